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

    /// Every page of RAM except `held` (sent later, e.g. hot pages last); holes as zero markers.
    func sendAll(holdingBack held: PageSet) throws {
        try streamer.memory.forEachExtent { first, count, isHole in
            if isHole {
                try streamer.addZeroPages(firstPage: first, count: count)
                return
            }
            var start = first
            for page in first..<first + count where held.contains(page) {
                if page > start { try streamer.addPages(firstPage: start, count: page - start) }
                start = page + 1
            }
            if first + count > start { try streamer.addPages(firstPage: start, count: first + count - start) }
        }
        try streamer.flush()
    }

    /// The given pages, in address order.
    func send(_ pages: PageSet) throws {
        try pages.forEachRange { first, count in try streamer.addPages(firstPage: first, count: count) }
        try streamer.flush()
    }

    /// The given pages in this order (consecutive pages still go as runs).
    func send(ordered pages: [Int]) throws {
        var index = 0
        while index < pages.count {
            var end = index + 1
            while end < pages.count && pages[end] == pages[end - 1] + 1 { end += 1 }
            try streamer.addPages(firstPage: pages[index], count: end - index)
            index = end
        }
        try streamer.flush()
    }
}
