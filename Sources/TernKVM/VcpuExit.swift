/// Why KVM_RUN returned, with the data the VMM needs to act on it.
///
/// The raw pointers of the I/O and MMIO cases point into the vCPU's shared
/// kvm_run area: read or fill them before the next `run()` of the same vCPU.
public enum VcpuExit {
    /// `in`/`ins`: fill `count` items of `size` bytes at `data` with the device's reply.
    case ioIn(port: UInt16, size: Int, count: Int, data: UnsafeMutableRawBufferPointer)
    /// `out`/`outs`: `count` items of `size` bytes the guest wrote.
    case ioOut(port: UInt16, size: Int, count: Int, data: UnsafeRawBufferPointer)
    case mmioRead(address: UInt64, data: UnsafeMutableRawBufferPointer)
    case mmioWrite(address: UInt64, data: UnsafeRawBufferPointer)
    /// HLT reached userspace (only without an in-kernel LAPIC).
    case halt
    /// Triple fault or an explicit shutdown: the guest cannot continue.
    case shutdown
    /// KVM_RUN was interrupted by a signal or immediate_exit: a chance to
    /// look at pause/stop requests. Not an error.
    case interrupted
    /// The hardware (or PVM) refused to enter the guest.
    case failEntry(hardwareReason: UInt64, cpu: UInt32)
    /// KVM could not handle something, e.g. an instruction it cannot emulate.
    case internalError(suberror: UInt32, data: [UInt64])
    /// KVM_SYSTEM_EVENT_SHUTDOWN (1), _RESET (2), _CRASH (3), ...
    case systemEvent(type: UInt32)
    case debug
    case exception(vector: UInt32, errorCode: UInt32)
    case unknown(reason: UInt32)
}

extension VcpuExit {
    /// A short name for logs and error messages.
    public var name: String {
        switch self {
        case .ioIn: "io-in"
        case .ioOut: "io-out"
        case .mmioRead: "mmio-read"
        case .mmioWrite: "mmio-write"
        case .halt: "hlt"
        case .shutdown: "shutdown (triple fault)"
        case .interrupted: "interrupted"
        case .failEntry(let reason, _): "failed entry (hardware reason 0x\(String(reason, radix: 16)))"
        case .internalError(let suberror, _): "KVM internal error (suberror \(suberror)\(suberror == 1 ? ": emulation failure" : ""))"
        case .systemEvent(let type): "system event \(type)"
        case .debug: "debug"
        case .exception(let vector, _): "exception \(vector)"
        case .unknown(let reason): "unknown exit \(reason)"
        }
    }
}
