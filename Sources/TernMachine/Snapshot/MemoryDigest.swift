import Foundation
import Glibc
import Synchronization
import TernKVM
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

    /// Calls `body` with the index (0, 1, ...) and CRC32C of each page laid out one after
    /// another in `bytes`, skipping the indices `skip` says yes to (their CRC is not taken).
    @inline(__always)
    public static func forEachPageCRC(in bytes: UnsafeRawBufferPointer, skip: ((Int) -> Bool)? = nil, _ body: (Int, UInt32) -> Void) {
        for i in 0..<bytes.count / PageRun.pageSize where !(skip?(i) ?? false) {
            body(i, Checksum.crc32c(UnsafeRawBufferPointer(rebasing: bytes[i * PageRun.pageSize..<(i + 1) * PageRun.pageSize])))
        }
    }

    /// The share of the digest of pages laid out one after another in `bytes`, the first being page `first`.
    public static func contribution(ofPages bytes: UnsafeRawBufferPointer, first: Int) -> UInt64 {
        var sum: UInt64 = 0
        forEachPageCRC(in: bytes) { i, crc in sum &+= mix(UInt64(first + i), crc) }
        return sum
    }

    /// The digest of all RAM, or of the pages for which `include` says yes (by memfd page index).
    public static func compute(_ memory: GuestMemory, including include: ((Int) -> Bool)? = nil) throws -> UInt64 {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkPages * PageRun.pageSize, alignment: 4096)
        defer { buffer.deallocate() }
        var digest: UInt64 = 0
        try memory.forEachExtent { first, count, isHole in
            let pages = UInt64(first)..<UInt64(first + count)
            digest &+= isHole ? holeDigest(pages, including: include) : try dataDigest(memory, pages, including: include, buffer: buffer)
        }
        return digest
    }

    /// The digest of all RAM, read by `threads` threads that take blocks of 16 MiB of data in turn (the
    /// digest is a sum, so the blocks add up). A paused source reads a GiB in about 100 ms on one core of
    /// this host: that is downtime when `--verify` waits for it before the hand-over. The extents are
    /// found once: each SEEK_HOLE walks the page cache to the end of its extent, so seeking per block
    /// would read the extent's pages over and over.
    public static func compute(_ memory: GuestMemory, threads: Int) throws -> UInt64 {
        var digest: UInt64 = 0
        var blocks: [Range<UInt64>] = []
        try memory.forEachExtent { first, count, isHole in
            let pages = UInt64(first)..<UInt64(first + count)
            if isHole { digest &+= holeDigest(pages, including: nil); return }
            for start in stride(from: pages.lowerBound, to: pages.upperBound, by: Int(blockPages)) {
                blocks.append(start..<min(start + blockPages, pages.upperBound))
            }
        }
        let workers = max(1, min(threads, blocks.count))
        let nextBlock = Atomic<Int>(0)
        let results = Mutex<[Result<UInt64, any Error>]>([])
        let work: @Sendable () -> Void = { [blocks] in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkPages * PageRun.pageSize, alignment: 4096)
            defer { buffer.deallocate() }
            let result = Result {
                var digest: UInt64 = 0
                while true {
                    let block = nextBlock.add(1, ordering: .relaxed).oldValue
                    guard block < blocks.count else { return digest }
                    digest &+= try dataDigest(memory, blocks[block], including: nil, buffer: buffer)
                }
            }
            results.withLock { $0.append(result) }
        }
        let done = DispatchSemaphore(value: 0)
        for index in 1..<max(workers, 1) {
            spawnThread(named: "digest-\(index)") {
                work()
                done.signal()
            }
        }
        work()
        for _ in 1..<max(workers, 1) { done.wait() }
        return try results.withLock { results in try results.reduce(digest) { try $0 &+ $1.get() } }
    }

    private static let chunkPages = 1024
    private static let blockPages: UInt64 = 4096

    private static func holeDigest(_ pages: Range<UInt64>, including include: ((Int) -> Bool)?) -> UInt64 {
        var digest: UInt64 = 0
        for page in pages where include?(Int(page)) ?? true { digest &+= mix(page, zeroPageCRC) }
        return digest
    }

    /// Reads `pages` with pread into `buffer` (`chunkPages` pages, reused: each fresh buffer costs a page
    /// fault per page) and sums their contributions.
    private static func dataDigest(_ memory: GuestMemory, _ pages: Range<UInt64>, including include: ((Int) -> Bool)?,
                                   buffer: UnsafeMutableRawBufferPointer) throws -> UInt64 {
        let pageSize = UInt64(PageRun.pageSize)
        let fd = memory.file.rawValue
        var digest: UInt64 = 0
        var page = pages.lowerBound
        while page < pages.upperBound {
            let count = Int(min(UInt64(chunkPages), pages.upperBound - page))
            let bytes = count * PageRun.pageSize
            var done = 0
            while done < bytes {
                let n = pread(fd, buffer.baseAddress! + done, bytes - done, off_t(page * pageSize) + off_t(done))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw FDStream.IOError(operation: "reading guest memory", errno: errno) }
                done += n
            }
            let first = page
            MemoryDigest.forEachPageCRC(in: UnsafeRawBufferPointer(rebasing: buffer[0..<bytes]),
                                        skip: include.map { include in { !include(Int(first) + $0) } }) { i, crc in
                digest &+= mix(first + UInt64(i), crc)
            }
            page += UInt64(count)
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
