/// Which of N parallel page streams carries a page. Memory is cut into
/// 1 MiB chunks dealt round-robin: each stream reads long contiguous runs,
/// the load spreads evenly even over a small hot set, and a page always
/// travels on the same stream, so a newer copy of it can never overtake an
/// older one (each stream is delivered in order). The destination enforces
/// the same rule, so a run on the wrong stream is refused.
public struct StreamPartition: Sendable, Equatable {
    public static let chunkPages = 256

    public let streams: Int

    public init(streams: Int) {
        precondition(streams >= 1, "StreamPartition: at least one stream")
        self.streams = streams
    }

    public func stream(ofPage page: Int) -> Int { (page / Self.chunkPages) % streams }

    /// Calls `body` with each piece of first..<first+count that `stream` carries, in order.
    public func forEachPiece(first: Int, count: Int, stream: Int, _ body: (_ first: Int, _ count: Int) throws -> Void) rethrows {
        if streams == 1 {
            if count > 0 { try body(first, count) }
            return
        }
        var page = first
        let end = first + count
        while page < end {
            let chunkEnd = min(end, (page / Self.chunkPages + 1) * Self.chunkPages)
            if self.stream(ofPage: page) == stream { try body(page, chunkEnd - page) }
            page = chunkEnd
        }
    }

    /// Whether every page of first..<first+count belongs to `stream`.
    public func carries(first: Int, count: Int, stream: Int) -> Bool {
        guard streams > 1 else { return true }
        guard count > 0 else { return true }
        let firstChunk = first / Self.chunkPages, lastChunk = (first + count - 1) / Self.chunkPages
        return firstChunk == lastChunk && firstChunk % streams == stream
    }
}
