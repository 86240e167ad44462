import Glibc
import TernWire

/// A run of consecutive guest pages that travel together: either their bytes
/// follow, or they are all zero and only the marker travels.
///
/// Encoded inside `pages` frames as a 16-byte header
///     u64 guest-physical address (page-aligned) | u32 page count | u32 kind
/// followed, for data runs, by count * 4096 bytes; for a delta (always one
/// page), by a u32 length and an XBZRLE delta against the copy the receiver
/// already holds.
public struct PageRun: Equatable, Sendable {
    public enum Kind: UInt32, Sendable { case data = 0, zero = 1, delta = 2 }
    public static let headerSize = 16
    public static let pageSize = 4096
    /// Flag on a `pages` frame whose payload is a u32 length and then one zstd frame of the runs (`--compress zstd`).
    public static let compressedFrameFlag: UInt32 = 1 << 1
    /// A compressed frame's runs may not decompress to more than this.
    public static let maximumUncompressedFrame = 16 << 20

    public var address: GuestAddress
    public var pageCount: UInt32
    public var kind: Kind

    public init(address: GuestAddress, pageCount: UInt32, kind: Kind) {
        self.address = address
        self.pageCount = pageCount
        self.kind = kind
    }

    public var byteCount: Int { Int(pageCount) * Self.pageSize }

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
        guard kind != .delta || pageCount == 1 else { throw .malformed("a delta run of \(pageCount) pages at \(address)") }
        self.kind = kind
    }
}
