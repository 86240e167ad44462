import Synchronization
import TernKVM
import TernMachine
import TernWire

/// Clears KVM's dirty-log bits of pages just before a pre-copy round copies
/// them (KVM_CLEAR_DIRTY_LOG, with manual protection on).
///
/// Without it a round re-sends every page the guest wrote since the last read
/// of the log, including the pages it wrote before this round copied them,
/// whose copy already held the write. A round takes the time its pages take
/// to send, so in a guest that writes its working set at random that is most
/// of the set: a page cleared as it is copied comes back only if the guest
/// writes it after the copy. Pages are cleared a group at a time (one ioctl
/// per group and slot), since each call that clears anything flushes the
/// vCPUs' TLBs.
///
/// Safe because a page is cleared before it is copied: a write before the
/// clear is in the copy, and a write after it sets the bit again.
final class DirtyLogRearm: Sendable {
    /// Pages per group: one ioctl each, and at most this many pages between a clear and its copy.
    static let groupPages = 512

    private let memory: GuestMemory
    private let vm: VirtualMachine
    /// Off while the VM is paused (nothing can write between a clear and a copy, so the ioctls would be
    /// downtime for nothing) and when this KVM has no manual protection.
    private let active = Atomic<Bool>(false)

    init(memory: GuestMemory, vm: VirtualMachine) {
        self.memory = memory
        self.vm = vm
    }

    /// Turns clearing on (when the VM has manual protection) or off.
    func setActive(_ on: Bool) { active.store(on && vm.hasManualDirtyLogProtection, ordering: .releasing) }

    var isActive: Bool { active.load(ordering: .acquiring) }

    /// Clears the bits of these memfd page runs, in one call per slot they touch.
    func clear(_ runs: [(first: Int, count: Int)]) throws {
        for (slot, region) in memory.regions.enumerated() {
            let regionFirst = Int(region.fileOffset / UInt64(PageRun.pageSize))
            let regionEnd = regionFirst + Int(region.size / UInt64(PageRun.pageSize))
            var low = Int.max, high = Int.min
            for run in runs {
                let first = max(run.first, regionFirst), end = min(run.first + run.count, regionEnd)
                guard first < end else { continue }
                low = min(low, first - regionFirst)
                high = max(high, end - regionFirst)
            }
            guard low < high else { continue }
            let base = low / 64 * 64
            var bits = PageSet(pageCount: high - base)
            for run in runs {
                let first = max(run.first, regionFirst), end = min(run.first + run.count, regionEnd)
                if first < end { bits.insert(range: first - regionFirst - base..<end - regionFirst - base) }
            }
            try vm.clearDirtyLog(slot: UInt32(slot), firstPage: base, bitmap: bits.words)
        }
    }
}
