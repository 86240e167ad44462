import TernWire

/// The snapshot file format (docs/SNAPSHOT.md):
///
///     file header (32 bytes)
///         0  "TERNSNAP"
///         8  u32 format major   a reader refuses another major
///        12  u32 format minor   and a newer minor than its own
///        16  u64 flags          none defined; must be 0
///        24  u32 reserved (0)
///        28  u32 CRC32C of bytes 0..<28
///     state frames              one per section: machine, platform, vCPUs, devices
///     pages frames              page runs covering every page of RAM exactly once
///     end frame                 totals: frames, data pages, zero pages
///
/// Frames are the same self-checking frames migration streams use (TernWire.FrameHeader).
public enum SnapshotFormat {
    public static let magic = Array("TERNSNAP".utf8)
    public static let major: UInt32 = 1
    public static let minor: UInt32 = 0
    public static let headerSize = 32
    /// The most VM state (all state frames together) a reader takes: a VM's is tens of KiB per vCPU.
    public static let maximumStateBytes: UInt64 = 16 << 20

    static func encodeHeader() -> [UInt8] {
        var w = WireWriter(capacity: headerSize)
        w.write(magic)
        w.write(major)
        w.write(minor)
        w.write(UInt64(0))
        w.write(UInt32(0))
        w.write(Checksum.crc32c(w.bytes))
        return w.bytes
    }

    static func checkHeader(_ bytes: [UInt8]) throws(WireError) {
        guard bytes.count == headerSize, Array(bytes[0..<8]) == magic else {
            throw .badMagic("not a Tern snapshot (no TERNSNAP header)")
        }
        var r = WireReader(Array(bytes[8...]), context: "snapshot header")
        let fileMajor = try r.read(UInt32.self), fileMinor = try r.read(UInt32.self)
        let flags = try r.read(UInt64.self)
        _ = try r.read(UInt32.self)
        guard try r.read(UInt32.self) == Checksum.crc32c(bytes[0..<28]) else { throw .checksumMismatch("snapshot header") }
        guard fileMajor == major, fileMinor <= minor else {
            throw .unsupportedVersion("snapshot format \(fileMajor).\(fileMinor); this tern reads \(major).0 to \(major).\(minor)")
        }
        guard flags == 0 else { throw .unsupportedVersion("snapshot uses flags 0x\(String(flags, radix: 16)) this tern does not know") }
    }

    struct EndSummary: Equatable {
        var frames: UInt64
        var dataPages: UInt64
        var zeroPages: UInt64

        var encoded: [UInt8] {
            var w = WireWriter()
            w.write(frames); w.write(dataPages); w.write(zeroPages)
            return w.bytes
        }

        init(frames: UInt64, dataPages: UInt64, zeroPages: UInt64) {
            self.frames = frames; self.dataPages = dataPages; self.zeroPages = zeroPages
        }

        init(decoding bytes: [UInt8]) throws(WireError) {
            var r = WireReader(bytes, context: "end frame")
            frames = try r.read(); dataPages = try r.read(); zeroPages = try r.read()
            try r.expectEnd()
        }
    }
}

/// What a snapshot write or read moved, for reports and benchmarks.
public struct SnapshotStatistics: Equatable, Sendable, Codable {
    public var dataPages: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var fileBytes: UInt64 = 0
    public var seconds: Double = 0
}
