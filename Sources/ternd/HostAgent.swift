import Foundation
import Glibc
import Logging
import Metrics
import Synchronization
import TernAPI
import TernCluster
import TernMachine
import TernMigration

/// What the agent remembers of one VM, in STATE/vms/NAME.json: enough for a restarted
/// agent to find the VM's process and API socket again, and what its migrations did.
struct AgentVMRecord: Codable {
    var spec: VMSpec
    var process: VMProcess
    var apiSocket: String
    var startedAtUnixMs: Double
    var incomingMigrationId: String?
    var incomingPort: Int?
    var outgoing: MigrationProgress?
    var departedAtUnixMs: Double?
    /// An incoming VM whose migration has arrived (it runs here now).
    var incomingArrived: Bool?
}

/// The host agent: starts and owns this host's VMs (tern processes with their API
/// sockets), reports the host's capacity and each VM's state, and runs the migrations
/// the controller asks for. Its memory of VMs is on disk, so a restarted agent adopts
/// the VMs its predecessor started; they never depend on the agent to keep running.
final class HostAgent: Sendable {
    struct Configuration: Sendable {
        var name: String
        /// The address incoming migrations listen on.
        var migrationAddress: String
        var memoryCapacityMib: UInt64
        var stateDirectory: String
        var ternBinary: String
        var tlsDirectory: String
        var tokenPublicKey: String
        var incomingPorts: ClosedRange<Int>
        /// Seconds between samples of each VM's activity (dirty rate, CPU, devices).
        var sampleInterval: Double
    }

    let configuration: Configuration
    private let records = Mutex<[String: AgentVMRecord]>([:])
    /// VMs whose migration a thread of this agent process is running.
    private let sending = Mutex<Set<String>>([])
    private let startedAtUnixMs = Date().timeIntervalSince1970 * 1000
    private let logger: Logger
    private let sampler: ActivitySampler
    /// A departed VM's record is kept this long, for a controller that was away when it left.
    static let departedRetention: Double = 600

    var vmDirectory: String { configuration.stateDirectory + "/vms" }

    init(configuration: Configuration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        sampler = ActivitySampler(interval: configuration.sampleInterval)
        try FileManager.default.createDirectory(atPath: configuration.stateDirectory + "/vms", withIntermediateDirectories: true,
                                                attributes: [.posixPermissions: 0o700])
        var adopted: [String: AgentVMRecord] = [:]
        for file in (try? FileManager.default.contentsOfDirectory(atPath: configuration.stateDirectory + "/vms")) ?? [] where file.hasSuffix(".json") {
            let path = configuration.stateDirectory + "/vms/" + file
            guard let data = FileManager.default.contents(atPath: path), let record = try? JSONDecoder().decode(AgentVMRecord.self, from: data) else {
                logger.warning("ignoring an unreadable VM record", metadata: ["file": "\(path)"])
                continue
            }
            adopted[record.spec.name] = record
        }
        records.withLock { $0 = adopted }
        for record in adopted.values {
            logger.info("adopted VM", metadata: ["vm": "\(record.spec.name)", "pid": "\(record.process.pid)", "alive": "\(record.process.isAlive)"])
        }
        sampler.start { [weak self] in self?.samplingTargets() ?? [] }
    }

    /// The VMs whose activity can be sampled now: running here, neither migrating nor waiting for one.
    private func samplingTargets() -> [ActivitySampler.Target] {
        let migrating = sending.withLock { $0 }
        return records.withLock { all in
            all.values.filter { record in
                record.departedAtUnixMs == nil && record.outgoing?.state != .running && !migrating.contains(record.spec.name)
                    && (record.incomingMigrationId == nil || record.incomingArrived == true)
            }.map { ActivitySampler.Target(name: $0.spec.name, apiSocket: $0.apiSocket, cpuSeconds: $0.process.cpuSeconds) }
        }
    }

    // MARK: Reporting

    func status() -> HostStatus {
        let names = records.withLock { Array($0.keys) }.sorted()
        let vms = names.compactMap { vmStatus($0) }
        return HostStatus(name: configuration.name, migrationAddress: configuration.migrationAddress,
                          memoryCapacityMib: configuration.memoryCapacityMib, cpus: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))),
                          vms: vms, agentStartedAtUnixMs: startedAtUnixMs)
    }

    func vmStatus(_ name: String) -> VMStatus? {
        guard var record = records.withLock({ $0[name] }) else { return nil }
        let nowMs = Date().timeIntervalSince1970 * 1000
        if let departed = record.departedAtUnixMs {
            if nowMs - departed > Self.departedRetention * 1000 { forget(name); return nil }
            return VMStatus(spec: record.spec, state: .departed, startedAtUnixMs: record.startedAtUnixMs,
                            incomingMigrationId: record.incomingMigrationId, outgoing: record.outgoing)
        }
        let isSending = sending.withLock { $0.contains(name) }
        // Its process ends by itself once the destination has taken over; the VM has left already.
        if record.outgoing?.state == .completed && record.process.isAlive {
            return VMStatus(spec: record.spec, state: .departed, pid: record.process.pid, startedAtUnixMs: record.startedAtUnixMs,
                            outgoing: record.outgoing)
        }
        guard record.process.isAlive else {
            // A VM that left by a completed migration ends its process by itself.
            if record.outgoing?.state == .completed {
                record.departedAtUnixMs = nowMs
                save(record)
                return VMStatus(spec: record.spec, state: .departed, startedAtUnixMs: record.startedAtUnixMs, outgoing: record.outgoing)
            }
            if record.outgoing?.state == .running && !isSending {
                record.outgoing?.state = .unknown
                record.outgoing?.reason = "the agent restarted during the migration and the VM's process has ended since"
                save(record)
            }
            return VMStatus(spec: record.spec, state: .lost, pid: record.process.pid, startedAtUnixMs: record.startedAtUnixMs,
                            incomingMigrationId: record.incomingMigrationId, outgoing: record.outgoing,
                            reason: "its process has ended (log: \(vmDirectory)/\(name).log)")
        }
        let client = APIClient(socketPath: record.apiSocket)
        var state = VMRunState.lost
        var reason: String?
        do {
            let response = try client.request(.GET, "/v1/vm", timeout: .seconds(3))
            if response.status == 200, let info = try? APIJSON.decoder.decode(MachineInfo.self, from: response.body) {
                switch info.state {
                case .running: state = .running
                case .paused: state = .paused
                case .created: state = .starting
                case .exited: state = .lost; reason = "the VM has exited"
                }
            } else if response.status == 503 {
                state = response.body.contains("\"waiting\"".utf8) ? .incoming : .starting
            } else {
                reason = "its API answered \(response.status)"
            }
        } catch {
            state = .starting
            reason = "its API does not answer yet: \(error)"
        }
        if state == .running || state == .paused, record.incomingMigrationId != nil, record.incomingArrived != true {
            record.incomingArrived = true
            save(record)
        }
        // A running migration's progress is the VM's own report, asked for once. Adopted mid-migration (no
        // thread here to record the outcome), an ended report is also the outcome to keep.
        var outgoing = record.outgoing
        if outgoing?.state == .running, let live = liveProgress(record) {
            outgoing = live
            if live.state != .running && !isSending { record.outgoing = live; save(record) }
        }
        var status = VMStatus(spec: record.spec, state: state, pid: record.process.pid, cpuSeconds: record.process.cpuSeconds,
                              startedAtUnixMs: record.startedAtUnixMs, incomingMigrationId: record.incomingMigrationId,
                              outgoing: outgoing, reason: reason)
        status.activity = sampler.activity(of: name)
        return status
    }

    /// The running (or last) migration as the VM's own API reports it.
    private func liveProgress(_ record: AgentVMRecord) -> MigrationProgress? {
        guard let id = record.outgoing?.migrationId,
              let response = try? APIClient(socketPath: record.apiSocket).request(.GET, "/v1/vm/migration", timeout: .seconds(3)),
              response.status == 200, let report = try? APIJSON.decoder.decode(MigrationReport.self, from: response.body) else { return nil }
        return Self.progress(of: report, id: id)
    }

    static func progress(of report: MigrationReport, id: String) -> MigrationProgress {
        let state: OutgoingState = switch report.status {
        case .completed: .completed
        case .failed: .failed
        case .cancelled: .cancelled
        default: .running
        }
        let remaining = report.rounds.last.map { $0.dirtyPages * 4096 } ?? (report.ramBytes > report.transferredBytes ? report.ramBytes - report.transferredBytes : 0)
        return MigrationProgress(migrationId: id, state: state, phase: report.status.rawValue, transferredBytes: report.transferredBytes,
                                 remainingBytes: remaining, rounds: report.rounds.count, downtimeMs: report.downtimeMs, totalMs: report.totalMs,
                                 maxDowntimeMs: report.maxDowntimeMs, verified: report.verification?.match, reason: report.reason)
    }

    // MARK: Starting VMs

    func create(_ spec: VMSpec) throws -> VMStatus {
        if let problem = spec.problem { throw AgentRefusal.invalid(problem) }
        try claimName(spec.name)
        let socket = vmDirectory + "/\(spec.name).sock"
        var arguments = ["run", "--kernel", spec.kernel, "--memory", "\(spec.memoryMib)M", "--cpus", "\(spec.cpus)",
                         "--serial", "off", "--api-socket", socket, "--name", spec.name]
        if !spec.cmdline.isEmpty { arguments += ["--cmdline", spec.cmdline] }
        let process = try VMProcess.spawn(configuration.ternBinary, arguments, log: vmDirectory + "/\(spec.name).log")
        let record = AgentVMRecord(spec: spec, process: process, apiSocket: socket, startedAtUnixMs: Date().timeIntervalSince1970 * 1000)
        save(record)
        logger.info("started VM", metadata: ["vm": "\(spec.name)", "pid": "\(process.pid)"])
        return vmStatus(spec.name) ?? VMStatus(spec: spec, state: .starting, pid: process.pid)
    }

    /// Starts the empty VM a migration fills, or finds the one already waiting for it.
    func prepareIncoming(_ spec: VMSpec, migrationId: String) throws -> String {
        if let problem = spec.problem { throw AgentRefusal.invalid(problem) }
        if let record = records.withLock({ $0[spec.name] }), record.incomingMigrationId == migrationId, record.departedAtUnixMs == nil,
           record.process.isAlive, let port = record.incomingPort {
            return "tcp:\(configuration.migrationAddress):\(port)"
        }
        try claimName(spec.name)
        let port = try freePort()
        let socket = vmDirectory + "/\(spec.name).sock"
        let arguments = ["run", "--incoming", "tcp:\(configuration.migrationAddress):\(port)", "--memory", "\(spec.memoryMib)M",
                         "--tls-dir", configuration.tlsDirectory, "--require-token", configuration.tokenPublicKey,
                         "--token-ledger", configuration.stateDirectory + "/used-tokens", "--serial", "off", "--api-socket", socket]
        let process = try VMProcess.spawn(configuration.ternBinary, arguments, log: vmDirectory + "/\(spec.name).log")
        save(AgentVMRecord(spec: spec, process: process, apiSocket: socket, startedAtUnixMs: Date().timeIntervalSince1970 * 1000,
                           incomingMigrationId: migrationId, incomingPort: port))
        // The controller tells the source to connect as soon as this returns: wait until the VM listens.
        let deadline = Date(timeIntervalSinceNow: 10)
        while Date() < deadline {
            if vmStatus(spec.name)?.state == .incoming { return "tcp:\(configuration.migrationAddress):\(port)" }
            guard process.isAlive else { break }
            usleep(20_000)
        }
        let log = (try? String(contentsOfFile: vmDirectory + "/\(spec.name).log", encoding: .utf8)) ?? ""
        process.signal(SIGKILL)
        forget(spec.name)
        throw AgentRefusal.failed("the destination VM did not start listening: \(log.split(separator: "\n").last ?? "no output")")
    }

    /// A name is free when no VM here has it, or only one that left or died.
    private func claimName(_ name: String) throws {
        if let existing = records.withLock({ $0[name] }) {
            guard existing.departedAtUnixMs != nil || !existing.process.isAlive else {
                throw AgentRefusal.conflict("a VM named '\(name)' already runs here")
            }
            forget(name)
        }
    }

    private func freePort() throws -> Int {
        let used = Set(records.withLock { $0.values.compactMap { $0.process.isAlive ? $0.incomingPort : nil } })
        for port in configuration.incomingPorts where !used.contains(port) {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            inet_pton(AF_INET, configuration.migrationAddress, &address.sin_addr)
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if bound == 0 { return port }
        }
        throw AgentRefusal.failed("no free port in \(configuration.incomingPorts) for an incoming migration")
    }

    // MARK: Migrations out

    /// Starts migration `request.migrationId` of `name` on a thread of its own; a repeated
    /// request for the same id finds the one already started.
    func startMigration(_ name: String, _ request: AgentMigrateRequest) throws {
        guard var record = records.withLock({ $0[name] }), record.departedAtUnixMs == nil else { throw AgentRefusal.notFound("no VM named '\(name)' here") }
        if record.outgoing?.migrationId == request.migrationId { return }
        guard record.process.isAlive else { throw AgentRefusal.conflict("VM '\(name)' is not running") }
        if record.outgoing?.state == .running { throw AgentRefusal.conflict("VM '\(name)' is already migrating (\(record.outgoing!.migrationId))") }
        let body = MigrateRequest(destination: request.destination, mode: "auto", maxDowntimeMs: request.maxDowntimeMs,
                                  // The controller's progress timeout decides when to give up converging, not a round count.
                                  maxRounds: 1_000_000, timeoutS: request.timeoutS, bandwidth: request.bandwidth, verify: request.verify,
                                  tlsDir: configuration.tlsDirectory, tlsAllow: [request.destinationName], token: request.token)
        record.outgoing = MigrationProgress(migrationId: request.migrationId, state: .running, phase: "setup", maxDowntimeMs: request.maxDowntimeMs)
        save(record)
        sending.withLock { _ = $0.insert(name) }
        let socket = record.apiSocket, id = request.migrationId
        let encoded = try APIJSON.encoder.encode(body)
        let thread = Thread { [self] in
            let outcome: MigrationProgress
            do {
                let response = try APIClient(socketPath: socket).request(.PUT, "/v1/vm/migrate", body: encoded, timeout: .seconds(Int64(request.timeoutS) + 600))
                if response.status == 200, let report = try? APIJSON.decoder.decode(MigrationReport.self, from: response.body) {
                    outcome = Self.progress(of: report, id: id)
                } else {
                    outcome = MigrationProgress(migrationId: id, state: .failed, phase: "refused",
                                                reason: response.errorMessage ?? "the VM's API answered \(response.status)")
                }
            } catch {
                outcome = MigrationProgress(migrationId: id, state: .failed, phase: "failed", reason: "\(error)")
            }
            if var latest = records.withLock({ $0[name] }), latest.outgoing?.migrationId == id {
                latest.outgoing = outcome
                save(latest)
            }
            sending.withLock { _ = $0.remove(name) }
            Counter(label: "tern_agent_migrations_out_total", dimensions: [("outcome", outcome.state.rawValue)]).increment()
            logger.info("migration ended", metadata: ["vm": "\(name)", "state": "\(outcome.state.rawValue)", "reason": "\(outcome.reason ?? "")"])
        }
        thread.start()
    }

    func migration(_ name: String) -> MigrationProgress? {
        vmStatus(name)?.outgoing
    }

    func act(_ name: String, _ action: MigrationAction) throws {
        guard let record = records.withLock({ $0[name] }), record.outgoing?.state == .running else {
            throw AgentRefusal.notFound("VM '\(name)' has no migration running here")
        }
        let client = APIClient(socketPath: record.apiSocket)
        let response: APIClient.Response
        switch action {
        case .postcopy: response = try client.request(.PUT, "/v1/vm/migration/postcopy")
        case .cancel: response = try client.request(.PUT, "/v1/vm/migration/cancel")
        case .setDowntime(let ms):
            response = try client.request(.PUT, "/v1/vm/migration/parameters", body: Data("{\"max_downtime_ms\": \(ms)}".utf8))
        }
        guard (200..<300).contains(response.status) else {
            throw AgentRefusal.conflict(response.errorMessage ?? "the VM's API answered \(response.status)")
        }
    }

    /// Stops an empty VM still waiting for `migrationId`; one that has arrived is left alone.
    func discardIncoming(_ name: String, migrationId: String) {
        guard let record = records.withLock({ $0[name] }), record.incomingMigrationId == migrationId else { return }
        // Not once it runs: then the migration did arrive, whatever the controller thinks.
        if let state = vmStatus(name)?.state, state == .running || state == .paused { return }
        stopProcess(record)
        forget(name)
    }

    /// Stops a VM (DELETE /v1/vms/NAME).
    func stop(_ name: String) throws {
        guard let record = records.withLock({ $0[name] }) else { throw AgentRefusal.notFound("no VM named '\(name)' here") }
        if record.departedAtUnixMs == nil, record.process.isAlive {
            if record.outgoing?.state == .running { throw AgentRefusal.conflict("VM '\(name)' is migrating: cancel the migration first") }
            stopProcess(record)
        }
        forget(name)
    }

    private func stopProcess(_ record: AgentVMRecord) {
        _ = try? APIClient(socketPath: record.apiSocket).request(.PUT, "/v1/vm/quit", timeout: .seconds(3))
        for _ in 0..<50 where record.process.isAlive { usleep(20_000) }
        record.process.signal(SIGKILL)
        for _ in 0..<50 where record.process.isAlive { usleep(20_000) }
    }

    // MARK: Records

    private func save(_ record: AgentVMRecord) {
        records.withLock { $0[record.spec.name] = record }
        let path = vmDirectory + "/\(record.spec.name).json"
        do {
            try JSONEncoder().encode(record).write(to: URL(fileURLWithPath: path), options: .atomic)
        } catch {
            logger.error("cannot write the VM's record: a restarted agent would not know it", metadata: ["file": "\(path)", "error": "\(error)"])
        }
    }

    private func forget(_ name: String) {
        records.withLock { _ = $0.removeValue(forKey: name) }
        unlink(vmDirectory + "/\(name).json")
    }
}

/// Why the agent refuses a request, with the HTTP status it answers.
enum AgentRefusal: Error, CustomStringConvertible {
    case invalid(String), notFound(String), conflict(String), failed(String)

    var status: Int {
        switch self {
        case .invalid: 400
        case .notFound: 404
        case .conflict: 409
        case .failed: 500
        }
    }

    var code: String {
        switch self {
        case .invalid: "bad_request"
        case .notFound: "not_found"
        case .conflict: "conflict"
        case .failed: "failed"
        }
    }

    var description: String {
        switch self {
        case .invalid(let why), .notFound(let why), .conflict(let why), .failed(let why): why
        }
    }
}
