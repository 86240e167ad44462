import Foundation
import Glibc
import TernMachine
import TernWire

extension MigrationSource {
    /// Post-copy: pause, send only the VM state and the list of pages the
    /// destination still needs, let it start, then push those pages (and
    /// answer its requests first) until it holds them all.
    func switchToPostcopy(stream: FDStream, urgent: FDStream?, sender: PageStreams, rateLimit: RateLimiter, pending: PageSet?, round: Int, switchover: String,
                                  token: UInt64, pausedHere: inout Bool, committed: inout Bool, sameHost: Bool,
                                  started: ContinuousClock.Instant) throws {
        update { $0.switchoverReason = switchover; $0.status = .stopAndCopy; $0.currentRound = round; $0.mode = parameters.mode.rawValue }
        // Pre-copy ran: what it left dirty. Otherwise every page the guest ever wrote (holes are zero at
        // both ends), listed before the pause, since walking 1 GiB of extents took milliseconds of downtime:
        // dirty logging has been on since before the walk, so what the guest writes meanwhile is in the log.
        var needed = try pending ?? PageSet(pagesWithDataIn: machine.memory)
        let pausedMono = Clocks.monotonicNs(), pausedReal = Clocks.realtimeNs()
        pausedHere = try pauseForSwitchover()
        rateLimit.lift()
        // Plus what the guest wrote since.
        needed.formUnion(try machine.memory.collectDirtyPages(from: machine.vm))
        // Disks move before execution does: the blocks written since their last round go now.
        if let storage {
            try storage.sendChangedBlocks(on: stream, rateLimit: rateLimit)
            try storage.endMirror()
            storage.endRound()
            updateStorageReport()
        }
        logger.debug("post-copy switch: \(needed.count) pages still needed, known \(Int(Clocks.milliseconds(from: pausedMono, to: Clocks.monotonicNs()))) ms after the pause")
        // The extra streams' pre-copy ends here; post-copy's push goes on over them too.
        try sender.endExtraStreams()
        let pushStreams = sender.senders.dropFirst().map { $0.streamer.stream }
        // With --verify, the memory digest is not taken here, in the downtime (a GiB took 90-130 ms):
        // this side's memory no longer changes once paused, so it is taken after the hand-over, while
        // pages are pushed, and compared with the destination's once its memory is complete. The end
        // frame carries a placeholder, as in pre-copy: it only asks the destination for its digest.
        let (sections, _, _) = try sendState(on: stream, withDigests: false)
        let memoryDigest: UInt64? = parameters.verify ? 0 : nil
        let stateDigest = parameters.verify ? MemoryDigest.state(sections) : nil
        logger.debug("post-copy switch: state captured and sent \(Int(Clocks.milliseconds(from: pausedMono, to: Clocks.monotonicNs()))) ms after the pause")
        let start = PostcopyStart(completion: Completion(pausedMonotonicNs: pausedMono, pausedRealtimeNs: pausedReal,
                                                         memoryDigest: memoryDigest, stateDigest: stateDigest),
                                  needed: needed)
        let startBytes = start.encoded
        try stream.writeFrame(.postcopyStart, payload: startBytes)
        let stateBytes = UInt64(sections.reduce(0) { $0 + $1.encoded.count + FrameHeader.size } + FrameHeader.size + startBytes.count)

        let (_, readyPayload) = try readReply(stream, expecting: .ready, what: "the hand-over")
        let ready = try Verdict(decoding: readyPayload)
        guard ready.accepted else { throw Failure("the destination rejected the VM: \(ready.reason)") }
        if parameters.verify && ready.stateDigest != stateDigest {
            try? stream.writeFrame(.abort, payload: Array("state digests differ".utf8))
            throw Failure("verification failed: the VM state differs between source and destination")
        }
        if parameters.verify, try !verifyDisks(ready, on: stream) {
            try? stream.writeFrame(.abort, payload: Array("disk digests differ".utf8))
            throw Failure("verification failed: the disks' digests differ between source and destination")
        }
        if cancelled { throw Failure("cancelled") }

        let precopy = sender.counters
        var context = PostcopyContext(neededAtSwitch: needed, token: token, precopy: precopy, stateBytes: stateBytes,
                                      memoryDigest: parameters.verify ? PendingDigest { [memory = machine.memory] in try MemoryDigest.compute(memory) } : nil,
                                      stateDigest: stateDigest,
                                      destinationStateDigest: ready.stateDigest,
                                      started: started, round: round)
        // `go` may reach the destination even if what follows fails: from here the pages are owed.
        try owePostcopyPages()
        do {
            try handOver(stream, pausedMono: pausedMono, pausedReal: pausedReal, sameHost: sameHost, keepPaused: !pausedHere,
                         committed: &committed)
        } catch where committed {
            // `go` is out: the destination may be running the VM and waiting for its pages. A lost
            // `resumed` is a dropped post-copy connection like any other, to be resumed.
            let saved = context
            lock.withLock { postcopyContext = saved }
            if let urgent { shutdown(urgent.fd, Int32(SHUT_RDWR)) }
            throw PostcopyInterrupted(description: "lost the destination right after the hand-over: \(error)")
        } catch {
            // `go` never went: the VM is still whole here.
            setOwesPostcopyPages(false)
            throw error
        }
        context.memoryDigest?.start()
        update {
            $0.executionMovedAtMs = milliseconds(since: started)
            $0.status = .postcopy
            $0.transferredBytes = precopy.bytes + stateBytes + storageBytes
            if precopy.unchangedPages > 0 { $0.unchangedPages = precopy.unchangedPages }
        }

        // Post-copy proper: from here the VM runs at the destination and this side only serves memory.
        try servePostcopy(stream: stream, urgent: urgent, pushStreams: Array(pushStreams), needed: needed, context: &context)
    }

    /// What post-copy needs to go on after its connection dropped; kept until it completes.
    struct PostcopyContext {
        let neededAtSwitch: PageSet
        let token: UInt64
        let precopy: PageStreamCounters
        let stateBytes: UInt64
        /// This side's memory digest at the pause (--verify), taken while post-copy runs.
        let memoryDigest: PendingDigest?
        let stateDigest: UInt64?
        let destinationStateDigest: UInt64?
        let started: ContinuousClock.Instant
        let round: Int
        /// What earlier connections carried.
        var earlier = PageStreamCounters()
        /// Pages earlier connections sent a second time.
        var earlierResent: UInt64 = 0
        /// What earlier connections carried, per stream (a resume runs on one).
        var earlierByStream: [UInt64] = []

        mutating func addEarlier(byStream pages: [UInt64]) {
            earlierByStream = combined(pages)
        }

        /// `pages` added stream by stream to what earlier connections carried.
        func combined(_ pages: [UInt64]) -> [UInt64] {
            (0..<max(pages.count, earlierByStream.count)).map {
                ($0 < pages.count ? pages[$0] : 0) + ($0 < earlierByStream.count ? earlierByStream[$0] : 0)
            }
        }
    }

    /// Post-copy's connection dropped: the destination runs the VM and waits; `resume` goes on.
    struct PostcopyInterrupted: Error, CustomStringConvertible {
        let description: String
    }

    /// Serves `needed` until the destination confirms it holds everything; a
    /// dropped connection keeps the context for `resume`.
    /// `pushStreams`: the pre-copy's extra page streams, which carry pushed pages too (a resume runs on one connection).
    func servePostcopy(stream: FDStream, urgent: FDStream? = nil, pushStreams: [FDStream] = [], needed: PageSet,
                       context: inout PostcopyContext) throws {
        // The cap was lifted for the switch (the downtime); the push shares the link again under it.
        let postcopy = PostcopySender(memory: machine.memory, connection: lock.withLock { connection }, stream: stream,
                                      urgent: urgent, pushStreams: pushStreams, needed: needed, rateLimit: makeRateLimiter())
        let (earlierBytes, owed) = (context.precopy.bytes + context.stateBytes + context.earlier.bytes + storageBytes, needed.count)
        postcopy.onProgress = { [unowned self] left, bytes in
            update {
                $0.transferredBytes = earlierBytes + bytes
                $0.roundPercent = owed > 0 ? Double(owed - left) / Double(owed) * 100 : 100
            }
        }
        let statistics: PostcopyStatistics
        do {
            statistics = try postcopy.run()
        } catch let failure as PostcopySender.Failure where failure.connectionLost {
            // The demand channel and the push streams go with the control connection: a resume runs on one new connection.
            if let urgent { shutdown(urgent.fd, Int32(SHUT_RDWR)) }
            for pushStream in pushStreams { shutdown(pushStream.fd, Int32(SHUT_RDWR)) }
            context.earlier.add(postcopy.counters)
            context.earlierResent += postcopy.resent
            context.addEarlier(byStream: postcopy.pagesByStream)
            let saved = context
            lock.withLock { postcopyContext = saved }
            throw PostcopyInterrupted(description: failure.description)
        }
        lock.withLock { postcopyContext = nil }
        setOwesPostcopyPages(false)
        var sent = context.earlier
        sent.add(postcopy.counters)
        let resent = context.earlierResent + postcopy.resent
        let c = context
        update {
            $0.postcopy = statistics
            $0.memoryCompleteAtMs = milliseconds(since: c.started)
            $0.transferredBytes = c.precopy.bytes + c.stateBytes + sent.bytes + storageBytes
            $0.dataPages = c.precopy.dataPages + sent.dataPages
            $0.zeroPages = c.precopy.zeroPages + sent.zeroPages
            $0.postcopyPagesSent = sent.dataPages + sent.zeroPages - resent
            $0.postcopyPagesResent = resent
            $0.postcopyPagesByStream = c.combined(postcopy.pagesByStream)
            $0.rounds.append(MigrationReport.Round(
                round: c.round, pages: sent.dataPages + sent.zeroPages, zeroPages: sent.zeroPages, bytes: sent.bytes + c.stateBytes,
                dirtyPages: 0, durationMs: milliseconds(since: c.started) - ($0.executionMovedAtMs ?? 0), throughputMBps: 0,
                dirtyRatePagesPerSecond: 0, predictedDowntimeMs: 0))
        }
        if parameters.verify {
            let memoryDigest: UInt64?
            do { memoryDigest = try c.memoryDigest?.value() } catch {
                throw Failure("verification failed: cannot take this side's memory digest: \(error) (the VM runs at the destination)")
            }
            let verification = MigrationReport.Verification(
                sourceMemoryDigest: hex(memoryDigest), destinationMemoryDigest: statistics.memoryDigest ?? "",
                sourceStateDigest: hex(c.stateDigest), destinationStateDigest: hex(c.destinationStateDigest),
                match: hex(memoryDigest) == statistics.memoryDigest && c.stateDigest == c.destinationStateDigest)
            update { $0.verification = verification }
            guard verification.match else {
                throw Failure("verification failed: the destination's memory once complete differs from the source's at the switch (the VM runs at the destination)")
            }
        }
    }

    /// Whether a post-copy waits for `resume` (its connection dropped).
    public var isPostcopyPaused: Bool { lock.withLock { postcopyContext != nil } }

    /// Reconnects a post-copy whose connection dropped (`tern migrate --resume`):
    /// the destination says which pages it still waits for, and post-copy goes on.
    /// Any failure short of a verification mismatch leaves it resumable again.
    public func resume(destination: Endpoint? = nil) -> MigrationReport {
        guard var context = lock.withLock({ postcopyContext }) else {
            var report = progress
            report.reason = "no post-copy is waiting to resume"
            return report
        }
        let target = destination ?? parameters.destination
        update {
            $0.status = .postcopy
            $0.reason = nil
            $0.destination = target.description
        }
        do {
            let socket = try dial(target)
            lock.withLock { connection = socket }
            setTimeouts(socket.rawValue, seconds: Self.replyTimeoutSeconds)
            let stream = socket.stream
            try stream.writeFrame(.postcopyResume, payload: PostcopyResume(token: context.token).encoded)
            let (_, payload) = try readReply(stream, expecting: .postcopyResumeReply, what: "the post-copy resume")
            let reply = try PostcopyResumeReply(decoding: payload, pageCount: context.neededAtSwitch.pageCount)
            // Only pages that were needed at the switch can still be owed.
            var needed = PageSet(pageCount: reply.expected.pageCount)
            reply.expected.forEachRange { first, count in
                for page in first..<first + count where context.neededAtSwitch.contains(page) { needed.insert(page) }
            }
            logger.info("post-copy resumed on \(target): \(needed.count) pages still owed")
            try servePostcopy(stream: stream, needed: needed, context: &context)
            update { $0.status = .completed }
        } catch let error as Failure where error.description.hasPrefix("verification failed") {
            update { $0.status = .failed; $0.reason = "\(error)" }
        } catch {
            lock.withLock { if postcopyContext == nil { postcopyContext = context } }
            update { $0.status = .postcopyPaused; $0.reason = "\(error); `tern migrate --resume` tries again" }
            logger.error("post-copy resume failed: \(error)")
        }
        lock.withLock { connection = nil }
        update { $0.totalMs = milliseconds(since: context.started) }
        return progress
    }
}
