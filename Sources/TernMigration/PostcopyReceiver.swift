import CKVM
import Foundation
import Glibc
import Logging
import Synchronization
import TernKVM
import TernMachine
import TernWire

/// The destination's side of post-copy. The VM runs while its memory is
/// still arriving: guest memory is registered with userfaultfd, so a vCPU
/// (or KVM on its behalf) touching a page that is not there yet blocks, a
/// request goes to the source, and the page is placed atomically when it
/// arrives (UFFDIO_COPY / UFFDIO_ZEROPAGE), waking the vCPU.
///
/// Pages are accepted only if they are still expected: a page sent twice, a
/// page outside guest RAM, or a demand reply to a request never made stops
/// the VM (paused, not running on corrupted memory) and ends the migration.
/// One exception: the source answers a request for a page it has already
/// pushed with a second copy on the demand channel, so the fault need not
/// wait behind the push's queue; so a page this side asked for may come
/// twice: the first copy to arrive is placed, the second dropped.
///
/// If the connection drops, nothing is lost: vCPUs touching missing pages
/// wait in the kernel, the others run on, and this side listens again on
/// the incoming address for the source's `tern migrate --resume`, tells it
/// which pages it still waits for, asks again for the ones vCPUs wait on,
/// and carries on.
final class PostcopyReceiver: @unchecked Sendable {
    // @unchecked Sendable: `expected`, `requested`, `requestTimes`, `latencies`, `digest` and the counters are guarded by `lock`;
    // `source`, `connection` and `connected` by `writeLock` (only the pages thread replaces them).
    let machine: Machine
    let memory: GuestMemory
    private var source: FDStream
    let logger: Logger
    /// Where to wait for the source after the connection drops (nil: a drop is a failure), and the token it must present.
    let recovery: Endpoint?
    let token: UInt64
    private var connected = true
    let uffd: Userfaultfd
    /// Preallocated memory (`--prealloc`): pages stay in the memfd and are only
    /// unmapped; an arriving page is written into the file (no allocation, the
    /// costly part on fresh memory) and mapped with UFFDIO_CONTINUE.
    let minorFaults: Bool
    /// The source of zero runs written into the file (minor-fault mode). Small: it is made
    /// during the downtime, where each of its pages costs a page fault to zero (with 4 MiB,
    /// the preallocated post-copy benchmark's downtime was 21.7/23.6 ms; with 64 KiB,
    /// 6.4/4.8 ms); zero runs are rare in post-copy and are written in pieces.
    private let zeros: UnsafeMutableRawBufferPointer
    static let zeroBufferBytes = 64 << 10
    /// Data runs are placed this much at a time, so a vCPU waiting for one page of a run waits for this much at most.
    static let placementPieceBytes = 8 * PageRun.pageSize
    private let lock = NSLock()
    /// Every page the source will send (fixed at the switch). Touching any
    /// other page means zero: the source never wrote it.
    private let needed: PageSet
    /// Needed pages not yet accepted. A page leaves this set when its run is
    /// accepted, a moment before it is placed; a fault in that moment must
    /// still wait for the page, never zero-fill it, so faults consult `needed`.
    private var expected: PageSet
    private var requested: PageSet
    /// Requested pages already placed whose second copy may still come (the demand
    /// channel's answer racing the push): dropped once, refused after that.
    private var secondCopyAllowed: PageSet
    private var requestTimes: [Int: UInt64] = [:]
    private var latencies: [Double] = []
    private var statistics = PostcopyStatistics()
    private let writeLock = NSLock()
    /// Set when post-copy completes or fails; then no page is requested or accepted any more.
    private let finished = Atomic<Bool>(false)
    /// Set when all memory is here or the VM ends: then faults are no longer served. After a
    /// failure they still are, for pages the source never wrote, so that vCPUs can park.
    private let faultsReleased = Atomic<Bool>(false)
    /// vCPU threads (kernel ids) waiting for a page still expected, and the page.
    private var waitingThreads: [Int32: Int] = [:]
    /// The `complete` report once all memory is here (guarded by `writeLock`): sent again if the
    /// source resumes because the first one was lost with the connection.
    private var completion: PostcopyStatistics?
    /// How long a completed destination still waits for a source that lost its `complete`.
    static let completedResumeWaitSeconds = 120.0
    private var digest: UInt64?
    /// With --verify: arriving pages add to `digest`.
    private let verifying: Bool
    private let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)
    /// Post-copy's demand channel (QEMU calls it the preempt channel): replies to
    /// page requests arrive here, never queued behind the background push.
    private let urgent: FileDescriptor?
    private let urgentBounce: UnsafeMutableRawBufferPointer
    private let urgentDone = DispatchSemaphore(value: 0)

    /// The socket, owned here: post-copy outlives the call that accepted it.
    private var connection: FileDescriptor?

    init(machine: Machine, source: FDStream, connection: FileDescriptor?, expected: PageSet, digestOfPresentPages: UInt64?,
         urgent: FileDescriptor? = nil, recovery: Endpoint? = nil, token: UInt64 = 0, logger: Logger) throws {
        self.connection = connection
        self.urgent = urgent
        urgentBounce = .allocate(byteCount: urgent == nil ? 0 : 1 << 20, alignment: 4096)
        self.recovery = recovery
        self.token = token
        self.machine = machine
        memory = machine.memory
        self.source = source
        self.expected = expected
        needed = expected
        requested = PageSet(pageCount: expected.pageCount)
        secondCopyAllowed = PageSet(pageCount: expected.pageCount)
        digest = digestOfPresentPages
        verifying = digestOfPresentPages != nil
        self.logger = logger
        let minorUffd = memory.isPreallocated ? try? Userfaultfd(minorFaults: true) : nil
        minorFaults = minorUffd != nil
        zeros = .allocate(byteCount: minorFaults ? Self.zeroBufferBytes : 0, alignment: 4096)
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        uffd = try minorUffd ?? Userfaultfd()
        let memory = self.memory
        if minorFaults {
            // Expected pages stay in the file (preallocated memory is never punched) but must not be mapped,
            // so that touching them is a minor fault until their contents arrive. Only pages a hybrid's
            // pre-copy wrote are mapped; for the rest this is a cheap no-op.
            try expected.forEachRange { first, count in
                guard madvise(memory.mapping.base + first * PageRun.pageSize, count * PageRun.pageSize, MADV_DONTNEED) == 0 else {
                    throw SystemError("unmapping pages still to come", errno: errno)
                }
            }
            try uffd.registerMinor(memory.mapping.base, length: memory.mapping.length)
        } else {
            // Pages still expected may hold stale pre-copy contents: drop them so that touching them faults.
            try expected.forEachRange { first, count in
                guard ckvm_punch_hole(memory.file.rawValue, Int64(first * PageRun.pageSize), Int64(count * PageRun.pageSize)) == 0 else {
                    throw SystemError("punching stale pages", errno: errno)
                }
            }
            try uffd.registerMissing(memory.mapping.base, length: memory.mapping.length)
        }
        // A short receive queue: a demand reply must not wait behind megabytes of pushed pages.
        var size: Int32 = 256 << 10
        setsockopt(source.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    deinit {
        bounce.deallocate()
        urgentBounce.deallocate()
        zeros.deallocate()
    }

    /// Serves faults and receives pages on two threads; returns at once.
    /// `started` is the monotonic time the VM started, for "memory complete after".
    func start(vmStartedNs: UInt64) {
        // Kept with the VM: if post-copy fails, the userfaultfd must stay open, or the
        // kernel would fill the missing pages with zeros under the waiting vCPUs.
        machine.keepAlive(self)
        machine.memoryIncomplete = true
        // When the VM ends, vCPUs still waiting for pages are let go, or their threads could never end.
        machine.onExit { [weak self] in self?.releaseFaults() }
        logger.info("post-copy: \(needed.count) pages to come, placed by \(minorFaults ? "minor faults (UFFDIO_CONTINUE) on preallocated memory" : "missing faults (UFFDIO_COPY)")")
        spawnThread(named: "postcopy-faults") { [self] in
            makeCurrentThreadLatencyCritical()
            serveFaults()
        }
        if let urgent {
            var noTimeout = timeval(tv_sec: 0, tv_usec: 0)
            setsockopt(urgent.rawValue, SOL_SOCKET, SO_RCVTIMEO, &noTimeout, socklen_t(MemoryLayout<timeval>.size))
            spawnThread(named: "postcopy-urgent") { [self] in
                makeCurrentThreadLatencyCritical()
                receiveDemandReplies(from: FDStream(fd: urgent.rawValue))
                urgentDone.signal()
            }
        }
        spawnThread(named: "postcopy-pages") { [self] in
            do {
                try receivePages(vmStartedNs: vmStartedNs)
            } catch {
                fail("\(error)")
            }
        }
    }

    private func fail(_ reason: String) {
        guard !finished.exchange(true, ordering: .relaxed) else { return }
        logger.error("post-copy failed: \(reason); the VM is paused rather than run on incomplete memory")
        let waiting = lock.withLock { Set(waitingThreads.keys) }
        let unparked = machine.pauseForGood(waitingForMemory: waiting)
        if unparked > 0 {
            logger.warning("\(unparked) vCPU(s) wait for guest memory that will not come; they stay stopped until the VM ends")
        }
        writeLock.withLock { _ = try? source.writeFrame(.abort, payload: Array(reason.utf8)) }
    }

    /// The VM is ending: stop serving faults and unregister guest memory, which wakes any
    /// vCPU still waiting for a page (it then sees a zero page, and stops at once).
    private func releaseFaults() {
        guard !faultsReleased.exchange(true, ordering: .relaxed) else { return }
        try? uffd.unregister(memory.mapping.base, length: memory.mapping.length)
    }

    // MARK: Faults

    private func serveFaults() {
        let base = UInt64(UInt(bitPattern: memory.mapping.base))
        while !faultsReleased.load(ordering: .relaxed) {
            let faults: [Userfaultfd.Fault]
            do { faults = try uffd.waitForFaults(timeoutMs: 100) } catch {
                fail("\(error)")
                return
            }
            // After a failure nothing is asked for: the pages will not come, their vCPUs stay waiting.
            let failed = finished.load(ordering: .relaxed)
            var toRequest: [UInt64] = []
            var toZero: [Int] = []
            let now = Clocks.monotonicNs()
            lock.withLock {
                for fault in faults {
                    let page = Int((fault.address - base) / UInt64(PageRun.pageSize))
                    guard page < expected.pageCount else { continue }
                    statistics.faults += 1
                    if !needed.contains(page) {
                        toZero.append(page)        // never written at the source: zero, no need to ask
                        continue
                    }
                    // A page accepted a moment ago is being placed, which wakes this vCPU: nothing to ask for.
                    guard expected.contains(page) else { continue }
                    waitingThreads[fault.threadID] = page
                    if !failed && !requested.contains(page) {
                        requested.insert(page)
                        requestTimes[page] = now
                        toRequest.append(UInt64(page))
                    }
                }
                statistics.requests += UInt64(toRequest.count)
            }
            for page in toZero {
                do {
                    // Minor faults: a page not needed is right in the file already (zero or sent before); it only needs mapping.
                    let target = memory.mapping.base + page * PageRun.pageSize
                    let placement = minorFaults ? try uffd.continueMapping(target, length: PageRun.pageSize)
                                                : try uffd.zero(target, length: PageRun.pageSize)
                    if placement == .placed {
                        lock.withLock { statistics.pagesZeroFilledLocally += 1 }
                    }
                } catch {
                    fail("cannot zero-fill page \(memory.address(ofPage: page)): \(error)")
                    return
                }
            }
            if !toRequest.isEmpty {
                do {
                    try sendRequests(toRequest)
                } catch {
                    // The vCPUs keep waiting for these pages; they are asked for again after a resume
                    // (the failed connection is already cut, so the pages thread notices).
                    guard recovery != nil else {
                        fail("cannot request pages from the source: \(error)")
                        return
                    }
                }
            }
        }
    }

    /// Sends page requests (in pieces a request frame can hold); a no-op while disconnected.
    private func sendRequests(_ pages: [UInt64]) throws {
        try writeLock.withLock { try sendRequestsLocked(pages) }
    }

    /// `sendRequests` with `writeLock` held. A failed write marks this very
    /// connection lost (never one adopted since) and cuts it.
    private func sendRequestsLocked(_ pages: [UInt64]) throws {
        guard connected else { return }
        do {
            for start in stride(from: 0, to: pages.count, by: PageRequest.maximumPages) {
                let request = PageRequest(pages: Array(pages[start..<min(pages.count, start + PageRequest.maximumPages)]))
                try source.writeFrame(.pageRequest, payload: request.encoded)
            }
        } catch {
            connected = false
            shutdown(source.fd, Int32(SHUT_RDWR))
            throw error
        }
    }

    /// Whether all memory is here and `complete` was sent (or lost with the connection).
    private var isComplete: Bool { writeLock.withLock { completion != nil } }

    /// Marks the connection lost and cuts it, so the pages thread notices at once.
    private func disconnect() {
        writeLock.withLock {
            connected = false
            shutdown(source.fd, Int32(SHUT_RDWR))
        }
        // The demand channel goes with it: after a resume everything comes on the new connection.
        if let urgent { shutdown(urgent.rawValue, Int32(SHUT_RDWR)) }
    }

    // MARK: Recovery

    static let resumeOpeningSeconds = 2

    /// Whether an error means the connection is gone (then a resume can repair it), not that the source misbehaved.
    private static func isConnectionLoss(_ error: any Error) -> Bool {
        if error is FDStream.IOError { return true }
        if case WireError.truncated = error { return true }
        return false
    }

    /// Waits on the incoming address for the source to come back with the
    /// migration's token, and switches to the new connection.
    private func awaitResume(after error: any Error) throws {
        guard let endpoint = recovery else { throw error }
        disconnect()
        let waiting = lock.withLock { expected.count }
        if isComplete {
            logger.warning("post-copy connection lost (\(error)) before the source confirmed it had `complete`; all memory is here. Listening on \(endpoint) for `tern migrate --resume`, for up to \(Int(Self.completedResumeWaitSeconds)) s")
        } else {
            logger.warning("post-copy connection lost (\(error)); \(waiting) pages still at the source, vCPUs that touch them wait. Listening on \(endpoint) for `tern migrate --resume`")
        }
        let listener = try listenAgain(on: endpoint)
        defer { if case .unix(let path) = endpoint { unlink(path) } }
        let waitStarted = Date()
        while true {
            if finished.load(ordering: .relaxed) {
                // Failed meanwhile: nothing to resume. Complete: wait a while for a source that missed it.
                guard isComplete else { throw error }
                if Date().timeIntervalSince(waitStarted) >= Self.completedResumeWaitSeconds {
                    logger.warning("no resume came within \(Int(Self.completedResumeWaitSeconds)) s; the VM runs here with all its memory")
                    throw error
                }
            }
            let candidate: FileDescriptor
            do { candidate = try Endpoint.accept(listener, timeoutSeconds: 1) } catch { continue }
            do {
                try adopt(candidate)
                return
            } catch {
                // A stranger or a stale source: turned away, the wait goes on.
                logger.warning("refused a connection while waiting for the resume: \(error)")
                try? FDStream(fd: candidate.rawValue).writeFrame(.abort, payload: Array("\(error)".utf8))
            }
        }
    }

    /// The incoming address may be held for a moment by the socket just closed; retry for a while.
    private func listenAgain(on endpoint: Endpoint) throws -> FileDescriptor {
        var attempts = 0
        while true {
            do { return try endpoint.listen() } catch {
                attempts += 1
                if attempts >= 50 { throw error }
                if case .unix(let path) = endpoint { unlink(path) }
                Thread.sleep(forTimeInterval: 0.1)
            }
        }
    }

    /// Checks the resume, tells the source what is still missing, and re-asks for what vCPUs wait on.
    private func adopt(_ candidate: FileDescriptor) throws {
        // A source sends its resume at once: a peer that stays silent must not hold up the real one for long.
        let payload = try readOpeningFrame(of: candidate, type: .postcopyResume, within: Self.resumeOpeningSeconds,
                                           otherwise: "expected a post-copy resume")
        let stream = FDStream(fd: candidate.rawValue)
        guard try PostcopyResume(decoding: payload).token == token else {
            throw MigrationDestination.Refusal("a resume for another migration (wrong token)")
        }
        setTimeouts(candidate.rawValue, seconds: MigrationSource.replyTimeoutSeconds)
        var size: Int32 = 256 << 10
        setsockopt(candidate.rawValue, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        // The demand channel's thread has stopped (it was cut with the connection): no frame of the old
        // connection can be placed after the list of pages still expected is taken.
        if urgent != nil {
            urgentDone.wait()
            urgentDone.signal()
        }
        // Under one writeLock: a fault noted meanwhile is either in this list or sent on the new connection.
        var stillCount = 0, waitedCount = 0
        try writeLock.withLock {
            let (stillExpected, waitedOn): (PageSet, [UInt64]) = lock.withLock {
                var waited: [UInt64] = []
                var page = 0
                while page < requested.pageCount, let next = requested.next(from: page) {
                    if expected.contains(next) { waited.append(UInt64(next)) }
                    page = next + 1
                }
                statistics.reconnections += 1
                return (expected, waited)
            }
            try stream.writeFrame(.postcopyResumeReply, payload: PostcopyResumeReply(expected: stillExpected).encoded)
            source = stream
            connection = candidate
            connected = true
            try sendRequestsLocked(waitedOn)
            stillCount = stillExpected.count
            waitedCount = waitedOn.count
        }
        logger.info("post-copy resumed: \(stillCount) pages to come, \(waitedCount) of them waited on")
    }

    // MARK: Pages

    private func receivePages(vmStartedNs: UInt64) throws {
        while true {
            let header: FrameHeader
            do { header = try source.readFrameHeader() } catch where Self.isConnectionLoss(error) {
                try awaitResume(after: error)
                continue
            }
            switch header.type {
            case .pages:
                do { try place(header, from: source, bounce: bounce) } catch where Self.isConnectionLoss(error) {
                    // A frame cut short is dropped whole: its pages are placed only after its CRC checks out.
                    try awaitResume(after: error)
                }
            case .postcopyEnd:
                _ = try source.readExactly(Int(header.length), what: "post-copy end")
                // The demand channel ends too (or ended with a dropped connection): its last replies are placed first.
                if urgent != nil {
                    urgentDone.wait()
                    urgentDone.signal()
                }
                let missing = lock.withLock { expected.count }
                guard missing == 0 else { throw WireError.malformed("the source finished with \(missing) pages never sent") }
                finish(vmStartedNs: vmStartedNs)
                // The source's acknowledgement (or, if the connection drops first, its resume) follows.
            case .completeAck:
                guard isComplete else { throw WireError.malformed("a completion acknowledgement before memory was complete") }
                _ = try source.readExactly(Int(min(header.length, 64)), what: "completion acknowledgement")
                disconnect()
                return
            case .abort:
                let payload = try source.readExactly(Int(header.length), what: "abort")
                throw WireError.malformed("the source aborted: \(String(decoding: payload, as: UTF8.self))")
            default:
                throw WireError.malformed("unexpected \(header.type) frame during post-copy")
            }
        }
    }

    /// The demand channel's replies, until the source's `postcopyEnd` on it. A
    /// dropped channel just ends this thread: replies then come on the control
    /// connection (after a resume, post-copy runs on that alone).
    private func receiveDemandReplies(from stream: FDStream) {
        do {
            while true {
                let header = try stream.readFrameHeader()
                switch header.type {
                case .pages:
                    guard header.flags & demandReplyFlag != 0 else { throw WireError.malformed("a pushed page on the demand channel") }
                    try place(header, from: stream, bounce: urgentBounce)
                case .postcopyEnd:
                    return
                default:
                    throw WireError.malformed("unexpected \(header.type) frame on the demand channel")
                }
            }
        } catch where Self.isConnectionLoss(error) {
            logger.debug("post-copy demand channel closed: \(error)")
        } catch {
            fail("\(error)")
        }
    }

    /// Reads a whole pages frame, checks its CRC, and only then places its
    /// pages: a running vCPU must never see bytes that fail the check.
    private func place(_ header: FrameHeader, from stream: FDStream, bounce: UnsafeMutableRawBufferPointer) throws {
        let demandReply = header.flags & demandReplyFlag != 0
        let length = Int(header.length)
        guard length <= bounce.count else { throw WireError.tooLarge("a post-copy pages frame of \(length) bytes") }
        let frame = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<length])
        try stream.readExactly(into: frame, what: "post-copy pages frame")
        guard Checksum.crc32c(UnsafeRawBufferPointer(frame)) == header.payloadCRC else {
            throw WireError.checksumMismatch("pages frame during post-copy")
        }
        var offset = 0
        while offset < length {
            guard length - offset >= PageRun.headerSize else { throw WireError.malformed("pages frame ends inside a run header") }
            let run = try PageRun(decodingHeader: Array(UnsafeRawBufferPointer(rebasing: frame[offset..<offset + PageRun.headerSize])))
            offset += PageRun.headerSize
            guard run.kind != .delta else { throw WireError.malformed("a delta page during post-copy, where each page is sent once") }
            let fileOffset = try memory.fileOffset(of: run.address, length: UInt64(run.byteCount))
            let firstPage = Int(fileOffset) / PageRun.pageSize
            if run.kind == .data && length - offset < run.byteCount { throw WireError.malformed("pages frame ends inside page data") }
            let firstCopies = try accept(run, firstPage: firstPage, demandReply: demandReply)
            let dataStart = offset
            if run.kind == .data { offset += run.byteCount }
            // Usually the whole run; without the second copies of pages already placed.
            for pages in firstCopies {
                let skipped = (pages.lowerBound - firstPage) * PageRun.pageSize
                let part = PageRun(address: run.address + UInt64(skipped), pageCount: UInt32(pages.count), kind: run.kind)
                let data = run.kind == .data ? UnsafeRawBufferPointer(rebasing: frame[dataStart + skipped..<dataStart + skipped + part.byteCount]) : nil
                try place(part, firstPage: pages.lowerBound, fileOffset: fileOffset + UInt64(skipped), data: data)
            }
        }
    }

    /// Places a run of pages just accepted: zero runs by UFFDIO_ZEROPAGE, data by UFFDIO_COPY
    /// (minor-fault mode: written into the file, then mapped by UFFDIO_CONTINUE).
    private func place(_ run: PageRun, firstPage: Int, fileOffset: UInt64, data: UnsafeRawBufferPointer?) throws {
        let target = memory.mapping.base + Int(fileOffset)
        switch run.kind {
        case .zero:
            if minorFaults {
                // A run may be longer than the zero buffer (runs are bounded by the region only).
                var done = 0
                while done < run.byteCount {
                    let piece = min(zeros.count, run.byteCount - done)
                    try write(UnsafeRawBufferPointer(rebasing: zeros[0..<piece]), at: fileOffset + UInt64(done))
                    done += piece
                }
            }
            guard try (minorFaults ? uffd.continueMapping(target, length: run.byteCount) : uffd.zero(target, length: run.byteCount)) == .placed else {
                throw WireError.malformed("page run at \(run.address) is already present")
            }
            if verifying {
                var sum: UInt64 = 0
                for page in firstPage..<firstPage + Int(run.pageCount) { sum &+= MemoryDigest.contribution(page: UInt64(page), crc: MemoryDigest.zeroPageCRC) }
                lock.withLock { digest! &+= sum }
            }
        case .delta:
            throw WireError.malformed("a delta page during post-copy")
        case .data:
            let chunk = data!
            // In pieces: the kernel wakes a faulting vCPU only once the whole range is placed, and placing
            // 64 fresh pages takes most of a millisecond here (first touch of host memory).
            for piece in stride(from: 0, to: run.byteCount, by: Self.placementPieceBytes) {
                let part = UnsafeRawBufferPointer(rebasing: chunk[piece..<min(run.byteCount, piece + Self.placementPieceBytes)])
                if minorFaults { try write(part, at: fileOffset + UInt64(piece)) }
                guard try (minorFaults ? uffd.continueMapping(target + piece, length: part.count)
                                       : uffd.copy(to: target + piece, from: part.baseAddress!, length: part.count)) == .placed else {
                    throw WireError.malformed("page run at \(run.address) is already present")
                }
            }
            if verifying {
                let sum = MemoryDigest.contribution(ofPages: chunk, first: firstPage)
                lock.withLock { digest! &+= sum }
            }
        }
    }

    /// Writes a run's contents into the memfd (minor-fault mode), where no vCPU can see them before they are mapped.
    private func write(_ bytes: UnsafeRawBufferPointer, at fileOffset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let n = pwrite(memory.file.rawValue, bytes.baseAddress! + done, bytes.count - done, off_t(fileOffset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            // A local failure, not a lost connection: it must not send post-copy into waiting for a resume.
            guard n > 0 else { throw SystemError("writing guest memory", errno: errno) }
            done += n
        }
    }

    /// Checks that every page of a run is still expected (and, for a demand
    /// reply, was requested), marks it arrived, and returns the pages to place:
    /// the whole run, less the second copies of requested pages already here.
    private func accept(_ run: PageRun, firstPage: Int, demandReply: Bool) throws -> [Range<Int>] {
        lock.lock()
        defer { lock.unlock() }
        // After a failure no page is placed: a vCPU woken by one would run while the VM counts as paused.
        guard !finished.load(ordering: .relaxed) else { throw WireError.malformed("a page after post-copy ended") }
        // Read under the lock: request times are too, so `now` is never earlier than one of them.
        let now = Clocks.monotonicNs()
        let pages = firstPage..<firstPage + Int(run.pageCount)
        for page in pages {
            if demandReply && !requested.contains(page) {
                throw WireError.malformed("a reply for page \(memory.address(ofPage: page)), which was never requested")
            }
            guard expected.contains(page) || secondCopyAllowed.contains(page) else {
                throw WireError.malformed("page \(memory.address(ofPage: page)) was sent twice or was never needed")
            }
        }
        if !waitingThreads.isEmpty { waitingThreads = waitingThreads.filter { !pages.contains($0.value) } }
        var firstCopies: [Range<Int>] = []
        for page in pages {
            guard expected.contains(page) else {
                secondCopyAllowed.remove(page)
                statistics.secondCopiesDropped += 1
                continue
            }
            expected.remove(page)
            if requested.contains(page) { secondCopyAllowed.insert(page) }
            if demandReply { statistics.pagesPulled += 1 } else { statistics.pagesPushed += 1 }
            if let asked = requestTimes.removeValue(forKey: page) { latencies.append(Clocks.milliseconds(from: asked, to: now)) }
            if let last = firstCopies.last, last.upperBound == page {
                firstCopies[firstCopies.count - 1] = last.lowerBound..<page + 1
            } else {
                firstCopies.append(page..<page + 1)
            }
        }
        return firstCopies
    }

    /// Sends `complete`: the first time with the statistics, after a resume the same report again.
    private func finish(vmStartedNs: UInt64) {
        if var again = writeLock.withLock({ completion }) {
            again.reconnections = lock.withLock { statistics.reconnections }
            writeLock.withLock { _ = try? source.writeFrame(.complete, payload: again.encoded) }
            logger.info("post-copy: `complete` sent again after the resume")
            return
        }
        guard !finished.exchange(true, ordering: .relaxed) else { return } // failed meanwhile: no `complete` after an abort
        machine.memoryIncomplete = false
        releaseFaults()
        let report: PostcopyStatistics = lock.withLock {
            var result = statistics
            let sorted = latencies.sorted()
            if !sorted.isEmpty {
                result.faultLatencyP50Ms = sorted[sorted.count / 2]
                result.faultLatencyP99Ms = sorted[min(sorted.count - 1, Int(Double(sorted.count) * 0.99))]
                result.faultLatencyMaxMs = sorted.last!
            }
            result.memoryCompleteAfterMs = Clocks.milliseconds(from: vmStartedNs, to: Clocks.monotonicNs())
            result.memoryDigest = digest.map { String(format: "%016llx", $0) }
            return result
        }
        writeLock.withLock {
            completion = report
            if ProcessInfo.processInfo.environment["TERN_MIGRATION_FAULT"] == "lose-complete" {
                // Fault injection (tests): the connection drops just as `complete` would have gone.
                logger.warning("TERN_MIGRATION_FAULT=lose-complete: dropping the connection instead of sending `complete`")
                connected = false
                shutdown(source.fd, Int32(SHUT_RDWR))
            } else {
                _ = try? source.writeFrame(.complete, payload: report.encoded)
            }
        }
        logger.info("post-copy complete: \(report.pagesPushed) pages pushed, \(report.pagesPulled) pulled, \(report.faults) faults, fault latency p50 \(String(format: "%.3f", report.faultLatencyP50Ms)) ms p99 \(String(format: "%.3f", report.faultLatencyP99Ms)) ms; all memory here after \(String(format: "%.0f", report.memoryCompleteAfterMs)) ms")
    }
}
