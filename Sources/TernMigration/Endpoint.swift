import Glibc
import TernKVM
import TernMachine

/// Where a migration stream goes: `tcp:HOST:PORT` or `unix:PATH`.
public enum Endpoint: Equatable, Sendable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(path: String)

    public init(parsing text: String) throws {
        if text.hasPrefix("unix:"), text.count > 5 {
            self = .unix(path: String(text.dropFirst(5)))
            return
        }
        guard text.hasPrefix("tcp:") else {
            throw ConfigurationError("invalid address '\(text)' (expected tcp:HOST:PORT or unix:PATH)")
        }
        let rest = text.dropFirst(4)
        // The port follows the last colon, so IPv6 literals in brackets work: tcp:[::1]:4444.
        guard let colon = rest.lastIndex(of: ":"), let port = UInt16(rest[rest.index(after: colon)...]), port != 0 else {
            throw ConfigurationError("invalid address '\(text)' (expected tcp:HOST:PORT with a port from 1 to 65535)")
        }
        var host = String(rest[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw ConfigurationError("invalid address '\(text)': no host") }
        self = .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case .tcp(let host, let port): host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        case .unix(let path): "unix:\(path)"
        }
    }

    /// Resolves a TCP host (numeric or by name) to socket addresses.
    private func resolve(host: String, port: UInt16, passive: Bool) throws -> [(family: Int32, address: [UInt8])] {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var result: UnsafeMutablePointer<addrinfo>?
        let status = getaddrinfo(host, String(port), &hints, &result)
        guard status == 0, let first = result else {
            throw ConfigurationError("cannot resolve \(host): \(String(cString: gai_strerror(status)))")
        }
        defer { freeaddrinfo(first) }
        var addresses: [(Int32, [UInt8])] = []
        var cursor: UnsafeMutablePointer<addrinfo>? = first
        while let info = cursor {
            let bytes = UnsafeRawBufferPointer(start: info.pointee.ai_addr, count: Int(info.pointee.ai_addrlen))
            addresses.append((info.pointee.ai_family, Array(bytes)))
            cursor = info.pointee.ai_next
        }
        return addresses
    }

    /// Listens for one migration (the destination side).
    public func listen() throws -> FileDescriptor {
        switch self {
        case .unix(let path):
            return try UnixSocket.listen(path: path, backlog: 1)
        case .tcp(let host, let port):
            var lastError = "no address"
            for (family, address) in try resolve(host: host, port: port, passive: true) {
                let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { continue }
                let owned = FileDescriptor(adopting: fd)
                var one: Int32 = 1
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
                let bound = address.withUnsafeBytes { bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
                if bound == 0 && Glibc.listen(fd, 1) == 0 { return owned }
                lastError = String(cString: strerror(errno))
            }
            throw ConfigurationError("cannot listen on \(self): \(lastError)")
        }
    }

    /// Connects to a waiting destination.
    public func connect() throws -> FileDescriptor {
        switch self {
        case .unix(let path):
            do { return try UnixSocket.connect(path: path) } catch {
                throw ConfigurationError("cannot connect to \(self): \(error)")
            }
        case .tcp(let host, let port):
            var lastError = "no address"
            for (family, address) in try resolve(host: host, port: port, passive: false) {
                let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                guard fd >= 0 else { continue }
                let owned = FileDescriptor(adopting: fd)
                let result = address.withUnsafeBytes { Glibc.connect(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count)) }
                if result == 0 {
                    Self.tune(fd)
                    return owned
                }
                lastError = String(cString: strerror(errno))
            }
            throw ConfigurationError("cannot connect to \(self): \(lastError)")
        }
    }

    /// Accepts the one connection a destination serves (with a timeout: within that many seconds, or an error).
    public static func accept(_ listener: FileDescriptor, timeoutSeconds: Int? = nil) throws -> FileDescriptor {
        if let timeoutSeconds {
            var entry = pollfd(fd: listener.rawValue, events: Int16(POLLIN), revents: 0)
            var ready: Int32
            repeat { ready = poll(&entry, 1, Int32(timeoutSeconds * 1000)) } while ready < 0 && errno == EINTR
            guard ready > 0 else { throw ConfigurationError("no connection within \(timeoutSeconds) s") }
        }
        while true {
            let fd = Glibc.accept(listener.rawValue, nil, nil)
            if fd >= 0 {
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                tune(fd)
                return FileDescriptor(adopting: fd)
            }
            if errno == EINTR { continue }
            throw SystemError("accept", errno: errno)
        }
    }

    /// Large buffers for bulk page traffic; no Nagle delay for the small control frames;
    /// keepalive probes, so a peer whose host vanished is noticed within about 25 s
    /// even on a connection that waits without a read timeout.
    static func tune(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, socklen_t(MemoryLayout<Int32>.size))
        for (option, value) in [(TCP_KEEPIDLE, Int32(10)), (TCP_KEEPINTVL, Int32(5)), (TCP_KEEPCNT, Int32(3))] {
            var value = value
            setsockopt(fd, Int32(IPPROTO_TCP), option, &value, socklen_t(MemoryLayout<Int32>.size))
        }
        var size: Int32 = 8 << 20
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }
}
