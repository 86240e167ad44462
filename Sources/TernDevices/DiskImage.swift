import CKVM
import Glibc
import TernKVM

/// A raw disk image file, the block device's backend: positioned reads and
/// writes straight between the file and guest memory (preadv/pwritev on the
/// request's buffers, no copy in between), flush by fdatasync, discard and
/// write-zeroes by fallocate.
public final class DiskImage: Sendable {
    public let path: String
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

        public var description: String {
            switch self {
            case .cannotOpen(let path, let reason): "cannot open disk image \(path): \(reason)"
            case .notAFile(let path): "disk image \(path) is neither a regular file nor a block device"
            case .tooSmall(let path): "disk image \(path) is smaller than one 512-byte sector"
            }
        }
    }

    public init(path: String, readOnly: Bool) throws(OpenError) {
        let raw = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard raw >= 0 else { throw .cannotOpen(path, String(cString: strerror(errno))) }
        file = FileDescriptor(adopting: raw)
        var info = stat()
        guard fstat(raw, &info) == 0 else { throw .cannotOpen(path, String(cString: strerror(errno))) }
        let kind = info.st_mode & S_IFMT
        guard kind == S_IFREG || kind == S_IFBLK else { throw .notAFile(path) }
        let end = lseek(raw, 0, SEEK_END)
        guard end >= 512 else { throw end < 0 ? .cannotOpen(path, String(cString: strerror(errno))) : .tooSmall(path) }
        self.path = path
        self.readOnly = readOnly
        size = UInt64(end)
    }

    /// Fills `buffers` from the image at `offset` (all of them, or an error).
    func read(into buffers: GuestBuffers, at offset: UInt64) -> Int32? {
        transfer(buffers, at: offset) { fd, vectors, count, position in preadv(fd, vectors, count, position) }
    }

    /// Writes `buffers` to the image at `offset`.
    func write(from buffers: GuestBuffers, at offset: UInt64) -> Int32? {
        transfer(buffers, at: offset) { fd, vectors, count, position in pwritev(fd, vectors, count, position) }
    }

    /// Returns the errno of a failure, nil on success. Short transfers continue where they stopped;
    /// reading past the end of the file (a block device shrunk under us) is an error, not zeros.
    private func transfer(_ buffers: GuestBuffers, at offset: UInt64,
                          _ call: (Int32, UnsafePointer<iovec>, Int32, off_t) -> Int) -> Int32? {
        var vectors = buffers.withIOVecs { $0 }
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

    /// fdatasync: what the guest wrote is on stable storage when this returns nil.
    func flush() -> Int32? {
        while fdatasync(file.rawValue) != 0 {
            if errno != EINTR { return errno }
        }
        return nil
    }

    /// Makes a range read as zeros: deallocated (discard, or write-zeroes that may unmap) or
    /// zeroed in place. Falls back to writing zeros where the file system cannot do either.
    func zero(at offset: UInt64, length: UInt64, deallocate: Bool) -> Int32? {
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
