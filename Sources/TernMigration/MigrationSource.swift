import Foundation
import Glibc
import Logging
import Synchronization
import TernDevices
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
    // @unchecked Sendable: `report`, `cancelReason`, `connection`, `extraConnections`, `committedFlag` and
    // `postcopyContext` are guarded by `lock` (internal, for the extensions in MigrationSource+*.swift).
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
        /// Send rarely-dirtied pages first and hot pages last (dynamic page transfer reordering, Svärd et
        /// al.): the default, since a guest's hot set then crosses the wire fewer times (hot960: 1015-1024 MB
        /// against 1031 in address order; docs/BENCHMARKS.md, summary) at no cost in time elsewhere.
        public var order = PageOrder.dirtyFrequency
        /// With dirty-frequency ordering: the hottest pages wait for the stop-and-copy instead of going every
        /// round. nil: only without XBZRLE, where a re-sent hot page costs a whole page. With XBZRLE it costs a
        /// small delta and keeps the cached copy fresh; held back, its stop-and-copy delta is against the first
        /// pass's copy, nearly a whole page (capped hot spot: 40 ms of downtime instead of 10).
        public var holdBackHot: Bool?
        /// Parallel page streams (connections): pre-copy's pages and post-copy's push.
        public var streams = 1
        /// Without `--streams`: two for a post-copy from the start, whose push is bound by the destination
        /// placing fresh pages, which a second stream spreads over a second thread (25-30% less total time
        /// for both post-copy benchmark cases, docs/MIGRATION.md, "Parallel streams"); one otherwise, as on
        /// these hosts a second pre-copy stream saved no time on the filled guests and sent more bytes.
        public static func defaultStreams(for mode: MigrationMode) -> Int { mode == .postcopy ? 2 : 1 }
        /// zstd on pre-copy's page frames at this level (nil: off).
        public var zstdLevel: Int32?
        /// In clear or over mutual TLS, on every connection of this migration.
        public var security: ChannelSecurity
        /// The migration token the destination asks for (`--token`); empty: none.
        public var authorization = ""
        /// How the disks move (`--storage`).
        public var storage = StorageMode.shared
        /// With `copy`: how the guest's writes during the copy reach the destination (`--storage-mirror`).
        public var storageMirror = StorageMirror.rounds
        /// How the destination announces the VM's NICs (`--announce-*`).
        public var announce = AnnounceSchedule()

        public init(destination: Endpoint, security: ChannelSecurity) {
            self.destination = destination
            self.security = security
        }
    }

    let machine: Machine
    let parameters: Parameters
    let logger: Logger
    /// `--storage copy`: moves the disks beside memory (nil: shared storage, or no disk).
    let storage: StorageSender?
    let lock = NSLock()
    private var report: MigrationReport
    private var cancelReason: String?
    var connection: Connection?
    /// Extra page streams' connections (`--streams`), cut with the control connection on cancel.
    var extraConnections: [Connection] = []
    /// Set once `go` is on the wire: from then on the VM may run at the destination,
    /// so a cancel can no longer be honoured (it would lose the VM).
    private var committedFlag = false
    /// A post-copy whose connection dropped: what `resume` needs to go on (guarded by `lock`).
    var postcopyContext: PostcopyContext?
    /// Whether the pages are owed, and whether this process was told to end: decided under one lock, so
    /// that an end allowed just before post-copy's `go` stops that `go` instead of racing it.
    private let ending = Mutex<(owesPages: Bool, endAllowed: Bool)>((false, false))
    /// From post-copy's `go` until the destination holds all memory, this process has the only copy of
    /// pages the running VM needs: ending it would lose the VM (quit and SIGTERM wait, APIRouter, Run).
    public var owesPostcopyPages: Bool { ending.withLock { $0.owesPages } }

    /// Whether this process may end now (nothing owed); once allowed, post-copy's `go` is not sent.
    public func allowEnding() -> Bool {
        ending.withLock { state in
            if state.owesPages { return false }
            state.endAllowed = true
            return true
        }
    }

    /// Marks the pages owed before `go` is written; throws if an end was allowed first.
    func owePostcopyPages() throws {
        try ending.withLock { state in
            if state.endAllowed { throw Failure("this VM is ending here (quit or a signal) before post-copy's hand-over") }
            state.owesPages = true
        }
    }

    func setOwesPostcopyPages(_ owes: Bool) { ending.withLock { $0.owesPages = owes } }
    /// `tern migrate-postcopy`: switch to post-copy now (guarded by `lock`).
    private var postcopyRequested = false
    /// Set when pre-copy's rounds end: a request for post-copy comes too late from then on (guarded by `lock`).
    private var precopyOver = false
    /// From the switch-over on, the migration decides when the VM pauses and runs (guarded by `lock`).
    private var switching = false
    /// The limits `tern migrate-set` may change while the migration runs (guarded by `lock`).
    private var limits: (maxDowntimeMs: Double, bandwidth: UInt64?)
    /// The rate limiter pages go through now (pre-copy's, then post-copy's push), for `tune` (guarded by `lock`).
    private var activeRateLimit: RateLimiter?

    /// Time allowed for the destination to answer a control message.
    public static let replyTimeoutSeconds = 30
    /// The VM state sections are small (about 20 KiB per vCPU); a fixed allowance is precise enough.
    static let stateBytesEstimate = 64 << 10

    public init(machine: Machine, parameters: Parameters, logger: Logger = Logger(label: "tern.migration")) {
        self.machine = machine
        self.parameters = parameters
        self.logger = logger
        let disks = machine.devices.devices.compactMap { device in (device.backend as? VirtioBlock).map { (id: device.id, device: $0) } }
        storage = parameters.storage == .copy && !disks.isEmpty ? StorageSender(disks: disks, verify: parameters.verify) : nil
        limits = (parameters.maxDowntimeMs, parameters.bandwidth)
        report = MigrationReport(status: .setup, destination: parameters.destination.description, ramBytes: machine.memory.size,
                                 maxDowntimeMs: parameters.maxDowntimeMs, bandwidthLimit: parameters.bandwidth)
        report.mode = parameters.mode.rawValue
        report.compression = CompressionChoice(xbzrle: parameters.xbzrleCacheBytes != nil, zstd: parameters.zstdLevel != nil).description
        // Post-copy alone runs no pre-copy round, so no order applies.
        report.order = parameters.mode == .postcopy ? "none" : parameters.order.rawValue
        report.streams = parameters.streams
        if !disks.isEmpty {
            report.storage = StorageReport(mode: parameters.storage, mirror: storage == nil ? nil : parameters.storageMirror, disks: storage?.report ?? [])
        }
    }

    /// Disk bytes sent so far (`--storage copy`).
    var storageBytes: UInt64 { storage?.bytesSent ?? 0 }

    /// The storage account in the report, brought up to date.
    func updateStorageReport() {
        guard let storage else { return }
        let disks = storage.report
        update { $0.storage?.disks = disks }
    }

    /// The report as it stands, the disks' account included as it grows.
    public var progress: MigrationReport {
        var current = lock.withLock { report }
        if let storage { current.storage?.disks = storage.report }
        return current
    }

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

    /// Asks a hybrid or auto migration still in pre-copy to switch to post-copy now, as QEMU's
    /// `migrate-start-postcopy` does: the round under way stops after the frame it is writing, and
    /// post-copy takes over with what that round had not sent and what the guest dirtied.
    /// Returns why not, or nil once the request is taken.
    public func requestPostcopy() -> String? {
        guard parameters.mode == .hybrid || parameters.mode == .auto else {
            return parameters.mode == .postcopy ? "the migration is post-copy from the start"
                : "the migration runs as --mode precopy; start it with --mode hybrid or --mode auto to switch to post-copy on request"
        }
        return lock.withLock {
            if cancelReason != nil { return "the migration is being cancelled" }
            if precopyOver || committedFlag { return "too late: pre-copy has ended and the switch-over has begun" }
            postcopyRequested = true
            return nil
        }
    }

    /// Changes the downtime target and the bandwidth cap of the running migration, as QEMU's
    /// `migrate-set-parameters` does: the target counts from the next round's decision, the cap from
    /// the next frame (`.some(nil)`: no cap). The stop-and-copy always goes uncapped.
    public func tune(maxDowntimeMs: Double?, bandwidth: UInt64??) {
        let limiter: RateLimiter? = lock.withLock {
            if let maxDowntimeMs {
                limits.maxDowntimeMs = maxDowntimeMs
                report.maxDowntimeMs = maxDowntimeMs
            }
            if let bandwidth {
                limits.bandwidth = bandwidth
                report.bandwidthLimit = bandwidth
            }
            return bandwidth == nil ? nil : activeRateLimit
        }
        if let bandwidth, let limiter { limiter.setRate(bandwidth) }
        logger.info("migration limits now: max downtime \(currentLimits.maxDowntimeMs) ms, bandwidth \(currentLimits.bandwidth.map { "\($0) B/s" } ?? "uncapped")")
    }

    var currentLimits: (maxDowntimeMs: Double, bandwidth: UInt64?) { lock.withLock { limits } }

    /// A rate limiter for pages from now on, at the current cap, which `tune` adjusts.
    func makeRateLimiter() -> RateLimiter {
        lock.withLock {
            let limiter = RateLimiter(bytesPerSecond: limits.bandwidth)
            activeRateLimit = limiter
            return limiter
        }
    }

    /// Whether post-copy was asked for while pre-copy still runs (a round in progress stops for it).
    var postcopyRequestPending: Bool { lock.withLock { postcopyRequested && !precopyOver } }

    /// Checked before every frame of a round: a cancel, or a request for post-copy while pre-copy runs (one lock).
    var roundShouldStop: Bool { lock.withLock { cancelReason != nil || (postcopyRequested && !precopyOver) } }

    /// Pre-copy's rounds are over: from here a request for post-copy is refused.
    func endPrecopy() { lock.withLock { precopyOver = true } }

    /// Runs a pause or resume asked for while the migration runs (`tern pause` to help a pre-copy converge,
    /// as with QEMU's `stop`), unless the switch-over has begun: from then on a resume could let the guest
    /// write pages already sent for the last time. Returns why not, or nil once `change` ran.
    public func changeRunState(_ change: () throws -> Void) rethrows -> String? {
        try lock.withLock {
            if switching { return "the migration is switching over: it pauses and resumes the VM itself (cancel it first)" }
            try change()
            return nil
        }
    }

    /// The switch-over begins: pauses the VM unless someone already has; true if it paused it here.
    /// A VM someone paused stays paused at the destination.
    func pauseForSwitchover() throws -> Bool {
        try lock.withLock {
            switching = true
            guard machine.currentState != .paused else { return false }
            // Copied disks are read through the page cache and flushed at the destination: what the guest
            // flushed is on this host's stable storage already, and the rest need not be, here.
            try machine.pause(flushingDisks: storage == nil)
            return true
        }
    }

    /// Marks the point of no return, unless a cancel got in first.
    private func commit() throws {
        try lock.withLock {
            if cancelReason != nil { throw Failure("cancelled") }
            committedFlag = true
        }
    }

    static let cancelGraceSeconds = 2.0

    var cancelled: Bool { lock.withLock { cancelReason != nil } }
    func update(_ change: (inout MigrationReport) -> Void) { lock.withLock { change(&report) } }

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
            let reason = cancelReason ?? destinationsReason(after: error) ?? "\(error)"
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
                if let control = lock.withLock({ connection }) {
                    setTimeouts(control.rawValue, seconds: 1)
                    try? control.stream.writeFrame(.abort, payload: Array(reason.utf8))
                }
                // Extra streams end with the control connection, so the destination's stream readers stop.
                lock.withLock { extraConnections.forEach { shutdown($0.rawValue, Int32(SHUT_RDWR)) } }
                // Shared storage: the images were let go of just before `go`, which never went.
                if parameters.storage == .shared, let failure = Result(catching: { try machine.devices.lockDisks() }).failureDescription {
                    update { $0.status = .failed; $0.reason = "\(reason); \(failure): the VM stays paused here" }
                    logger.error("migration failed: \(reason); \(failure)")
                    storage?.finish()
                    return progress
                }
                if pausedHere { try? machine.resume() }
                lock.withLock { switching = false }
                update { $0.status = cancelReason != nil ? .cancelled : .failed; $0.reason = reason }
            }
            try? machine.vm.memorySlots.forEach { try machine.vm.setDirtyLogging(slot: $0.slot, enabled: false) }
            logger.error("migration \(report.status.rawValue): \(reason)")
        }
        storage?.finish()
        updateStorageReport()
        lock.withLock {
            connection = nil
            extraConnections = []
        }
        update {
            $0.totalMs = milliseconds(since: started)
            $0.throughputMBps = $0.totalMs > 0 ? Double($0.transferredBytes) / 1e6 / ($0.totalMs / 1000) : 0
            $0.currentRound = nil
            $0.roundPercent = nil
            // Pages the rounds after the first pass sent again; post-copy's phase, the last round when it ran, sends each page once.
            let precopyRounds = $0.postcopy == nil ? $0.rounds[...] : $0.rounds.dropLast()
            $0.resentPages = precopyRounds.dropFirst().reduce($0.resendProbePages ?? 0) { $0 + $1.pages }
        }
        return progress
    }

    private func migrate(started: ContinuousClock.Instant, pausedHere: inout Bool, committed: inout Bool) throws {
        guard machine.currentState == .running || machine.currentState == .paused else {
            throw Failure("the VM is \(machine.currentState.rawValue); only a running or paused VM can migrate")
        }
        let session = try openSession(started: started)
        // Manual protection, where this KVM has it, lets each round clear a page's dirty bit just before
        // copying it (DirtyLogRearm); without it the log works as before.
        do { try machine.vm.enableManualDirtyLogProtection() } catch { logger.warning("dirty log: \(error); pages are re-sent as before") }
        // Pre-copy. Dirty logging starts clean, before the first pass reads anything.
        for slot in machine.vm.memorySlots { try machine.vm.setDirtyLogging(slot: slot.slot, enabled: true) }
        let roundPlan = Mutex<(pagesBefore: UInt64, planned: Double)>((0, 1))
        let rateLimit = makeRateLimiter()
        let sender = PageStreams(memory: machine.memory, streams: session.pageStreams, rateLimit: rateLimit,
                                 rearm: DirtyLogRearm(memory: machine.memory, vm: machine.vm),
                                 shouldStop: { [unowned self] in roundShouldStop },
                                 onProgress: { [unowned self] counters in
                                     let plan = roundPlan.withLock { $0 }
                                     let storageBytes = storageBytes
                                     // A stream's progress may report counters read just before the round began.
                                     let covered = counters.pagesCovered >= plan.pagesBefore ? counters.pagesCovered - plan.pagesBefore : 0
                                     update {
                                         $0.roundPercent = min(100, Double(covered) / max(plan.planned, 1) * 100)
                                         $0.transferredBytes = counters.bytes + storageBytes
                                     }
                                 })
        // Pre-copy's rounds send what the dirty log names; some of it holds what was sent already.
        if parameters.mode != .postcopy { sender.skipUnchangedPages(pageCount: Int(machine.memory.size / UInt64(PageRun.pageSize))) }
        if let cacheBytes = parameters.xbzrleCacheBytes { sender.useXBZRLE(cacheBytes: cacheBytes) }
        if let level = parameters.zstdLevel { sender.useZstd(level: level) }
        if let storage {
            if let mirror = session.mirror { storage.attachMirror(mirror) }
            try storage.beginBulkPass(on: session.control, rateLimit: rateLimit)
            // Post-copy moves memory after execution, but disks before it: their bulk pass and rounds run now.
            if parameters.mode == .postcopy { try storageRounds(storage, on: session.control, rateLimit: rateLimit) }
        }
        var outcome = try precopyRounds(sender: sender, rateLimit: rateLimit, roundPlan: roundPlan,
                                          roundTripMs: session.roundTripMs, started: started)
        if parameters.mode == .postcopy { outcome.switchover = "post-copy: execution moves first" }
        // The reason is set with the status that the switch-over starts (a progress poll sees both or neither).
        if outcome.usePostcopy {
            try switchToPostcopy(stream: session.control, urgent: session.urgent, sender: sender, rateLimit: rateLimit, pending: outcome.pending,
                                 round: outcome.round, switchover: outcome.switchover, token: session.token, pausedHere: &pausedHere,
                                 committed: &committed, sameHost: session.sameHost, started: started)
        } else {
            try stopAndCopy(session: session, sender: sender, rateLimit: rateLimit, pending: outcome.pending, round: outcome.round,
                            switchover: outcome.switchover, pausedHere: &pausedHere, committed: &committed)
        }
    }

    /// Captures the paused VM's state and sends its sections; with --verify, the
    /// digests of memory (as it is now, paused) and of the state.
    func sendState(on stream: FDStream, withDigests: Bool = true) throws -> (sections: [StateSection], memoryDigest: UInt64?, stateDigest: UInt64?) {
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
    func handOver(_ stream: FDStream, pausedMono: UInt64, pausedReal: UInt64, sameHost: Bool, keepPaused: Bool,
                          committed: inout Bool) throws -> Resumed {
        try commit()
        // Shared storage: the disks were flushed when the VM paused; the destination takes them once they are let go of.
        if parameters.storage == .shared { machine.devices.unlockDisks() }
        try stream.writeFrame(.go, payload: Go(keepPaused: keepPaused).encoded)
        committed = true
        let (_, payload) = try readReply(stream, expecting: .resumed, what: "the destination's confirmation")
        let resumed = try Resumed(decoding: payload)
        let upperBound = Clocks.milliseconds(from: pausedMono, to: Clocks.monotonicNs())
        update {
            $0.downtimeUpperBoundMs = upperBound
            $0.downtimeMs = sameHost ? Clocks.milliseconds(from: pausedMono, to: resumed.monotonicNs)
                                     : Clocks.milliseconds(from: pausedReal, to: resumed.realtimeNs)
            $0.downtimeClock = sameHost ? "shared-monotonic" : "realtime"
            $0.pausedAtUnixMs = Double(pausedReal) / 1e6
            $0.resumedAtUnixMs = Double(resumed.realtimeNs) / 1e6
        }
        return resumed
    }

    /// A write that failed because the destination gave up (it refused a frame, its disk filled up) is
    /// explained by the abort it sent before closing, which may still wait unread: its reason, if so.
    func destinationsReason(after error: any Error) -> String? {
        let (open, committed) = lock.withLock { (connection, committedFlag) }
        guard let failure = error as? FDStream.IOError, failure.operation == "write", let control = open, !committed else { return nil }
        setTimeouts(control.rawValue, seconds: 1)
        for _ in 0..<64 {
            guard let (header, payload) = try? control.stream.readFrame() else { return nil }
            if header.type == .abort { return "the destination aborted: \(String(decoding: payload, as: UTF8.self))" }
        }
        return nil
    }

    /// Reads the next frame, which must be `expected`; an abort frame carries the peer's reason.
    func readReply(_ stream: FDStream, expecting expected: FrameType, what: String) throws -> (FrameHeader, [UInt8]) {
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
    (ContinuousClock.now - start).inSeconds * 1000
}

func hex(_ value: UInt64?) -> String { value.map { String(format: "%016llx", $0) } ?? "" }

extension Result {
    /// The error's description, or nil on success.
    var failureDescription: String? {
        if case .failure(let error) = self { return "\(error)" }
        return nil
    }
}
