import Foundation
import Glibc
import JWTKit

/// The Ed25519 key pair that signs migration tokens: the private half stays with whoever issues
/// them (`tern token issue`, the cluster controller); destinations hold the public half
/// (`tern run --incoming ... --require-token token.pub`). Both are PEM files, as OpenSSL reads them.
public enum TokenKeys {
    public static let privateKeyFile = "token.key", publicKeyFile = "token.pub"

    /// Writes a new key pair into `directory` (made if missing): `token.key` (mode 0600) and `token.pub`.
    /// Refuses to replace an existing key, which would invalidate every token it signed.
    public static func create(in directory: String) throws(TokenKeyError) -> (privateKey: String, publicKey: String) {
        let privatePath = directory + "/" + privateKeyFile, publicPath = directory + "/" + publicKeyFile
        for path in [privatePath, publicPath] where access(path, F_OK) == 0 {
            throw .exists(path)
        }
        do {
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw .unreadable(directory, "\(error)")
        }
        let key: EdDSA.PrivateKey
        do { key = try EdDSA.PrivateKey(curve: .ed25519) } catch { throw .invalid(privatePath, "\(error)") }
        try write(key.pemRepresentation, to: privatePath, mode: 0o600)
        try write(key.publicKey.pemRepresentation, to: publicPath, mode: 0o644)
        return (privatePath, publicPath)
    }

    public static func loadPrivate(_ path: String) throws(TokenKeyError) -> EdDSA.PrivateKey {
        let text = try read(path)
        do { return try EdDSA.PrivateKey(pem: text) } catch { throw .invalid(path, "not an Ed25519 private key in PEM (\(error))") }
    }

    public static func loadPublic(_ path: String) throws(TokenKeyError) -> EdDSA.PublicKey {
        let text = try read(path)
        do { return try EdDSA.PublicKey(pem: text) } catch { throw .invalid(path, "not an Ed25519 public key in PEM (\(error))") }
    }

    private static func read(_ path: String) throws(TokenKeyError) -> String {
        do { return try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw .unreadable(path, String(cString: strerror(errno == 0 ? ENOENT : errno)))
        }
    }

    private static func write(_ text: String, to path: String, mode: mode_t) throws(TokenKeyError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else { throw .unreadable(path, String(cString: strerror(errno))) }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) == bytes.count, fsync(fd) == 0 else {
            throw .unreadable(path, String(cString: strerror(errno)))
        }
    }
}

public enum TokenKeyError: Error, CustomStringConvertible, Equatable {
    case exists(String)
    case unreadable(String, String)
    case invalid(String, String)

    public var description: String {
        switch self {
        case .exists(let path): "\(path) exists: a new key would invalidate the tokens the old one signed (remove it first)"
        case .unreadable(let path, let reason): "\(path): \(reason)"
        case .invalid(let path, let reason): "\(path): \(reason)"
        }
    }
}
