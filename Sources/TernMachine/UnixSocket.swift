import Glibc
import TernKVM

/// Minimal blocking Unix-domain stream sockets, for the serial console and
/// the "is this API socket path already in use?" check.
public enum UnixSocket {
    /// A sockaddr_un for `path`, or nil when the path is too long for one.
    static func address(_ path: String) -> sockaddr_un? {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard bytes.count < capacity else { return nil }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    /// Creates, binds and listens on `path`. A leftover socket file nobody
    /// listens on is replaced; a live one is an error.
    public static func listen(path: String, backlog: Int32 = 4) throws -> FileDescriptor {
        guard var address = address(path) else { throw ConfigurationError("socket path is too long: \(path)") }
        try claim(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket", errno: errno) }
        let owned = FileDescriptor(adopting: fd)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else { throw ConfigurationError("cannot bind socket \(path): \(String(cString: strerror(errno)))") }
        guard Glibc.listen(fd, backlog) == 0 else { throw SystemError("listen \(path)", errno: errno) }
        return owned
    }

    /// Makes `path` free to bind: refuses a socket someone listens on or a
    /// file that is not a socket, and removes a stale socket left by a process that died.
    public static func claim(_ path: String) throws {
        if isListening(path) { throw ConfigurationError("socket \(path) is already in use by another process") }
        var info = stat()
        if lstat(path, &info) == 0 {
            guard (info.st_mode & S_IFMT) == S_IFSOCK else { throw ConfigurationError("\(path) exists and is not a socket") }
            unlink(path)
        }
    }

    /// Connects to `path`; throws when nobody listens there.
    public static func connect(path: String) throws -> FileDescriptor {
        guard var address = address(path) else { throw ConfigurationError("socket path is too long: \(path)") }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket", errno: errno) }
        let owned = FileDescriptor(adopting: fd)
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard result == 0 else { throw SystemError("connect \(path)", errno: errno) }
        return owned
    }

    /// True when a process accepts connections on `path` right now.
    public static func isListening(_ path: String) -> Bool {
        (try? connect(path: path)) != nil
    }
}
