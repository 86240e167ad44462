import Foundation
import Glibc
import Logging
import Synchronization
import TernKVM
import TernMachine
import TernWire

/// The sending side of a pre-copy live migration (Clark et al., NSDI 2005):
/// copy all memory while the guest runs, then re-send what the dirty log
/// says changed, round after round, until what is left can be sent within
/// the downtime target; then pause, send the rest and the VM state, and hand
/// over. Until the destination confirms it holds the complete VM, nothing
/// is final: any failure resumes the VM here.
public final class MigrationSource: @unchecked Sendable {
    // @unchecked Sendable: `report`, `cancelReason` and `connection` are guarded by `lock`.
    public struct Parameters: Sendable {
        public var destination: Endpoint
        public var maxDowntimeMs: Double = 300
        public var maxRounds: Int = 30
        public var timeoutSeconds: Double = 600
        public var bandwidth: UInt64?
        public var verify = false
        public var mode = MigrationMode.precopy
        /// Hybrid: pre-copy rounds before switching to post-copy.
        public var precopyRounds = 2
        /// XBZRLE delta encoding of re-sent pages, with a cache of this many bytes (nil: off).
        public var xbzrleCacheBytes: UInt64?
        /// Send rarely-dirtied pages first and hot pages last (dynamic page transfer reordering).
        public var order = PageOrder.sequential
        /// With dirty-frequency ordering: the hottest pages wait for the stop-and-copy instead of going every
        /// round. nil: only without XBZRLE, where a re-sent hot page costs a whole page. With XBZRLE it costs a
        /// small delta and keeps the cached copy fresh; held back, its stop-and-copy delta is against the first
        /// pass's copy, nearly a whole page (capped hot spot: 40 ms of downtime instead of 10).
        public var holdBackHot: Bool?
        /// Parallel page streams (connections) during pre-copy.
        public var streams = 1
        /// zstd on pre-copy's page frames at this level (nil: off).
        public var zstdLevel: Int32?

        public init(destination: Endpoint) { self.destination = destination }
    }

    let machine: Machine
    let parameters: Parameters
    let logger: Logger
    private let lock = NSLock()
    private var report: MigrationReport
    private var cancelReason: String?
    private var connection: FileDescriptor?
    /// Extra page streams' connections (`--streams`), cut with the control connection on cancel.
    private var extraConnections: [FileDescriptor] = []
    /// Set once `go` is on the wire: from then on the VM may run at the destination,
    /// so a cancel can no longer be honoured (it would lose the VM).
    private var committedFlag = false

    /// Time allowed for the destination to answer a control message.
    public static let replyTimeoutSeconds = 30
    /// The VM state sections are small (about 20 KiB per vCPU); a fixed allowance is precise enough.
    static let stateBytesEstimate = 64 << 10

    public init(machine: Machine, parameters: Parameters, logger: Logger = Logger(label: "tern.migration")) {
        self.machine = machine
        self.parameters = parameters
        self.logger = logger
        report = MigrationReport(status: .setup, destination: parameters.destination.description, ramBytes: machine.memory.size,
                                 maxDowntimeMs: parameters.maxDowntimeMs, bandwidthLimit: parameters.bandwidth)
        report.mode = parameters.mode.rawValue
        report.compression = CompressionChoice(xbzrle: parameters.xbzrleCacheBytes != nil, zstd: parameters.zstdLevel != nil).description
        report.order = parameters.order.rawValue
        report.streams = parameters.streams
    }

    public var progress: MigrationReport { lock.withLock { report } }

    /// Asks the migration to stop. Before the hand-over the VM keeps running here.
    /// The sender notices between frames and tells the destination why; if it
    /// is stuck on a peer that stopped reading, the connection is cut after a grace period.
    /// Returns false when it is too late: the destination was told to run the VM.
    @discardableResult
    public func cancel(reason: String = "cancelled by the user") -> Bool {
        let first: Bool? = lock.withLock {
            if committedFlag { return nil }
            guard cancelReason == nil else { return false }
            cancelReason = reason
            return true
        }
        guard let first else { return false }
        guard first else { return true }
        DispatchQueue.global().asyncAfter(deadline: .now() + Self.cancelGraceSeconds) { [weak self] in
            guard let self else { return }
            lock.withLock {
                guard !committedFlag else { return }
                for fd in ([connection] + extraConnections).compactMap({ $0?.rawValue }) { shutdown(fd, Int32(SHUT_RDWR)) }
            }
        }
        return true
    }

    /// Marks the point of no return, unless a cancel got in first.
    private func commit() throws {
        try lock.withLock {
            if cancelReason != nil { throw Failure("cancelled") }
            committedFlag = true
        }
    }

    static let cancelGraceSeconds = 2.0
    /// Dirty-frequency ordering: samples of the dirty log taken before the first pass.
    static let frequencySamples = 2
    static let frequencySampleSeconds = 0.1

    private var cancelled: Bool { lock.withLock { cancelReason != nil } }
    private func update(_ change: (inout MigrationReport) -> Void) { lock.withLock { change(&report) } }

    struct Failure: Error, CustomStringConvertible {
        let description: String
        init(_ description: String) { self.description = description }
    }

    /// Runs the migration to its end and returns the report. On success the
    /// VM runs at the destination and this machine stays paused for the
    /// caller to end; otherwise it runs on here.
    public func run() -> MigrationReport {
        let started = ContinuousClock.now
        var pausedHere = false
        var committed = false
        do {
            try migrate(started: started, pausedHere: &pausedHere, committed: &committed)
            update { $0.status = .completed }
        } catch {
            let cancelReason = lock.withLock { self.cancelReason }
            let reason = cancelReason ?? "\(error)"
            if error is PostcopyInterrupted {
                update {
                    $0.status = .postcopyPaused
                    $0.reason = "\(reason); the VM runs at the destination, which waits for the pages still here: `tern migrate --resume` reconnects and finishes"
                }
            } else if committed {
                // The destination may already be running the VM: running it here too would fork it.
                update { $0.status = .failed; $0.reason = "\(reason); the destination was told to start, so the VM stays paused here (resume it only if the destination is known dead)" }
            } else {
                // Tell the destination why, so it does not mistake the end of the stream for damage.
                if let fd = lock.withLock({ connection?.rawValue }) {
                    setTimeouts(fd, seconds: 1)
                    try? FDStream(fd: fd).writeFrame(.abort, payload: Array(reason.utf8))
                }
                // Extra streams end with the control connection, so the destination's stream readers stop.
                lock.withLock { extraConnections.forEach { shutdown($0.rawValue, Int32(SHUT_RDWR)) } }
                if pausedHere { try? machine.resume() }
                update { $0.status = cancelReason != nil ? .cancelled : .failed; $0.reason = reason }
            }
            try? machine.vm.memorySlots.forEach { try machine.vm.setDirtyLogging(slot: $0.slot, enabled: false) }
            logger.error("migration \(report.status.rawValue): \(reason)")
        }
        lock.withLock {
            connection = nil
            extraConnections = []
        }
        update {
            $0.totalMs = milliseconds(since: started)
            $0.throughputMBps = $0.totalMs > 0 ? Double($0.transferredBytes) / 1e6 / ($0.totalMs / 1000) : 0
            $0.currentRound = nil
            $0.roundPercent = nil
            $0.resentPages = $0.rounds.dropFirst().reduce(0) { $0 + $1.pages }
        }
        return progress
    }

    private func migrate(started: ContinuousClock.Instant, pausedHere: inout Bool, committed: inout Bool) throws {
        guard machine.currentState == .running || machine.currentState == .paused else {
            throw Failure("the VM is \(machine.currentState.rawValue); only a running or paused VM can migrate")
        }
        let wasPaused = machine.currentState == .paused
        let socket = try parameters.destination.connect()
        lock.withLock { connection = socket }
        if cancelled { throw Failure("cancelled") }
        let stream = FDStream(fd: socket.rawValue)
        setTimeouts(socket.rawValue, seconds: Self.replyTimeoutSeconds)

        // Handshake: the destination checks it can run this machine before any memory moves.
        let state0 = machine.configuration
        let description = MachineDescription(memorySize: machine.memory.size, vcpuCount: UInt32(state0.vcpuCount),
                                             kernelPath: state0.kernelPath ?? "", commandLine: state0.commandLine)
        var hello = Hello(bootID: Clocks.bootID, machine: description, cpuid: machine.guestCPUID, devices: ["UART"],
                          streams: UInt32(parameters.streams))
        if parameters.zstdLevel != nil { hello.features |= Hello.zstdFeature }
        if parameters.mode == .postcopy { hello.features |= Hello.postcopyFirstFeature }
        if parameters.verify { hello.features |= Hello.verifyFeature }
        // Any mode that may end in post-copy gets a demand channel for page requests' replies.
        if parameters.mode != .precopy { hello.features |= Hello.postcopyUrgentFeature }
        try stream.writeFrame(.hello, payload: hello.encoded)
        let (replyHeader, replyPayload) = try readReply(stream, expecting: .helloReply, what: "the handshake")
        _ = replyHeader
        let reply = try Verdict(decoding: replyPayload)
        guard reply.accepted else { throw Failure("the destination refused the VM: \(reply.reason)") }
        let sameHost = reply.bootID == Clocks.bootID
        // Extra page streams join with the token the destination handed out.
        var streamList = [stream]
        for index in 1..<max(parameters.streams, 1) {
            let extra = try parameters.destination.connect()
            lock.withLock { extraConnections.append(extra) }
            setTimeouts(extra.rawValue, seconds: Self.replyTimeoutSeconds)
            let extraStream = FDStream(fd: extra.rawValue)
            try extraStream.writeFrame(.streamHello, payload: StreamHello(token: reply.token, index: UInt32(index)).encoded)
            streamList.append(extraStream)
        }
        var urgent: FDStream?
        if parameters.mode != .precopy {
            let connection = try parameters.destination.connect()
            lock.withLock { extraConnections.append(connection) }
            setTimeouts(connection.rawValue, seconds: Self.replyTimeoutSeconds)
            let channel = FDStream(fd: connection.rawValue)
            try channel.writeFrame(.streamHello, payload: StreamHello(token: reply.token, index: StreamHello.urgentIndex).encoded)
            urgent = channel
        }
        // The hand-over costs about one and a half round trips beyond the data (end -> ready -> go -> resumed).
        let pingStart = ContinuousClock.now
        try stream.writeFrame(.ping, payload: [UInt8]())
        _ = try readReply(stream, expecting: .pong, what: "the latency probe")
        let roundTripMs = milliseconds(since: pingStart)
        update { $0.setupMs = milliseconds(since: started); $0.status = .precopy; $0.roundTripMs = roundTripMs }

        // Pre-copy. Dirty logging starts clean, before the first pass reads anything.
        for slot in machine.vm.memorySlots { try machine.vm.setDirtyLogging(slot: slot.slot, enabled: true) }
        let roundPlan = Mutex<(pagesBefore: UInt64, planned: Double)>((0, 1))
        let rateLimit = RateLimiter(bytesPerSecond: parameters.bandwidth)
        let sender = PageStreams(memory: machine.memory, streams: streamList, rateLimit: rateLimit,
                                 shouldStop: { [unowned self] in cancelled },
                                 onProgress: { [unowned self] counters in
                                     let plan = roundPlan.withLock { $0 }
                                     update {
                                         $0.roundPercent = min(100, Double(counters.dataPages + counters.zeroPages - plan.pagesBefore) / max(plan.planned, 1) * 100)
                                         $0.transferredBytes = counters.bytes
                                     }
                                 })
        if let cacheBytes = parameters.xbzrleCacheBytes { sender.useXBZRLE(cacheBytes: cacheBytes) }
        if let level = parameters.zstdLevel { sender.useZstd(level: level) }
        let pageCount = Int(machine.memory.size / UInt64(PageRun.pageSize))
        var frequency = DirtyFrequency(pageCount: pageCount)
        // Pages the first pass holds back to its end: the hot ones (ordering), or none yet.
        var firstPassHeld = PageSet(pageCount: pageCount)
        var resentAfterFirstPass: PageSet?
        var heldOver: PageSet?
        var firstPassSamples: [(milliseconds: Double, pages: Int)] = []
        /// The dirty log read at the end of the last round, before held-back pages join it.
        var latestDirty: PageSet?
        if parameters.order == .dirtyFrequency && parameters.mode != .postcopy {
            // Learn which pages are hot before the first pass, so that it sends them last
            // (and, with XBZRLE, keeps them in the cache for the deltas of the next rounds).
            for _ in 0..<Self.frequencySamples {
                Thread.sleep(forTimeInterval: Self.frequencySampleSeconds)
                frequency.record(try machine.memory.collectDirtyPages(from: machine.vm))
            }
            firstPassHeld = frequency.hot(pageCount: pageCount)
        }
        // Without ordering the first pass still learns as it goes (without the samples before it, which
        // serve the ordering): where the guest writes, to cache those chunks for XBZRLE's deltas, and
        // how fast it re-dirties memory, for the switch-over policy.
        let holdBackHot = parameters.order == .dirtyFrequency && (parameters.holdBackHot ?? (parameters.xbzrleCacheBytes == nil))
        var round = 0
        let policy = SwitchoverPolicy(maxDowntimeMs: parameters.maxDowntimeMs, maxRounds: parameters.maxRounds,
                                      timeoutSeconds: parameters.timeoutSeconds)
        var history = SwitchoverPolicy.History()
        var pending: PageSet?
        var switchover = "converged"
        let totalPages = machine.memory.size / UInt64(PageRun.pageSize)
        var usePostcopy = parameters.mode == .postcopy
        while parameters.mode != .postcopy {
            let roundStart = ContinuousClock.now
            let before = sender.counters
            let waitedBefore = rateLimit.waitedSeconds
            update { $0.currentRound = round; $0.roundPercent = 0 }
            roundPlan.withLock { $0 = (before.dataPages + before.zeroPages, Double(pending.map { UInt64($0.count) } ?? totalPages)) }
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
                let learner = FirstPassLearner(memory: machine.memory, vm: machine.vm, initiallyHeld: firstPassHeld, frequency: frequency,
                                               interval: Self.learningIntervalPages,
                                               deferringHotChunks: parameters.order == .dirtyFrequency)
                try sender.firstPass(learning: learner)
                let learnt = learner.finish()
                frequency = learnt.frequency
                sender.setCacheWholePages(true)
                if parameters.order == .dirtyFrequency { try sender.send(ordered: frequency.ordered(learnt.held)) } else { try sender.send(learnt.held) }
                resentAfterFirstPass = learnt.dirtyAfterSending
                firstPassSamples = learnt.samples
            }
            // Pages re-sent from now on are likely to be re-sent again: keep them for deltas.
            sender.setCacheWholePages(true)
            try sender.synchronise(round: round) { [unowned self] in try readReply($0, expecting: .pong, what: "the sync after a round").1 }
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
            let roundBytes = sent.bytes - before.bytes
            // Link speed: what the whole pre-copy achieved so far (single tiny rounds are too noisy).
            let elapsedPrecopy = max(milliseconds(since: started) - progress.setupMs, 0.001)
            let throughput = Double(sent.bytes) / (elapsedPrecopy / 1000)
            // Bytes a dirty page will cost: a whole page, or what re-sent pages cost in the last round (XBZRLE deltas are far smaller).
            let roundPages = (sent.dataPages + sent.zeroPages) - (before.dataPages + before.zeroPages)
            let bytesPerPage = round > 0 && roundPages > 0 ? Double(roundBytes) / Double(roundPages) : Double(PageRun.pageSize + PageRun.headerSize)
            // A page's end-to-end cost counts unless the cap set the pace (its senders waited for tokens a tenth of the round or more).
            let throttled = (rateLimit.waitedSeconds - waitedBefore) * 1000 / Double(sender.senders.count) > 0.1 * duration
            let predictedMs = DowntimePrediction(
                dirtyPages: dirty.count, wireBytesPerPage: bytesPerPage, throughputBytesPerSecond: throughput,
                stateBytes: Self.stateBytesEstimate, roundTripMs: roundTripMs,
                pageCostMs: round > 0 && roundPages >= Self.pagesToMeasureCost && !throttled
                    ? max(duration - roundTripMs, 0) / Double(roundPages) : nil).milliseconds
            let record = MigrationReport.Round(
                round: round, pages: (sent.dataPages + sent.zeroPages) - (before.dataPages + before.zeroPages),
                zeroPages: sent.zeroPages - before.zeroPages, bytes: roundBytes, dirtyPages: UInt64(dirty.count),
                durationMs: duration, throughputMBps: Double(roundBytes) / 1e6 / (duration / 1000),
                dirtyRatePagesPerSecond: Double(dirty.count) / (duration / 1000), predictedDowntimeMs: predictedMs)
            update {
                $0.rounds.append(record)
                $0.transferredBytes = sent.bytes
                $0.dataPages = sent.dataPages
                $0.zeroPages = sent.zeroPages
                $0.roundPercent = 100
            }
            logger.debug("round \(round): \(record.pages) pages in \(Int(duration)) ms, \(dirty.count) dirty, predicted downtime \(Int(predictedMs)) ms")
            pending = dirty
            // A dirty-log read of the first pass that came no longer after the one before it than the next
            // round would take, yet found three quarters of the dirty set: that round could not shrink it.
            let rewritesFaster = round == 0 && firstPassSamples.contains {
                $0.milliseconds <= predictedMs && Double($0.pages) >= SwitchoverPolicy.worthwhileShrink * Double(dirty.count)
            }
            let decision = policy.decide(afterRound: round, dirtyPages: dirty.count, predictedMs: predictedMs,
                                         elapsedSeconds: milliseconds(since: started) / 1000,
                                         dirtySetRewrittenWithinARound: rewritesFaster, history: &history)
            round += 1
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
        if parameters.mode == .postcopy { switchover = "post-copy: execution moves first" }
        if usePostcopy {
            update { $0.switchoverReason = switchover }
            try switchToPostcopy(stream: stream, urgent: urgent, sender: sender, rateLimit: rateLimit, pending: pending, round: round, token: reply.token,
                                 wasPaused: wasPaused, pausedHere: &pausedHere, committed: &committed, sameHost: sameHost, started: started)
            return
        }

        // Stop-and-copy.
        update { $0.switchoverReason = switchover; $0.status = .stopAndCopy; $0.currentRound = round }
        let pausedMono = Clocks.monotonicNs(), pausedReal = Clocks.realtimeNs()
        if !wasPaused {
            try machine.pause()
            pausedHere = true
        }
        let pauseInstant = ContinuousClock.now
        logger.debug("stop-and-copy: the vCPUs stopped \(Int(Clocks.milliseconds(from: pausedMono, to: Clocks.monotonicNs()))) ms after the pause began")
        // The cap shares the link during pre-copy; while the VM is paused, every byte it holds back is downtime.
        rateLimit.lift()
        var last = try machine.memory.collectDirtyPages(from: machine.vm)
        if let pending { last.formUnion(pending) }
        let before = sender.counters
        let lastPages = last.count
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
        update {
            $0.status = .completing
            $0.rounds.append(MigrationReport.Round(
                round: round, pages: (sent.dataPages + sent.zeroPages) - (before.dataPages + before.zeroPages),
                zeroPages: sent.zeroPages - before.zeroPages, bytes: sent.bytes - before.bytes + stateBytes, dirtyPages: 0,
                durationMs: milliseconds(since: pauseInstant), throughputMBps: 0, dirtyRatePagesPerSecond: 0, predictedDowntimeMs: 0))
            $0.transferredBytes = sent.bytes + stateBytes
            $0.deltaPages = sent.deltaPages
            $0.xbzrle = sender.xbzrleStatistics
            if parameters.zstdLevel != nil {
                $0.zstdInputBytes = sent.compressedInputBytes
                $0.zstdOutputBytes = sent.compressedOutputBytes
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
            let verification = MigrationReport.Verification(
                sourceMemoryDigest: hex(memoryDigest), destinationMemoryDigest: hex(ready.memoryDigest),
                sourceStateDigest: hex(stateDigest), destinationStateDigest: hex(ready.stateDigest),
                match: memoryDigest == ready.memoryDigest && stateDigest == ready.stateDigest)
            update { $0.verification = verification }
            guard verification.match else {
                try? stream.writeFrame(.abort, payload: Array("digests differ".utf8))
                throw Failure("verification failed: memory or state digests differ between source and destination")
            }
        }
        if cancelled { throw Failure("cancelled") }

        // Commit: from here the destination may run the VM.
        _ = try handOver(stream, pausedMono: pausedMono, pausedReal: pausedReal, sameHost: sameHost, committed: &committed)
    }

    static let learningIntervalPages = 8192
    /// A round of fewer pages says little about what a page costs (its sync's round trip and fixed costs dominate).
    static let pagesToMeasureCost: UInt64 = 256

    /// Post-copy: pause, send only the VM state and the list of pages the
    /// destination still needs, let it start, then push those pages (and
    /// answer its requests first) until it holds them all.
    private func switchToPostcopy(stream: FDStream, urgent: FDStream?, sender: PageStreams, rateLimit: RateLimiter, pending: PageSet?, round: Int, token: UInt64,
                                  wasPaused: Bool, pausedHere: inout Bool, committed: inout Bool, sameHost: Bool,
                                  started: ContinuousClock.Instant) throws {
        update { $0.status = .stopAndCopy; $0.currentRound = round; $0.mode = parameters.mode.rawValue }
        let pageCount = Int(machine.memory.size / UInt64(PageRun.pageSize))
        // Pre-copy ran: what it left dirty. Otherwise every page the guest ever wrote (holes are zero at
        // both ends), listed before the pause, since walking 1 GiB of extents took milliseconds of downtime:
        // dirty logging has been on since before the walk, so what the guest writes meanwhile is in the log.
        var needed = pending ?? PageSet(pageCount: pageCount)
        if pending == nil {
            try machine.memory.forEachExtent { first, count, isHole in
                if !isHole { needed.insert(range: first..<first + count) }
            }
        }
        let pausedMono = Clocks.monotonicNs(), pausedReal = Clocks.realtimeNs()
        if !wasPaused {
            try machine.pause()
            pausedHere = true
        }
        rateLimit.lift()
        // Plus what the guest wrote since.
        needed.formUnion(try machine.memory.collectDirtyPages(from: machine.vm))
        logger.debug("post-copy switch: \(needed.count) pages still needed, known \(Int(Clocks.milliseconds(from: pausedMono, to: Clocks.monotonicNs()))) ms after the pause")
        // Post-copy runs on the control connection alone.
        try sender.endExtraStreams()
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
        if cancelled { throw Failure("cancelled") }

        let precopy = sender.counters
        var context = PostcopyContext(neededAtSwitch: needed, token: token, precopy: precopy, stateBytes: stateBytes,
                                      memoryDigest: parameters.verify ? PendingDigest { [memory = machine.memory] in try MemoryDigest.compute(memory) } : nil,
                                      stateDigest: stateDigest,
                                      destinationStateDigest: ready.stateDigest,
                                      started: started, round: round)
        do {
            try handOver(stream, pausedMono: pausedMono, pausedReal: pausedReal, sameHost: sameHost, committed: &committed)
        } catch where committed {
            // `go` is out: the destination may be running the VM and waiting for its pages. A lost
            // `resumed` is a dropped post-copy connection like any other, to be resumed.
            let saved = context
            lock.withLock { postcopyContext = saved }
            if let urgent { shutdown(urgent.fd, Int32(SHUT_RDWR)) }
            throw PostcopyInterrupted(description: "lost the destination right after the hand-over: \(error)")
        }
        context.memoryDigest?.start()
        update {
            $0.executionMovedAtMs = milliseconds(since: started)
            $0.status = .postcopy
            $0.transferredBytes = precopy.bytes + stateBytes
        }

        // Post-copy proper: from here the VM runs at the destination and this side only serves memory.
        try servePostcopy(stream: stream, urgent: urgent, needed: needed, context: &context)
    }

    /// What post-copy needs to go on after its connection dropped; kept until it completes.
    private struct PostcopyContext {
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
    }

    /// Post-copy's connection dropped: the destination runs the VM and waits; `resume` goes on.
    private struct PostcopyInterrupted: Error, CustomStringConvertible {
        let description: String
    }

    private var postcopyContext: PostcopyContext?

    /// Serves `needed` until the destination confirms it holds everything; a
    /// dropped connection keeps the context for `resume`.
    private func servePostcopy(stream: FDStream, urgent: FDStream? = nil, needed: PageSet, context: inout PostcopyContext) throws {
        let postcopy = PostcopySender(memory: machine.memory, connection: lock.withLock { connection }, stream: stream,
                                      urgent: urgent, needed: needed)
        let statistics: PostcopyStatistics
        do {
            statistics = try postcopy.run()
        } catch let failure as PostcopySender.Failure where failure.connectionLost {
            // The demand channel goes with the control connection: a resume runs on one new connection.
            if let urgent { shutdown(urgent.fd, Int32(SHUT_RDWR)) }
            context.earlier.add(postcopy.counters)
            context.earlierResent += postcopy.resent
            let saved = context
            lock.withLock { postcopyContext = saved }
            throw PostcopyInterrupted(description: failure.description)
        }
        lock.withLock { postcopyContext = nil }
        var sent = context.earlier
        sent.add(postcopy.counters)
        let resent = context.earlierResent + postcopy.resent
        let c = context
        update {
            $0.postcopy = statistics
            $0.memoryCompleteAtMs = milliseconds(since: c.started)
            $0.transferredBytes = c.precopy.bytes + c.stateBytes + sent.bytes
            $0.dataPages = c.precopy.dataPages + sent.dataPages
            $0.zeroPages = c.precopy.zeroPages + sent.zeroPages
            $0.postcopyPagesSent = sent.dataPages + sent.zeroPages - resent
            $0.postcopyPagesResent = resent
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
            let socket = try target.connect()
            lock.withLock { connection = socket }
            setTimeouts(socket.rawValue, seconds: Self.replyTimeoutSeconds)
            let stream = FDStream(fd: socket.rawValue)
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

    /// Captures the paused VM's state and sends its sections; with --verify, the
    /// digests of memory (as it is now, paused) and of the state.
    private func sendState(on stream: FDStream, withDigests: Bool = true) throws -> (sections: [StateSection], memoryDigest: UInt64?, stateDigest: UInt64?) {
        let sections = try machine.captureState().sections
        for section in sections { try stream.writeFrame(.state, payload: section.encoded) }
        guard parameters.verify && withDigests else { return (sections, nil, nil) }
        return (sections, try MemoryDigest.compute(machine.memory), MemoryDigest.state(sections))
    }

    /// The commit: `go` (from here the destination may run the VM), then its
    /// `resumed`, which gives the downtime: on the shared monotonic clock when
    /// both ends run on one kernel, on the realtime clocks otherwise, and as an
    /// upper bound on this side's clock either way.
    @discardableResult
    private func handOver(_ stream: FDStream, pausedMono: UInt64, pausedReal: UInt64, sameHost: Bool,
                          committed: inout Bool) throws -> Resumed {
        try commit()
        try stream.writeFrame(.go, payload: [UInt8]())
        committed = true
        let (_, payload) = try readReply(stream, expecting: .resumed, what: "the destination's confirmation")
        let resumed = try Resumed(decoding: payload)
        let upperBound = Clocks.milliseconds(from: pausedMono, to: Clocks.monotonicNs())
        update {
            $0.downtimeUpperBoundMs = upperBound
            $0.downtimeMs = sameHost ? Clocks.milliseconds(from: pausedMono, to: resumed.monotonicNs)
                                     : Clocks.milliseconds(from: pausedReal, to: resumed.realtimeNs)
            $0.downtimeClock = sameHost ? "shared-monotonic" : "realtime"
        }
        return resumed
    }

    /// Reads the next frame, which must be `expected`; an abort frame carries the peer's reason.
    private func readReply(_ stream: FDStream, expecting expected: FrameType, what: String) throws -> (FrameHeader, [UInt8]) {
        let frame: (FrameHeader, [UInt8])
        do {
            frame = try stream.readFrame()
        } catch let error as WireError {
            throw Failure("no valid answer from the destination during \(what): \(error)")
        } catch let error as FDStream.IOError where error.errno == EAGAIN || error.errno == EWOULDBLOCK {
            throw Failure("the destination did not answer within \(Self.replyTimeoutSeconds) s during \(what)")
        } catch {
            throw Failure("lost the destination during \(what): \(error)")
        }
        if frame.0.type == .abort {
            throw Failure("the destination aborted: \(String(decoding: frame.1, as: UTF8.self))")
        }
        guard frame.0.type == expected else {
            throw Failure("the destination sent a \(frame.0.type) frame during \(what), expected \(expected)")
        }
        return frame
    }
}

/// Bounded waits on a socket, so a silent peer becomes an error rather than a hang.
func setTimeouts(_ fd: Int32, seconds: Int) {
    var timeout = timeval(tv_sec: seconds, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
}

func milliseconds(since start: ContinuousClock.Instant) -> Double {
    let elapsed = ContinuousClock.now - start
    return Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
}

func hex(_ value: UInt64?) -> String { value.map { String(format: "%016llx", $0) } ?? "" }
