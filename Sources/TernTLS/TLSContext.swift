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
    /// `timeoutSeconds`, checks the peer against `allowedPeers`, and returns the session.
    public func secure(fd: Int32, timeoutSeconds: Double = 10) throws(TLSError) -> TLSSession {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 else { throw .handshake("fcntl: \(String(cString: strerror(errno)))") }
        guard let raw = ctls_session_new(context, fd, role == .server ? 1 : 0) else { throw .handshake("cannot create a TLS session") }
        let deadline = ContinuousClock.now + .milliseconds(Int(timeoutSeconds * 1000))
        while true {
            let result = ctls_handshake(raw)
            if result == 1 { break }
            guard Int(result) == CTLS_WANT_READ || Int(result) == CTLS_WANT_WRITE else {
                var error = [CChar](repeating: 0, count: 512)
                ctls_last_error(raw, &error, error.count)
                ctls_session_free(raw)
                let reason = Int(result) == CTLS_CLOSED ? "the peer closed the connection (it refused us, or does not speak TLS)" : String(nulTerminated: error)
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
        let peer = String(nulTerminated: name)
        if !allowedPeers.isEmpty && !allowedPeers.contains(where: { ctls_peer_matches(raw, $0) == 1 }) {
            ctls_shutdown(raw)
            ctls_session_free(raw)
            throw .peerNotAllowed(peer, allowed: allowedPeers)
        }
        return TLSSession(session: raw, fd: fd, peerName: peer, version: String(cString: ctls_version(raw)),
                          cipher: String(cString: ctls_cipher(raw)))
    }
}
