/// The unit of every Tern byte stream, snapshot files and migration streams
/// alike: a fixed 24-byte header, then `length` payload bytes.
///
///     0  u32 type         what the payload is (FrameType)
///     4  u32 flags        type-specific
///     8  u64 length       payload bytes; capped at `maximumPayload` before anything is allocated
///    16  u32 payloadCRC   CRC32C of the payload
///    20  u32 headerCRC    CRC32C of bytes 0..<20, so a flipped length is caught before it is trusted
public struct FrameHeader: Equatable, Sendable {
    public static let size = 24
    public static let maximumPayload: UInt64 = 64 << 20

    public var type: FrameType
    public var flags: UInt32
    public var length: UInt64
    public var payloadCRC: UInt32

    public init(type: FrameType, flags: UInt32 = 0, length: UInt64, payloadCRC: UInt32) {
        self.type = type
        self.flags = flags
        self.length = length
        self.payloadCRC = payloadCRC
    }

    public var encoded: [UInt8] {
        var writer = WireWriter(capacity: Self.size)
        writer.write(type.rawValue)
        writer.write(flags)
        writer.write(length)
        writer.write(payloadCRC)
        writer.write(Checksum.crc32c(writer.bytes))
        return writer.bytes
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        guard bytes.count == Self.size else { throw .truncated("frame header") }
        var reader = WireReader(bytes, context: "frame header")
        let rawType = try reader.read(UInt32.self)
        flags = try reader.read(UInt32.self)
        length = try reader.read(UInt64.self)
        payloadCRC = try reader.read(UInt32.self)
        let headerCRC = try reader.read(UInt32.self)
        guard headerCRC == Checksum.crc32c(bytes[0..<20]) else {
            throw .checksumMismatch("frame header (type \(rawType), length \(length))")
        }
        guard length <= Self.maximumPayload else {
            throw .tooLarge("frame payload of \(length) bytes (limit \(Self.maximumPayload))")
        }
        type = FrameType(rawValue: rawType)
    }
}

/// Frame types, all in one place so that no two share a number. Snapshot
/// files use state, pages and end; migration streams add their control types.
public struct FrameType: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// One state section (a vCPU, the irqchip, a device...): see StateSection.
    public static let state = FrameType(rawValue: 1)
    /// A batch of guest pages: see PageBatch.
    public static let pages = FrameType(rawValue: 2)
    /// The explicit end of a stream, with totals to cross-check.
    public static let end = FrameType(rawValue: 3)

    // The migration protocol (docs/MIGRATION.md, "Wire protocol").
    public static let hello = FrameType(rawValue: 16)
    public static let helloReply = FrameType(rawValue: 17)
    public static let ready = FrameType(rawValue: 18)
    public static let go = FrameType(rawValue: 19)
    public static let resumed = FrameType(rawValue: 20)
    public static let abort = FrameType(rawValue: 21)
    /// Round-trip probe before the first page (the downtime prediction needs the link's latency), and each round's sync.
    public static let ping = FrameType(rawValue: 22)
    public static let pong = FrameType(rawValue: 23)

    // Post-copy (docs/MIGRATION.md, "Post-copy").
    /// S→D at switch-over instead of `end`: the pages the destination must still get, and the pause time.
    public static let postcopyStart = FrameType(rawValue: 24)
    /// D→S: pages a vCPU (or KVM) is waiting for.
    public static let pageRequest = FrameType(rawValue: 25)
    /// S→D: every needed page has been sent.
    public static let postcopyEnd = FrameType(rawValue: 26)
    /// D→S: the destination holds all memory; with its fault statistics.
    public static let complete = FrameType(rawValue: 27)
    /// S→D: the source has the destination's `complete` and ends; until then the destination stays resumable.
    public static let completeAck = FrameType(rawValue: 32)
    /// S→D, first frame of a new connection after post-copy's connection dropped: the migration's token.
    public static let postcopyResume = FrameType(rawValue: 30)
    /// D→S: the pages the destination still waits for (a bitmap, as in `postcopyStart`).
    public static let postcopyResumeReply = FrameType(rawValue: 31)

    // Parallel page streams (docs/MIGRATION.md, "Parallel streams").
    /// S→D, first frame of each extra connection: the session token and the stream's index.
    public static let streamHello = FrameType(rawValue: 28)
    /// S→D on an extra connection: this stream carries no more pages.
    public static let streamEnd = FrameType(rawValue: 29)

    // Storage migration (docs/STORAGE.md).
    /// S→D: a run of one disk's blocks, with their data or as zeros.
    public static let blocks = FrameType(rawValue: 33)

    public var description: String {
        switch self {
        case .state: "state"
        case .pages: "pages"
        case .end: "end"
        case .hello: "hello"
        case .helloReply: "hello reply"
        case .ready: "ready"
        case .go: "go"
        case .resumed: "resumed"
        case .abort: "abort"
        case .ping: "ping"
        case .pong: "pong"
        case .postcopyStart: "post-copy start"
        case .pageRequest: "page request"
        case .postcopyEnd: "post-copy end"
        case .complete: "complete"
        case .completeAck: "complete acknowledgement"
        case .postcopyResume: "post-copy resume"
        case .postcopyResumeReply: "post-copy resume reply"
        case .streamHello: "stream hello"
        case .streamEnd: "stream end"
        case .blocks: "blocks"
        default: "type-\(rawValue)"
        }
    }
}

/// A state section: a four-character tag naming the component, the
/// component's own state version, and its encoded state.
public struct StateSection: Equatable, Sendable {
    public var tag: String
    public var version: UInt32
    public var body: [UInt8]

    public init(tag: String, version: UInt32, body: [UInt8]) {
        self.tag = tag
        self.version = version
        self.body = body
    }

    public var encoded: [UInt8] {
        var writer = WireWriter(capacity: body.count + 12)
        writer.writeString(tag)
        writer.write(version)
        writer.write(body)
        return writer.bytes
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var reader = WireReader(bytes, context: "state section")
        tag = try reader.readString(maximum: 16)
        version = try reader.read(UInt32.self)
        body = try reader.readBytes(reader.remaining)
    }
}
