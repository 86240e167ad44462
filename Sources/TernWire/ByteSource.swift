/// Something bytes are read from exactly: a socket or file (FDStream), or a
/// buffer in tests, so decoders of streams are tested byte by byte without I/O.
public protocol ByteSource {
    /// Fills `buffer` completely; throws `WireError.truncated` at end of input.
    func readExactly(into buffer: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws
    /// Whether the channel itself authenticates every byte (a TLS session's AEAD), so frames carry no
    /// payload CRC and none is checked: a damaged record fails in the channel before any byte is read.
    var authenticatesPayloads: Bool { get }
}

extension ByteSource {
    public var authenticatesPayloads: Bool { false }

    /// Checks a frame's payload against the CRC in its header, unless the channel authenticates it.
    public func checkPayload(_ payload: UnsafeRawBufferPointer, of header: FrameHeader, what: @autoclosure () -> String) throws(WireError) {
        guard !authenticatesPayloads else { return }
        guard Checksum.crc32c(payload) == header.payloadCRC else {
            let what = what()
            throw .checksumMismatch("\(what) (\(header.length) bytes)")
        }
    }

    public func checkPayload(_ payload: [UInt8], of header: FrameHeader, what: @autoclosure () -> String) throws(WireError) {
        guard !authenticatesPayloads else { return }
        guard Checksum.crc32c(payload) == header.payloadCRC else {
            let what = what()
            throw .checksumMismatch("\(what) (\(header.length) bytes)")
        }
    }

    public func readExactly(_ count: Int, what: @autoclosure () -> String) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try readExactly(into: $0, what: what()) }
        return bytes
    }

    /// Reads a frame header (validated); the caller then reads `length` payload bytes.
    public func readFrameHeader() throws -> FrameHeader {
        try FrameHeader(decoding: readExactly(FrameHeader.size, what: "frame header"))
    }

    /// Reads a whole frame into memory, checking its payload CRC.
    public func readFrame() throws -> (FrameHeader, [UInt8]) {
        let header = try readFrameHeader()
        let payload = try readExactly(Int(header.length), what: "\(header.type) frame payload")
        try checkPayload(payload, of: header, what: "\(header.type) frame payload")
        return (header, payload)
    }
}

/// An in-memory ByteSource.
public final class BufferSource: ByteSource {
    private let bytes: [UInt8]
    public private(set) var offset = 0

    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public func readExactly(into buffer: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws {
        guard bytes.count - offset >= buffer.count else {
            throw WireError.truncated("\(what()): input ended after \(bytes.count - offset) of \(buffer.count) bytes")
        }
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + buffer.count])) }
        offset += buffer.count
    }
}
