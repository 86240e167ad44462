import Foundation

/// Where a VM is in its life on one host, as that host's agent sees it.
public enum VMRunState: String, Codable, Sendable {
    /// Its tern process is up but the VM is not built yet.
    case starting
    case running
    case paused
    /// An empty VM waiting for a migration to fill it.
    case incoming
    /// Its process has ended, or no longer answers (see `reason`).
    case lost
    /// Moved away by a migration that completed; kept for a while so that the controller
    /// reads the migration's outcome even if it was away when it ended.
    case departed
}

/// What happened to a migration a host sent, as its agent knows it.
public enum OutgoingState: String, Codable, Sendable {
    case running, completed, failed, cancelled
    /// The agent restarted during it and the VM's process has ended since: only the
    /// destination can say whether the VM arrived.
    case unknown
}

/// A migration's progress, reduced to what the controller decides on.
public struct MigrationProgress: Codable, Sendable, Equatable {
    public var migrationId: String
    public var state: OutgoingState
    /// The VM's migration status (setup, precopy, postcopy, completed, ...).
    public var phase: String
    public var transferredBytes: UInt64
    /// Bytes still to send as the last round left them (RAM not yet sent, or pages dirtied since).
    public var remainingBytes: UInt64
    public var rounds: Int
    public var downtimeMs: Double?
    public var totalMs: Double
    public var maxDowntimeMs: Double
    /// With --verify: whether both sides' digests matched.
    public var verified: Bool?
    public var reason: String?

    public init(migrationId: String, state: OutgoingState, phase: String, transferredBytes: UInt64 = 0, remainingBytes: UInt64 = 0,
                rounds: Int = 0, downtimeMs: Double? = nil, totalMs: Double = 0, maxDowntimeMs: Double = 0,
                verified: Bool? = nil, reason: String? = nil) {
        self.migrationId = migrationId
        self.state = state
        self.phase = phase
        self.transferredBytes = transferredBytes
        self.remainingBytes = remainingBytes
        self.rounds = rounds
        self.downtimeMs = downtimeMs
        self.totalMs = totalMs
        self.maxDowntimeMs = maxDowntimeMs
        self.verified = verified
        self.reason = reason
    }
}

/// What a VM has been doing, as its agent last sampled it (every few seconds, not while it migrates).
public struct VMActivity: Codable, Sendable, Equatable {
    /// Bytes per second the guest wrote, from the dirty log over a short window.
    public var dirtyBytesPerSecond: Double
    /// CPU time its process used per second since the sample before (1 = one core busy).
    public var cpuFraction: Double?
    /// Requests its disks served and frames its NICs carried, since it started on this host.
    public var diskOperations: Int
    public var networkFrames: Int
    public var sampledAtUnixMs: Double

    public init(dirtyBytesPerSecond: Double, cpuFraction: Double?, diskOperations: Int, networkFrames: Int, sampledAtUnixMs: Double) {
        self.dirtyBytesPerSecond = dirtyBytesPerSecond
        self.cpuFraction = cpuFraction
        self.diskOperations = diskOperations
        self.networkFrames = networkFrames
        self.sampledAtUnixMs = sampledAtUnixMs
    }
}

/// One VM on a host, as its agent reports it.
public struct VMStatus: Codable, Sendable, Equatable {
    public var spec: VMSpec
    public var state: VMRunState
    public var pid: Int32?
    /// CPU time its process has used (user and system).
    public var cpuSeconds: Double
    public var startedAtUnixMs: Double
    /// The migration that brought it here (while incoming) or is taking it away.
    public var incomingMigrationId: String?
    public var outgoing: MigrationProgress?
    public var activity: VMActivity?
    public var reason: String?

    public var name: String { spec.name }

    public init(spec: VMSpec, state: VMRunState, pid: Int32? = nil, cpuSeconds: Double = 0, startedAtUnixMs: Double = 0,
                incomingMigrationId: String? = nil, outgoing: MigrationProgress? = nil, reason: String? = nil) {
        self.spec = spec
        self.state = state
        self.pid = pid
        self.cpuSeconds = cpuSeconds
        self.startedAtUnixMs = startedAtUnixMs
        self.incomingMigrationId = incomingMigrationId
        self.outgoing = outgoing
        self.reason = reason
    }
}

/// A host as its agent reports it: capacity, and the VMs it holds.
public struct HostStatus: Codable, Sendable, Equatable {
    public var name: String
    /// The address this host's incoming migrations listen on.
    public var migrationAddress: String
    public var memoryCapacityMib: UInt64
    public var cpus: Int
    public var vms: [VMStatus]
    public var agentStartedAtUnixMs: Double

    public init(name: String, migrationAddress: String, memoryCapacityMib: UInt64, cpus: Int, vms: [VMStatus], agentStartedAtUnixMs: Double) {
        self.name = name
        self.migrationAddress = migrationAddress
        self.memoryCapacityMib = memoryCapacityMib
        self.cpus = cpus
        self.vms = vms
        self.agentStartedAtUnixMs = agentStartedAtUnixMs
    }

    /// Memory held by VMs that are here or on their way here.
    public var committedMib: UInt64 { vms.filter { $0.state != .lost && $0.state != .departed }.reduce(0) { $0 + $1.spec.memoryMib } }
    public var freeMib: UInt64 { memoryCapacityMib > committedMib ? memoryCapacityMib - committedMib : 0 }

    /// The VMs that run here (not those arriving, nor those lost).
    public var residentVMs: [VMStatus] { vms.filter { $0.state == .running || $0.state == .paused || $0.state == .starting } }
}
