/// Which pending migrations may start now under the policy's limits: the cluster's, each
/// source's outbound and each destination's inbound, taken in priority order (a migration
/// that must wait does not hold back one behind it that fits).
public enum Admission {
    public static func admit(pending: [MigrationRecord], active: [MigrationRecord], policy: MigrationPolicy,
                             reachable: Set<String>) -> [MigrationRecord] {
        var running = active.count
        var outbound: [String: Int] = [:], inbound: [String: Int] = [:]
        for migration in active {
            outbound[migration.source, default: 0] += 1
            inbound[migration.destination, default: 0] += 1
        }
        var admitted: [MigrationRecord] = []
        for migration in pending.sorted(by: { ($0.priority, $0.createdAt, $0.id) < ($1.priority, $1.createdAt, $1.id) }) {
            guard running < policy.maxParallelMigrations else { break }
            guard reachable.contains(migration.source), reachable.contains(migration.destination),
                  outbound[migration.source, default: 0] < policy.maxOutboundPerHost,
                  inbound[migration.destination, default: 0] < policy.maxInboundPerHost else { continue }
            running += 1
            outbound[migration.source, default: 0] += 1
            inbound[migration.destination, default: 0] += 1
            admitted.append(migration)
        }
        return admitted
    }

    /// The priority a new migration gets under `order` (lower starts first).
    public static func priority(for vm: VMStatus, planIndex: Int, order: SchedulingOrder) -> Double {
        switch order {
        case .fifo: Double(planIndex)
        // Longest first (by memory), the plan's order among equals.
        case .tern: -Double(vm.spec.memoryMib) + Double(planIndex) * 1e-6
        }
    }
}
