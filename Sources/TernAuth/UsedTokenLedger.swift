import Foundation
import Glibc

/// The ids of tokens a destination has accepted, kept in a file so that a token is good for one
/// migration even across restarts, and shared by destinations on one host through flock(2).
/// One line per token: its id and its expiry (Unix seconds). A token is spent when it is accepted,
/// so a migration that fails after that needs a new one.
public struct UsedTokenLedger: Sendable {
    public let path: String

    /// Opens (creating if needed) the ledger at `path`: a destination that cannot record tokens must not accept any.
    public init(path: String) throws(TokenRefusal) {
        let directory = (path as NSString).deletingLastPathComponent
        if !directory.isEmpty { try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        let fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw .ledger("\(path): \(String(cString: strerror(errno)))") }
        close(fd)
        self.path = path
    }

    /// Records `claims`' token as used, or throws `.replayed` if it was already.
    public func spend(_ claims: MigrationClaims) throws(TokenRefusal) {
        let fd = open(path, O_RDWR | O_APPEND | O_CLOEXEC)
        guard fd >= 0 else { throw .ledger("\(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard flock(fd, LOCK_EX) == 0 else { throw .ledger("\(path): flock: \(String(cString: strerror(errno)))") }
        if try spentIDs(fd).contains(Substring(claims.tokenID)) { throw .replayed(claims.tokenID) }
        let line = Array("\(claims.tokenID) \(Int64(claims.expiry.timeIntervalSince1970))\n".utf8)
        guard line.withUnsafeBytes({ write(fd, $0.baseAddress, $0.count) }) == line.count, fsync(fd) == 0 else {
            throw .ledger("\(path): \(String(cString: strerror(errno)))")
        }
    }

    public func contains(_ tokenID: String) throws(TokenRefusal) -> Bool {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .ledger("\(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard flock(fd, LOCK_SH) == 0 else { throw .ledger("\(path): flock: \(String(cString: strerror(errno)))") }
        return try spentIDs(fd).contains(Substring(tokenID))
    }

    private func spentIDs(_ fd: Int32) throws(TokenRefusal) -> Set<Substring> {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        var offset: off_t = 0
        while true {
            let count = chunk.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, offset) }
            guard count >= 0 else { throw .ledger("\(path): \(String(cString: strerror(errno)))") }
            if count == 0 { break }
            bytes += chunk[..<count]
            offset += off_t(count)
        }
        let text = String(decoding: bytes, as: UTF8.self)
        return Set(text.split(separator: "\n").compactMap { $0.split(separator: " ").first })
    }
}
