import CTLS
import Foundation
import Glibc

/// Mutual TLS 1.3 for migration connections: this host's certificate and key,
/// the CA every peer's certificate must chain to, and optionally the names a
/// peer may have (`--tls-allow`). Built from a directory holding `ca.pem`,
/// `cert.pem` and `key.pem` (`tern certs init` writes one).
public final class TLSContext: @unchecked Sendable {
    // @unchecked: an SSL_CTX is safe to share once configured; it is never changed after init.
    public enum Role: Sendable { case server, client }

    public let role: Role
    public let directory: String
    /// Peers allowed by certificate name; empty: any peer whose certificate chains to the CA.
    public let allowedPeers: [String]
    private let context: OpaquePointer

    public static let caFile = "ca.pem", certificateFile = "cert.pem", keyFile = "key.pem"

    public init(directory: String, role: Role, allowedPeers: [String] = []) throws(TLSError) {
        for file in [Self.caFile, Self.certificateFile, Self.keyFile] {
            let path = directory + "/" + file
            guard access(path, R_OK) == 0 else {
                throw .configuration("\(path): \(String(cString: strerror(errno))) (tern certs init \(directory) --name HOST makes one)")
            }
        }
        var error = [CChar](repeating: 0, count: 512)
        guard let context = ctls_context_new(role == .server ? 1 : 0, directory + "/" + Self.caFile, directory + "/" + Self.certificateFile,
                                             directory + "/" + Self.keyFile, &error, error.count) else {
            throw .configuration("\(directory): \(String(nulTerminated: error))")
        }
        self.context = context
        self.role = role
        self.directory = directory
        self.allowedPeers = allowedPeers
    }

    deinit { ctls_context_free(context) }

    /// Runs the handshake on `fd` (a connected socket, made non-blocking for good) within
    /// `timeoutSeconds` and returns the session; `check(_:)` then says whether its peer is allowed.
    public func secure(fd: Int32, timeoutSeconds: Double = 10) throws(TLSError) -> TLSSession {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else { throw .handshake("fcntl: \(String(cString: strerror(errno)))") }
        let deadline = ContinuousClock.now + .milliseconds(Int(timeoutSeconds * 1000))
        if role == .server { try Self.expectClientHello(fd, until: deadline, timeoutSeconds: timeoutSeconds) }
        guard let raw = ctls_session_new(context, fd, role == .server ? 1 : 0) else { throw .handshake("cannot create a TLS session") }
        while true {
            let result = ctls_handshake(raw)
            if result == 1 { break }
            guard Int(result) == CTLS_WANT_READ || Int(result) == CTLS_WANT_WRITE else {
                var error = [CChar](repeating: 0, count: 512)
                ctls_last_error(raw, &error, error.count)
                ctls_session_free(raw)
                let reason = Int(result) == CTLS_CLOSED ? "the peer closed the connection (it refused us, or does not speak TLS)" : String(nulTerminated: error)
                if role == .server { Self.lingerForAlert(fd) }
                throw .handshake(reason)
            }
            let left = deadline - .now
            let milliseconds = Int32(max(0, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
            var entry = pollfd(fd: fd, events: Int16(Int(result) == CTLS_WANT_READ ? POLLIN : POLLOUT), revents: 0)
            if milliseconds == 0 || poll(&entry, 1, milliseconds) == 0 {
                ctls_session_free(raw)
                throw .handshake("no answer within \(timeoutSeconds) s")
            }
        }
        var name = [CChar](repeating: 0, count: 256)
        ctls_peer_name(raw, &name, name.count)
        return TLSSession(session: raw, fd: fd, peerName: String(nulTerminated: name), version: String(cString: ctls_version(raw)),
                          cipher: String(cString: ctls_cipher(raw)))
    }

    /// Throws unless the session's peer is one of `allowedPeers` (any peer of the CA when there are none).
    public func check(_ session: TLSSession) throws(TLSError) {
        guard !allowedPeers.isEmpty, !allowedPeers.contains(where: { session.peerMatches($0) }) else { return }
        throw .peerNotAllowed(session.peerName, allowed: allowedPeers)
    }

    /// A TLS client speaks first, with a handshake record (content type 22): anything else is a peer in
    /// clear, which the caller can then answer in clear.
    static func expectClientHello(_ fd: Int32, until deadline: ContinuousClock.Instant, timeoutSeconds: Double) throws(TLSError) {
        while true {
            let left = deadline - .now
            let milliseconds = Int32(max(0, left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = poll(&entry, 1, milliseconds)
            if ready < 0 && errno == EINTR { continue }
            guard ready > 0 else { throw .handshake("no answer within \(timeoutSeconds) s") }
            var first: UInt8 = 0
            let count = recv(fd, &first, 1, Int32(MSG_PEEK))
            if count < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            guard count == 1 else { throw .handshake("the peer closed the connection before the TLS handshake") }
            guard first == 22 else { throw .notTLS }
            return
        }
    }

    /// In TLS 1.3 a client learns that the server refused its certificate only from the alert that
    /// follows its own Finished, while it is already sending. Closing at once, with its data unread,
    /// would reset the connection and drop the alert; so the server stops writing and reads what
    /// is still coming for a moment, and the client reads the reason.
    public static func lingerForAlert(_ fd: Int32) {
        shutdown(fd, Int32(SHUT_WR))
        var buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = ContinuousClock.now + .milliseconds(500)
        while ContinuousClock.now < deadline {
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, 100) > 0 else { continue }
            if buffer.withUnsafeMutableBytes({ read(fd, $0.baseAddress, $0.count) }) <= 0 { return }
        }
    }
}
