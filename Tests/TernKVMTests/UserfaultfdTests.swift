import CKVM
import Foundation
import Glibc
import Testing
@testable import TernKVM

/// userfaultfd on memfd memory, first from a plain thread, then with KVM
/// itself faulting (the path post-copy migration depends on).
struct UserfaultfdTests {
    func memfd(_ size: Int) throws -> (Int32, HostMapping) {
        let fd = ckvm_memfd_create("uffd-test", CKVM_MFD_CLOEXEC)
        #expect(fd >= 0)
        #expect(ftruncate(fd, off_t(size)) == 0)
        return (fd, try HostMapping(length: size, fd: fd))
    }

    @Test func resolvesAThreadsFaultWithCopyAndZero() throws {
        let (fd, mapping) = try memfd(4 * 4096)
        defer { close(fd) }
        let uffd = try Userfaultfd()
        try uffd.registerMissing(mapping.base, length: mapping.length)
        let base = UInt(bitPattern: mapping.base)
        let result = ResultBox()
        let readerThread = ResultBox()
        let reader = Thread {
            readerThread.set(UInt64(ckvm_gettid()), 0)
            let pointer = UnsafeMutableRawPointer(bitPattern: base)!
            let first = pointer.load(fromByteOffset: 4096 + 8, as: UInt64.self)   // faults: page 1
            let second = pointer.load(fromByteOffset: 3 * 4096, as: UInt64.self)  // faults: page 3
            result.set(first, second)
        }
        reader.start()
        var resolved = 0
        let deadline = Date(timeIntervalSinceNow: 10)
        while resolved < 2 && Date() < deadline {
            for fault in try uffd.waitForFaults(timeoutMs: 100) {
                let page = (fault.address - UInt64(base)) / 4096
                #expect(UInt64(fault.threadID) == readerThread.get()?.0, "the fault names the thread that waits")
                let target = mapping.base + Int(page) * 4096
                if page == 1 {
                    var source = [UInt64](repeating: 0x1122_3344_5566_7788, count: 512)
                    #expect(try source.withUnsafeMutableBytes { try uffd.copy(to: target, from: $0.baseAddress!, length: 4096) } == .placed)
                } else {
                    #expect(try uffd.zero(target, length: 4096) == .placed)
                }
                resolved += 1
            }
        }
        while result.get() == nil && Date() < deadline { usleep(1000) }
        // A reader still blocked would touch the mapping after this test: keep it mapped for good.
        if result.get() == nil { _ = Unmanaged.passRetained(mapping) }
        #expect(result.get()?.0 == 0x1122_3344_5566_7788)
        #expect(result.get()?.1 == 0)
        // Placing a page that is already there is reported, not an error.
        var source = [UInt8](repeating: 1, count: 4096)
        #expect(try source.withUnsafeMutableBytes { try uffd.copy(to: mapping.base + 4096, from: $0.baseAddress!, length: 4096) } == .alreadyPresent)
    }

    /// Both kinds registered (post-copy into huge-page memory): a thread waiting on a hole is
    /// woken by writing the page into the file and mapping it, and mapping a hole is reported.
    @Test func resolvesAMissingFaultByWritingIntoTheFileAndContinuing() throws {
        let (fd, mapping) = try memfd(4 * 4096)
        defer { close(fd) }
        let uffd = try Userfaultfd(minorFaults: true)
        try uffd.register(mapping.base, length: mapping.length, modes: [.missing, .minor])
        #expect(try uffd.continueMapping(mapping.base + 3 * 4096, length: 4096) == .notInFile)
        let base = UInt(bitPattern: mapping.base)
        let result = ResultBox()
        let reader = Thread {
            let value = UnsafeMutableRawPointer(bitPattern: base)!.load(fromByteOffset: 2 * 4096, as: UInt64.self)
            result.set(value, 0)
        }
        reader.start()
        var faults: [Userfaultfd.Fault] = []
        let deadline = Date(timeIntervalSinceNow: 10)
        while faults.isEmpty && Date() < deadline { faults = try uffd.waitForFaults(timeoutMs: 100) }
        #expect(faults.map(\.address) == [UInt64(base) + 2 * 4096], "the reader waits on the hole at page 2")
        // Written where the reader cannot see it yet; it still waits until the page is mapped.
        let page = [UInt64](repeating: 0xA5A5_0000_1234_5678, count: 512)
        #expect(page.withUnsafeBytes { pwrite(fd, $0.baseAddress, 4096, 2 * 4096) } == 4096)
        usleep(20_000)
        #expect(result.get() == nil, "a page written into the file is not seen before it is mapped")
        #expect(try uffd.continueMapping(mapping.base + 2 * 4096, length: 4096) == .placed)
        while result.get() == nil && Date() < deadline { usleep(1000) }
        if result.get() == nil { _ = Unmanaged.passRetained(mapping) }
        #expect(result.get()?.0 == 0xA5A5_0000_1234_5678)
        #expect(try uffd.continueMapping(mapping.base + 2 * 4096, length: 4096) == .alreadyPresent)
    }

    @Test(.enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func resolvesAGuestsFault() throws {
        let size = 0x10000
        let (fd, mapping) = try memfd(size)
        defer { close(fd) }
        // The code page arrives before the guest runs (written into the memfd, not faulted);
        // the data page at 0x5000 is missing until the fault handler supplies it.
        // mov al,[0x5000] ; mov dx,0x80 ; out dx,al ; hlt
        let code: [UInt8] = [0xA0, 0x00, 0x50, 0xBA, 0x80, 0x00, 0xEE, 0xF4]
        _ = code.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0x1000) }
        let uffd = try Userfaultfd()
        try uffd.registerMissing(mapping.base, length: size)

        let kvm = try Kvm()
        let vm = try kvm.createVM()
        try vm.setMemoryRegion(slot: 0, guestAddress: 0, mapping: mapping, size: size)
        let vcpu = try vm.createVcpu(id: 0)
        try startInRealMode(vcpu, at: 0x1000)

        let output = ResultBox()
        let runner = Thread {
            if case .ioOut(_, _, _, let data)? = try? vcpu.run() { output.set(UInt64(data[0]), 0) }
        }
        runner.start()
        var faults: [UInt64] = []
        let deadline = Date(timeIntervalSinceNow: 10)
        while output.get() == nil && Date() < deadline {
            for fault in try uffd.waitForFaults(timeoutMs: 50) {
                let offset = Int((fault.address - UInt64(UInt(bitPattern: mapping.base))) / 4096 * 4096)
                faults.append(UInt64(offset))
                var page = [UInt8](repeating: offset == 0x5000 ? 0x5A : 0, count: 4096)
                _ = try page.withUnsafeMutableBytes { try uffd.copy(to: mapping.base + offset, from: $0.baseAddress!, length: 4096) }
            }
        }
        // A vCPU still waiting in the fault would touch the mapping after this test: keep it mapped for good.
        if output.get() == nil { _ = Unmanaged.passRetained(mapping) }
        #expect(output.get()?.0 == 0x5A, "the guest read the page the handler placed")
        #expect(faults.contains(0x5000))
    }
}

final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var value: (UInt64, UInt64)?
    func set(_ a: UInt64, _ b: UInt64) { lock.withLock { value = (a, b) } }
    func get() -> (UInt64, UInt64)? { lock.withLock { value } }
}
