import Glibc
import Testing
import TernKVM
import TernMachine
@testable import TernMigration

/// Pre-copy's clears of the dirty log, on a real VM whose memory has two
/// slots: KVM takes a KVM_CLEAR_DIRTY_LOG only from a first page that is a
/// multiple of 64 and for a multiple of 64 pages, or up to the slot's end.
@Suite(.enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
struct DirtyLogRearmTests {
    static let pageSize = 4096
    /// Pages below the PCI hole (slot 0); slot 1 starts at 4 GiB with the memfd's next page.
    static let lowPages = (3 << 30) / pageSize

    /// 3 GiB + 1 MiB (sizes are whole MiB): slot 1 has 256 pages.
    func makeVM() throws -> (GuestMemory, VirtualMachine)? {
        let memory = try GuestMemory(size: (3 << 30) + (1 << 20))
        let vm = try Kvm().createVM()
        try memory.register(with: vm)
        guard try vm.enableManualDirtyLogProtection() else {
            Issue.record("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (Linux 5.3 and later have it)")
            return nil
        }
        for slot in memory.regions.indices { try vm.setDirtyLogging(slot: UInt32(slot), enabled: true) }
        return (memory, vm)
    }

    @Test func clearsRunsInBothSlotsUpToTheSecondSlotsEnd() throws {
        guard let (memory, vm) = try makeVM() else { return }
        #expect(memory.regions.count == 2 && memory.regions[1].size == 1 << 20)
        let rearm = DirtyLogRearm(memory: memory, vm: vm)
        rearm.setActive(true)
        #expect(rearm.isActive)
        let low = Self.lowPages
        // Across the slots' border, and to slot 1's last page: one call per slot, each accepted by KVM.
        try rearm.clear([(first: low - 3, count: 6), (first: low + 250, count: 6)])
        // Slot 0's first and last pages in one group (a bitmap spanning the whole slot).
        try rearm.clear([(first: 0, count: 1), (first: low - 1, count: 1)])
        // Slot 1 alone, from a page that is not a multiple of 64.
        try rearm.clear([(first: low + 70, count: 3)])
        #expect(try memory.collectDirtyPages(from: vm).count == 0, "no vCPU ran: nothing is dirty")
    }

    @Test func aClearMustLieInsideAnExistingSlot() throws {
        guard let (_, vm) = try makeVM() else { return }
        #expect(throws: SystemError.self) { try vm.clearDirtyLog(slot: 1, firstPage: 256, bitmap: [1]) }
        #expect(throws: SystemError.self) { try vm.clearDirtyLog(slot: 2, firstPage: 0, bitmap: [1]) }
        #expect(throws: SystemError.self) { try vm.clearDirtyLog(slot: 1, firstPage: 3, bitmap: [1]) }
        // Two words from page 192: KVM is asked for the 64 pages up to the slot's end, not 128.
        try vm.clearDirtyLog(slot: 1, firstPage: 192, bitmap: [1 << 63, 1])
    }

    @Test func inactiveWithoutManualProtection() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let vm = try Kvm().createVM()
        try memory.register(with: vm, logDirtyPages: true)
        let rearm = DirtyLogRearm(memory: memory, vm: vm)
        rearm.setActive(true)
        #expect(!rearm.isActive, "without manual protection a clear would be refused; reads reset the log instead")
    }
}
