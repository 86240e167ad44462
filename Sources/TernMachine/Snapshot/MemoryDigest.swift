import Glibc
import TernWire

/// A digest of all guest RAM that both ends of a migration (or a snapshot
/// and its restore) can compute independently and compare.
///
/// Per page: CRC32C of its bytes, mixed with the page's index, summed.
/// Pages in the memfd's holes are zero without being read (their CRC is a
/// constant), and pages are read with pread from the memfd rather than
/// through the VMM's mapping, so computing a digest neither allocates guest
/// memory nor faults in page tables.
public enum MemoryDigest {
    public static let zeroPageCRC: UInt32 = {
        let zeros = [UInt8](repeating: 0, count: PageRun.pageSize)
        return Checksum.crc32c(zeros)
    }()

    @inline(__always)
    static func mix(_ page: UInt64, _ crc: UInt32) -> UInt64 {
        (UInt64(crc) | UInt64(crc) << 32) ^ (page &* 0x9E37_79B9_7F4A_7C15)
    }

    /// One page's share of the digest (the digest is their sum), for receivers that see pages one by one.
    public static func contribution(page: UInt64, crc: UInt32) -> UInt64 { mix(page, crc) }

    /// The digest of all RAM, or of the pages for which `include` says yes (by memfd page index).
    public static func compute(_ memory: GuestMemory, including include: ((Int) -> Bool)? = nil) throws -> UInt64 {
        let pageSize = UInt64(PageRun.pageSize)
        let fd = memory.file.rawValue
        let chunkPages = 1024
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkPages * PageRun.pageSize, alignment: 4096)
        defer { buffer.deallocate() }
        var digest: UInt64 = 0
        var page: UInt64 = 0
        let totalPages = memory.size / pageSize
        while page < totalPages {
            let offset = page * pageSize
            let nextData = lseek(fd, off_t(offset), 3 /* SEEK_DATA */)
            let holeEnd = nextData < 0 ? totalPages : min(UInt64(nextData) / pageSize, totalPages)
            while page < holeEnd {
                if include?(Int(page)) ?? true { digest &+= mix(page, zeroPageCRC) }
                page += 1
            }
            guard page < totalPages else { break }
            let nextHole = lseek(fd, off_t(page * pageSize), 4 /* SEEK_HOLE */)
            let dataEnd = nextHole < 0 ? totalPages : min((UInt64(nextHole) + pageSize - 1) / pageSize, totalPages)
            while page < dataEnd {
                let count = Int(min(UInt64(chunkPages), dataEnd - page))
                let bytes = count * PageRun.pageSize
                var done = 0
                while done < bytes {
                    let n = pread(fd, buffer.baseAddress! + done, bytes - done, off_t(page * pageSize) + off_t(done))
                    if n < 0 && errno == EINTR { continue }
                    guard n > 0 else { throw FDStream.IOError(operation: "reading guest memory", errno: errno) }
                    done += n
                }
                for i in 0..<count where include?(Int(page) + i) ?? true {
                    let crc = Checksum.crc32c(UnsafeRawBufferPointer(rebasing: buffer[i * PageRun.pageSize..<(i + 1) * PageRun.pageSize]))
                    digest &+= mix(page + UInt64(i), crc)
                }
                page += UInt64(count)
            }
        }
        return digest
    }

    /// A digest of the encoded device and vCPU state.
    public static func state(_ sections: [StateSection]) -> UInt64 {
        var crc: UInt32 = 0, length: UInt64 = 0
        for section in sections {
            let bytes = section.encoded
            crc = Checksum.crc32c(bytes, seed: crc)
            length += UInt64(bytes.count)
        }
        return UInt64(crc) << 32 | (length & 0xFFFF_FFFF)
    }
}
