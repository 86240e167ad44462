import TernWire

/// How a migration treats the VM's disks (`tern migrate --storage`, docs/STORAGE.md).
public enum StorageMode: String, Codable, Sendable, CaseIterable {
    /// Both hosts see the same image: the source flushes and lets go of it at the hand-over, and the
    /// destination takes it only then.
    case shared
    /// The whole disk moves: a bulk pass while the guest runs, then rounds of the blocks it changed,
    /// the last of them while it is paused. Zero blocks go as markers, and the copy stays sparse.
    case copy

    var wireValue: UInt8 {
        switch self {
        case .shared: 0
        case .copy: 1
        }
    }

    init(wireValue: UInt8) throws(WireError) {
        switch wireValue {
        case 0: self = .shared
        case 1: self = .copy
        default: throw .malformed("hello: storage mode \(wireValue)")
        }
    }
}

/// The hello's account of the VM's disks: how they move, and each one's size, so that a destination
/// can refuse a target of the wrong size before any block moves.
public struct StorageAnnouncement: Equatable, Sendable {
    public struct Disk: Equatable, Sendable {
        public var id: String
        public var sizeBytes: UInt64
        public init(id: String, sizeBytes: UInt64) {
            self.id = id
            self.sizeBytes = sizeBytes
        }
    }

    public var mode: StorageMode
    public var disks: [Disk]

    public init(mode: StorageMode = .shared, disks: [Disk] = []) {
        self.mode = mode
        self.disks = disks
    }

    func encode(into writer: inout WireWriter) {
        writer.write(mode.wireValue)
        writer.write(UInt32(disks.count))
        for disk in disks {
            writer.writeString(disk.id)
            writer.write(disk.sizeBytes)
        }
    }

    init(reading reader: inout WireReader) throws(WireError) {
        mode = try StorageMode(wireValue: reader.read())
        let count = Int(try reader.read(UInt32.self))
        guard count <= 16 else { throw .tooLarge("hello: \(count) disks") }
        disks = []
        for _ in 0..<count {
            disks.append(Disk(id: try reader.readString(maximum: 64), sizeBytes: try reader.read()))
        }
    }
}

/// The fixed part of a `blocks` frame: which disk, which blocks, and whether their data follows
/// (`count` × 4 KiB; the disk's last block is padded with zeros) or they are zeros.
///
///     0  u16 disk      index in the hello's disk list
///     2  u8  kind      0: data follows, 1: zeros
///     3  u8  reserved  0
///     4  u32 count     blocks
///     8  u64 first     first block
public struct BlockRunHeader: Equatable, Sendable {
    public enum Kind: UInt8, Sendable {
        case data = 0
        case zeros = 1
    }

    public static let size = 16
    public static let blockSize = 4096
    /// Data blocks in one frame (1 MiB).
    public static let maximumDataBlocks = 256
    /// Zero blocks one marker may cover (4 GiB).
    public static let maximumZeroBlocks = 1 << 20

    public var disk: UInt16
    public var kind: Kind
    public var count: UInt32
    public var first: UInt64

    public init(disk: UInt16, kind: Kind, first: UInt64, count: UInt32) {
        self.disk = disk
        self.kind = kind
        self.first = first
        self.count = count
    }

    public var blocks: Range<UInt64> { first..<first + UInt64(count) }

    /// Payload bytes that follow the header in the frame.
    public var dataBytes: Int { kind == .data ? Int(count) * Self.blockSize : 0 }

    public var encoded: [UInt8] {
        var writer = WireWriter(capacity: Self.size)
        writer.write(disk)
        writer.write(kind.rawValue)
        writer.write(UInt8(0))
        writer.write(count)
        writer.write(first)
        return writer.bytes
    }

    public init(decoding bytes: some Collection<UInt8>) throws(WireError) {
        var reader = WireReader(Array(bytes.prefix(Self.size)), context: "blocks frame")
        disk = try reader.read()
        guard let kind = Kind(rawValue: try reader.read()) else { throw .malformed("blocks frame: unknown kind") }
        self.kind = kind
        guard try reader.read(UInt8.self) == 0 else { throw .malformed("blocks frame: reserved byte set") }
        count = try reader.read()
        first = try reader.read()
        guard count > 0 else { throw .malformed("blocks frame: no blocks") }
        // A disk's bytes fit in 64 bits, so its blocks in 52: beyond that no arithmetic on them is safe.
        guard first < 1 << 52 else { throw .malformed("blocks frame: block \(first) is beyond any disk") }
        let limit = kind == .data ? Self.maximumDataBlocks : Self.maximumZeroBlocks
        guard count <= limit else { throw .tooLarge("blocks frame: \(count) blocks (limit \(limit))") }
    }
}
