import Glibc
import TernWire

/// A run of consecutive guest pages that travel together: either their bytes
/// follow, or they are all zero and only the marker travels.
///
/// Encoded inside `pages` frames as a 16-byte header
///     u64 guest-physical address (page-aligned) | u32 page count | u32 kind
/// followed, for data runs, by count * 4096 bytes.
public struct PageRun: Equatable, Sendable {
    public enum Kind: UInt32, Sendable { case data = 0, zero = 1 }
    public static let headerSize = 16
    public static let pageSize = 4096

    public var address: GuestAddress
    public var pageCount: UInt32
    public var kind: Kind

    public init(address: GuestAddress, pageCount: UInt32, kind: Kind) {
        self.address = address
        self.pageCount = pageCount
        self.kind = kind
    }

    public var byteCount: Int { Int(pageCount) * Self.pageSize }
    public var payloadSize: Int { Self.headerSize + (kind == .data ? byteCount : 0) }

    public var encodedHeader: [UInt8] {
        var w = WireWriter(capacity: Self.headerSize)
        w.write(address.rawValue)
        w.write(pageCount)
        w.write(kind.rawValue)
        return w.bytes
    }

    public init(decodingHeader bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "page run header")
        address = GuestAddress(try r.read(UInt64.self))
        pageCount = try r.read(UInt32.self)
        let rawKind = try r.read(UInt32.self)
        guard let kind = Kind(rawValue: rawKind) else { throw .malformed("page run of unknown kind \(rawKind)") }
        guard address.rawValue % UInt64(Self.pageSize) == 0 else { throw .malformed("page run at unaligned address \(address)") }
        guard pageCount > 0 else { throw .malformed("empty page run at \(address)") }
        self.kind = kind
    }
}

/// Walks guest memory as zero and data runs without touching pages that
/// were never written: the memfd's holes (Self.seekHole) are zero by
/// definition, and reading them would allocate them.
public struct MemoryScanner {
    let memory: GuestMemory
    /// Longest run emitted, so runs fit comfortably in a frame.
    let maximumRunPages: UInt32

    public init(memory: GuestMemory, maximumRunPages: UInt32 = 1024) {
        self.memory = memory
        self.maximumRunPages = maximumRunPages
    }

    /// Calls `body` for each run, in address order, covering all of RAM exactly once.
    public func forEachRun(_ body: (PageRun) throws -> Void) throws {
        try withoutActuallyEscaping(body) { try scan($0) }
    }

    // lseek whences from <unistd.h> that Glibc's module does not export (Linux values).
    private static let seekData: Int32 = 3
    private static let seekHole: Int32 = 4

    private func scan(_ body: @escaping (PageRun) throws -> Void) throws {
        let page = UInt64(PageRun.pageSize)
        let fd = memory.file.rawValue
        for region in memory.regions {
            var builder = RunBuilder(region: region, maximumRunPages: maximumRunPages, body: body)
            var offset = region.fileOffset
            let end = region.fileOffset + region.size
            while offset < end {
                // A hole (never written) runs up to the next data; ENXIO means "no data until the end".
                let nextData = lseek(fd, off_t(offset), Self.seekData)
                let holeEnd = nextData < 0 ? end : min(UInt64(nextData) / page * page, end)
                if holeEnd > offset {
                    try builder.add(.zero, from: offset, pages: (holeEnd - offset) / page)
                    offset = holeEnd
                }
                guard offset < end else { break }
                let nextHole = lseek(fd, off_t(offset), Self.seekHole)
                let dataEnd = nextHole < 0 ? end : min((UInt64(nextHole) + page - 1) / page * page, end)
                while offset < dataEnd {
                    let bytes = UnsafeRawBufferPointer(start: memory.mapping.base + Int(offset), count: PageRun.pageSize)
                    try builder.add(Checksum.isZero(bytes) ? .zero : .data, from: offset, pages: 1)
                    offset += page
                }
            }
            try builder.finish()
        }
    }
}

/// Merges adjacent pages of one kind into runs of bounded length.
private struct RunBuilder {
    let region: GuestMemory.Region
    let maximumRunPages: UInt32
    let body: (PageRun) throws -> Void
    var pending: PageRun?

    init(region: GuestMemory.Region, maximumRunPages: UInt32, body: @escaping (PageRun) throws -> Void) {
        self.region = region
        self.maximumRunPages = maximumRunPages
        self.body = body
    }

    mutating func add(_ kind: PageRun.Kind, from fileOffset: UInt64, pages: UInt64) throws {
        var address = region.start + (fileOffset - region.fileOffset)
        var left = pages
        while left > 0 {
            if var run = pending, run.kind == kind, run.pageCount < maximumRunPages,
               run.address.rawValue + UInt64(run.byteCount) == address.rawValue {
                let take = min(UInt64(maximumRunPages - run.pageCount), left)
                run.pageCount += UInt32(take)
                pending = run
                left -= take
                address = address + take * UInt64(PageRun.pageSize)
                continue
            }
            try finish()
            let take = min(UInt64(maximumRunPages), left)
            pending = PageRun(address: address, pageCount: UInt32(take), kind: kind)
            left -= take
            address = address + take * UInt64(PageRun.pageSize)
        }
    }

    mutating func finish() throws {
        if let run = pending { try body(run) }
        pending = nil
    }
}
