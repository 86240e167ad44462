import CTLS
import Glibc
import Synchronization
import TernWire

/// One TLS 1.3 connection (OpenSSL) over a socket Tern keeps owning.
///
/// OpenSSL's sessions are not safe for concurrent calls, yet a migration
/// connection is read on one thread while another writes (post-copy's page
/// requests and replies). So the socket is made non-blocking, every OpenSSL
/// call happens under `lock` and returns at once, and the waiting (poll) is
/// done outside it: a reader blocked for data never holds up a writer.
/// Waits honour the socket's SO_RCVTIMEO/SO_SNDTIMEO, which the migration
/// code sets as its deadlines, exactly as they bound a blocking socket.
public final class TLSSession: SecureTransport, @unchecked Sendable {
    // @unchecked: `session` is only touched under `lock`; `outgoing` only by writers, under `writing`.
    private let session: OpaquePointer
    public let fd: Int32
    private let lock = Mutex<Void>(())
    private let writing = Mutex<[UInt8]>([])
    /// The identity the peer's certificate proves (its common name).
    public let peerName: String
    public let version: String
    public let cipher: String
    /// Records are up to 16 KiB: frames are gathered into one write of that size, not sent piece by piece.
    static let recordSize = 16384

    init(session: OpaquePointer, fd: Int32, peerName: String, version: String, cipher: String) {
        self.session = session
        self.fd = fd
        self.peerName = peerName
        self.version = version
        self.cipher = cipher
    }

    deinit { ctls_session_free(session) }

    public func readSome(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard buffer.count > 0 else { return 0 }
        while true {
            let result = lock.withLock { _ in ctls_read(session, buffer.baseAddress, Int32(min(buffer.count, Int(Int32.max)))) }
            if result > 0 { return Int(result) }
            switch Int(result) {
            case CTLS_CLOSED: return 0
            case CTLS_SOCKET_ERROR: throw FDStream.IOError(operation: "read", errno: errno)
            case CTLS_WANT_READ: try wait(for: Int16(POLLIN), timeoutOption: SO_RCVTIMEO, operation: "read")
            case CTLS_WANT_WRITE: try wait(for: Int16(POLLOUT), timeoutOption: SO_SNDTIMEO, operation: "read")
            default: throw TLSError.failed(lastError())
            }
        }
    }

    public func writeAll(_ buffers: [UnsafeRawBufferPointer]) throws {
        try writing.withLock { record in
            // Small pieces (frame and run headers) are gathered into full records; the whole records' worth
            // in the middle of a large piece (page data) is encrypted straight from where it lies, so page
            // bytes are read once, by the cipher, and never copied here first.
            for buffer in buffers where buffer.count > 0 {
                var offset = 0
                if !record.isEmpty {
                    let take = min(Self.recordSize - record.count, buffer.count)
                    record.append(contentsOf: UnsafeRawBufferPointer(rebasing: buffer[0..<take]))
                    offset = take
                    guard record.count == Self.recordSize else { continue }
                    try record.withUnsafeBytes { try send($0) }
                    record.removeAll(keepingCapacity: true)
                }
                let direct = (buffer.count - offset) / Self.recordSize * Self.recordSize
                if direct > 0 {
                    try send(UnsafeRawBufferPointer(rebasing: buffer[offset..<offset + direct]))
                    offset += direct
                }
                record.append(contentsOf: UnsafeRawBufferPointer(rebasing: buffer[offset...]))
            }
            if !record.isEmpty {
                try record.withUnsafeBytes { try send($0) }
                record.removeAll(keepingCapacity: true)
            }
        }
    }

    private func send(_ buffer: UnsafeRawBufferPointer) throws {
        var offset = 0
        while offset < buffer.count {
            let size = Int32(min(buffer.count - offset, 1 << 20))
            let result = lock.withLock { _ in ctls_write(session, buffer.baseAddress! + offset, size) }
            if result > 0 {
                offset += Int(result)
                continue
            }
            switch Int(result) {
            case CTLS_WANT_WRITE: try wait(for: Int16(POLLOUT), timeoutOption: SO_SNDTIMEO, operation: "write")
            case CTLS_WANT_READ: try wait(for: Int16(POLLIN), timeoutOption: SO_RCVTIMEO, operation: "write")
            case CTLS_CLOSED: throw FDStream.IOError(operation: "write", errno: EPIPE)
            case CTLS_SOCKET_ERROR: throw FDStream.IOError(operation: "write", errno: errno)
            default: throw TLSError.failed(lastError())
            }
        }
    }

    /// Sends close_notify.
    public func close() { lock.withLock { _ in ctls_shutdown(session) } }

    /// Whether the peer's certificate names `name` (a subject alternative name or the common name).
    public func peerMatches(_ name: String) -> Bool { lock.withLock { _ in ctls_peer_matches(session, name) == 1 } }
    /// Whether this end's own certificate names `name` (a token's destination, checked by the destination).
    public func localMatches(_ name: String) -> Bool { lock.withLock { _ in ctls_local_matches(session, name) == 1 } }
    /// This end's own certificate's common name.
    public var localName: String {
        var text = [CChar](repeating: 0, count: 256)
        lock.withLock { _ in ctls_local_name(session, &text, text.count) }
        return String(nulTerminated: text)
    }

    private func lastError() -> String {
        var text = [CChar](repeating: 0, count: 512)
        lock.withLock { _ in ctls_last_error(session, &text, text.count) }
        return String(nulTerminated: text)
    }

    /// Waits until the socket is ready, within the socket's own timeout for that direction (none: forever).
    func wait(for events: Int16, timeoutOption: Int32, operation: String) throws {
        var timeout = timeval()
        var length = socklen_t(MemoryLayout<timeval>.size)
        let milliseconds: Int32
        if getsockopt(fd, SOL_SOCKET, timeoutOption, &timeout, &length) == 0, timeout.tv_sec != 0 || timeout.tv_usec != 0 {
            milliseconds = Int32(min(Int(timeout.tv_sec) * 1000 + Int(timeout.tv_usec) / 1000, Int(Int32.max)))
        } else {
            milliseconds = -1
        }
        var entry = pollfd(fd: fd, events: events, revents: 0)
        while true {
            let ready = poll(&entry, 1, milliseconds)
            if ready > 0 { return }
            if ready == 0 { throw FDStream.IOError(operation: operation, errno: EAGAIN) }
            if errno != EINTR { throw FDStream.IOError(operation: operation, errno: errno) }
        }
    }
}

public enum TLSError: Error, Equatable, CustomStringConvertible {
    case configuration(String)
    case handshake(String)
    case peerNotAllowed(String, allowed: [String])
    /// The peer spoke first, and not TLS: a source migrating in clear.
    case notTLS
    case failed(String)

    public var description: String {
        switch self {
        case .configuration(let why): "TLS configuration: \(why)"
        case .handshake(let why): "TLS handshake failed: \(why)"
        case .peerNotAllowed(let name, let allowed): "the peer '\(name)' is not allowed (--tls-allow \(allowed.joined(separator: ", ")))"
        case .notTLS: "the peer does not speak TLS (a migration in clear, to a destination that takes TLS only)"
        case .failed(let why): why
        }
    }
}

extension String {
    /// The text of a C buffer up to its first NUL.
    init(nulTerminated buffer: [CChar]) {
        self.init(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
