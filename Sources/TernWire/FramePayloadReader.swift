/// Reads one frame's payload from a byte source in large pieces, and never
/// past the frame's end.
///
/// A pages frame full of XBZRLE deltas is thousands of tiny fields (a run
/// header, a length, a few dozen bytes of delta); read one by one from a
/// socket, each is a syscall, and those syscalls, not the decoding, made a
/// destination fall hundreds of milliseconds behind a source that sent deltas
/// at 100 MB/s. Small reads are served from a buffer filled with up to
/// `capacity` bytes of the frame at a time; large reads (page data) go
/// straight into the caller's memory, so they cost no extra copy.
public final class FramePayloadReader: ByteSource {
    private let buffer: UnsafeMutableRawBufferPointer
    private var start = 0
    private var end = 0
    /// Bytes of the frame not yet taken from the source.
    private var unread = 0
    private var source: (any ByteSource)?
    /// Reads at least this large bypass the buffer when it is empty.
    static let directReadThreshold = 16 << 10

    public init(capacity: Int = 64 << 10) {
        precondition(capacity > 0, "FramePayloadReader needs a buffer")
        buffer = .allocate(byteCount: capacity, alignment: 64)
    }

    deinit { buffer.deallocate() }

    /// Starts a frame whose payload is the next `length` bytes of `source`.
    public func begin(_ source: any ByteSource, length: Int) {
        self.source = source
        unread = length
        start = 0
        end = 0
    }

    public var authenticatesPayloads: Bool { source?.authenticatesPayloads ?? false }

    /// Bytes of the frame neither read by the caller nor left in the source.
    public var remaining: Int { end - start + unread }

    public func readExactly(into target: UnsafeMutableRawBufferPointer, what: @autoclosure () -> String) throws {
        guard target.count <= remaining else {
            throw WireError.truncated("\(what()): the frame ends after \(remaining) of \(target.count) bytes")
        }
        var filled = 0
        while filled < target.count {
            let wanted = target.count - filled
            if start == end {
                if wanted >= Self.directReadThreshold {
                    try source!.readExactly(into: UnsafeMutableRawBufferPointer(rebasing: target[filled...]), what: what())
                    unread -= wanted
                    return
                }
                let piece = min(buffer.count, unread)
                try source!.readExactly(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<piece]), what: what())
                unread -= piece
                start = 0
                end = piece
            }
            let take = min(wanted, end - start)
            UnsafeMutableRawBufferPointer(rebasing: target[filled..<filled + take])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[start..<start + take]))
            start += take
            filled += take
        }
    }
}
