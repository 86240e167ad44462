import Foundation
import TernMachine
import TernWire

/// Sends one page stream's share of guest pages through a PageStreamer,
/// with the rate limit and the cancellation check applied before every
/// frame. `partition` and `index` say which pages are this stream's.
struct PageSender {
    let streamer: PageStreamer
    let partition: StreamPartition
    let index: Int
    struct Stopped: Error {}

    init(memory: GuestMemory, stream: FDStream, partition: StreamPartition = StreamPartition(streams: 1), index: Int = 0,
         rateLimit: RateLimiter, shouldStop: @escaping () -> Bool, onFrame: @escaping (PageStreamCounters) -> Void = { _ in }) {
        streamer = PageStreamer(memory: memory, stream: stream)
        self.partition = partition
        self.index = index
        streamer.beforeFrame = { [unowned streamer] size in
            if shouldStop() { throw Stopped() }
            rateLimit.consume(size)
            onFrame(streamer.counters)
        }
    }

    var counters: PageStreamCounters { streamer.counters }

    /// This stream's share of the given pages, in address order.
    func send(_ pages: PageSet) throws {
        try pages.forEachRange { first, count in
            try partition.forEachPiece(first: first, count: count, stream: index) { try streamer.addPages(firstPage: $0, count: $1) }
        }
        try streamer.flush()
    }

    /// This stream's share of the given pages, in this order (consecutive pages still go as runs).
    func send(ordered pages: [Int]) throws {
        var index = 0
        while index < pages.count {
            guard partition.stream(ofPage: pages[index]) == self.index else {
                index += 1
                continue
            }
            var end = index + 1
            // A run stays inside one chunk: the next chunk belongs to another stream.
            while end < pages.count && pages[end] == pages[end - 1] + 1 && pages[end] % StreamPartition.chunkPages != 0 { end += 1 }
            try streamer.addPages(firstPage: pages[index], count: end - index)
            index = end
        }
        try streamer.flush()
    }
}
