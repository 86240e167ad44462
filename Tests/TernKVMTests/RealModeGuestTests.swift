import CKVM
import Glibc
import Testing
@testable import TernKVM

/// Tiny hand-assembled guests on the real /dev/kvm, exercising the wrappers
/// end to end (the style of hypervisor-kit's tests).
@Suite(.enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs read/write access to /dev/kvm"))
struct RealModeGuestTests {
    /// A VM with one slot of `size` bytes at GPA 0 and `code` at 0x1000, one vCPU in real mode at 0:0x1000.
    func makeGuest(_ code: [UInt8], size: Int = 0x10000, irqchip: Bool = false) throws -> (Kvm, VirtualMachine, Vcpu, HostMapping) {
        let kvm = try Kvm()
        let vm = try kvm.createVM()
        let memory = try HostMapping(length: size)
        memory.base.advanced(by: 0x1000).copyMemory(from: code, byteCount: code.count)
        try vm.setMemoryRegion(slot: 0, guestAddress: 0, mapping: memory, size: size)
        if irqchip { try vm.createIRQChip() }
        let vcpu = try vm.createVcpu(id: 0)
        try startInRealMode(vcpu, at: 0x1000)
        return (kvm, vm, vcpu, memory)
    }

    @Test func portOutputThenHalt() throws {
        // mov dx,0x3f8 ; mov al,0x42 ; out dx,al ; hlt
        let (_, _, vcpu, _) = try makeGuest([0xBA, 0xF8, 0x03, 0xB0, 0x42, 0xEE, 0xF4])
        let exit = try vcpu.run()
        guard case .ioOut(let port, let size, let count, let data) = exit else {
            Issue.record("expected an io-out exit, got \(exit.name)"); return
        }
        #expect(port == 0x3F8)
        #expect(size == 1 && count == 1)
        #expect(data[0] == 0x42)
        guard case .halt = try vcpu.run() else { Issue.record("expected hlt"); return }
        #expect(try vcpu.registers().rip == 0x1007)
    }

    @Test func portInputReplyReachesTheGuest() throws {
        // mov dx,0x60 ; in al,dx ; mov [0x2000],al ; hlt
        let (_, _, vcpu, memory) = try makeGuest([0xBA, 0x60, 0x00, 0xEC, 0xA2, 0x00, 0x20, 0xF4])
        guard case .ioIn(let port, _, _, let data) = try vcpu.run() else { Issue.record("expected io-in"); return }
        #expect(port == 0x60)
        data[0] = 0x5A
        guard case .halt = try vcpu.run() else { Issue.record("expected hlt"); return }
        #expect(memory.base.load(fromByteOffset: 0x2000, as: UInt8.self) == 0x5A)
    }

    @Test func mmioWriteAndReadOutsideMemory() throws {
        // mov ax,0x2000 ; mov ds,ax ; mov byte [0x10],0x42 ; mov al,[0x20] ; out 0x80,al ; hlt
        // (0x20010 and 0x20020 lie beyond the 64 KiB slot: MMIO exits)
        let (_, _, vcpu, _) = try makeGuest([0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xC6, 0x06, 0x10, 0x00, 0x42,
                                             0xA0, 0x20, 0x00, 0xE6, 0x80, 0xF4])
        guard case .mmioWrite(let address, let written) = try vcpu.run() else { Issue.record("expected an MMIO write"); return }
        #expect(address == 0x20010)
        #expect(Array(written) == [0x42])
        guard case .mmioRead(let readAddress, let reply) = try vcpu.run() else { Issue.record("expected an MMIO read"); return }
        #expect(readAddress == 0x20020)
        #expect(reply.count == 1)
        reply[0] = 0x5A
        guard case .ioOut(let port, _, _, let data) = try vcpu.run() else { Issue.record("expected io-out"); return }
        #expect(port == 0x80)
        #expect(data[0] == 0x5A, "the guest read the byte the MMIO reply supplied")
    }

    @Test func dirtyLogReportsWrittenPages() throws {
        // mov byte [0x3000],1 ; mov byte [0x5000],1 ; hlt
        let (_, vm, vcpu, _) = try makeGuest([0xC6, 0x06, 0x00, 0x30, 0x01, 0xC6, 0x06, 0x00, 0x50, 0x01, 0xF4])
        try vm.setDirtyLogging(slot: 0, enabled: true)
        guard case .halt = try vcpu.run() else { Issue.record("expected hlt"); return }
        let bitmap = try vm.dirtyLog(slot: 0)
        let dirty = (0..<16).filter { bitmap[0] & (1 << UInt64($0)) != 0 }
        #expect(dirty.contains(3))
        #expect(dirty.contains(5))
        #expect(!dirty.contains(7))
        // The log resets on read.
        #expect(try vm.dirtyLog(slot: 0)[0] & (1 << 3) == 0)
    }

    @Test func clearingADirtyBitForgetsEarlierWritesAndCatchesLaterOnes() throws {
        // mov byte [0x3000],1 ; mov byte [0x5000],1 ; hlt ; mov byte [0x3000],2 ; hlt
        let (kvm, vm, vcpu, _) = try makeGuest([0xC6, 0x06, 0x00, 0x30, 0x01, 0xC6, 0x06, 0x00, 0x50, 0x01, 0xF4,
                                                0xC6, 0x06, 0x00, 0x30, 0x02, 0xF4])
        guard kvm.checkExtension(.manualDirtyLogProtect2) & 1 != 0 else {
            Issue.record("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (Linux 5.3 and later have it)"); return
        }
        #expect(try vm.enableManualDirtyLogProtection())
        try vm.setDirtyLogging(slot: 0, enabled: true)
        guard case .halt = try vcpu.run() else { Issue.record("expected hlt"); return }
        // Page 3 is about to be copied: its bit goes, page 5's stays.
        try vm.clearDirtyLog(slot: 0, firstPage: 0, bitmap: [1 << 3])
        let afterClear = try vm.dirtyLog(slot: 0)[0]
        #expect(afterClear & (1 << 3) == 0, "a write before the clear is not reported")
        #expect(afterClear & (1 << 5) != 0)
        // The clear protected page 3 again, and reading reset page 5: only the second write to page 3 shows.
        guard case .halt = try vcpu.run() else { Issue.record("expected the second hlt"); return }
        let afterWrite = try vm.dirtyLog(slot: 0)[0]
        #expect(afterWrite & (1 << 3) != 0, "a write after the clear is reported")
        #expect(afterWrite & (1 << 5) == 0, "with manual protection a read still resets the log")
        #expect(throws: SystemError.self) { try vm.clearDirtyLog(slot: 0, firstPage: 3, bitmap: [1]) }
    }

    @Test func immediateExitInterruptsRun() throws {
        // jmp $ (spins forever)
        let (_, _, vcpu, _) = try makeGuest([0xEB, 0xFE])
        vcpu.setImmediateExit(true)
        guard case .interrupted = try vcpu.run() else { Issue.record("expected interrupted"); return }
    }

    @Test func capabilitiesAndCPUID() throws {
        let kvm = try Kvm()
        #expect(kvm.checkExtension(.userMemory) > 0)
        #expect(kvm.checkExtension(.irqchip) > 0)
        let cpuid = try kvm.supportedCPUID()
        #expect(cpuid.contains { $0.function == 0 })
        #expect(cpuid.contains { $0.function == 1 })
        let msrs = try kvm.msrIndexList()
        #expect(msrs.contains(0x10)) // IA32_TSC
    }

    @Test func missingDeviceIsAClearError() {
        #expect(throws: SystemError.self) { try Kvm(path: "/nonexistent/kvm") }
        do { _ = try Kvm(path: "/nonexistent/kvm") } catch {
            #expect(error.description.contains("No such file"))
        }
    }
}

/// Points a fresh vCPU at real-mode code at `address` (CS base 0).
func startInRealMode(_ vcpu: Vcpu, at address: UInt64) throws {
    var sregs = try vcpu.specialRegisters()
    sregs.cs.base = 0
    sregs.cs.selector = 0
    try vcpu.setSpecialRegisters(sregs)
    var regs = kvm_regs()
    regs.rip = address
    regs.rflags = 0x2
    try vcpu.setRegisters(regs)
}
