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
    /// Clears the dirty-log bits of pages just before they are copied (while the VM runs).
    let rearm: DirtyLogRearm?
    struct Stopped: Error {}

    init(memory: GuestMemory, stream: FDStream, partition: StreamPartition = StreamPartition(streams: 1), index: Int = 0,
         rateLimit: RateLimiter, rearm: DirtyLogRearm? = nil, shouldStop: @escaping () -> Bool,
         onFrame: @escaping (PageStreamCounters) -> Void = { _ in }) {
        streamer = PageStreamer(memory: memory, stream: stream)
        self.partition = partition
        self.index = index
        self.rearm = rearm
        streamer.beforeFrame = { [unowned streamer] size in
            if shouldStop() { throw Stopped() }
            rateLimit.consume(size)
            onFrame(streamer.counters)
        }
    }

    var counters: PageStreamCounters { streamer.counters }

    /// This stream's share of the given pages, in address order.
    func send(_ pages: PageSet) throws {
        try sendRuns { emit in
            try pages.forEachRange { first, count in
                try partition.forEachPiece(first: first, count: count, stream: index) { try emit($0, $1) }
            }
        }
        try streamer.flush()
    }

    /// This stream's share of the given pages, in this order (consecutive pages still go as runs).
    func send(ordered pages: [Int]) throws {
        var runs: [(first: Int, count: Int)] = []
        var index = 0
        while index < pages.count {
            guard partition.stream(ofPage: pages[index]) == self.index else {
                index += 1
                continue
            }
            var end = index + 1
            // A run stays inside one chunk: the next chunk belongs to another stream.
            while end < pages.count && pages[end] == pages[end - 1] + 1 && pages[end] % StreamPartition.chunkPages != 0 { end += 1 }
            runs.append((pages[index], end - index))
            index = end
        }
        try sendRuns { emit in for run in runs { try emit(run.first, run.count) } }
        try streamer.flush()
    }

    /// Hands the runs `produce` emits to the streamer; while the VM runs, a group at a time, each group's
    /// dirty-log bits cleared just before it is copied (DirtyLogRearm).
    func sendRuns(_ produce: (_ emit: (Int, Int) throws -> Void) throws -> Void) throws {
        guard let rearm, rearm.isActive else {
            try produce { try streamer.addPages(firstPage: $0, count: $1) }
            return
        }
        var group: [(first: Int, count: Int)] = []
        var pages = 0
        func sendGroup() throws {
            guard !group.isEmpty else { return }
            try rearm.clear(group)
            for run in group { try streamer.addPages(firstPage: run.first, count: run.count) }
            group.removeAll(keepingCapacity: true)
            pages = 0
        }
        try produce { first, count in
            var first = first, left = count
            while left > 0 {
                let take = min(left, DirtyLogRearm.groupPages - pages)
                group.append((first, take))
                pages += take
                first += take
                left -= take
                if pages >= DirtyLogRearm.groupPages { try sendGroup() }
            }
        }
        try sendGroup()
    }
}
