import CKVM
import Glibc
import Synchronization
import TernKVM

/// A raw disk image file, the block device's backend: positioned reads and
/// writes straight between the file and guest memory (preadv/pwritev on the
/// request's buffers, no copy in between), flush by fdatasync, discard and
/// write-zeroes by fallocate.
///
/// Like QEMU's image locking, an image is locked while a VM uses it (flock:
/// exclusive for a writable disk, shared for a read-only one), so two VMs
/// cannot write one image. A migration's destination on shared storage opens
/// the image unlocked and takes the lock once the source has let go of it.
public final class DiskImage: Sendable {
    /// Where the image is; a migration's copy changes it once, when the received image takes its final name.
    public var path: String { currentPath.withLock { $0 } }
    private let currentPath: Mutex<String>
    public let readOnly: Bool
    /// Bytes; fixed while the VM runs (the guest was told its capacity).
    public let size: UInt64
    private let file: FileDescriptor
    /// IOV_MAX on Linux (not importable: glibc defines it through a macro chain).
    static let iovecLimit = 1024

    public enum OpenError: Error, Equatable, CustomStringConvertible {
        case cannotOpen(String, String)
        case notAFile(String)
        case tooSmall(String)
        case inUse(String)

        public var description: String {
            switch self {
            case .inUse(let path): "disk image \(path) is in use by another process (it holds the image's lock)"
            case .cannotOpen(let path, let reason): "cannot open disk image \(path): \(reason)"
            case .notAFile(let path): "disk image \(path) is neither a regular file nor a block device"
            case .tooSmall(let path): "disk image \(path) is smaller than one 512-byte sector"
            }
        }
    }

    /// When the image's lock is taken: on open, or later by `acquireLock` (a destination on shared storage).
    public enum Locking: Sendable {
        case atOpen
        case deferred
    }

    public init(path: String, readOnly: Bool, locking: Locking = .atOpen) throws(OpenError) {
        let raw = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard raw >= 0 else { throw .cannotOpen(path, String(cString: strerror(errno))) }
        file = FileDescriptor(adopting: raw)
        var info = stat()
        guard fstat(raw, &info) == 0 else { throw .cannotOpen(path, String(cString: strerror(errno))) }
        let kind = info.st_mode & S_IFMT
        guard kind == S_IFREG || kind == S_IFBLK else { throw .notAFile(path) }
        let end = lseek(raw, 0, SEEK_END)
        guard end >= 512 else { throw end < 0 ? .cannotOpen(path, String(cString: strerror(errno))) : .tooSmall(path) }
        currentPath = Mutex(path)
        self.readOnly = readOnly
        size = UInt64(end)
        if locking == .atOpen { try acquireLock() }
    }

    /// Takes the image's lock, or says another process holds it. Idempotent.
    public func acquireLock() throws(OpenError) {
        while flock(file.rawValue, (readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0 {
            if errno == EINTR { continue }
            if errno == EWOULDBLOCK { throw .inUse(path) }
            throw .cannotOpen(path, String(cString: strerror(errno)))
        }
    }

    /// Lets go of the lock (a source on shared storage at the hand-over); the image stays open.
    public func releaseLock() { _ = flock(file.rawValue, LOCK_UN) }

    /// Whether some other process holds a lock on the image at `path` that a writer would need
    /// (false if the file does not exist).
    public static func isLockedElsewhere(_ path: String) -> Bool {
        let raw = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard raw >= 0 else { return false }
        defer { close(raw) }
        while flock(raw, LOCK_EX | LOCK_NB) != 0 {
            if errno == EINTR { continue }
            return errno == EWOULDBLOCK
        }
        flock(raw, LOCK_UN)
        return false
    }

    /// Records the image's new name after a rename (the open file is the same).
    public func renamed(to newPath: String) { currentPath.withLock { $0 = newPath } }

    /// Reads `buffer.count` bytes at `offset` for a migration; what lies past the end of the image reads as
    /// zeros (a disk's last block, padded). Returns the errno of a failure.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int32? {
        let inImage = offset >= size ? 0 : Int(min(UInt64(buffer.count), size - offset))
        if inImage < buffer.count { (buffer.baseAddress! + inImage).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - inImage) }
        guard inImage > 0 else { return nil }
        return transfer([iovec(iov_base: buffer.baseAddress, iov_len: inImage)], at: offset) { fd, vectors, count, position in
            preadv(fd, vectors, count, position)
        }
    }

    /// Writes `bytes` at `offset` (a migration's received blocks). Returns the errno of a failure.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Int32? {
        guard !bytes.isEmpty else { return nil }
        return transfer([iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)], at: offset) {
            fd, vectors, count, position in pwritev(fd, vectors, count, position)
        }
    }

    /// Walks the image's allocated and unallocated byte ranges in order (SEEK_DATA / SEEK_HOLE), each
    /// widened to whole `granule`s; a file system without holes reports one data range.
    public func forEachExtent(granule: UInt64, _ body: (_ range: Range<UInt64>, _ isHole: Bool) throws -> Void) rethrows {
        let fd = file.rawValue
        var offset: UInt64 = 0
        while offset < size {
            // lseek whences SEEK_DATA (3) and SEEK_HOLE (4); ENXIO from SEEK_DATA means "no data until the end".
            let nextData = lseek(fd, off_t(offset), 3)
            let holeEnd = nextData < 0 ? size : min(UInt64(nextData) / granule * granule, size)
            if holeEnd > offset {
                try body(offset..<holeEnd, true)
                offset = holeEnd
            }
            guard offset < size else { break }
            let nextHole = lseek(fd, off_t(offset), 4)
            let dataEnd = nextHole < 0 ? size : min((UInt64(nextHole) + granule - 1) / granule * granule, size)
            try body(offset..<max(dataEnd, offset + 1), false)
            offset = max(dataEnd, offset + 1)
        }
    }

    /// Fills `buffers` from the image at `offset` (all of them, or an error).
    func read(into buffers: GuestBuffers, at offset: UInt64) -> Int32? {
        transfer(buffers.withIOVecs { $0 }, at: offset) { fd, vectors, count, position in preadv(fd, vectors, count, position) }
    }

    /// Writes `buffers` to the image at `offset`.
    func write(from buffers: GuestBuffers, at offset: UInt64) -> Int32? {
        transfer(buffers.withIOVecs { $0 }, at: offset) { fd, vectors, count, position in pwritev(fd, vectors, count, position) }
    }

    /// Returns the errno of a failure, nil on success. Short transfers continue where they stopped;
    /// reading past the end of the file (a block device shrunk under us) is an error, not zeros.
    private func transfer(_ vectors: [iovec], at offset: UInt64,
                          _ call: (Int32, UnsafePointer<iovec>, Int32, off_t) -> Int) -> Int32? {
        var vectors = vectors
        var position = off_t(offset)
        var first = 0
        while first < vectors.count {
            let count = Int32(min(vectors.count - first, Self.iovecLimit))
            let done = vectors.withUnsafeBufferPointer { call(file.rawValue, $0.baseAddress! + first, count, position) }
            if done < 0 {
                if errno == EINTR { continue }
                return errno
            }
            if done == 0 { return EIO }
            position += off_t(done)
            var left = done
            while left > 0, first < vectors.count {
                if left >= vectors[first].iov_len {
                    left -= vectors[first].iov_len
                    first += 1
                } else {
                    vectors[first].iov_base += left
                    vectors[first].iov_len -= left
                    left = 0
                }
            }
        }
        return nil
    }

    /// Starts writing a range back to stable storage without waiting for it (sync_file_range), so that a
    /// later flush has little left to do (a length of 0: to the end of the file): a migration's destination does this as blocks arrive, which keeps
    /// writing back a whole disk out of the downtime's final flush.
    public func startWriteback(at offset: UInt64, length: UInt64) {
        _ = ckvm_start_writeback(file.rawValue, Int64(offset), Int64(length))
    }

    /// fdatasync: what the guest wrote is on stable storage when this returns nil.
    public func flush() -> Int32? {
        while fdatasync(file.rawValue) != 0 {
            if errno != EINTR { return errno }
        }
        return nil
    }

    /// Makes a range read as zeros: deallocated (discard, or write-zeroes that may unmap) or
    /// zeroed in place. Falls back to writing zeros where the file system cannot do either.
    public func zero(at offset: UInt64, length: UInt64, deallocate: Bool) -> Int32? {
        if deallocate, ckvm_punch_hole(file.rawValue, Int64(offset), Int64(length)) == 0 { return nil }
        if ckvm_zero_range(file.rawValue, Int64(offset), Int64(length)) == 0 { return nil }
        let chunk = [UInt8](repeating: 0, count: 1 << 16)
        var done: UInt64 = 0
        while done < length {
            let take = Int(min(UInt64(chunk.count), length - done))
            let written = chunk.withUnsafeBytes { pwrite(file.rawValue, $0.baseAddress, take, off_t(offset + done)) }
            if written < 0 {
                if errno == EINTR { continue }
                return errno
            }
            done += UInt64(written)
        }
        return nil
    }
}
