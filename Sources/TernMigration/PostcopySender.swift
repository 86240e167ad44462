import Foundation
import Glibc
import TernKVM
import TernMachine
import TernWire

/// The source's side of post-copy (Hines et al.): the VM already runs at the
/// destination; every page it still needs is sent exactly once, either
/// because it asked (a fault: sent at once, ahead of everything else) or by
/// the background push, which jumps to the neighbourhood of the latest
/// fault (pre-paging) so that nearby accesses find their pages already there.
///
/// With a demand channel (a connection of its own, QEMU's "preempt channel"),
/// requests are answered by the reader thread the moment they arrive, on that
/// connection, so a reply never waits behind pushed pages in either socket.
/// A request for a page already pushed means the page is still on its way
/// (the destination asks only for pages it has not got), queued behind up to
/// a megabyte of push in the two sockets: it is sent again on the demand
/// channel, at most once per page, and the destination keeps whichever copy
/// lands first. Small push frames and socket buffers would shorten that wait
/// too, but cost a fifth of the throughput (commit b3c4675, reverted).
/// Without a demand channel (after a resume), replies go between pushed frames.
///
/// With `--streams N` the push runs on all N connections at once, each with a
/// loop of its own taking the next frame's pages from the same queue, so that
/// the destination places pages on N threads: placing a fresh page is most of
/// post-copy's cost there, and one thread is one core.
final class PostcopySender: @unchecked Sendable {
    // @unchecked Sendable: `needed`, `requests`, `hint`, `cursor`, `repliesInFlight`, `outcome`, `readerError`,
    // `readerLostConnection`, `pushError`, `pushedPages`, `pushedBytes` and `pulled` are guarded by `condition`;
    // `streamer` is the control push loop's, each of `pushStreamers` its own loop's, `urgentStreamer` the reader's.
    /// Pages per pushed frame: small, so a demand reply never waits behind much.
    static let pushFramePages = 64
    static let completionTimeoutSeconds = 60.0
    /// Pages per demand-channel frame (the destination reads them into a 1 MiB buffer).
    static let demandFramePages = 128

    let memory: GuestMemory
    let stream: FDStream
    /// Owned for as long as the reader thread may use it.
    let connection: Connection?
    private var needed: PageSet
    /// What post-copy started with: only these pages are ever sent again.
    private let initiallyNeeded: PageSet
    /// Pages already sent a second time (never a third).
    private var resentPages: PageSet
    private var resentCount: UInt64 = 0
    /// Pages sent twice: pushed, then asked for while still on the way.
    var resent: UInt64 { condition.withLock { resentCount } }
    private let streamer: PageStreamer
    /// The push's other connections (the pre-copy's extra page streams), a loop each.
    private let pushStreamers: [PageStreamer]
    private let urgentStreamer: PageStreamer?
    private let condition = NSCondition()
    private var requests: [Int] = []
    /// Where the push should go next after a demand reply (pre-paging), set by the reader.
    private var hint: Int?
    /// Where the push goes on from (shared by the push loops).
    private var cursor = 0
    /// The first failure of a push loop on an extra stream; the others stop at it.
    private var pushError: Failure?
    private var pushStopping = false
    private var repliesInFlight = 0
    private var outcome: PostcopyStatistics?
    private var readerError: String?
    /// Whether the reader stopped because the connection broke (not because the destination refused).
    private var readerLostConnection = false
    private var pushedPages: UInt64 = 0
    var pushed: UInt64 { condition.withLock { pushedPages } }
    /// Bytes the push loops wrote, for progress while they run.
    private var pushedBytes: UInt64 = 0
    private var pulledPages: UInt64 = 0
    /// Bytes the demand channel carried, for progress while it runs (its streamer is the reader thread's).
    private var urgentBytes: UInt64 = 0
    var pulled: UInt64 { condition.withLock { pulledPages } }
    var shouldStop: () -> Bool = { false }
    /// Progress for `tern migrate`'s line, at most every 100 ms: pages still owed and the bytes written so far.
    var onProgress: (_ pagesLeft: Int, _ bytes: UInt64) -> Void = { _, _ in }
    /// `--bandwidth`: the push waits for tokens; demand replies, which a vCPU waits for, go at once and are
    /// charged to it, so the push makes room for them.
    private let rateLimit: RateLimiter

    init(memory: GuestMemory, connection: Connection?, stream: FDStream, urgent: FDStream? = nil, pushStreams: [FDStream] = [],
         needed: PageSet, rateLimit: RateLimiter = RateLimiter(bytesPerSecond: nil)) {
        self.connection = connection
        self.rateLimit = rateLimit
        self.memory = memory
        self.stream = stream
        self.needed = needed
        initiallyNeeded = needed
        resentPages = PageSet(pageCount: needed.pageCount)
        streamer = PageStreamer(memory: memory, stream: stream, framePages: Self.pushFramePages)
        pushStreamers = pushStreams.map { PageStreamer(memory: memory, stream: $0, framePages: Self.pushFramePages) }
        urgentStreamer = urgent.map { PageStreamer(memory: memory, stream: $0, framePages: Self.demandFramePages) }
        urgentStreamer?.frameFlags = demandReplyFlag
    }

    /// What went on the wire (read after `run`).
    var counters: PageStreamCounters {
        var total = streamer.counters
        for pushStreamer in pushStreamers { total.add(pushStreamer.counters) }
        if let urgentStreamer { total.add(urgentStreamer.counters) }
        return total
    }

    /// Pages each push connection carried, the control connection first (read after `run`).
    var pagesByStream: [UInt64] { ([streamer] + pushStreamers).map { $0.counters.dataPages + $0.counters.zeroPages } }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        /// The connection broke: the destination may be waiting for a resume.
        var connectionLost = false
    }

    /// Sends every needed page, then waits for the destination to confirm it holds them all.
    func run() throws -> PostcopyStatistics {
        do {
            return try serve()
        } catch where Connection.broke(error) {
            throw Failure(description: "lost the destination during post-copy: \(error)", connectionLost: true)
        }
    }

    private func serve() throws -> PostcopyStatistics {
        // Keep the sockets' queues short: a demand reply should not queue behind megabytes of push.
        var size: Int32 = 256 << 10
        for fd in [stream.fd] + pushStreamers.map(\.stream.fd) {
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        // Requests may be minutes apart; the completion wait below has its own bound.
        var noTimeout = timeval(tv_sec: 0, tv_usec: 0)
        setsockopt(stream.fd, SOL_SOCKET, SO_RCVTIMEO, &noTimeout, socklen_t(MemoryLayout<timeval>.size))
        let readerDone = DispatchSemaphore(value: 0)
        let reader = Thread { [self] in
            if urgentStreamer != nil { makeCurrentThreadLatencyCritical() }
            readReplies()
            readerDone.signal()
        }
        reader.start()
        let pushLoops = DispatchGroup()
        for index in pushStreamers.indices {
            pushLoops.enter()
            spawnThread(named: "tern-postcopy-push-\(index + 1)") { [self] in
                pushLoop(on: pushStreamers[index])
                pushLoops.leave()
            }
        }
        // Whatever happens below, the reader and the push loops must be gone before the sockets can be closed.
        defer {
            condition.withLock {
                pushStopping = true
                condition.broadcast()
            }
            if condition.withLock({ outcome == nil }) {
                shutdown(stream.fd, Int32(SHUT_RDWR))
                if let urgent = urgentStreamer?.stream { shutdown(urgent.fd, Int32(SHUT_RDWR)) }
                for pushStreamer in pushStreamers { shutdown(pushStreamer.stream.fd, Int32(SHUT_RDWR)) }
            }
            pushLoops.wait()
            readerDone.wait()
        }

        var lastProgress = Clocks.monotonicNs()
        while true {
            if shouldStop() { throw Failure(description: "cancelled during post-copy") }
            if Clocks.monotonicNs() - lastProgress >= 100_000_000 {
                lastProgress = Clocks.monotonicNs()
                let (left, bytes) = condition.withLock { (needed.count, pushedBytes + urgentBytes) }
                onProgress(left, bytes)
            }
            if let failure = condition.withLock({ readerError.map { Failure(description: $0, connectionLost: readerLostConnection) } ?? pushError }) {
                throw failure
            }
            // Without a demand channel, requests are answered here, ahead of the next pushed frame.
            let demand: [Int] = condition.withLock {
                defer { requests.removeAll(keepingCapacity: true) }
                return requests.filter { needed.contains($0) }.map { page in
                    needed.remove(page)
                    return page
                }
            }
            if !demand.isEmpty {
                let bytesBefore = streamer.counters.bytes
                streamer.frameFlags = demandReplyFlag
                for page in demand { try streamer.addPages(firstPage: page, count: 1) }
                try streamer.flush()
                streamer.frameFlags = 0
                rateLimit.charge(Int(streamer.counters.bytes - bytesBefore))
                condition.withLock {
                    pulledPages += UInt64(demand.count)
                    cursor = min(demand.last! + 1, needed.pageCount)
                }
                continue
            }
            let lastFrameStart = streamer.counters.bytes
            guard try pushFrame(on: streamer) else { break }
            // Waits after the frame, before the next: the same average rate. Without a demand channel
            // (after a resume) this loop answers requests itself, and one that comes ends the wait, so a
            // vCPU never waits for the push's tokens; the bucket's debt makes the next wait longer.
            let wait = rateLimit.reserve(Int(streamer.counters.bytes - lastFrameStart))
            if wait > .zero {
                let deadline = Date(timeIntervalSinceNow: wait.inSeconds)
                condition.withLock {
                    while requests.isEmpty && readerError == nil && condition.wait(until: deadline) {}
                }
            }
        }
        // Every page is on its way, or on the way into another push loop's frame: those end their streams
        // first, so that the destination has them all by the control connection's `postcopyEnd`.
        pushLoops.wait()
        if let failure = condition.withLock({ pushError }) { throw failure }
        // Demand replies still being written finish first.
        condition.withLock { while repliesInFlight > 0 { condition.wait() } }
        if let urgent = urgentStreamer?.stream { try urgent.writeFrame(.postcopyEnd, payload: [UInt8]()) }
        try stream.writeFrame(.postcopyEnd, payload: [UInt8]())

        let deadline = Date(timeIntervalSinceNow: Self.completionTimeoutSeconds)
        let statistics: PostcopyStatistics = try condition.withLock {
            while outcome == nil && readerError == nil {
                guard condition.wait(until: deadline) else {
                    throw Failure(description: "the destination did not confirm it holds all memory", connectionLost: true)
                }
            }
            if let error = readerError { throw Failure(description: error, connectionLost: readerLostConnection) }
            return outcome!
        }
        // The destination stays resumable until it knows `complete` arrived here. If this
        // acknowledgement is lost, it waits a while for a resume that never comes, and runs on.
        try? stream.writeFrame(.completeAck, payload: [UInt8]())
        return statistics
    }

    /// Sends the next pushed frame on `pushStreamer`; false once no page is left to push. The frame starts
    /// near the latest fault if there was one (pre-paging), else goes on from where the push was, and
    /// takes the next needed pages across gaps: after many faults (pre-paging jumps to each one) the
    /// pages left are scattered, and a frame ending at the first gap would carry a page or two.
    private func pushFrame(on pushStreamer: PageStreamer) throws -> Bool {
        let (runs, taken): ([(first: Int, count: Int)], Int) = condition.withLock {
            if let next = hint {
                cursor = next
                hint = nil
            }
            var runs: [(first: Int, count: Int)] = []
            var taken = 0
            var from = cursor
            while taken < Self.pushFramePages, let first = needed.next(from: from) ?? (runs.isEmpty ? needed.next(from: 0) : nil) {
                var count = 0
                while taken < Self.pushFramePages, first + count < needed.pageCount, needed.contains(first + count) {
                    needed.remove(first + count)
                    count += 1
                    taken += 1
                }
                runs.append((first, count))
                from = first + count
            }
            if let last = runs.last { cursor = last.first + last.count }
            return (runs, taken)
        }
        guard !runs.isEmpty else { return false }
        let bytesBefore = pushStreamer.counters.bytes
        for run in runs { try pushStreamer.addPages(firstPage: run.first, count: run.count) }
        try pushStreamer.flush()
        condition.withLock {
            pushedPages += UInt64(taken)
            pushedBytes += pushStreamer.counters.bytes - bytesBefore
        }
        return true
    }

    /// The push on an extra stream, until no page is left to push or the push stops; then the
    /// stream's `postcopyEnd`. A failure is kept for the control loop, which ends post-copy with it.
    private func pushLoop(on pushStreamer: PageStreamer) {
        do {
            while true {
                if condition.withLock({ pushStopping || readerError != nil || pushError != nil }) || shouldStop() { return }
                let bytesBefore = pushStreamer.counters.bytes
                guard try pushFrame(on: pushStreamer) else { break }
                rateLimit.consume(Int(pushStreamer.counters.bytes - bytesBefore))
            }
            try pushStreamer.stream.writeFrame(.postcopyEnd, payload: [UInt8]())
        } catch {
            condition.withLock {
                if pushError == nil {
                    pushError = Failure(description: "lost the destination during post-copy (push stream): \(error)",
                                        connectionLost: Connection.broke(error))
                }
                condition.broadcast()
            }
        }
    }

    /// Answers a request on the demand channel at once, in one frame: the pages
    /// still owed, taken out of the push's way, and the ones already pushed.
    private func reply(to pages: [Int], on urgent: PageStreamer) throws {
        let owed: [Int] = condition.withLock {
            let owed = pages.filter { page in
                if needed.contains(page) {
                    needed.remove(page)
                    return true
                }
                guard initiallyNeeded.contains(page), !resentPages.contains(page) else { return false }
                resentPages.insert(page)
                resentCount += 1
                return true
            }
            if let last = owed.last { hint = min(last + 1, needed.pageCount) }
            repliesInFlight += 1
            return owed
        }
        defer {
            condition.withLock {
                repliesInFlight -= 1
                condition.broadcast()
            }
        }
        guard !owed.isEmpty else { return }
        let bytesBefore = urgent.counters.bytes
        for page in owed { try urgent.addPages(firstPage: page, count: 1) }
        try urgent.flush()
        let bytes = urgent.counters.bytes - bytesBefore
        rateLimit.charge(Int(bytes))
        condition.withLock {
            pulledPages += UInt64(owed.count)
            urgentBytes += bytes
        }
    }

    /// The destination's requests and its final confirmation, on their own thread.
    private func readReplies() {
        while true {
            do {
                let (header, payload) = try stream.readFrame()
                switch header.type {
                case .pageRequest:
                    let request = try PageRequest(decoding: payload)
                    let pages = request.pages.lazy.filter { $0 < UInt64(self.memory.size) / UInt64(PageRun.pageSize) }.map { Int($0) }
                    if let urgentStreamer {
                        try reply(to: Array(pages), on: urgentStreamer)
                    } else {
                        condition.withLock {
                            // Bounded: a well-behaved destination never has more pages outstanding than exist.
                            if requests.count < needed.pageCount { requests.append(contentsOf: pages) }
                            condition.broadcast()
                        }
                    }
                case .complete:
                    let statistics = try PostcopyStatistics(decoding: payload)
                    condition.withLock {
                        outcome = statistics
                        condition.broadcast()
                    }
                    return
                case .abort:
                    throw Failure(description: "the destination aborted: \(String(decoding: payload, as: UTF8.self))")
                default:
                    throw Failure(description: "unexpected \(header.type) frame from the destination during post-copy")
                }
            } catch {
                condition.withLock {
                    if outcome == nil {
                        readerError = error is Failure ? "\(error)" : "lost the destination during post-copy: \(error)"
                        readerLostConnection = !(error is Failure)
                    }
                    condition.broadcast()
                }
                return
            }
        }
    }
}
