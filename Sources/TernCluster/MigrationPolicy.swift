import Foundation

/// The bounds every migration the controller starts respects, after KubeVirt's
/// (5 per cluster, 2 outbound per node, 800 s per GiB, 150 s without progress),
/// with an inbound limit per host too.
public struct MigrationPolicy: Codable, Sendable, Equatable {
    public var maxParallelMigrations: Int = 5
    public var maxOutboundPerHost: Int = 2
    public var maxInboundPerHost: Int = 2
    /// Bytes per second for each migration; nil: uncapped.
    public var bandwidthPerMigration: UInt64?
    /// Seconds a migration may take per GiB of RAM (and disk) before it is cancelled.
    public var completionTimeoutPerGiB: Double = 800
    /// Seconds without a new low in the bytes left to send before `escalation` acts.
    public var progressTimeout: Double = 150
    public var escalation: Escalation = .postcopy
    public var maxDowntimeMs: Double = 300
    /// raise-downtime stops doubling here, and cancels instead.
    public var downtimeCeilingMs: Double = 2000
    /// Tries per VM (the first and its retries).
    public var maxAttempts: Int = 3
    /// Seconds before a failed migration is retried.
    public var retryDelay: Double = 2
    /// With --verify on every migration: digests of memory and device state compared on both sides.
    public var verify: Bool = false
    public var order: SchedulingOrder = .tern

    public init() {}

    /// Why this policy cannot be used, or nil.
    public var problem: String? {
        if maxParallelMigrations < 1 { return "max_parallel_migrations must be at least 1" }
        if maxOutboundPerHost < 1 || maxInboundPerHost < 1 { return "per-host limits must be at least 1" }
        if let bandwidthPerMigration, bandwidthPerMigration < 1_000_000 { return "bandwidth_per_migration must be at least 1000000 B/s" }
        if !(completionTimeoutPerGiB > 0) || !(progressTimeout > 0) { return "timeouts must be positive" }
        if !(maxDowntimeMs > 0) || downtimeCeilingMs < maxDowntimeMs { return "max_downtime_ms must be positive and at most downtime_ceiling_ms" }
        if maxAttempts < 1 { return "max_attempts must be at least 1" }
        if retryDelay < 0 { return "retry_delay must not be negative" }
        return nil
    }

    /// The completion timeout for a VM of this size.
    public func completionTimeout(memoryMib: UInt64, diskMib: UInt64 = 0) -> Double {
        max(1, completionTimeoutPerGiB * Double(memoryMib + diskMib) / 1024)
    }
}

/// The order in which pending migrations take free slots.
public enum SchedulingOrder: String, Codable, Sendable, CaseIterable {
    /// As planned (largest VM first within an evacuation, since placement packs those first).
    case fifo
    /// Tern's: the VMs that will take longest (the largest) first, so that the last slot to
    /// finish is not held by a big VM started late.
    case tern
}
