import CKVM
import Glibc

/// An eventfd(2): a counter the kernel can signal (ioeventfd: a guest's write
/// to a device register) and be signalled through (irqfd: an interrupt), with
/// no exit to user space on either path.
public final class EventFD: Sendable {
    public let fd: FileDescriptor

    /// Non-blocking, so a `consume` that finds nothing returns instead of waiting: callers wait in poll(2).
    public init() throws(SystemError) {
        let raw = try check("eventfd") { eventfd(0, CKVM_EFD_CLOEXEC | CKVM_EFD_NONBLOCK) }
        fd = FileDescriptor(adopting: raw)
    }

    /// Adds one to the counter (wakes a poller, or injects the irqfd's interrupt).
    public func signal() {
        var one: UInt64 = 1
        // Only EAGAIN (the counter at its maximum, already signalled) can fail here: nothing to do then.
        _ = withUnsafeBytes(of: &one) { Glibc.write(fd.rawValue, $0.baseAddress, 8) }
    }

    /// Reads and resets the counter: how many signals arrived since the last call (0 if none).
    @discardableResult
    public func consume() -> UInt64 {
        var value: UInt64 = 0
        let count = withUnsafeMutableBytes(of: &value) { Glibc.read(fd.rawValue, $0.baseAddress, 8) }
        return count == 8 ? value : 0
    }

    /// Waits until one of `events` is signalled or `timeoutMs` passes (-1: forever); the indices of those signalled.
    public static func wait(_ events: [EventFD], timeoutMs: Int32) -> [Int] {
        var fds = events.map { pollfd(fd: $0.fd.rawValue, events: Int16(POLLIN), revents: 0) }
        let ready = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), timeoutMs) }
        guard ready > 0 else { return [] }
        return fds.indices.filter { fds[$0].revents & Int16(POLLIN) != 0 }
    }
}

extension VirtualMachine {
    /// KVM_IOEVENTFD: a guest write of `length` bytes to the MMIO address `address` (with the value
    /// `match`, if given) signals `event` inside the kernel instead of exiting to the vCPU's thread.
    /// The VM keeps `event` alive as long as it is registered.
    public func registerIoEventFD(_ event: EventFD, mmioAddress address: UInt64, length: UInt32,
                                  match: UInt64? = nil) throws(SystemError) {
        var request = kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = event.fd.rawValue
        if let match {
            request.datamatch = match
            request.flags = CKVM_IOEVENTFD_FLAG_DATAMATCH
        }
        _ = try check("KVM_IOEVENTFD at 0x\(String(address, radix: 16))") {
            ckvm_ioctl_ptr(fd.rawValue, CKVM_IOEVENTFD, &request)
        }
        retainEventFD(event)
    }

    /// KVM_IRQFD: signalling `event` raises (edge-triggers) the irqchip's line `gsi`.
    public func registerIrqFD(_ event: EventFD, gsi: UInt32) throws(SystemError) {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: event.fd.rawValue)
        request.gsi = gsi
        _ = try check("KVM_IRQFD gsi \(gsi)") { ckvm_ioctl_ptr(fd.rawValue, CKVM_IRQFD, &request) }
        retainEventFD(event)
    }
}
