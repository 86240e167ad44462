import Foundation
import TernKVM

/// How fast the guest writes its memory, measured as QEMU's `calc-dirty-rate`
/// does with the dirty log: logging is turned on for a window, the pages the log
/// then names are counted, and logging is turned off again. The caller makes sure
/// no migration uses the log meanwhile.
public struct DirtyRateSample: Codable, Equatable, Sendable {
    public var pages: UInt64
    public var windowMs: Double
    public var pagesPerSecond: Double
    public var bytesPerSecond: Double

    public static let windowRange: ClosedRange<Int> = 10...5000

    public static func measure(_ vm: VirtualMachine, windowMs: Int) throws -> DirtyRateSample {
        let slots = vm.memorySlots
        // Logging starts with every page clean (a slot re-registered with KVM_MEM_LOG_DIRTY_PAGES).
        for slot in slots { try vm.setDirtyLogging(slot: slot.slot, enabled: true) }
        let started = ContinuousClock.now
        var pages: UInt64 = 0
        do {
            usleep(useconds_t(windowMs * 1000))
            for slot in slots {
                pages += try vm.dirtyLog(slot: slot.slot).reduce(0) { $0 + UInt64($1.nonzeroBitCount) }
            }
        } catch {
            for slot in slots { try? vm.setDirtyLogging(slot: slot.slot, enabled: false) }
            throw error
        }
        let elapsed = ContinuousClock.now - started
        for slot in slots { try vm.setDirtyLogging(slot: slot.slot, enabled: false) }
        let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        return DirtyRateSample(pages: pages, windowMs: seconds * 1000, pagesPerSecond: Double(pages) / seconds,
                               bytesPerSecond: Double(pages) * 4096 / seconds)
    }
}
