import Foundation
import TernMachine
import TernWire

/// Sends guest pages for pre-copy through a PageStreamer, with the rate
/// limit and the cancellation check applied before every frame.
struct PageSender {
    let streamer: PageStreamer
    struct Stopped: Error {}

    init(memory: GuestMemory, stream: FDStream, rateLimit: RateLimiter, shouldStop: @escaping () -> Bool,
         onFrame: @escaping (PageStreamCounters) -> Void = { _ in }) {
        streamer = PageStreamer(memory: memory, stream: stream)
        streamer.beforeFrame = { [unowned streamer] size in
            if shouldStop() { throw Stopped() }
            rateLimit.consume(size)
            onFrame(streamer.counters)
        }
    }

    var counters: PageStreamCounters { streamer.counters }

    /// Every page of RAM (the first pre-copy pass); never-written pages go as zero markers unread.
    func sendAll() throws {
        try streamer.memory.forEachExtent { first, count, isHole in
            if isHole { try streamer.addZeroPages(firstPage: first, count: count) } else { try streamer.addPages(firstPage: first, count: count) }
        }
        try streamer.flush()
    }

    /// The given pages.
    func send(_ pages: PageSet) throws {
        try pages.forEachRange { first, count in try streamer.addPages(firstPage: first, count: count) }
        try streamer.flush()
    }
}
