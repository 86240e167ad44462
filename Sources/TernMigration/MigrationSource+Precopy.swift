import Foundation
import Synchronization
import TernKVM
import TernMachine
import TernWire

extension MigrationSource {
    static let learningIntervalPages = 8192
    /// A flush of fewer blocks says little about what one costs.
    static let blocksToMeasureFlush = 256
    /// A round of fewer pages says little about what a page costs (its sync's round trip and fixed costs dominate).
    static let pagesToMeasureCost: UInt64 = 256
    /// Nor does a round not much longer than a round trip: less the round trip it ends with, what is
    /// left is mostly the round trip's jitter (on a WAN link), and a page would look nearly free.
    static let roundTripsToMeasureCost = 3.0

    /// What a page cost end to end over pages sent and then synced (`durationMs`, the sync included), or
    /// nil when that says too little: too few pages, too short beside a round trip, or paced by the cap
    /// (the senders waited for tokens a tenth of the time or more; the stop-and-copy goes uncapped).
    static func measuredPageCost(pages: UInt64, durationMs: Double, waitedSeconds: Double, streams: Int,
                                 roundTripMs: Double) -> Double? {
        let throttled = waitedSeconds * 1000 / Double(streams) > 0.1 * durationMs
        guard pages >= pagesToMeasureCost, !throttled, durationMs >= roundTripsToMeasureCost * roundTripMs else { return nil }
        return max(durationMs - roundTripMs, 0) / Double(pages)
    }

    /// The switch-over reason for a `tern migrate-postcopy` taken between rounds.
    static func postcopyRequested(afterRounds rounds: Int) -> String {
        "post-copy requested (tern migrate-postcopy) after \(rounds) pre-copy round\(rounds == 1 ? "" : "s")"
    }

    /// Where pre-copy's rounds ended: what is still to send, and whether post-copy takes over.
    struct PrecopyOutcome {
        var pending: PageSet?
        var round: Int
        var switchover: String
        var usePostcopy: Bool
    }

    /// The first pass and the rounds after it, until the switch-over policy
    /// says stop (post-copy alone runs none).
    func precopyRounds(sender: PageStreams, rateLimit: RateLimiter, roundPlan: borrowing Mutex<(pagesBefore: UInt64, planned: Double)>,
                       roundTripMs: Double, started: ContinuousClock.Instant) throws -> PrecopyOutcome {
        let pageCount = Int(machine.memory.size / UInt64(PageRun.pageSize))
        var frequency = DirtyFrequency(pageCount: pageCount)
        var resentAfterFirstPass: PageSet?
        var heldOver: PageSet?
        var firstPassSamples: [(milliseconds: Double, pages: Int)] = []
        /// What a re-sent page cost in the first pass's probe (measureResendCost), for the first prediction.
        var probedPageCostMs: Double?
        /// The probe's pages, re-sends rather than part of the first pass: not counted in round 0's pages.
        var probeSentPages: UInt64 = 0
        /// What the destination took to flush one received disk block, measured in the last round's sync.
        var blockFlushCostMs = 0.0
        /// The dirty log read at the end of the last round, before held-back pages join it.
        var latestDirty: PageSet?
        // The first pass learns as it goes, from the dirty log read after its first megabyte and then at
        // doubling intervals: where the guest writes (with ordering, those chunks go at the end of the pass;
        // with XBZRLE, into the cache for the deltas of the next rounds) and how fast it re-dirties memory,
        // for the switch-over policy. Sampling the log before the pass (two reads 100 ms apart, until
        // commit 8f5eb3b) told it little more and cost 200 ms of every migration.
        let holdBackHot = parameters.order == .dirtyFrequency && (parameters.holdBackHot ?? (parameters.xbzrleCacheBytes == nil))
        var round = 0
        var policy = SwitchoverPolicy(maxDowntimeMs: parameters.maxDowntimeMs, maxRounds: parameters.maxRounds,
                                      timeoutSeconds: parameters.timeoutSeconds)
        var history = SwitchoverPolicy.History()
        var pending: PageSet?
        var switchover = "converged"
        let totalPages = machine.memory.size / UInt64(PageRun.pageSize)
        var usePostcopy = parameters.mode == .postcopy
        // The VM runs during the rounds: clear each page's dirty bit as it is copied. From the pause on,
        // nothing writes between a clear and a copy.
        sender.rearm?.setActive(true)
        defer {
            sender.rearm?.setActive(false)
            endPrecopy()
        }
        // Hybrid and auto can be told to switch to post-copy at any moment (`tern migrate-postcopy`): their
        // rounds record what they sent, so that a round cut short leaves post-copy exactly what it had not.
        let interruptible = parameters.mode == .hybrid || parameters.mode == .auto
        while parameters.mode != .postcopy {
            if postcopyRequestPending {
                switchover = Self.postcopyRequested(afterRounds: round)
                usePostcopy = true
                break
            }
            let roundStart = ContinuousClock.now
            let before = sender.counters
            let storageBefore = storageBytes
            var blocksSent = 0
            let waitedBefore = rateLimit.waitedSeconds
            update { $0.currentRound = round; $0.roundPercent = 0 }
            roundPlan.withLock { $0 = (before.pagesCovered, Double(pending.map { UInt64($0.count) } ?? totalPages)) }
            if interruptible { sender.recordSentPages(true, pageCount: pageCount) }
            var learner: FirstPassLearner?
            do {
                if let pages = pending {
                    if holdBackHot {
                        let split = frequency.holdingBackHottest(pages, stillHot: latestDirty ?? pages)
                        try sender.send(ordered: split.send)
                        heldOver = split.held
                    } else if parameters.order == .dirtyFrequency {
                        try sender.send(ordered: frequency.ordered(pages))
                    } else {
                        try sender.send(pages)
                    }
                } else {
                    let firstPass = FirstPassLearner(memory: machine.memory, vm: machine.vm, initiallyHeld: PageSet(pageCount: pageCount),
                                                     frequency: frequency, interval: Self.learningIntervalPages,
                                                     deferringHotChunks: parameters.order == .dirtyFrequency)
                    learner = firstPass
                    try sender.firstPass(learning: firstPass)
                    let learnt = firstPass.finish()
                    frequency = learnt.frequency
                    sender.setCacheWholePages(true)
                    if parameters.order == .dirtyFrequency { try sender.send(ordered: frequency.ordered(learnt.held)) } else { try sender.send(learnt.held) }
                    var owed = learnt.dirtyAfterSending
                    if let probe = try measureResendCost(sender: sender, rateLimit: rateLimit, owed: &owed, round: round,
                                                         roundTripMs: roundTripMs) {
                        probedPageCostMs = probe.pageCostMs
                        probeSentPages = UInt64(probe.pages)
                        update { $0.resendProbePages = UInt64(probe.pages) }
                    }
                    resentAfterFirstPass = owed
                    firstPassSamples = learnt.samples
                }
                // The disks' blocks (round 0: the bulk pass), after memory's, on the control connection.
                if let storage {
                    blocksSent = try storage.sendChangedBlocks(on: sender.senders[0].streamer.stream, rateLimit: rateLimit,
                                                               shouldStop: { [unowned self] in roundShouldStop })
                }
            } catch is PageSender.Stopped where postcopyRequestPending && !cancelled {
                // Cut short for post-copy: it takes over what this round had not sent (the first pass: every page
                // that holds data), plus what the first pass owes from the dirty log it read already (held
                // pages, and pages written again after they were sent); the rest is read at the switch.
                var rest = try pending ?? PageSet(pagesWithDataIn: machine.memory)
                rest.subtract(sender.pagesSent(pageCount: pageCount))
                if let learner { rest.formUnion(learner.owedIfCutShort) }
                sender.recordSentPages(false, pageCount: pageCount)
                // The frame each stream was about to write never went: its pages are not counted as sent.
                sender.discardUnsentFrames()
                // While the VM still runs here, let the destination apply what the sockets hold, so that it
                // is not drained inside the downtime (megabytes per stream, seconds on a slow link).
                try sender.synchronise(round: round) { [unowned self] in try readReply($0, expecting: .pong, what: "the sync after a round cut short").1 }
                let sent = sender.counters
                let duration = milliseconds(since: roundStart)
                let partial = MigrationReport.Round(
                    round: round, pages: (sent.dataPages + sent.zeroPages) - (before.dataPages + before.zeroPages),
                    zeroPages: sent.zeroPages - before.zeroPages, bytes: sent.bytes - before.bytes, dirtyPages: UInt64(rest.count),
                    durationMs: duration, throughputMBps: Double(sent.bytes - before.bytes) / 1e6 / max(duration / 1000, 0.001),
                    dirtyRatePagesPerSecond: 0, predictedDowntimeMs: 0)
                let diskBytes = storageBytes
                storage?.endRound()
                updateStorageReport()
                update {
                    $0.rounds.append(partial)
                    $0.transferredBytes = sent.bytes + diskBytes
                    $0.dataPages = sent.dataPages
                    $0.zeroPages = sent.zeroPages
                }
                logger.info("post-copy requested: round \(round) stopped after \(partial.pages) pages; \(rest.count) pages left to post-copy")
                pending = rest
                switchover = "post-copy requested (tern migrate-postcopy) during pre-copy round \(round)"
                usePostcopy = true
                round += 1
                break
            }
            if interruptible { sender.recordSentPages(false, pageCount: pageCount) }
            // Pages re-sent from now on are likely to be re-sent again: keep them for deltas.
            sender.setCacheWholePages(true)
            let syncStart = ContinuousClock.now
            try sender.synchronise(round: round) { [unowned self] in try readReply($0, expecting: .pong, what: "the sync after a round").1 }
            // The destination flushes the round's disk blocks before it answers the sync: beyond the round
            // trip, the sync's time is that flush, which the last round's blocks will cost in the downtime.
            if round > 0, blocksSent >= Self.blocksToMeasureFlush {
                blockFlushCostMs = max(milliseconds(since: syncStart) - roundTripMs, 0) / Double(blocksSent)
            }
            let duration = max(milliseconds(since: roundStart), 0.001)
            var dirty = try machine.memory.collectDirtyPages(from: machine.vm)
            frequency.record(dirty)
            latestDirty = dirty
            if let earlier = resentAfterFirstPass {
                dirty.formUnion(earlier)
                resentAfterFirstPass = nil
            }
            // Held-back pages are still owed: they count in the prediction and go at the switch at the latest.
            if let held = heldOver {
                dirty.formUnion(held)
                update { $0.heldBackPages = UInt64(held.count) }
                heldOver = nil
            }
            let sent = sender.counters
            let diskBytes = storageBytes
            let roundBytes = sent.bytes - before.bytes + diskBytes - storageBefore
            // Link speed: what the whole pre-copy achieved so far (single tiny rounds are too noisy).
            let elapsedPrecopy = max(milliseconds(since: started) - progress.setupMs, 0.001)
            let throughput = Double(sent.bytes + diskBytes) / (elapsedPrecopy / 1000)
            // Disk blocks are 4 KiB, as pages are: the prediction counts the blocks still to send as pages.
            storage?.endRound()
            let pendingBlocks = storage?.pendingBlocks ?? 0
            // Bytes a dirty page will cost: a whole page, or what re-sent pages cost in the last round (XBZRLE deltas are far
            // smaller, and pages found unchanged cost nothing on the wire).
            let roundPages = sent.pagesCovered - before.pagesCovered + UInt64(blocksSent)
            let bytesPerPage = round > 0 && roundPages > 0 ? Double(roundBytes) / Double(roundPages) : Double(PageRun.pageSize + PageRun.headerSize)
            var prediction = DowntimePrediction(
                dirtyPages: dirty.count + pendingBlocks, wireBytesPerPage: bytesPerPage, throughputBytesPerSecond: throughput,
                stateBytes: Self.stateBytesEstimate, roundTripMs: roundTripMs,
                pageCostMs: round > 0
                    ? Self.measuredPageCost(pages: roundPages, durationMs: duration, waitedSeconds: rateLimit.waitedSeconds - waitedBefore,
                                            streams: sender.senders.count, roundTripMs: roundTripMs)
                    : probedPageCostMs)
            prediction.pendingBlocks = pendingBlocks
            prediction.blockFlushCostMs = blockFlushCostMs
            let predictedMs = prediction.milliseconds
            let record = MigrationReport.Round(
                round: round, pages: (sent.dataPages + sent.zeroPages) - (before.dataPages + before.zeroPages) - (round == 0 ? probeSentPages : 0),
                zeroPages: sent.zeroPages - before.zeroPages, bytes: roundBytes, dirtyPages: UInt64(dirty.count),
                durationMs: duration, throughputMBps: Double(roundBytes) / 1e6 / (duration / 1000),
                dirtyRatePagesPerSecond: Double(dirty.count) / (duration / 1000), predictedDowntimeMs: predictedMs)
            updateStorageReport()
            update {
                $0.rounds.append(record)
                $0.transferredBytes = sent.bytes + diskBytes
                $0.dataPages = sent.dataPages
                $0.zeroPages = sent.zeroPages
                $0.roundPercent = 100
            }
            logger.debug("round \(round): \(record.pages) pages in \(Int(duration)) ms, \(dirty.count) dirty, predicted downtime \(Int(predictedMs)) ms")
            pending = dirty
            // The first pass's dirty-log reads tell how fast the guest writes: if it would write three quarters
            // of the dirty set again while the next round sent it, that round could not shrink it.
            let rewritesFaster = round == 0 && SwitchoverPolicy.guestRewritesWithinARound(
                samples: firstPassSamples, dirtyPages: dirty.count, roundMs: predictedMs, workingSetPages: frequency.pagesEverDirty)
            // `tern migrate-set` may have moved the target since the last round.
            policy.maxDowntimeMs = currentLimits.maxDowntimeMs
            var decision = policy.decide(afterRound: round, dirtyPages: dirty.count + pendingBlocks, predictedMs: predictedMs,
                                         elapsedSeconds: milliseconds(since: started) / 1000,
                                         dirtySetRewrittenWithinARound: rewritesFaster, history: &history)
            // The bulk pass's flush, of long runs, says nothing of what the guest's scattered blocks cost to
            // flush: a copied disk converges only after a round of those has measured it.
            if storage != nil, round == 0, case .switchover(let reason) = decision, reason.hasPrefix("converged") { decision = .iterate }
            round += 1
            // A request for post-copy that came during this round wins over whatever the policy decided.
            if interruptible && postcopyRequestPending {
                switchover = Self.postcopyRequested(afterRounds: round)
                usePostcopy = true
                break
            }
            if case .switchover(let reason) = decision {
                switchover = reason
                // Auto: pre-copy while it can meet the downtime target, post-copy when it cannot.
                if parameters.mode == .auto && !reason.hasPrefix("converged") {
                    usePostcopy = true
                    switchover = reason + "; switching to post-copy"
                }
                if parameters.mode == .hybrid {
                    usePostcopy = true
                    switchover = reason + "; switching to post-copy"
                }
                break
            }
            if parameters.mode == .hybrid && round >= parameters.precopyRounds {
                switchover = "\(parameters.precopyRounds) pre-copy rounds done; switching to post-copy"
                usePostcopy = true
                break
            }
        }
        return PrecopyOutcome(pending: pending, round: round, switchover: switchover, usePostcopy: usePostcopy)
    }

    /// --verify with `--storage copy`: records both sides' disk digests; true if they match (or no disk moved).
    func verifyDisks(_ ready: Verdict, on stream: FDStream) throws -> Bool {
        guard let storage else { return true }
        let mine = storage.digests()
        update {
            $0.storage?.sourceDigests = mine.map { hex($0) }
            $0.storage?.destinationDigests = ready.diskDigests.map { hex($0) }
        }
        return mine == ready.diskDigests
    }

    /// Post-copy from the start, with `--storage copy`: the disks' rounds before the switch (the bulk pass
    /// was marked by `beginBulkPass`), until what the guest keeps writing would go within the downtime target.
    func storageRounds(_ storage: StorageSender, on stream: FDStream, rateLimit: RateLimiter) throws {
        for round in 0..<parameters.maxRounds {
            let start = ContinuousClock.now
            let before = storageBytes
            try storage.sendChangedBlocks(on: stream, rateLimit: rateLimit, shouldStop: { [unowned self] in cancelled })
            var marker = WireWriter()
            marker.write(UInt64(round))
            try stream.writeFrame(.ping, payload: marker.bytes)
            _ = try readReply(stream, expecting: .pong, what: "the sync after a disk round")
            storage.endRound()
            updateStorageReport()
            let seconds = max((ContinuousClock.now - start).inSeconds, 0.001)
            let bytesPerSecond = Double(storageBytes - before) / seconds
            let pendingMs = Double(storage.pendingBlocks * (BlockFrame.blockSize + FrameHeader.size)) / max(bytesPerSecond, 1) * 1000
            logger.debug("disk round \(round): \(storageBytes - before) bytes in \(Int(seconds * 1000)) ms, \(storage.pendingBlocks) blocks changed since")
            if pendingMs <= currentLimits.maxDowntimeMs / 2 { return }
        }
    }

    /// Pauses the VM, sends what is still dirty and the VM state, checks the
    /// digests (--verify) and hands over.
    func stopAndCopy(session: Session, sender: PageStreams, rateLimit: RateLimiter, pending: PageSet?, round: Int, switchover: String,
                     pausedHere: inout Bool, committed: inout Bool) throws {
        let stream = session.control, sameHost = session.sameHost
        update { $0.switchoverReason = switchover; $0.status = .stopAndCopy; $0.currentRound = round }
        let pausedMono = Clocks.monotonicNs(), pausedReal = Clocks.realtimeNs()
        pausedHere = try pauseForSwitchover()
        let pauseInstant = ContinuousClock.now
        logger.debug("stop-and-copy: the vCPUs stopped \(Int(Clocks.milliseconds(from: pausedMono, to: Clocks.monotonicNs()))) ms after the pause began")
        // The cap shares the link during pre-copy; while the VM is paused, every byte it holds back is downtime.
        rateLimit.lift()
        var last = try machine.memory.collectDirtyPages(from: machine.vm)
        if let pending { last.formUnion(pending) }
        let before = sender.counters
        let storageBefore = storageBytes
        let lastPages = last.count
        // The disks are quiesced and flushed: the blocks written since the last round are the last.
        if let storage {
            let blocks = try storage.sendChangedBlocks(on: stream, rateLimit: rateLimit)
            try storage.endMirror()
            storage.endRound()
            logger.debug("stop-and-copy: \(blocks) disk blocks sent \(Int(milliseconds(since: pauseInstant))) ms after the pause")
        }
        try sender.send(last)
        try sender.endExtraStreams()
        logger.debug("stop-and-copy: \(lastPages) pages sent \(Int(milliseconds(since: pauseInstant))) ms after the pause")
        let (sections, _, _) = try sendState(on: stream, withDigests: false)
        // With --verify the end asks for the destination's digests (their values here are placeholders) and this
        // side computes its own meanwhile, from memory that stays paused: the two digests overlap instead of
        // adding up inside the downtime.
        let completion = Completion(pausedMonotonicNs: pausedMono, pausedRealtimeNs: pausedReal,
                                    memoryDigest: parameters.verify ? 0 : nil, stateDigest: parameters.verify ? 0 : nil)
        try stream.writeFrame(.end, payload: completion.encoded)
        logger.debug("stop-and-copy: state and end sent \(Int(milliseconds(since: pauseInstant))) ms after the pause")
        let memoryDigest = parameters.verify ? try MemoryDigest.compute(machine.memory, threads: ProcessInfo.processInfo.activeProcessorCount) : nil
        if parameters.verify { logger.debug("stop-and-copy: this side's memory digest taken \(Int(milliseconds(since: pauseInstant))) ms after the pause") }
        let stateDigest = parameters.verify ? MemoryDigest.state(sections) : nil
        let stateBytes = UInt64(sections.reduce(0) { $0 + $1.encoded.count + FrameHeader.size }) + UInt64(FrameHeader.size + completion.encoded.count)
        let sent = sender.counters
        let diskBytes = storageBytes
        updateStorageReport()
        update {
            $0.status = .completing
            $0.rounds.append(MigrationReport.Round(
                round: round, pages: (sent.dataPages + sent.zeroPages) - (before.dataPages + before.zeroPages),
                zeroPages: sent.zeroPages - before.zeroPages, bytes: sent.bytes - before.bytes + stateBytes + diskBytes - storageBefore, dirtyPages: 0,
                durationMs: milliseconds(since: pauseInstant), throughputMBps: 0, dirtyRatePagesPerSecond: 0, predictedDowntimeMs: 0))
            $0.transferredBytes = sent.bytes + stateBytes + diskBytes
            $0.deltaPages = sent.deltaPages
            $0.unchangedPages = sent.unchangedPages
            $0.xbzrle = sender.xbzrleStatistics
            if parameters.zstdLevel != nil {
                $0.zstdInputBytes = sent.compressedInputBytes
                $0.zstdOutputBytes = sent.compressedOutputBytes
                $0.zstdSkippedFrames = sent.compressionSkippedFrames
            }
            $0.dataPages = sent.dataPages
            $0.zeroPages = sent.zeroPages
        }

        // The destination holds everything and says whether it accepts it.
        let (_, readyPayload) = try readReply(stream, expecting: .ready, what: "the hand-over")
        logger.debug("stop-and-copy: the destination was ready \(Int(milliseconds(since: pauseInstant))) ms after the pause")
        let ready = try Verdict(decoding: readyPayload)
        guard ready.accepted else { throw Failure("the destination rejected the VM: \(ready.reason)") }
        if parameters.verify {
            let disksMatch = try verifyDisks(ready, on: stream)
            let verification = MigrationReport.Verification(
                sourceMemoryDigest: hex(memoryDigest), destinationMemoryDigest: hex(ready.memoryDigest),
                sourceStateDigest: hex(stateDigest), destinationStateDigest: hex(ready.stateDigest),
                match: memoryDigest == ready.memoryDigest && stateDigest == ready.stateDigest && disksMatch)
            update { $0.verification = verification }
            guard verification.match else {
                try? stream.writeFrame(.abort, payload: Array("digests differ".utf8))
                throw Failure(disksMatch ? "verification failed: memory or state digests differ between source and destination"
                                         : "verification failed: the disks' digests differ between source and destination")
            }
        }
        if cancelled { throw Failure("cancelled") }

        // Commit: from here the destination may run the VM.
        _ = try handOver(stream, pausedMono: pausedMono, pausedReal: pausedReal, sameHost: sameHost, keepPaused: !pausedHere,
                         committed: &committed)
    }
}
