import CZstd

/// zstd (libzstd) for page frames on slow links (`--compress zstd`): one
/// compressor per stream, fed the frame's pieces without gathering them.
public final class ZstdCompressor {
    private let context: OpaquePointer
    public let level: Int32
    private var output: UnsafeMutableRawBufferPointer

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public init(level: Int32) {
        context = ZSTD_createCCtx()
        self.level = level
        ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, level)
        output = .allocate(byteCount: 0, alignment: 64)
    }

    deinit {
        ZSTD_freeCCtx(context)
        output.deallocate()
    }

    /// Compresses the concatenation of `pieces` (`size` bytes in all) into one
    /// zstd frame. Returns it (valid until the next call), or nil when it
    /// would not be smaller than the input: then the input goes as it is.
    public func compress(_ pieces: [UnsafeRawBufferPointer], size: Int) throws -> UnsafeRawBufferPointer? {
        if output.count < size {
            output.deallocate()
            output = .allocate(byteCount: size, alignment: 64)
        }
        ZSTD_CCtx_reset(context, ZSTD_reset_session_only)
        ZSTD_CCtx_setPledgedSrcSize(context, UInt64(size))
        var out = ZSTD_outBuffer(dst: output.baseAddress, size: size, pos: 0)
        for piece in pieces where piece.count > 0 {
            var input = ZSTD_inBuffer(src: piece.baseAddress, size: piece.count, pos: 0)
            while input.pos < input.size {
                let result = ZSTD_compressStream2(context, &out, &input, ZSTD_e_continue)
                if ZSTD_isError(result) != 0 { throw Failure(description: "zstd: \(String(cString: ZSTD_getErrorName(result)))") }
                if out.pos == out.size && input.pos < input.size { return nil }
            }
        }
        var empty = ZSTD_inBuffer(src: nil, size: 0, pos: 0)
        while true {
            let remaining = ZSTD_compressStream2(context, &out, &empty, ZSTD_e_end)
            if ZSTD_isError(remaining) != 0 { throw Failure(description: "zstd: \(String(cString: ZSTD_getErrorName(remaining)))") }
            if remaining == 0 { break }
            if out.pos == out.size { return nil }
        }
        return out.pos < size ? UnsafeRawBufferPointer(rebasing: output[0..<out.pos]) : nil
    }
}

/// The receiving half: one zstd frame into a buffer of exactly the announced size.
public final class ZstdDecompressor {
    private let context: OpaquePointer

    public init() { context = ZSTD_createDCtx() }
    deinit { ZSTD_freeDCtx(context) }

    /// Decompresses `input`, which must hold one zstd frame of exactly `output.count` bytes.
    public func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) throws(WireError) {
        let result = ZSTD_decompressDCtx(context, output.baseAddress, output.count, input.baseAddress, input.count)
        if ZSTD_isError(result) != 0 { throw .malformed("zstd: \(String(cString: ZSTD_getErrorName(result)))") }
        guard result == output.count else { throw .malformed("zstd: \(result) bytes where \(output.count) were announced") }
    }
}

/// A ByteSource over memory it does not own (a decompressed frame).
public final class RawBufferSource: ByteSource {
    private let bytes: UnsafeRawBufferPointer
    public private(set) var offset = 0

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public func readExactly(into buffer: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws {
        guard bytes.count - offset >= buffer.count else {
            throw WireError.truncated("\(what()): input ended after \(bytes.count - offset) of \(buffer.count) bytes")
        }
        buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + buffer.count]))
        offset += buffer.count
    }
}
