import CKVM
import Glibc
import Synchronization

/// A KVM virtual machine (the VM fd): memory slots, vCPUs, the in-kernel
/// interrupt controllers and the VM-wide clock.
public final class VirtualMachine: Sendable {
    public let fd: FileDescriptor
    public let kvm: Kvm
    /// Mappings registered as memory slots, kept alive as long as the VM.
    private let registeredMappings = Mutex<[UInt32: MemorySlot]>([:])
    /// Whether KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on (VirtualMachine+DirtyLog.swift).
    let manualDirtyLogProtection = Atomic<Bool>(false)
    /// Eventfds registered as ioeventfds or irqfds: the kernel holds their file, but closing
    /// ours while registered would let the number be reused under it.
    private let registeredEventFDs = Mutex<[EventFD]>([])

    func retainEventFD(_ event: EventFD) { registeredEventFDs.withLock { $0.append(event) } }

    init(fd: FileDescriptor, kvm: Kvm) {
        self.fd = fd
        self.kvm = kvm
    }

    /// A guest-physical range backed by (part of) a host mapping.
    public struct MemorySlot: Sendable {
        public let slot: UInt32
        public let guestAddress: UInt64
        public let mapping: HostMapping
        public let mappingOffset: Int
        public let size: Int
        public var logsDirtyPages: Bool
    }

    /// KVM_SET_USER_MEMORY_REGION: exposes `size` bytes of `mapping` at
    /// `guestAddress`. The VM retains the mapping.
    public func setMemoryRegion(slot: UInt32, guestAddress: UInt64, mapping: HostMapping, mappingOffset: Int = 0,
                                size: Int, logDirtyPages: Bool = false) throws(SystemError) {
        guard mappingOffset >= 0, size > 0, mappingOffset + size <= mapping.length else {
            throw SystemError("KVM_SET_USER_MEMORY_REGION: slot \(slot) exceeds its mapping", errno: EINVAL)
        }
        let entry = MemorySlot(slot: slot, guestAddress: guestAddress, mapping: mapping, mappingOffset: mappingOffset,
                               size: size, logsDirtyPages: logDirtyPages)
        try apply(entry)
        registeredMappings.withLock { $0[slot] = entry }
    }

    /// Turns dirty-page logging on or off for a slot (re-registers it with
    /// KVM_MEM_LOG_DIRTY_PAGES; KVM starts with every page clean).
    public func setDirtyLogging(slot: UInt32, enabled: Bool) throws(SystemError) {
        guard var entry = registeredMappings.withLock({ $0[slot] }) else {
            throw SystemError("dirty logging: no memory slot \(slot)", errno: ENOENT)
        }
        entry.logsDirtyPages = enabled
        try apply(entry)
        registeredMappings.withLock { $0[slot] = entry }
    }

    public var memorySlots: [MemorySlot] {
        registeredMappings.withLock { Array($0.values).sorted { $0.slot < $1.slot } }
    }

    func memorySlot(_ slot: UInt32) -> MemorySlot? { registeredMappings.withLock { $0[slot] } }

    private func apply(_ entry: MemorySlot) throws(SystemError) {
        var region = kvm_userspace_memory_region()
        region.slot = entry.slot
        region.flags = entry.logsDirtyPages ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0
        region.guest_phys_addr = entry.guestAddress
        region.memory_size = UInt64(entry.size)
        region.userspace_addr = UInt64(UInt(bitPattern: entry.mapping.base + entry.mappingOffset))
        _ = try check("KVM_SET_USER_MEMORY_REGION slot \(entry.slot)") {
            ckvm_ioctl_ptr(fd.rawValue, CKVM_SET_USER_MEMORY_REGION, &region)
        }
    }

    /// KVM_SET_TSS_ADDR: three pages below 4 GiB that Intel's real-mode
    /// emulation needs; harmless elsewhere. Must not overlap guest RAM.
    public func setTSSAddress(_ address: UInt64) throws(SystemError) {
        _ = try check("KVM_SET_TSS_ADDR") { ckvm_ioctl_val(fd.rawValue, CKVM_SET_TSS_ADDR, UInt(address)) }
    }

    public func setIdentityMapAddress(_ address: UInt64) throws(SystemError) {
        var value = address
        _ = try check("KVM_SET_IDENTITY_MAP_ADDR") { ckvm_ioctl_ptr(fd.rawValue, CKVM_SET_IDENTITY_MAP_ADDR, &value) }
    }

    /// KVM_CREATE_IRQCHIP: in-kernel PICs, IOAPIC and a LAPIC per vCPU
    /// (created before any vCPU).
    public func createIRQChip() throws(SystemError) {
        _ = try check("KVM_CREATE_IRQCHIP") { ckvm_ioctl_val(fd.rawValue, CKVM_CREATE_IRQCHIP, 0) }
    }

    /// KVM_CREATE_PIT2: the in-kernel i8254 (ports 0x40-0x43 and 0x61).
    public func createPIT2() throws(SystemError) {
        var config = kvm_pit_config()
        config.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)
        _ = try check("KVM_CREATE_PIT2") { ckvm_ioctl_ptr(fd.rawValue, CKVM_CREATE_PIT2, &config) }
    }

    /// KVM_IRQ_LINE: drive an interrupt line of the in-kernel irqchip.
    public func setIRQLine(_ irq: UInt32, level: Bool) throws(SystemError) {
        var line = kvm_irq_level()
        line.irq = irq
        line.level = level ? 1 : 0
        _ = try check("KVM_IRQ_LINE \(irq)") { ckvm_ioctl_ptr(fd.rawValue, CKVM_IRQ_LINE, &line) }
    }

    public func createVcpu(id: UInt32) throws(SystemError) -> Vcpu {
        let vcpufd = try check("KVM_CREATE_VCPU \(id)") { ckvm_ioctl_val(fd.rawValue, CKVM_CREATE_VCPU, UInt(id)) }
        let descriptor = FileDescriptor(adopting: vcpufd)
        let size = try kvm.vcpuMmapSize()
        let run = try HostMapping(length: size, fd: vcpufd)
        return Vcpu(id: id, fd: descriptor, runArea: run, vm: self)
    }

    // MARK: VM-wide device state (for snapshots and migration)

    /// KVM_GET_IRQCHIP for chip 0 (PIC master), 1 (PIC slave) or 2 (IOAPIC).
    public func irqchip(_ chipID: UInt32) throws(SystemError) -> kvm_irqchip {
        var chip = kvm_irqchip()
        chip.chip_id = chipID
        try get(CKVM_GET_IRQCHIP, "KVM_GET_IRQCHIP \(chipID)", into: &chip)
        return chip
    }

    public func setIRQChip(_ chip: kvm_irqchip) throws(SystemError) {
        try set(CKVM_SET_IRQCHIP, "KVM_SET_IRQCHIP \(chip.chip_id)", chip)
    }

    public func pit2() throws(SystemError) -> kvm_pit_state2 {
        var state = kvm_pit_state2()
        try get(CKVM_GET_PIT2, "KVM_GET_PIT2", into: &state)
        return state
    }

    public func setPIT2(_ state: kvm_pit_state2) throws(SystemError) {
        try set(CKVM_SET_PIT2, "KVM_SET_PIT2", state)
    }

    public func clock() throws(SystemError) -> kvm_clock_data {
        var data = kvm_clock_data()
        try get(CKVM_GET_CLOCK, "KVM_GET_CLOCK", into: &data)
        return data
    }

    public func setClock(_ data: kvm_clock_data) throws(SystemError) {
        try set(CKVM_SET_CLOCK, "KVM_SET_CLOCK", data)
    }

    private func get<T>(_ request: UInt, _ name: String, into value: inout T) throws(SystemError) {
        let buffer = UnsafeMutablePointer<T>.allocate(capacity: 1)
        defer { buffer.deinitialize(count: 1); buffer.deallocate() }
        buffer.initialize(to: value)
        _ = try check(name) { ckvm_ioctl_ptr(fd.rawValue, request, buffer) }
        value = buffer.pointee
    }

    private func set<T>(_ request: UInt, _ name: String, _ value: T) throws(SystemError) {
        var copy = value
        try get(request, name, into: &copy)
    }
}
