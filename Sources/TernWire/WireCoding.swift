/// Why bytes from a file or a peer could not be decoded. Every decoder in
/// Tern reports through this, so a truncated or hostile input becomes a
/// message, never a trap.
public enum WireError: Error, Equatable, CustomStringConvertible, Sendable {
    case truncated(String)
    case badMagic(String)
    case unsupportedVersion(String)
    case checksumMismatch(String)
    case tooLarge(String)
    case malformed(String)

    public var description: String {
        switch self {
        case .truncated(let what): "truncated: \(what)"
        case .badMagic(let what): "bad magic: \(what)"
        case .unsupportedVersion(let what): "unsupported version: \(what)"
        case .checksumMismatch(let what): "checksum mismatch: \(what)"
        case .tooLarge(let what): "too large: \(what)"
        case .malformed(let what): "malformed: \(what)"
        }
    }
}

/// Appends little-endian values to a byte array.
public struct WireWriter: Sendable {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    /// Many u64s at once (bitmaps, page lists): one append, not a generic call per word.
    public mutating func write(words: [UInt64]) {
        #if _endian(little)
        words.withUnsafeBytes { bytes.append(contentsOf: $0) }
        #else
        for word in words { write(word) }
        #endif
    }

    public mutating func write(_ data: [UInt8]) { bytes.append(contentsOf: data) }
    public mutating func write(_ data: UnsafeRawBufferPointer) { bytes.append(contentsOf: data) }

    /// A length-prefixed (u32) byte string.
    public mutating func writeBlob(_ data: [UInt8]) {
        write(UInt32(data.count))
        write(data)
    }

    public mutating func writeString(_ text: String) { writeBlob(Array(text.utf8)) }

    /// The raw bytes of a plain C struct (Linux UAPI structs are fixed-layout), length-prefixed.
    public mutating func writeRaw<T>(_ value: T) {
        var copy = value
        withUnsafeBytes(of: &copy) { writeBlob(Array($0)) }
    }
}

/// Reads little-endian values with bounds checks; every read throws on short input.
public struct WireReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset: Int
    let context: String

    public init(_ bytes: [UInt8], context: String = "input") {
        self.bytes = bytes
        self.offset = 0
        self.context = context
    }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset == bytes.count }

    public mutating func read<T: FixedWidthInteger>(_ type: T.Type = T.self) throws(WireError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw .truncated("\(context) ends inside a \(size)-byte field at offset \(offset)") }
        var value: T = 0
        for i in (0..<size).reversed() { value = value << 8 | T(bytes[offset + i]) }
        offset += size
        return value
    }

    /// `count` little-endian u64s (bitmaps, page lists) with one bounds check. Reading them one
    /// by one with the generic `read`, which is not specialised across modules, made a post-copy
    /// switch's 32 KiB bitmap arrive 3-4 ms after the pause instead of 1 ms (`--log-level debug`).
    public mutating func readWords(_ count: Int) throws(WireError) -> [UInt64] {
        guard count >= 0, count <= remaining / 8 else {
            throw .truncated("\(context) ends inside a list of \(count) 8-byte words at offset \(offset)")
        }
        let start = offset
        let words = bytes.withUnsafeBytes { raw in
            [UInt64](unsafeUninitializedCapacity: count) { buffer, initialized in
                for i in 0..<count {
                    buffer[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: start + i * 8, as: UInt64.self))
                }
                initialized = count
            }
        }
        offset += count * 8
        return words
    }

    public mutating func readBytes(_ count: Int) throws(WireError) -> [UInt8] {
        guard count >= 0, remaining >= count else { throw .truncated("\(context) ends inside a \(count)-byte field at offset \(offset)") }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }

    public mutating func readBlob(maximum: Int = 1 << 24) throws(WireError) -> [UInt8] {
        let count = Int(try read(UInt32.self))
        guard count <= maximum else { throw .tooLarge("\(context): a \(count)-byte field (limit \(maximum))") }
        return try readBytes(count)
    }

    public mutating func readString(maximum: Int = 1 << 16) throws(WireError) -> String {
        let bytes = try readBlob(maximum: maximum)
        guard let text = String(validating: bytes, as: UTF8.self) else { throw .malformed("\(context): a string that is not UTF-8") }
        return text
    }

    /// A raw C struct written by `writeRaw`; its size must match this build's layout exactly.
    public mutating func readRaw<T>(_ type: T.Type, initial: T) throws(WireError) -> T {
        let blob = try readBlob()
        guard blob.count == MemoryLayout<T>.size else {
            throw .malformed("\(context): \(T.self) is \(blob.count) bytes, expected \(MemoryLayout<T>.size)")
        }
        var value = initial
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: blob) }
        return value
    }

    public func expectEnd() throws(WireError) {
        guard isAtEnd else { throw .malformed("\(context) has \(remaining) unexpected trailing bytes") }
    }
}
