import Foundation
import Synchronization
import TernMachine
import TernMigration
import TernTLS

/// Body of PUT /v1/vm/migrate.
public struct MigrateRequest: Codable, Sendable {
    /// Required, except with `resume` (then it defaults to the first attempt's).
    public var destination: String?
    /// Reconnect a post-copy whose connection dropped (no other field applies).
    public var resume: Bool?
    public var mode: String?
    public var maxDowntimeMs: Double?
    public var maxRounds: Int?
    public var timeoutS: Double?
    public var bandwidth: UInt64?
    public var verify: Bool?
    public var precopyRounds: Int?
    /// "none" (default), "xbzrle", "zstd" or "xbzrle,zstd".
    public var compress: String?
    public var xbzrleCacheBytes: UInt64?
    /// zstd level (1 to 19; default 1).
    public var zstdLevel: Int?
    /// Parallel page streams (1 to 16; default 2 for mode postcopy, 1 otherwise).
    public var streams: Int?
    /// "dirty-frequency" (default) or "sequential".
    public var order: String?
    /// With dirty-frequency ordering, hold the hottest pages back for the stop-and-copy (default: only without XBZRLE).
    public var holdBack: Bool?
    /// Mutual TLS: the directory with ca.pem, cert.pem and key.pem (read by this VM's tern process).
    public var tlsDir: String?
    /// With tls_dir: the destination's certificate must name one of these.
    public var tlsAllow: [String]?
    /// A tcp: migration without TLS must say so.
    public var insecure: Bool?
    /// The migration token for a destination started with --require-token (a JWT from `tern token issue`).
    public var token: String?
    /// "shared" (default: both hosts see the images) or "copy" (the disks move with the VM).
    public var storage: String?
    /// With storage "copy": "rounds" (default: writes during the copy are re-sent by the next round) or "sync".
    public var storageMirror: String?
    /// The destination's announcements of the VM's NICs (QEMU's announce-self parameters); rounds 0: none.
    public var announceRounds: Int?
    public var announceInitialMs: Int?
    public var announceMaxMs: Int?
    public var announceStepMs: Int?

    public init(destination: String?, resume: Bool? = nil, mode: String? = nil, maxDowntimeMs: Double? = nil, maxRounds: Int? = nil,
                timeoutS: Double? = nil, bandwidth: UInt64? = nil, verify: Bool? = nil, precopyRounds: Int? = nil,
                compress: String? = nil, xbzrleCacheBytes: UInt64? = nil, order: String? = nil, holdBack: Bool? = nil,
                zstdLevel: Int? = nil, streams: Int? = nil, tlsDir: String? = nil, tlsAllow: [String]? = nil, insecure: Bool? = nil,
                token: String? = nil, storage: String? = nil, storageMirror: String? = nil, announceRounds: Int? = nil,
                announceInitialMs: Int? = nil, announceMaxMs: Int? = nil, announceStepMs: Int? = nil) {
        self.announceRounds = announceRounds
        self.announceInitialMs = announceInitialMs
        self.announceMaxMs = announceMaxMs
        self.announceStepMs = announceStepMs
        self.storage = storage
        self.storageMirror = storageMirror
        self.token = token
        self.tlsDir = tlsDir
        self.tlsAllow = tlsAllow
        self.insecure = insecure
        self.holdBack = holdBack
        self.zstdLevel = zstdLevel
        self.streams = streams
        self.order = order
        self.precopyRounds = precopyRounds
        self.compress = compress
        self.xbzrleCacheBytes = xbzrleCacheBytes
        self.destination = destination
        self.resume = resume
        self.mode = mode
        self.maxDowntimeMs = maxDowntimeMs
        self.maxRounds = maxRounds
        self.timeoutS = timeoutS
        self.bandwidth = bandwidth
        self.verify = verify
    }
}

extension MigrateRequest {
    /// Enough for the re-sent working set of most guests; a quarter of a GiB of host memory.
    public static let defaultXBZRLECache: UInt64 = 256 << 20
    /// The lowest `bandwidth` (bytes per second) taken: below it a single pages frame would hold a sender for seconds.
    public static let minimumBandwidth: UInt64 = 1_000_000
}

/// Body of PUT /v1/vm/migration/parameters: limits to change while a migration runs (absent: unchanged).
public struct MigrationLimitsRequest: Codable, Sendable {
    public var maxDowntimeMs: Double?
    /// Bytes per second; 0 lifts the cap.
    public var bandwidth: UInt64?

    public init(maxDowntimeMs: Double? = nil, bandwidth: UInt64? = nil) {
        self.maxDowntimeMs = maxDowntimeMs
        self.bandwidth = bandwidth
    }
}

/// The migration a VM is in (at most one at a time), and the last one's report.
final class MigrationSlot: Sendable {
    private let current = Mutex<MigrationSource?>(nil)
    private let last = Mutex<MigrationReport?>(nil)
    /// A post-copy whose connection dropped, waiting for `resume`.
    private let paused = Mutex<MigrationSource?>(nil)

    var suspended: MigrationSource? { paused.withLock { $0 } }

    /// Held by whatever else uses the dirty log (a dirty-rate sample) and, briefly, by `begin`.
    private let dirtyLog = Mutex<Void>(())

    /// Runs `body` while no migration runs and none can start (one asked for waits); nil if one runs.
    func whileIdle<T>(_ body: () -> T) -> T? {
        dirtyLog.withLock { _ in
            guard current.withLock({ $0 == nil }) && suspended == nil else { return nil }
            return body()
        }
    }

    /// Claims the slot; nil when a migration is already running.
    func begin(_ source: MigrationSource) -> Bool {
        dirtyLog.withLock { _ in current.withLock { slot in
            guard slot == nil else { return false }
            slot = source
            return true
        } }
    }

    func end(_ report: MigrationReport) {
        last.withLock { $0 = report }
        current.withLock { source in
            paused.withLock { $0 = report.status == .postcopyPaused ? source : nil }
            source = nil
        }
    }

    var progress: MigrationReport? { current.withLock { $0?.progress } ?? last.withLock { $0 } }

    /// Whether this process holds guest pages that exist nowhere else: post-copy moved execution to the
    /// destination and its memory is not complete there yet (or the migration waits for a resume).
    /// Ending the process now would lose the VM.
    var holdsOwedPages: Bool {
        suspended != nil || current.withLock { $0?.owesPostcopyPages ?? false }
    }

    /// Whether the process may end now; if so, a running migration will not hand the VM over after all.
    func allowEnding() -> Bool {
        suspended == nil && current.withLock { $0?.allowEnding() ?? true }
    }
    var active: MigrationSource? { current.withLock { $0 } }
}

extension APIRouter {
    /// Runs a whole migration in the request (the CLI polls progress on a
    /// second connection). On success the process ends after answering.
    func migrate(_ body: Data) -> APIResponse {
        guard let request = try? APIJSON.decoder.decode(MigrateRequest.self, from: body) else {
            return .error(400, "bad_request", "expected a JSON body {\"destination\": \"tcp:HOST:PORT\", ...}")
        }
        if request.resume == true { return resumeMigration(request) }
        if migrations.suspended != nil {
            return .error(409, "postcopy_paused", "a post-copy migration lost its connection and waits: `tern migrate --resume`")
        }
        guard let destinationText = request.destination else {
            return .error(400, "bad_request", "destination is required (tcp:HOST:PORT or unix:PATH)")
        }
        let mode = request.mode.flatMap(MigrationMode.init(rawValue:)) ?? .precopy
        if let text = request.mode, MigrationMode(rawValue: text) == nil {
            return .error(400, "bad_request", "unknown mode '\(text)' (precopy, postcopy, hybrid or auto)")
        }
        let destination: Endpoint
        do { destination = try Endpoint(parsing: destinationText) } catch {
            return .error(400, "bad_request", "\(error)")
        }
        let security: ChannelSecurity
        switch ChannelSecurity.choose(tlsDirectory: request.tlsDir, allowedPeers: request.tlsAllow ?? [], insecure: request.insecure ?? false,
                                      for: destination, role: .client) {
        case .success(let chosen): security = chosen
        case .failure(let refusal): return .error(400, "bad_request", refusal.description)
        }
        var parameters = MigrationSource.Parameters(destination: destination, security: security)
        if let token = request.token {
            guard token.utf8.count <= Hello.maximumAuthorizationBytes else {
                return .error(400, "bad_request", "token longer than \(Hello.maximumAuthorizationBytes) bytes")
            }
            parameters.authorization = token
        }
        if let value = request.maxDowntimeMs {
            guard value > 0 else { return .error(400, "bad_request", "max_downtime_ms must be positive") }
            parameters.maxDowntimeMs = value
        }
        if let value = request.maxRounds {
            guard value >= 1 else { return .error(400, "bad_request", "max_rounds must be at least 1") }
            parameters.maxRounds = value
        }
        if let value = request.timeoutS {
            guard value > 0 else { return .error(400, "bad_request", "timeout_s must be positive") }
            parameters.timeoutSeconds = value
        }
        if let value = request.bandwidth {
            guard value >= MigrateRequest.minimumBandwidth else {
                return .error(400, "bad_request", "bandwidth below \(MigrateRequest.minimumBandwidth) bytes per second (1M) is not supported")
            }
            parameters.bandwidth = value
        }
        parameters.verify = request.verify ?? false
        if let text = request.order {
            guard let order = PageOrder(rawValue: text) else {
                return .error(400, "bad_request", "unknown order '\(text)' (sequential or dirty-frequency)")
            }
            parameters.order = order
        }
        if request.holdBack != nil && parameters.order != .dirtyFrequency {
            return .error(400, "bad_request", "hold_back needs order dirty-frequency")
        }
        parameters.holdBackHot = request.holdBack
        let compression: CompressionChoice
        do { compression = try CompressionChoice(parsing: request.compress ?? "none") } catch {
            return .error(400, "bad_request", "\(error)")
        }
        if compression.xbzrle {
            let cache = request.xbzrleCacheBytes ?? MigrateRequest.defaultXBZRLECache
            guard cache >= 1 << 20, cache <= machine.memory.size else {
                return .error(400, "bad_request", "xbzrle_cache_bytes must be between 1 MiB and the guest's memory size")
            }
            parameters.xbzrleCacheBytes = cache
        }
        if compression.zstd {
            let level = request.zstdLevel ?? 1
            guard (1...19).contains(level) else { return .error(400, "bad_request", "zstd_level must be between 1 and 19") }
            parameters.zstdLevel = Int32(level)
        }
        if let streams = request.streams {
            guard (1...Hello.maximumStreams).contains(streams) else {
                return .error(400, "bad_request", "streams must be between 1 and \(Hello.maximumStreams)")
            }
        }
        if let text = request.storage {
            guard let storage = StorageMode(rawValue: text) else {
                return .error(400, "bad_request", "unknown storage '\(text)' (shared or copy)")
            }
            parameters.storage = storage
        }
        let defaults = AnnounceSchedule()
        parameters.announce = AnnounceSchedule(rounds: request.announceRounds ?? defaults.rounds, initialMs: request.announceInitialMs ?? defaults.initialMs,
                                               maxMs: request.announceMaxMs ?? defaults.maxMs, stepMs: request.announceStepMs ?? defaults.stepMs)
        if let problem = parameters.announce.problem { return .error(400, "bad_request", problem) }
        if let text = request.storageMirror {
            guard let mirror = StorageMirror(rawValue: text) else {
                return .error(400, "bad_request", "unknown storage_mirror '\(text)' (rounds or sync)")
            }
            guard parameters.storage == .copy else { return .error(400, "bad_request", "storage_mirror needs storage copy") }
            parameters.storageMirror = mirror
        }
        parameters.mode = mode
        parameters.streams = request.streams ?? MigrationSource.Parameters.defaultStreams(for: mode)
        if let value = request.precopyRounds {
            guard value >= 1 else { return .error(400, "bad_request", "precopy_rounds must be at least 1") }
            parameters.precopyRounds = value
        }
        guard machine.currentState == .running || machine.currentState == .paused else {
            return .error(409, "invalid_state", "the VM is \(machine.currentState.rawValue)")
        }
        guard !machine.memoryIncomplete else {
            return .error(409, "invalid_state", "the VM's memory is still arriving from its previous host (post-copy)")
        }
        let source = MigrationSource(machine: machine, parameters: parameters)
        guard let claimed = snapshots.unlessWriting({ migrations.begin(source) }) else { return SnapshotGate.busy }
        guard claimed else { return .error(409, "busy", "a migration is already in progress") }
        let report = source.run()
        migrations.end(report)
        return ended(report, exitMessage: "migrated to \(destination)")
    }

    /// The report of a migration that ended; after a completed one, this process's VM ends once it is sent.
    private func ended(_ report: MigrationReport, exitMessage: String) -> APIResponse {
        guard report.status == .completed else { return .json(report) }
        let machine = self.machine
        return APIResponse(status: 200, contentType: "application/json", body: (try? APIJSON.encoder.encode(report)) ?? Data()) {
            machine.requestExit(MachineExit(kind: .migrated, message: exitMessage))
        }
    }

    /// Reconnects the post-copy that lost its connection; the process ends once it completes.
    private func resumeMigration(_ request: MigrateRequest) -> APIResponse {
        guard let source = migrations.suspended else {
            return .error(409, "invalid_state", "no post-copy migration is waiting to resume")
        }
        var destination: Endpoint?
        if let text = request.destination {
            do { destination = try Endpoint(parsing: text) } catch { return .error(400, "bad_request", "\(error)") }
        }
        guard migrations.begin(source) else { return .error(409, "busy", "a migration is already in progress") }
        let report = source.resume(destination: destination)
        migrations.end(report)
        return ended(report, exitMessage: "migrated to \(report.destination) (post-copy resumed)")
    }

    func migrationProgress() -> APIResponse {
        guard let report = migrations.progress else { return .error(404, "not_found", "no migration has run on this VM") }
        return .json(report)
    }

    func cancelMigration() -> APIResponse {
        guard let source = migrations.active else { return .error(404, "not_found", "no migration is in progress") }
        guard source.cancel() else {
            return .error(409, "committed", "too late to cancel: the destination has been told to run the VM")
        }
        return APIResponse(status: 202, contentType: nil, body: Data())
    }

    /// QEMU's `migrate-start-postcopy`: a hybrid or auto migration still in pre-copy switches now.
    func startPostcopy() -> APIResponse {
        guard let source = migrations.active else { return .error(404, "not_found", "no migration is in progress") }
        if let refusal = source.requestPostcopy() { return .error(409, "invalid_state", refusal) }
        return APIResponse(status: 202, contentType: nil, body: Data())
    }

    /// QEMU's `migrate-set-parameters` for `downtime-limit` and `max-bandwidth`, on the running migration.
    func tuneMigration(_ body: Data) -> APIResponse {
        guard let request = try? APIJSON.decoder.decode(MigrationLimitsRequest.self, from: body),
              request.maxDowntimeMs != nil || request.bandwidth != nil else {
            return .error(400, "bad_request", "expected a JSON body {\"max_downtime_ms\": MS, \"bandwidth\": BYTES_PER_S (0: no cap)}")
        }
        if let value = request.maxDowntimeMs, !(value > 0) { return .error(400, "bad_request", "max_downtime_ms must be positive") }
        if let value = request.bandwidth, value != 0, value < MigrateRequest.minimumBandwidth {
            return .error(400, "bad_request", "bandwidth below \(MigrateRequest.minimumBandwidth) bytes per second (1M) is not supported; 0 lifts the cap")
        }
        guard let source = migrations.active else { return .error(404, "not_found", "no migration is in progress") }
        source.tune(maxDowntimeMs: request.maxDowntimeMs, bandwidth: request.bandwidth.map { $0 == 0 ? nil : $0 })
        return .json(source.progress)
    }
}
