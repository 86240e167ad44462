import Metrics

/// What the controller counts through swift-metrics (exported by ternd in Prometheus's
/// text format): migrations by outcome, their downtime and total time, bytes moved, and
/// failed attempts and escalations on the way.
public enum ClusterMetrics {
    public static let migrations = "tern_cluster_migrations_total"
    public static let downtime = "tern_cluster_migration_downtime_seconds"
    public static let duration = "tern_cluster_migration_duration_seconds"
    public static let bytes = "tern_cluster_migration_bytes_total"
    public static let failedAttempts = "tern_cluster_migration_failed_attempts_total"
    public static let escalations = "tern_cluster_migration_escalations_total"

    /// Bucket bounds in seconds, for the factory that exports them.
    public static let downtimeBuckets: [Double] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]
    public static let durationBuckets: [Double] = [0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800]

    static func finished(_ migration: MigrationRecord) {
        Counter(label: migrations, dimensions: [("outcome", migration.phase.rawValue)]).increment()
        guard migration.phase == .completed else { return }
        if let downtimeMs = migration.downtimeMs { Metrics.Timer(label: downtime).recordNanoseconds(Int64(downtimeMs * 1e6)) }
        if let totalMs = migration.totalMs { Metrics.Timer(label: duration).recordNanoseconds(Int64(totalMs * 1e6)) }
        Counter(label: bytes).increment(by: Int64(clamping: migration.transferredBytes))
    }
}
