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
final class PostcopySender: @unchecked Sendable {
    // @unchecked Sendable: `requests`, `outcome` and `readerError` are guarded by `condition`.
    /// Pages per pushed frame: small, so a demand reply never waits behind much.
    static let pushFramePages = 64
    /// Pages pushed after a fault before the push may wander off again.
    static let prepagingWindow = 256
    static let completionTimeoutSeconds = 60.0

    let memory: GuestMemory
    let stream: FDStream
    /// Owned for as long as the reader thread may use it.
    let connection: FileDescriptor?
    private var needed: PageSet
    private let streamer: PageStreamer
    private let condition = NSCondition()
    private var requests: [Int] = []
    private var outcome: PostcopyStatistics?
    private var readerError: String?
    /// Whether the reader stopped because the connection broke (not because the destination refused).
    private var readerLostConnection = false
    private(set) var pushed: UInt64 = 0
    private(set) var pulled: UInt64 = 0
    var shouldStop: () -> Bool = { false }

    init(memory: GuestMemory, connection: FileDescriptor?, stream: FDStream, needed: PageSet) {
        self.connection = connection
        self.memory = memory
        self.stream = stream
        self.needed = needed
        streamer = PageStreamer(memory: memory, stream: stream, framePages: Self.pushFramePages)
    }

    var counters: PageStreamCounters { streamer.counters }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        /// The connection broke: the destination may be waiting for a resume.
        var connectionLost = false
    }

    /// Sends every needed page, then waits for the destination to confirm it holds them all.
    func run() throws -> PostcopyStatistics {
        do {
            return try serve()
        } catch let error as FDStream.IOError {
            throw Failure(description: "lost the destination during post-copy: \(error)", connectionLost: true)
        }
    }

    private func serve() throws -> PostcopyStatistics {
        // Keep the socket's queue short: a demand reply should not queue behind megabytes of push.
        var size: Int32 = 256 << 10
        setsockopt(stream.fd, SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        // Requests may be minutes apart; the completion wait below has its own bound.
        var noTimeout = timeval(tv_sec: 0, tv_usec: 0)
        setsockopt(stream.fd, SOL_SOCKET, SO_RCVTIMEO, &noTimeout, socklen_t(MemoryLayout<timeval>.size))
        let readerDone = DispatchSemaphore(value: 0)
        let reader = Thread { [self] in
            readReplies()
            readerDone.signal()
        }
        reader.start()
        // Whatever happens below, the reader must be gone before the socket can be closed.
        defer {
            if condition.withLock({ outcome == nil }) { shutdown(stream.fd, Int32(SHUT_RDWR)) }
            readerDone.wait()
        }

        var cursor = 0
        var prepagingLeft = 0
        while true {
            if shouldStop() { throw Failure(description: "cancelled during post-copy") }
            if let error = condition.withLock({ readerError }) {
                throw Failure(description: error, connectionLost: condition.withLock { readerLostConnection })
            }
            let demand: [Int] = condition.withLock {
                defer { requests.removeAll(keepingCapacity: true) }
                return requests
            }
            if !demand.isEmpty {
                streamer.frameFlags = demandReplyFlag
                for page in demand where page < needed.pageCount && needed.contains(page) {
                    needed.remove(page)
                    try streamer.addPages(firstPage: page, count: 1)
                    pulled += 1
                }
                try streamer.flush()
                streamer.frameFlags = 0
                cursor = min((demand.last ?? cursor) + 1, needed.pageCount)
                prepagingLeft = Self.prepagingWindow
                continue
            }
            guard let first = needed.next(from: cursor) ?? needed.next(from: 0) else { break }
            if prepagingLeft > 0 && first != cursor { prepagingLeft = 0 }
            var count = 0
            while count < Self.pushFramePages, first + count < needed.pageCount, needed.contains(first + count) {
                needed.remove(first + count)
                count += 1
            }
            try streamer.addPages(firstPage: first, count: count)
            try streamer.flush()
            pushed += UInt64(count)
            prepagingLeft = max(0, prepagingLeft - count)
            cursor = first + count
        }
        try stream.writeFrame(.postcopyEnd, payload: [UInt8]())

        let deadline = Date(timeIntervalSinceNow: Self.completionTimeoutSeconds)
        condition.lock()
        defer { condition.unlock() }
        while outcome == nil && readerError == nil {
            guard condition.wait(until: deadline) else {
                throw Failure(description: "the destination did not confirm it holds all memory", connectionLost: true)
            }
        }
        if let error = readerError { throw Failure(description: error, connectionLost: readerLostConnection) }
        return outcome!
    }

    /// The destination's requests and its final confirmation, on their own thread.
    private func readReplies() {
        while true {
            do {
                let (header, payload) = try stream.readFrame()
                switch header.type {
                case .pageRequest:
                    let request = try PageRequest(decoding: payload)
                    condition.withLock {
                        // Bounded: a well-behaved destination never has more pages outstanding than exist.
                        if requests.count < needed.pageCount {
                            requests.append(contentsOf: request.pages.lazy.filter { $0 < UInt64(self.needed.pageCount) }.map { Int($0) })
                        }
                        condition.broadcast()
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
