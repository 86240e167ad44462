import Glibc
import TernKVM
import TernTLS
import TernWire

/// One migration connection: the socket, and the TLS session every byte goes
/// through when the channel is encrypted. The control connection, each extra
/// page stream, post-copy's demand channel and a resumed connection are each one.
public final class Connection: Sendable {
    public let descriptor: FileDescriptor
    public let session: TLSSession?

    public init(descriptor: FileDescriptor, session: TLSSession? = nil) {
        self.descriptor = descriptor
        self.session = session
    }

    /// The socket's number, for shutdown(2) and socket options.
    public var rawValue: Int32 { descriptor.rawValue }
    /// Reads and writes on this connection (through TLS if it has it).
    public var stream: FDStream { FDStream(fd: descriptor.rawValue, secure: session) }

    /// Whether `error` says the connection itself failed: the socket, or a TLS record that failed its
    /// check (damaged or forged on the way), which ends that connection but not the migration.
    public static func broke(_ error: any Error) -> Bool {
        if error is FDStream.IOError { return true }
        if case TLSError.failed = error { return true }
        return false
    }
}

/// How a migration's connections are protected.
public enum ChannelSecurity: Sendable {
    /// In clear: a `unix:` socket (file permissions guard it), or `tcp:` with an explicit `--insecure`.
    case plaintext
    /// Mutual TLS 1.3: both ends prove a certificate of one CA (`--tls-dir`), optionally of named peers (`--tls-allow`).
    case tls(TLSContext)

    /// How long a peer may take over the TLS handshake before it is dropped.
    public static let handshakeSeconds = 10.0

    /// Secures a connected socket (nothing to do in clear), its handshake bounded by `timeoutSeconds`.
    public func establish(_ descriptor: FileDescriptor, timeoutSeconds: Double = handshakeSeconds) throws -> Connection {
        switch self {
        case .plaintext: return Connection(descriptor: descriptor)
        case .tls(let context):
            let session: TLSSession
            do {
                session = try context.secure(fd: descriptor.rawValue, timeoutSeconds: timeoutSeconds)
            } catch .notTLS {
                // Told in clear, which is what such a source reads.
                try? FDStream(fd: descriptor.rawValue).writeFrame(.abort, payload: Array("this destination takes migrations over mutual TLS only (tern migrate --tls-dir DIR)".utf8))
                throw TLSError.notTLS
            }
            do {
                try context.check(session)
            } catch {
                // A destination tells a source it turns away why, before it closes.
                if context.role == .server {
                    try? FDStream(fd: descriptor.rawValue, secure: session).writeFrame(.abort, payload: Array("\(error)".utf8))
                }
                session.close()
                // The client's unread hello would turn an immediate close into a reset that loses the reason.
                if context.role == .server { TLSContext.lingerForAlert(descriptor.rawValue) }
                throw error
            }
            return Connection(descriptor: descriptor, session: session)
        }
    }

    /// What the user's options ask for: TLS with `tlsDirectory`; in clear on a `unix:` socket, or on
    /// `tcp:` only with `insecure` (a VM's memory is not sent in clear by default).
    public static func choose(tlsDirectory: String?, allowedPeers: [String], insecure: Bool, for endpoint: Endpoint,
                              role: TLSContext.Role) -> Result<ChannelSecurity, SecurityRefusal> {
        if let tlsDirectory {
            guard !insecure else { return .failure(SecurityRefusal("--insecure and --tls-dir exclude each other")) }
            do {
                return .success(.tls(try TLSContext(directory: tlsDirectory, role: role, allowedPeers: allowedPeers)))
            } catch {
                return .failure(SecurityRefusal("\(error)"))
            }
        }
        guard allowedPeers.isEmpty else { return .failure(SecurityRefusal("--tls-allow needs --tls-dir")) }
        if case .tcp = endpoint, !insecure {
            return .failure(SecurityRefusal("a tcp: migration needs --tls-dir DIR (mutual TLS; `tern certs init DIR --name HOST` makes one), or --insecure to send the VM's memory in clear"))
        }
        return .success(.plaintext)
    }

    public var isEncrypted: Bool {
        if case .tls = self { return true }
        return false
    }
}

/// What the report says about a migration's channel.
public struct ChannelReport: Codable, Equatable, Sendable {
    /// "tls", or "plaintext" (a tcp: migration with --insecure, or a unix: socket).
    public var transport: String
    public var tlsVersion: String?
    public var cipher: String?
    /// The name the peer's certificate proves.
    public var peer: String?
    /// The id of the migration token the destination accepted (`--require-token`).
    public var tokenID: String?

    // The API's snake_case keys read back as "tokenId", not "tokenID".
    enum CodingKeys: String, CodingKey {
        case transport, tlsVersion, cipher, peer, tokenID = "tokenId"
    }

    public init(transport: String, tlsVersion: String? = nil, cipher: String? = nil, peer: String? = nil) {
        self.transport = transport
        self.tlsVersion = tlsVersion
        self.cipher = cipher
        self.peer = peer
    }

    public init(connection: Connection, endpoint: Endpoint) {
        if let session = connection.session {
            transport = "tls"
            tlsVersion = session.version
            cipher = session.cipher
            peer = session.peerName
        } else {
            transport = "plaintext"
        }
    }
}

public struct SecurityRefusal: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
