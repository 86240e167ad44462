import Foundation
import Synchronization
import TernMachine
import TernWire

/// The first frame of an extra page stream: which migration (the token the
/// destination handed out in its hello reply) and which stream it is.
public struct StreamHello: Equatable, Sendable {
    /// The index of post-copy's demand channel (not a page stream of pre-copy).
    public static let urgentIndex = UInt32.max
    /// The index of the disks' connection under `--storage-mirror sync`.
    public static let mirrorIndex = UInt32.max - 1
    public var token: UInt64
    public var index: UInt32

    public init(token: UInt64, index: UInt32) {
        self.token = token
        self.index = index
    }

    public var encoded: [UInt8] {
        var w = WireWriter()
        w.write(token)
        w.write(index)
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "stream hello")
        token = try r.read()
        index = try r.read()
        try r.expectEnd()
    }
}

/// Pre-copy's page sending over one or more streams (`--streams N`): every
/// operation runs on all streams at once, each stream sending the pages its
/// partition gives it, and returns when all are done, so rounds stay
/// measurable and the dirty log is read between them.
final class PageStreams: @unchecked Sendable {
    // @unchecked Sendable: `senders[i]` is used only by stream i's thread during a job, and by the caller between jobs.
    let senders: [PageSender]
    let partition: StreamPartition
    private let workers: StreamWorkers
    private let perStream: StreamCounters
    /// Per stream, the pages sent while recording (each stream's thread adds to its own).
    private let sentPages: [SentPageRecord]

    /// Clears pages' dirty-log bits just before they are copied, while pre-copy's rounds run.
    let rearm: DirtyLogRearm?

    init(memory: GuestMemory, streams: [FDStream], rateLimit: RateLimiter, rearm: DirtyLogRearm? = nil,
         shouldStop: @escaping @Sendable () -> Bool, onProgress: @escaping @Sendable (PageStreamCounters) -> Void) {
        partition = StreamPartition(streams: streams.count)
        self.rearm = rearm
        let workers = StreamWorkers(count: streams.count, name: "tern-stream")
        let perStream = StreamCounters(streams: streams.count)
        self.workers = workers
        self.perStream = perStream
        sentPages = streams.map { _ in SentPageRecord() }
        senders = streams.enumerated().map { index, stream in
            PageSender(memory: memory, stream: stream, partition: StreamPartition(streams: streams.count), index: index,
                       rateLimit: rateLimit, rearm: rearm, shouldStop: { shouldStop() || workers.failed },
                       onFrame: { counters in
                           onProgress(perStream.update(stream: index, counters))
                       })
        }
    }

    deinit { workers.stop() }

    /// What all streams sent (read it between operations).
    var counters: PageStreamCounters { senders.reduce(into: PageStreamCounters()) { $0.add($1.counters) } }

    var xbzrleStatistics: XBZRLECache.Statistics? {
        let caches = senders.compactMap { $0.streamer.cache }
        guard !caches.isEmpty else { return nil }
        return caches.reduce(into: XBZRLECache.Statistics()) { $0.add($1.statistics) }
    }

    /// XBZRLE: each stream caches its own pages, in an equal share of the budget.
    func useXBZRLE(cacheBytes: UInt64) {
        for sender in senders { sender.streamer.cache = XBZRLECache(bytes: cacheBytes / UInt64(senders.count)) }
    }

    /// zstd on every frame of every stream.
    func useZstd(level: Int32) {
        for sender in senders { sender.streamer.compressor = ZstdCompressor(level: level) }
    }

    /// Pages whose bytes have not changed since they were sent are not sent again (SentPageFingerprints):
    /// one table for all streams, each of which touches only the pages of its own partition.
    func skipUnchangedPages(pageCount: Int) {
        let fingerprints = SentPageFingerprints(pageCount: pageCount)
        for sender in senders { sender.streamer.fingerprints = fingerprints }
    }

    func setCacheWholePages(_ value: Bool) { for sender in senders { sender.streamer.cacheWholePages = value } }

    /// Runs `body` on every stream at once.
    func run(_ body: @escaping (PageSender) throws -> Void) throws {
        let senders = self.senders
        try workers.run { index in try body(senders[index]) }
    }

    func send(_ pages: PageSet) throws { try run { try $0.send(pages) } }
    func send(ordered pages: [Int]) throws { try run { try $0.send(ordered: pages) } }

    /// Waits, on every stream, until the destination has applied everything
    /// sent so far (a ping it answers once it has read up to it): socket
    /// buffers hold megabytes, so "sent" is not "arrived", and a round's
    /// duration must include the destination's share for the downtime
    /// prediction to be honest.
    func synchronise(round: Int, expectReply: @escaping @Sendable (FDStream) throws -> [UInt8]) throws {
        var writer = WireWriter()
        writer.write(UInt64(round))
        let marker = writer.bytes
        try run { sender in
            let stream = sender.streamer.stream
            try stream.writeFrame(.ping, payload: marker)
            guard try expectReply(stream) == marker else {
                throw MigrationSource.Failure("the destination answered a round-\(round) sync with another round's marker")
            }
        }
    }

    /// After a round stopped before its next frame: drops each stream's staged frame (read between operations).
    func discardUnsentFrames() { for sender in senders { sender.streamer.discardPending() } }

    /// Starts recording, on every stream, the pages its frames carry (nil: stops).
    func recordSentPages(_ on: Bool, pageCount: Int) {
        for (index, sender) in senders.enumerated() {
            guard on else {
                sender.streamer.runSent = nil
                continue
            }
            let record = sentPages[index]
            record.withLock { $0 = PageSet(pageCount: pageCount) }
            sender.streamer.runSent = { first, count in record.withLock { $0.insert(range: first..<first + count) } }
        }
    }

    /// What the streams' frames carried since `recordSentPages(true, ...)` (read between operations).
    func pagesSent(pageCount: Int) -> PageSet {
        sentPages.reduce(into: PageSet(pageCount: pageCount)) { all, record in record.withLock { all.formUnion($0) } }
    }

    /// Tells the destination that the extra streams carry nothing more (the control connection goes on).
    func endExtraStreams() throws {
        for sender in senders.dropFirst() { try sender.streamer.stream.writeFrame(.streamEnd, payload: [UInt8]()) }
        workers.stop()
    }
}

/// One stream's sent pages; a lock only so the set can be read from another thread afterwards.
final class SentPageRecord: Sendable {
    private let pages = Mutex(PageSet(pageCount: 0))
    func withLock<R>(_ body: (inout PageSet) -> R) -> R { pages.withLock { body(&$0) } }
}

/// The latest counters of each stream, summed for progress reports.
private final class StreamCounters: Sendable {
    private let latest: Mutex<[PageStreamCounters]>

    init(streams: Int) { latest = Mutex([PageStreamCounters](repeating: PageStreamCounters(), count: streams)) }

    /// Records one stream's counters; returns the sum over all streams.
    func update(stream: Int, _ counters: PageStreamCounters) -> PageStreamCounters {
        latest.withLock { all in
            all[stream] = counters
            return all.reduce(into: PageStreamCounters()) { $0.add($1) }
        }
    }
}

extension PageStreamCounters {
    mutating func add(_ other: PageStreamCounters) {
        bytes += other.bytes
        dataPages += other.dataPages
        zeroPages += other.zeroPages
        frames += other.frames
        deltaPages += other.deltaPages
        deltaBytes += other.deltaBytes
        compressedInputBytes += other.compressedInputBytes
        compressedOutputBytes += other.compressedOutputBytes
        compressionSkippedFrames += other.compressionSkippedFrames
        unchangedPages += other.unchangedPages
    }

    /// Pages a round has dealt with: sent (as data or zero markers) or found unchanged.
    var pagesCovered: UInt64 { dataPages + zeroPages + unchangedPages }
}

extension XBZRLECache.Statistics {
    mutating func add(_ other: XBZRLECache.Statistics) {
        cacheBytes += other.cacheBytes
        hits += other.hits
        misses += other.misses
        overflows += other.overflows
        unchanged += other.unchanged
        encodedBytes += other.encodedBytes
        bytesSaved += other.bytesSaved
    }
}
