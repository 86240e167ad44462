import Foundation
import Logging
import Synchronization

/// The controller's desired-state loop: each `tick` reads the hosts' agents, takes every
/// migration in flight a step further, settles operations, and starts pending migrations
/// as the policy's limits allow. Operators' requests (`evacuate`, `migrate`) only write
/// records; the loop acts on them. State lives in the store, so a restarted controller
/// resumes from it.
public final class ClusterController: Sendable {
    public let store: any ClusterStore
    public let policy: MigrationPolicy
    private let agents: any HostAgents
    private let liveness: (any HostLiveness)?
    private let driver: MigrationDriver
    private let clock: @Sendable () -> Date
    private let logger: Logger
    /// One decision at a time: requests and the loop read and write the same records.
    private let deciding = Mutex<Void>(())
    private let observations = Mutex<[String: HostObservation]>([:])
    private let storeProblem = Mutex<String?>(nil)

    /// The last look at a host's agent.
    public struct HostObservation: Codable, Sendable {
        public var record: HostRecord
        public var status: HostStatus?
        public var error: String?
        /// With host liveness (etcd): whether the host's lease is alive.
        public var leaseAlive: Bool?
        public var at: Date
    }

    public enum Refusal: Error, CustomStringConvertible {
        case invalid(String)
        case placement(Placement.Refusal)
        case unavailable(String)

        public var description: String {
            switch self {
            case .invalid(let why), .unavailable(let why): why
            case .placement(let refusal): refusal.description
            }
        }
    }

    public init(store: any ClusterStore, agents: any HostAgents, tokens: any MigrationTokenIssuer, policy: MigrationPolicy,
                liveness: (any HostLiveness)? = nil, clock: @escaping @Sendable () -> Date = Date.init,
                logger: Logger = Logger(label: "tern.controller")) {
        self.store = store
        self.agents = agents
        self.liveness = liveness
        self.policy = policy
        self.clock = clock
        self.logger = logger
        driver = MigrationDriver(agents: agents, tokens: tokens, policy: policy, logger: logger)
    }

    // MARK: What operators ask for

    public func addHost(_ record: HostRecord) throws(Refusal) {
        guard VMSpec.isValidName(record.name) else { throw .invalid("host name '\(record.name)' must be letters, digits, '.', '_' or '-'") }
        guard record.endpoint != nil else { throw .invalid("host address '\(record.address)' is not HOST:PORT") }
        try locked { try store.save(record) }
    }

    public func createVM(_ spec: VMSpec, on hostName: String) throws -> VMStatus {
        if let problem = spec.problem { throw Refusal.invalid(problem) }
        let hosts = try locked { try store.hosts() }
        guard let host = hosts.first(where: { $0.name == hostName }) else { throw Refusal.placement(.unknownHost(hostName)) }
        let everywhere = observe(hosts)
        if let holder = everywhere.first(where: { $0.status?.vms.contains { $0.name == spec.name && $0.state != .departed } ?? false }) {
            throw Refusal.invalid("a VM named '\(spec.name)' already exists on \(holder.record.name)")
        }
        guard let status = everywhere.first(where: { $0.record.name == hostName })?.status else {
            throw Refusal.unavailable("host '\(hostName)' is not reachable")
        }
        guard status.freeMib >= spec.memoryMib else {
            throw Refusal.placement(.destinationFull(vm: spec.name, host: hostName, needsMib: spec.memoryMib, freeMib: status.freeMib))
        }
        return try agents.createVM(spec, on: host)
    }

    /// Moves every VM off `hostName`, to destinations chosen by free memory; refused
    /// untouched when some VM has nowhere to go.
    public func evacuate(_ hostName: String) throws(Refusal) -> OperationRecord {
        try locked { () throws -> OperationRecord in
            let (hosts, migrations, view) = try lookAround()
            guard var host = hosts.first(where: { $0.name == hostName }) else { throw Refusal.placement(.unknownHost(hostName)) }
            guard let status = view.statuses[hostName] else { throw Refusal.unavailable("host '\(hostName)' is not reachable: its VMs cannot be listed") }
            let moving = Set(migrations.filter { !$0.phase.isFinished }.map(\.vm))
            let vms = status.residentVMs.filter { !moving.contains($0.name) }
            let candidates = hosts.filter { $0.name != hostName && !$0.draining }.compactMap { view.statuses[$0.name] }
            let moves: [Placement.Move]
            do throws(Placement.Refusal) { moves = try Placement.plan(vms, candidates: candidates, reservedMib: reserved(migrations, view: view)) } catch { throw Refusal.placement(error) }
            let now = clock()
            let operation = OperationRecord(kind: .evacuate(host: hostName), createdAt: now)
            do {
                host.draining = true
                try store.save(host)
                for (index, move) in moves.enumerated() {
                    try store.save(MigrationRecord(vm: move.vm.name, source: hostName, destination: move.destination, memoryMib: move.vm.spec.memoryMib,
                                                   operationId: operation.id, priority: Admission.priority(for: move.vm, planIndex: index, order: policy.order),
                                                   maxDowntimeMs: policy.maxDowntimeMs, createdAt: now))
                }
                try store.save(operation)
            } catch { throw Refusal.unavailable("\(error)") }
            logger.notice("evacuation planned", metadata: ["host": "\(hostName)", "vms": "\(moves.count)"])
            return operation
        }
    }

    /// Moves one VM to `destination`.
    public func migrate(_ vmName: String, to destination: String) throws(Refusal) -> OperationRecord {
        try locked { () throws -> OperationRecord in
            let (hosts, migrations, view) = try lookAround()
            guard hosts.contains(where: { $0.name == destination }) else { throw Refusal.placement(.unknownHost(destination)) }
            guard let source = view.statuses.values.first(where: { $0.residentVMs.contains { $0.name == vmName } }),
                  let vm = source.residentVMs.first(where: { $0.name == vmName }) else {
                throw Refusal.invalid("no reachable host runs a VM named '\(vmName)'")
            }
            guard source.name != destination else { throw Refusal.invalid("VM '\(vmName)' already runs on \(destination)") }
            if migrations.contains(where: { $0.vm == vmName && !$0.phase.isFinished }) { throw Refusal.invalid("VM '\(vmName)' is already being migrated") }
            guard let target = view.statuses[destination] else { throw Refusal.unavailable("host '\(destination)' is not reachable") }
            let free = target.freeMib - min(target.freeMib, reserved(migrations, view: view)[destination] ?? 0)
            guard free >= vm.spec.memoryMib else {
                throw Refusal.placement(.destinationFull(vm: vmName, host: destination, needsMib: vm.spec.memoryMib, freeMib: free))
            }
            let now = clock()
            let operation = OperationRecord(kind: .migrate(vm: vmName, to: destination), createdAt: now)
            do {
                try store.save(MigrationRecord(vm: vmName, source: source.name, destination: destination, memoryMib: vm.spec.memoryMib,
                                               operationId: operation.id, maxDowntimeMs: policy.maxDowntimeMs, createdAt: now))
                try store.save(operation)
            } catch { throw Refusal.unavailable("\(error)") }
            return operation
        }
    }

    /// Evens out memory use across the hosts that take VMs (`Placement.balance`). Its moves run
    /// under the same limits as any others; a cluster already balanced gets an operation with none.
    public func balance() throws(Refusal) -> OperationRecord {
        try locked { () throws -> OperationRecord in
            let (hosts, migrations, view) = try lookAround()
            if migrations.contains(where: { !$0.phase.isFinished }) {
                throw Refusal.invalid("migrations are still pending or in flight: balance once they have ended")
            }
            let candidates = hosts.filter { !$0.draining }.compactMap { view.statuses[$0.name] }
            let moves = Placement.balance(candidates, reservedMib: reserved(migrations, view: view))
            let now = clock()
            var operation = OperationRecord(kind: .balance, createdAt: now)
            if moves.isEmpty {
                operation.phase = .completed
                operation.reason = "already balanced"
                operation.finishedAt = now
            }
            let sources = Dictionary(uniqueKeysWithValues: candidates.flatMap { host in host.residentVMs.map { ($0.name, host.name) } })
            do {
                for (index, move) in moves.enumerated() {
                    try store.save(MigrationRecord(vm: move.vm.name, source: sources[move.vm.name]!, destination: move.destination,
                                                   memoryMib: move.vm.spec.memoryMib, operationId: operation.id,
                                                   priority: Admission.priority(for: move.vm, planIndex: index, order: policy.order),
                                                   maxDowntimeMs: policy.maxDowntimeMs, createdAt: now))
                }
                try store.save(operation)
            } catch { throw Refusal.unavailable("\(error)") }
            logger.notice("balance planned", metadata: ["moves": "\(moves.count)"])
            return operation
        }
    }

    /// Lets a drained host take VMs again.
    public func undrain(_ hostName: String) throws(Refusal) {
        try locked { () throws in
            do {
                guard var host = try store.hosts().first(where: { $0.name == hostName }) else { throw Refusal.placement(.unknownHost(hostName)) }
                host.draining = false
                try store.save(host)
            } catch let refusal as Refusal { throw refusal } catch { throw Refusal.unavailable("\(error)") }
        }
    }

    // MARK: What the loop does

    /// One pass of the loop. Returns whether anything is still in flight or pending.
    @discardableResult
    public func tick() -> Bool {
        deciding.withLock { _ in
            let now = clock()
            let hosts: [HostRecord], migrations: [MigrationRecord], operations: [OperationRecord]
            do {
                hosts = try store.hosts()
                migrations = try store.migrations()
                operations = try store.operations()
                storeProblem.withLock { $0 = nil }
            } catch {
                // Migrations in flight go on at their hosts; none starts until the store is back.
                let message = "\(error)"
                if storeProblem.withLock({ $0 }) != message { logger.error("store unavailable: no migration starts until it is back", metadata: ["error": "\(message)"]) }
                storeProblem.withLock { $0 = message }
                return true
            }
            let view = look(at: hosts)
            var current: [MigrationRecord] = []
            var storeFailed = false
            for var migration in migrations {
                do {
                    switch migration.phase {
                    case .starting: try driver.start(&migration, view: view, now: now, save: store.save)
                    case .running: try driver.advance(&migration, view: view, now: now, save: store.save)
                    default: break
                    }
                } catch {
                    logger.error("store write failed", metadata: ["vm": "\(migration.vm)", "error": "\(error)"])
                    storeFailed = true
                }
                current.append(migration)
            }
            settle(operations, migrations: current, view: view, now: now)
            guard !storeFailed else { return true }
            let pending = current.filter { $0.phase == .pending && ($0.notBefore ?? .distantPast) <= now }
            let active = current.filter { $0.phase.isActive }
            for var migration in Admission.admit(pending: pending, active: active, policy: policy, reachable: Set(view.statuses.keys)) {
                do { try driver.start(&migration, view: view, now: now, save: store.save) } catch {
                    logger.error("store write failed", metadata: ["vm": "\(migration.vm)", "error": "\(error)"])
                    break
                }
            }
            return current.contains { !$0.phase.isFinished }
        }
    }

    /// A new look at every host (for `tern cluster hosts` and `vms`: what is true now, not at the loop's last pass).
    public func observeNow() -> [HostObservation] {
        guard let hosts = try? store.hosts() else { return lastObservations }
        return observe(hosts).sorted { $0.record.name < $1.record.name }
    }

    /// The last look at every host.
    public var lastObservations: [HostObservation] {
        observations.withLock { Array($0.values) }.sorted { $0.record.name < $1.record.name }
    }

    /// Why the store cannot be used now, or nil.
    public var storeUnavailable: String? { storeProblem.withLock { $0 } }

    // MARK: Helpers

    private func locked<T>(_ body: () throws -> T) throws(Refusal) -> T {
        try deciding.withLock { _ throws(Refusal) in
            do { return try body() } catch let refusal as Refusal { throw refusal } catch { throw .unavailable("\(error)") }
        }
    }

    private func lookAround() throws(Refusal) -> ([HostRecord], [MigrationRecord], MigrationDriver.View) {
        do {
            let hosts = try store.hosts(), migrations = try store.migrations()
            let view = look(at: hosts)
            return (hosts, migrations, view)
        } catch { throw .unavailable("\(error)") }
    }

    /// Asks every agent for its status, all at once. With host liveness, a host whose lease has
    /// expired counts as unreachable even if its agent answers.
    private func observe(_ hosts: [HostRecord]) -> [HostObservation] {
        let results = Mutex<[HostObservation]>([])
        let now = clock()
        let live: Set<String>? = liveness.flatMap { try? $0.liveHosts() }
        DispatchQueue.concurrentPerform(iterations: hosts.count) { index in
            let host = hosts[index]
            var observation: HostObservation
            do {
                let status = try agents.status(of: host)
                observation = status.name == host.name ? HostObservation(record: host, status: status, error: nil, at: now)
                    : HostObservation(record: host, status: nil, error: "the agent at \(host.address) says it is '\(status.name)'", at: now)
            } catch {
                observation = HostObservation(record: host, status: nil, error: "\(error)", at: now)
            }
            if liveness != nil {
                observation.leaseAlive = live?.contains(host.name)
                if observation.leaseAlive != true && observation.status != nil {
                    observation.status = nil
                    observation.error = live == nil ? "its liveness lease cannot be read" : "its liveness lease has expired"
                }
            }
            results.withLock { $0.append(observation) }
        }
        let all = results.withLock { $0 }
        observations.withLock { stored in
            stored = Dictionary(uniqueKeysWithValues: all.map { ($0.record.name, $0) })
        }
        return all
    }

    /// The hosts' records and what their agents answer now.
    private func look(at hosts: [HostRecord]) -> MigrationDriver.View {
        let observations = observe(hosts)
        return MigrationDriver.View(hosts: Dictionary(uniqueKeysWithValues: hosts.map { ($0.name, $0) }),
                                    statuses: Dictionary(uniqueKeysWithValues: observations.compactMap { seen in seen.status.map { (seen.record.name, $0) } }))
    }

    /// Memory promised to unfinished migrations whose VM the destination does not list yet.
    private func reserved(_ migrations: [MigrationRecord], view: MigrationDriver.View) -> [String: UInt64] {
        var reserved: [String: UInt64] = [:]
        for migration in migrations where !migration.phase.isFinished && view.vm(migration.vm, on: migration.destination) == nil {
            reserved[migration.destination, default: 0] += migration.memoryMib
        }
        return reserved
    }

    /// Ends operations whose migrations have all finished.
    private func settle(_ operations: [OperationRecord], migrations: [MigrationRecord], view: MigrationDriver.View, now: Date) {
        for var operation in operations where operation.phase == .active {
            let own = migrations.filter { $0.operationId == operation.id }
            guard own.allSatisfy({ $0.phase.isFinished }) else { continue }
            let failed = own.filter { $0.phase != .completed }
            if failed.isEmpty {
                operation.phase = .completed
            } else {
                operation.phase = .failed
                operation.reason = failed.map { "\($0.vm): \($0.reason ?? $0.phase.rawValue)" }.joined(separator: "; ")
            }
            operation.finishedAt = now
            do { try store.save(operation) } catch { logger.error("store write failed", metadata: ["error": "\(error)"]) }
        }
    }
}
