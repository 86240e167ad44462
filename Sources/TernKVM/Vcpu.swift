import CKVM
import Glibc

/// One virtual CPU (the vCPU fd and its shared kvm_run area).
///
/// A vCPU is driven by one thread at a time: KVM serialises vCPU ioctls, and
/// the state getters below must be called only while the vCPU is not inside
/// `run()` (the machine layer enforces this by pausing first).
public final class Vcpu: @unchecked Sendable {
    // Sendable: the fd and mapping are immutable; the kvm_run area is touched
    // only by the thread that owns the vCPU, except `requestImmediateExit`,
    // which is the documented cross-thread handshake (a single byte store).
    public let id: UInt32
    public let fd: FileDescriptor
    private let runArea: HostMapping
    /// Held strongly: the guest memory a vCPU runs on belongs to its VM.
    public let vm: VirtualMachine

    init(id: UInt32, fd: FileDescriptor, runArea: HostMapping, vm: VirtualMachine) {
        self.id = id
        self.fd = fd
        self.runArea = runArea
        self.vm = vm
    }

    private var shared: UnsafeMutablePointer<kvm_run> {
        runArea.base.assumingMemoryBound(to: kvm_run.self)
    }

    /// Sets kvm_run.immediate_exit: the next (or current, after a signal)
    /// KVM_RUN returns EINTR at once instead of entering the guest.
    public func setImmediateExit(_ on: Bool) {
        shared.pointee.immediate_exit = on ? 1 : 0
    }

    /// KVM_RUN until the next exit that needs userspace.
    public func run() throws(SystemError) -> VcpuExit {
        let result = ckvm_ioctl_val(fd.rawValue, CKVM_RUN, 0)
        if result == -1 {
            let error = errno
            // EINTR: a signal kicked us out (pause/stop). EAGAIN: ditto on some kernels.
            if error == EINTR || error == EAGAIN { return .interrupted }
            throw SystemError("KVM_RUN vcpu \(id)", errno: error)
        }
        return decodeExit()
    }

    private func decodeExit() -> VcpuExit {
        let r = shared
        switch Int32(r.pointee.exit_reason) {
        case KVM_EXIT_IO:
            let io = r.pointee.io
            let size = Int(io.size), count = Int(io.count)
            let data = runArea.base + Int(io.data_offset)
            if io.direction == UInt8(KVM_EXIT_IO_IN) {
                return .ioIn(port: io.port, size: size, count: count,
                             data: UnsafeMutableRawBufferPointer(start: data, count: size * count))
            }
            return .ioOut(port: io.port, size: size, count: count,
                          data: UnsafeRawBufferPointer(start: data, count: size * count))
        case KVM_EXIT_MMIO:
            let length = Int(min(r.pointee.mmio.len, 8))
            let address = r.pointee.mmio.phys_addr
            // The data bytes live inside kvm_run itself; take their address there.
            let data = runArea.base + ckvm_run_mmio_data_offset()
            if r.pointee.mmio.is_write != 0 {
                return .mmioWrite(address: address, data: UnsafeRawBufferPointer(start: data, count: length))
            }
            return .mmioRead(address: address, data: UnsafeMutableRawBufferPointer(start: data, count: length))
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_INTR:
            return .interrupted
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(hardwareReason: r.pointee.fail_entry.hardware_entry_failure_reason,
                              cpu: r.pointee.fail_entry.cpu)
        case KVM_EXIT_INTERNAL_ERROR:
            let failure = r.pointee.`internal`
            let count = Int(min(failure.ndata, 16))
            let data = withUnsafeBytes(of: failure.data) { Array($0.bindMemory(to: UInt64.self).prefix(count)) }
            return .internalError(suberror: failure.suberror, data: data)
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: r.pointee.system_event.type)
        case KVM_EXIT_DEBUG:
            return .debug
        case KVM_EXIT_EXCEPTION:
            return .exception(vector: r.pointee.ex.exception, errorCode: r.pointee.ex.error_code)
        default:
            return .unknown(reason: r.pointee.exit_reason)
        }
    }

    // MARK: Registers and state. Call only while the vCPU is not running.

    public func registers() throws(SystemError) -> kvm_regs { try get(CKVM_GET_REGS, "KVM_GET_REGS") }
    public func setRegisters(_ regs: kvm_regs) throws(SystemError) { try set(CKVM_SET_REGS, "KVM_SET_REGS", regs) }
    public func specialRegisters() throws(SystemError) -> kvm_sregs { try get(CKVM_GET_SREGS, "KVM_GET_SREGS") }
    public func setSpecialRegisters(_ sregs: kvm_sregs) throws(SystemError) { try set(CKVM_SET_SREGS, "KVM_SET_SREGS", sregs) }
    public func fpu() throws(SystemError) -> kvm_fpu { try get(CKVM_GET_FPU, "KVM_GET_FPU") }
    public func setFPU(_ fpu: kvm_fpu) throws(SystemError) { try set(CKVM_SET_FPU, "KVM_SET_FPU", fpu) }
    public func lapic() throws(SystemError) -> kvm_lapic_state { try get(CKVM_GET_LAPIC, "KVM_GET_LAPIC") }
    public func setLAPIC(_ lapic: kvm_lapic_state) throws(SystemError) { try set(CKVM_SET_LAPIC, "KVM_SET_LAPIC", lapic) }
    public func xsave() throws(SystemError) -> kvm_xsave { try get(CKVM_GET_XSAVE, "KVM_GET_XSAVE") }
    public func setXSave(_ xsave: kvm_xsave) throws(SystemError) { try set(CKVM_SET_XSAVE, "KVM_SET_XSAVE", xsave) }
    public func xcrs() throws(SystemError) -> kvm_xcrs { try get(CKVM_GET_XCRS, "KVM_GET_XCRS") }
    public func setXCRs(_ xcrs: kvm_xcrs) throws(SystemError) { try set(CKVM_SET_XCRS, "KVM_SET_XCRS", xcrs) }
    public func events() throws(SystemError) -> kvm_vcpu_events { try get(CKVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS") }
    public func setEvents(_ events: kvm_vcpu_events) throws(SystemError) { try set(CKVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", events) }
    public func mpState() throws(SystemError) -> kvm_mp_state { try get(CKVM_GET_MP_STATE, "KVM_GET_MP_STATE") }
    public func setMPState(_ state: kvm_mp_state) throws(SystemError) { try set(CKVM_SET_MP_STATE, "KVM_SET_MP_STATE", state) }
    public func debugRegisters() throws(SystemError) -> kvm_debugregs { try get(CKVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS") }
    public func setDebugRegisters(_ regs: kvm_debugregs) throws(SystemError) { try set(CKVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS", regs) }

    /// KVM_GET_TSC_KHZ: the guest TSC frequency of this vCPU.
    public func tscKHz() throws(SystemError) -> UInt32 {
        UInt32(try check("KVM_GET_TSC_KHZ") { ckvm_ioctl_val(fd.rawValue, CKVM_GET_TSC_KHZ, 0) })
    }

    /// KVM_SET_TSC_KHZ: scale the guest TSC to a frequency (a VM moved from a host with another TSC rate).
    public func setTSCKHz(_ khz: UInt32) throws(SystemError) {
        _ = try check("KVM_SET_TSC_KHZ") { ckvm_ioctl_val(fd.rawValue, CKVM_SET_TSC_KHZ, UInt(khz)) }
    }

    /// KVM_SET_CPUID2: what CPUID reports inside the guest.
    public func setCPUID(_ entries: [CPUIDEntry]) throws(SystemError) {
        let size = ckvm_cpuid2_size(UInt32(entries.count))
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        let cpuid = raw.assumingMemoryBound(to: kvm_cpuid2.self)
        cpuid.pointee.nent = UInt32(entries.count)
        let slots = ckvm_cpuid2_entries(cpuid)!
        for (i, entry) in entries.enumerated() { slots[i] = entry.raw }
        _ = try check("KVM_SET_CPUID2") { ckvm_ioctl_ptr(fd.rawValue, CKVM_SET_CPUID2, raw) }
    }

    /// KVM_GET_MSRS for the given indices. KVM stops at the first MSR it cannot
    /// read; the result holds only the ones it read, in order.
    public func msrs(_ indices: [UInt32]) throws(SystemError) -> [(index: UInt32, value: UInt64)] {
        try withMSRBuffer(indices.map { ($0, 0) }) { (buffer, entries) throws(SystemError) in
            let read = try check("KVM_GET_MSRS") { ckvm_ioctl_ptr(fd.rawValue, CKVM_GET_MSRS, buffer) }
            return (0..<Int(read)).map { (entries[$0].index, entries[$0].data) }
        }
    }

    /// KVM_SET_MSRS; throws unless every MSR was accepted.
    public func setMSRs(_ values: [(index: UInt32, value: UInt64)]) throws(SystemError) {
        try withMSRBuffer(values) { (buffer, entries) throws(SystemError) in
            let written = try check("KVM_SET_MSRS") { ckvm_ioctl_ptr(fd.rawValue, CKVM_SET_MSRS, buffer) }
            if Int(written) != values.count {
                let rejected = values[Int(written)].index
                throw SystemError("KVM_SET_MSRS rejected MSR 0x\(String(rejected, radix: 16))", errno: EINVAL)
            }
        }
    }

    private func withMSRBuffer<R>(_ values: [(index: UInt32, value: UInt64)],
                                  _ body: (UnsafeMutableRawPointer, UnsafeMutablePointer<kvm_msr_entry>) throws(SystemError) -> R) throws(SystemError) -> R {
        let size = ckvm_msrs_size(UInt32(values.count))
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        let msrs = raw.assumingMemoryBound(to: kvm_msrs.self)
        msrs.pointee.nmsrs = UInt32(values.count)
        let entries = ckvm_msrs_entries(msrs)!
        for (i, v) in values.enumerated() {
            entries[i].index = v.index
            entries[i].data = v.value
        }
        return try body(raw, entries)
    }

    private func get<T>(_ request: UInt, _ name: String) throws(SystemError) -> T {
        let value = UnsafeMutablePointer<T>.allocate(capacity: 1)
        defer { value.deallocate() }
        UnsafeMutableRawPointer(value).initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T>.size)
        _ = try check("\(name) vcpu \(id)") { ckvm_ioctl_ptr(fd.rawValue, request, value) }
        return value.pointee
    }

    private func set<T>(_ request: UInt, _ name: String, _ state: T) throws(SystemError) {
        let copy = UnsafeMutablePointer<T>.allocate(capacity: 1)
        defer { copy.deinitialize(count: 1); copy.deallocate() }
        copy.initialize(to: state)
        _ = try check("\(name) vcpu \(id)") { ckvm_ioctl_ptr(fd.rawValue, request, copy) }
    }
}
