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

/// A `blocks` frame: runs of one disk's 4 KiB blocks, each with its data
/// (the disk's last block padded with zeros) or as zeros, so that scattered
/// blocks travel many to a frame rather than one frame each.
///
///     0  u16 disk      index in the hello's disk list
///     2  u16 runs      1 to 256
///     4  u32 reserved  0
///     8  runs × { u64 first block, u32 blocks, u8 kind (0 data, 1 zeros), 3 bytes 0 }
///        then the data runs' blocks, in order (at most 256 blocks in all)
public struct BlockFrame: Equatable, Sendable {
    public enum Kind: UInt8, Sendable {
        case data = 0
        case zeros = 1
    }

    public struct Run: Equatable, Sendable {
        public var first: UInt64
        public var count: UInt32
        public var kind: Kind
        public init(first: UInt64, count: UInt32, kind: Kind) {
            self.first = first
            self.count = count
            self.kind = kind
        }
        public var blocks: Range<UInt64> { first..<first + UInt64(count) }
    }

    public static let headerSize = 8
    public static let runSize = 16
    public static let blockSize = 4096
    /// Data blocks in one frame (1 MiB), and runs.
    public static let maximumDataBlocks = 256
    public static let maximumRuns = 256
    /// Zero blocks one run may cover (4 GiB).
    public static let maximumZeroBlocks = 1 << 20

    public var disk: UInt16
    public var runs: [Run]

    public init(disk: UInt16, runs: [Run]) {
        self.disk = disk
        self.runs = runs
    }

    public var dataBlocks: Int { runs.reduce(0) { $0 + ($1.kind == .data ? Int($1.count) : 0) } }
    /// Bytes of the header and run list, before the data.
    public var encodedSize: Int { Self.headerSize + runs.count * Self.runSize }

    /// The header and run list (the data follows them in the frame).
    public var encoded: [UInt8] {
        var writer = WireWriter(capacity: encodedSize)
        writer.write(disk)
        writer.write(UInt16(runs.count))
        writer.write(UInt32(0))
        for run in runs {
            writer.write(run.first)
            writer.write(run.count)
            writer.write(run.kind.rawValue)
            writer.write(UInt8(0)); writer.write(UInt8(0)); writer.write(UInt8(0))
        }
        return writer.bytes
    }

    /// Decodes and checks the header and run list of `payload`, whose rest must be exactly the data runs' blocks.
    public init(decoding payload: [UInt8]) throws(WireError) {
        var reader = WireReader(Array(payload.prefix(Self.headerSize + Self.maximumRuns * Self.runSize)), context: "blocks frame")
        disk = try reader.read()
        let count = Int(try reader.read(UInt16.self))
        guard try reader.read(UInt32.self) == 0 else { throw .malformed("blocks frame: reserved bits set") }
        guard (1...Self.maximumRuns).contains(count) else { throw .malformed("blocks frame: \(count) runs (1 to \(Self.maximumRuns))") }
        var runs: [Run] = []
        for _ in 0..<count {
            let first = try reader.read(UInt64.self), blocks = try reader.read(UInt32.self)
            guard let kind = Kind(rawValue: try reader.read()) else { throw .malformed("blocks frame: unknown run kind") }
            guard try reader.read(UInt8.self) == 0, try reader.read(UInt8.self) == 0, try reader.read(UInt8.self) == 0 else {
                throw .malformed("blocks frame: reserved bits set")
            }
            guard blocks > 0 else { throw .malformed("blocks frame: an empty run") }
            // A disk's bytes fit in 64 bits, so its blocks in 52: beyond that no arithmetic on them is safe.
            guard first < 1 << 52 else { throw .malformed("blocks frame: block \(first) is beyond any disk") }
            guard kind == .data || Int(blocks) <= Self.maximumZeroBlocks else { throw .tooLarge("blocks frame: a run of \(blocks) zero blocks") }
            runs.append(Run(first: first, count: blocks, kind: kind))
        }
        self.runs = runs
        let data = runs.reduce(0) { $0 + ($1.kind == .data ? Int($1.count) : 0) }
        guard data <= Self.maximumDataBlocks else { throw .tooLarge("blocks frame: \(data) data blocks (limit \(Self.maximumDataBlocks))") }
        guard payload.count == encodedSize + data * Self.blockSize else {
            throw .malformed("blocks frame: \(data) data blocks with \(payload.count - min(payload.count, encodedSize)) bytes of data")
        }
    }
}
