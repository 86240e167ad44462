import Glibc

/// An owned file descriptor, closed exactly once when the owner goes away.
///
/// KVM hands out a tree of descriptors (system -> VM -> vCPU); each Swift
/// object owns its own so that lifetimes follow the object graph.
public final class FileDescriptor: @unchecked Sendable {
    // Sendable: the raw value never changes after init and close happens in deinit.
    public let rawValue: Int32

    public init(adopting rawValue: Int32) {
        self.rawValue = rawValue
    }

    /// open(2), close-on-exec.
    public static func open(_ path: String, flags: Int32) throws(SystemError) -> FileDescriptor {
        let fd = try check("open \(path)") { Glibc.open(path, flags | O_CLOEXEC) }
        return FileDescriptor(adopting: fd)
    }

    deinit {
        _ = Glibc.close(rawValue)
    }
}
