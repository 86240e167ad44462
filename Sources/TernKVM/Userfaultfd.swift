import CKVM
import Glibc

/// A userfaultfd: lets this process resolve page faults on registered memory
/// itself — KVM's accesses to guest memory included — by placing pages
/// atomically (UFFDIO_COPY / UFFDIO_ZEROPAGE). Post-copy migration runs on it.
public final class Userfaultfd: @unchecked Sendable {
    // Sendable: the fd is immutable; the kernel serialises the ioctls.
    public let fd: FileDescriptor

    /// A fault waiting to be resolved: the faulting address, whether it was a write,
    /// and the thread that waits (UFFD_FEATURE_THREAD_ID).
    public struct Fault: Equatable, Sendable {
        public var address: UInt64
        public var isWrite: Bool
        public var threadID: Int32
    }

    /// Opens a userfaultfd (non-blocking, so a reader can poll it alongside a stop signal)
    /// and negotiates the API, requiring missing-page faults on shared memory (memfd),
    /// and with `minorFaults` also minor faults on it (pages in the file but not mapped).
    /// Every fault names its thread, so a caller can tell which threads wait on it.
    public init(minorFaults: Bool = false) throws(SystemError) {
        let raw = try check("userfaultfd") { ckvm_userfaultfd(O_CLOEXEC | O_NONBLOCK) }
        fd = FileDescriptor(adopting: raw)
        var api = uffdio_api()
        api.api = UInt64(UFFD_API)
        api.features = UInt64(UFFD_FEATURE_MISSING_SHMEM) | UInt64(UFFD_FEATURE_THREAD_ID)
            | (minorFaults ? UInt64(UFFD_FEATURE_MINOR_SHMEM) : 0)
        _ = try check("UFFDIO_API") { ckvm_ioctl_ptr(raw, CKVM_UFFDIO_API, &api) }
    }

    /// Whether this kernel gives minor faults on shared memory (Linux 5.14 and later), which
    /// post-copy into huge pages or preallocated memory depends on.
    public static let minorFaultsAvailable: Bool = (try? Userfaultfd(minorFaults: true)) != nil

    /// Which faults a registered range reports.
    public struct Modes: OptionSet, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        /// An access to a page the file does not hold (a hole) waits until a page is placed there.
        public static let missing = Modes(rawValue: UInt64(UFFDIO_REGISTER_MODE_MISSING))
        /// An access to a page the file holds but the mapping does not map waits until `continueMapping` maps it.
        public static let minor = Modes(rawValue: UInt64(UFFDIO_REGISTER_MODE_MINOR))
    }

    /// Registers [start, start + length) for missing-page faults.
    public func registerMissing(_ start: UnsafeMutableRawPointer, length: Int) throws(SystemError) {
        try register(start, length: length, modes: .missing)
    }

    /// Registers [start, start + length) for the faults `modes` names (both at once: a range
    /// with holes whose pages are written into the file before they are mapped).
    public func register(_ start: UnsafeMutableRawPointer, length: Int, modes: Modes) throws(SystemError) {
        var register = uffdio_register()
        register.range.start = UInt64(UInt(bitPattern: start))
        register.range.len = UInt64(length)
        register.mode = modes.rawValue
        _ = try check("UFFDIO_REGISTER") { ckvm_ioctl_ptr(fd.rawValue, CKVM_UFFDIO_REGISTER, &register) }
    }

    /// UFFDIO_CONTINUE: maps the file's pages (already written) and wakes the faulting threads,
    /// whichever kind of fault they wait in. `.notInFile` if the file has a hole there.
    public func continueMapping(_ start: UnsafeMutableRawPointer, length: Int) throws(SystemError) -> Placement {
        var request = uffdio_continue()
        request.range.start = UInt64(UInt(bitPattern: start))
        request.range.len = UInt64(length)
        request.mode = 0
        return try place("UFFDIO_CONTINUE", holeIsResult: true) { ckvm_ioctl_ptr(fd.rawValue, CKVM_UFFDIO_CONTINUE, &request) }
    }

    public func unregister(_ start: UnsafeMutableRawPointer, length: Int) throws(SystemError) {
        var range = uffdio_range(start: UInt64(UInt(bitPattern: start)), len: UInt64(length))
        _ = try check("UFFDIO_UNREGISTER") { ckvm_ioctl_ptr(fd.rawValue, CKVM_UFFDIO_UNREGISTER, &range) }
    }

    /// Result of placing a page: placed now, or it was already there (another
    /// fault or copy won the race; not an error for the caller to retry), or
    /// (UFFDIO_CONTINUE only) there is nothing in the file to map.
    public enum Placement: Equatable, Sendable { case placed, alreadyPresent, notInFile }

    /// UFFDIO_COPY: atomically fills `length` bytes at `destination` from `source` and wakes the faulting threads.
    public func copy(to destination: UnsafeMutableRawPointer, from source: UnsafeRawPointer, length: Int) throws(SystemError) -> Placement {
        var request = uffdio_copy()
        request.dst = UInt64(UInt(bitPattern: destination))
        request.src = UInt64(UInt(bitPattern: source))
        request.len = UInt64(length)
        request.mode = 0
        return try place("UFFDIO_COPY") { ckvm_ioctl_ptr(fd.rawValue, CKVM_UFFDIO_COPY, &request) }
    }

    /// UFFDIO_ZEROPAGE: places zero pages and wakes the faulting threads.
    public func zero(_ destination: UnsafeMutableRawPointer, length: Int) throws(SystemError) -> Placement {
        var request = uffdio_zeropage()
        request.range.start = UInt64(UInt(bitPattern: destination))
        request.range.len = UInt64(length)
        request.mode = 0
        return try place("UFFDIO_ZEROPAGE") { ckvm_ioctl_ptr(fd.rawValue, CKVM_UFFDIO_ZEROPAGE, &request) }
    }

    private func place(_ name: String, holeIsResult: Bool = false, _ call: () -> Int32) throws(SystemError) -> Placement {
        while true {
            if call() == 0 { return .placed }
            switch errno {
            case EINTR, EAGAIN: continue
            case EEXIST: return .alreadyPresent
            case EFAULT where holeIsResult: return .notInFile
            default: throw SystemError(name, errno: errno)
            }
        }
    }

    /// Waits up to `timeoutMs` for faults and returns those pending (empty on timeout).
    public func waitForFaults(timeoutMs: Int32) throws(SystemError) -> [Fault] {
        var poll = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        let ready = Glibc.poll(&poll, 1, timeoutMs)
        if ready < 0 {
            if errno == EINTR { return [] }
            throw SystemError("poll userfaultfd", errno: errno)
        }
        guard ready > 0 else { return [] }
        var faults: [Fault] = []
        var messages = [uffd_msg](repeating: uffd_msg(), count: 64)
        let size = MemoryLayout<uffd_msg>.stride
        let n = messages.withUnsafeMutableBytes { Glibc.read(fd.rawValue, $0.baseAddress, $0.count) }
        if n < 0 {
            if errno == EAGAIN || errno == EINTR { return [] }
            throw SystemError("read userfaultfd", errno: errno)
        }
        for message in messages.prefix(n / size) where message.event == UInt8(UFFD_EVENT_PAGEFAULT) {
            faults.append(Fault(address: message.arg.pagefault.address,
                                isWrite: message.arg.pagefault.flags & UInt64(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                                threadID: Int32(bitPattern: message.arg.pagefault.feat.ptid)))
        }
        return faults
    }
}
