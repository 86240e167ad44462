import TernWire

/// Each guest page's CRC32C, kept up to date as pages arrive, so that a
/// receiver has its `MemoryDigest` the moment the last page lands instead of
/// reading all of RAM again inside the migration's downtime (a GiB took
/// about 100 ms here).
///
/// The CRC is taken of the bytes just written to the page (or of the page
/// after a delta was applied to it), so the digest is still that of what the
/// memory holds: it catches a page placed at the wrong address, a page that
/// never came, or an older copy that overtook a newer one, as a digest read
/// from memory would. Fresh memory is zero, so every page starts with the
/// zero page's CRC.
///
/// Not synchronised: the appliers of parallel streams write disjoint pages
/// (each page belongs to one stream), and the digest is read after they
/// have all finished.
public final class PageDigests: @unchecked Sendable {
    private let crcs: UnsafeMutableBufferPointer<UInt32>

    public init(pageCount: Int) {
        crcs = .allocate(capacity: pageCount)
        crcs.initialize(repeating: MemoryDigest.zeroPageCRC)
    }

    deinit { crcs.deallocate() }

    public var pageCount: Int { crcs.count }

    /// Records the contents of `count` pages from `first`, laid out one after another in `bytes`.
    public func record(first: Int, pages bytes: UnsafeRawBufferPointer) {
        MemoryDigest.forEachPageCRC(in: bytes) { i, crc in crcs[first + i] = crc }
    }

    /// Records `count` pages from `first` as zero.
    public func recordZero(first: Int, count: Int) {
        for page in first..<first + count { crcs[page] = MemoryDigest.zeroPageCRC }
    }

    /// The digest of all pages, or of those `include` says yes to (as `MemoryDigest.compute`).
    public func digest(including include: ((Int) -> Bool)? = nil) -> UInt64 {
        var digest: UInt64 = 0
        for page in 0..<crcs.count where include?(page) ?? true {
            digest &+= MemoryDigest.contribution(page: UInt64(page), crc: crcs[page])
        }
        return digest
    }
}
