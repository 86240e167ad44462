import Foundation

/// What the controller asks of a host's agent. Every call that changes something is
/// keyed by the migration's id, so repeating it (after a restart, or by a second
/// controller) does the same thing once.
public protocol HostAgents: Sendable {
    func status(of host: HostRecord) throws -> HostStatus
    func createVM(_ spec: VMSpec, on host: HostRecord) throws -> VMStatus
    /// Starts (or finds) the empty VM waiting for `migrationId`, and says where it listens (tcp:IP:PORT).
    func prepareIncoming(_ spec: VMSpec, migrationId: String, on host: HostRecord) throws -> String
    /// Starts (or finds) the migration `request.migrationId` of `vm`.
    func startMigration(_ request: AgentMigrateRequest, vm: String, on host: HostRecord) throws
    /// The migration `vm` is in, or last ended; nil when the host has neither the VM nor its migration.
    func migration(of vm: String, on host: HostRecord) throws -> MigrationProgress?
    func act(_ action: MigrationAction, vm: String, on host: HostRecord) throws
    /// Stops the empty VM a failed migration left waiting (nothing if there is none).
    func discardIncoming(_ vm: String, migrationId: String, on host: HostRecord) throws
}

/// Body of an agent's POST /v1/vms/NAME/migrate.
public struct AgentMigrateRequest: Codable, Sendable, Equatable {
    public var migrationId: String
    /// tcp:IP:PORT, as the destination's agent gave it.
    public var destination: String
    /// The destination's host name: its certificate must carry it.
    public var destinationName: String
    public var token: String
    public var bandwidth: UInt64?
    public var maxDowntimeMs: Double
    public var verify: Bool
    /// The source's own limit on the whole migration (the controller's completion timeout acts first).
    public var timeoutS: Double

    public init(migrationId: String, destination: String, destinationName: String, token: String, bandwidth: UInt64?,
                maxDowntimeMs: Double, verify: Bool, timeoutS: Double) {
        self.migrationId = migrationId
        self.destination = destination
        self.destinationName = destinationName
        self.token = token
        self.bandwidth = bandwidth
        self.maxDowntimeMs = maxDowntimeMs
        self.verify = verify
        self.timeoutS = timeoutS
    }
}

/// What the controller does to a migration in flight (an escalation, or an operator's cancel).
public enum MigrationAction: Codable, Sendable, Equatable {
    case postcopy
    case cancel
    case setDowntime(ms: Double)
}

/// Issues the per-migration tokens destinations demand (`tern run --require-token`).
public protocol MigrationTokenIssuer: Sendable {
    func token(vm: String, source: String, destination: String, lifetime: Double) throws -> String
}

/// Which hosts count as alive apart from answering the controller (etcd leases their
/// agents keep: `EtcdHostLiveness`). A host not in the set is treated as unreachable.
public protocol HostLiveness: Sendable {
    func liveHosts() throws -> Set<String>
}
