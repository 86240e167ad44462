import Glibc
import Synchronization
import TernKVM

/// Where the guest's serial console goes (`--serial stdout|file:PATH|socket:PATH|off`).
public enum SerialTarget: Equatable, Sendable, CustomStringConvertible {
    case stdout
    case file(String)
    case socket(String)
    case off

    public init(parsing text: String) throws {
        switch text {
        case "stdout": self = .stdout
        case "off", "none", "null": self = .off
        default:
            if text.hasPrefix("file:"), text.count > 5 { self = .file(String(text.dropFirst(5))) }
            else if text.hasPrefix("socket:"), text.count > 7 { self = .socket(String(text.dropFirst(7))) }
            else { throw ConfigurationError("invalid --serial '\(text)' (expected stdout, file:PATH, socket:PATH or off)") }
        }
    }

    public var description: String {
        switch self {
        case .stdout: "stdout"
        case .file(let path): "file:\(path)"
        case .socket(let path): "socket:\(path)"
        case .off: "off"
        }
    }
}

/// A byte sink (and, for sockets, source) for the UART.
public protocol SerialConnection: AnyObject, Sendable {
    func transmit(_ byte: UInt8)
    /// Called once with a function that delivers bytes typed by a user.
    func startReceiving(_ deliver: @escaping @Sendable ([UInt8]) -> Void)
    func close()
}

extension SerialConnection {
    public func startReceiving(_ deliver: @escaping @Sendable ([UInt8]) -> Void) {}
    public func close() {}
}

/// Writes to a file descriptor (stdout or a file), unbuffered so that output
/// appears as the guest produces it and nothing is lost if the VMM dies.
public final class FileSerialConnection: SerialConnection {
    private let fd: Int32
    private let owned: FileDescriptor?

    public static func standardOutput() -> FileSerialConnection { FileSerialConnection(fd: 1, owned: nil) }

    public static func file(_ path: String) throws -> FileSerialConnection {
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ConfigurationError("cannot open serial output file \(path): \(String(cString: strerror(errno)))") }
        return FileSerialConnection(fd: fd, owned: FileDescriptor(adopting: fd))
    }

    private init(fd: Int32, owned: FileDescriptor?) {
        self.fd = fd
        self.owned = owned
    }

    public func transmit(_ byte: UInt8) {
        var value = byte
        while Glibc.write(fd, &value, 1) == -1 && errno == EINTR {}
    }
}

public final class NullSerialConnection: SerialConnection {
    public init() {}
    public func transmit(_ byte: UInt8) {}
}
