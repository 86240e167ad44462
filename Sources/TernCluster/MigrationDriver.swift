import Foundation
import Logging
import Metrics

/// Takes one migration a step further each time the controller looks: readies the
/// destination and starts the source, follows its progress, applies the timeouts, and
/// settles its outcome (a retry, a failure, or the VM on its new host). It decides from
/// what the agents report, so a record left in any phase by a stopped controller is
/// picked up where it stood.
struct MigrationDriver {
    let agents: any HostAgents
    let tokens: any MigrationTokenIssuer
    let policy: MigrationPolicy
    let logger: Logger

    struct View {
        var hosts: [String: HostRecord]
        var statuses: [String: HostStatus]
        func vm(_ name: String, on host: String) -> VMStatus? { statuses[host]?.vms.first { $0.name == name } }
    }

    /// Starts a pending migration (or finishes starting one a controller left in `.starting`).
    func start(_ migration: inout MigrationRecord, view: View, now: Date, save: (MigrationRecord) throws -> Void) throws {
        guard let source = view.hosts[migration.source], let destination = view.hosts[migration.destination] else {
            return try settle(&migration, failure: "its source or destination is no longer a cluster host", retry: false, view: view, now: now, save: save)
        }
        if arrived(migration, view: view) { return try complete(&migration, progress: nil, now: now, save: save) }
        guard let vm = view.vm(migration.vm, on: migration.source), vm.state == .running || vm.state == .paused else {
            return try settle(&migration, failure: "VM '\(migration.vm)' is not running on \(migration.source)", retry: false, view: view, now: now, save: save)
        }
        if migration.phase == .pending {
            migration.phase = .starting
            migration.startedAt = now
            migration.lastProgressAt = now
            try save(migration)
        }
        do {
            let address = try agents.prepareIncoming(vm.spec, migrationId: migration.attemptID, on: destination)
            migration.destinationAddress = address
            let lifetime = policy.completionTimeout(memoryMib: migration.memoryMib) + 60
            let token = try tokens.token(vm: migration.vm, source: migration.source, destination: migration.destination, lifetime: lifetime)
            let request = AgentMigrateRequest(migrationId: migration.attemptID, destination: address, destinationName: migration.destination,
                                              token: token, bandwidth: policy.bandwidthPerMigration, maxDowntimeMs: migration.maxDowntimeMs,
                                              verify: policy.verify, timeoutS: policy.completionTimeout(memoryMib: migration.memoryMib) * 2)
            try agents.startMigration(request, vm: migration.vm, on: source)
        } catch {
            return try settle(&migration, failure: "could not start: \(error)", retry: true, view: view, now: now, save: save)
        }
        migration.phase = .running
        try save(migration)
        logger.info("migration started", metadata: ["vm": "\(migration.vm)", "from": "\(migration.source)", "to": "\(migration.destination)",
                                                   "attempt": "\(migration.attempt)"])
    }

    /// Follows a running migration.
    func advance(_ migration: inout MigrationRecord, view: View, now: Date, save: (MigrationRecord) throws -> Void) throws {
        guard let source = view.hosts[migration.source] else {
            return try settle(&migration, failure: "its source is no longer a cluster host", retry: false, view: view, now: now, save: save)
        }
        // A source out of reach may still be sending: wait for it rather than guess.
        guard view.statuses[migration.source] != nil else { return }
        let progress: MigrationProgress?
        do { progress = try agents.migration(of: migration.vm, on: source) } catch { return }
        guard let progress, progress.migrationId == migration.attemptID, progress.state != .unknown else {
            if arrived(migration, view: view) { return try complete(&migration, progress: nil, now: now, save: save) }
            if view.statuses[migration.destination] == nil { return }
            return try settle(&migration, failure: "the source has no record of it and the VM did not arrive", retry: true, view: view, now: now, save: save)
        }
        switch progress.state {
        case .completed: return try complete(&migration, progress: progress, now: now, save: save)
        case .failed, .cancelled, .unknown:
            return try settle(&migration, failure: progress.reason ?? "the source reports it \(progress.state.rawValue)", retry: true,
                              view: view, now: now, save: save)
        case .running: break
        }
        var changed = migration.transferredBytes != progress.transferredBytes || migration.remainingBytes != progress.remainingBytes
        migration.transferredBytes = progress.transferredBytes
        migration.remainingBytes = progress.remainingBytes
        if progress.rounds > 0, migration.lowestRemainingBytes.map({ progress.remainingBytes < $0 }) ?? true {
            migration.lowestRemainingBytes = progress.remainingBytes
            migration.lastProgressAt = now
            changed = true
        }
        if let action = timeoutAction(for: migration, now: now) {
            do {
                try agents.act(action.action, vm: migration.vm, on: source)
                logger.notice("migration escalated", metadata: ["vm": "\(migration.vm)", "escalation": "\(action.escalation.rawValue)", "why": "\(action.why)"])
                migration.escalations.append(action.escalation)
                Counter(label: ClusterMetrics.escalations, dimensions: [("escalation", action.escalation.rawValue)]).increment()
                if case .setDowntime(let ms) = action.action { migration.maxDowntimeMs = ms }
                if action.escalation == .cancel { migration.reason = action.why }
                migration.lastProgressAt = now
                changed = true
            } catch {
                logger.warning("escalation failed", metadata: ["vm": "\(migration.vm)", "error": "\(error)"])
            }
        }
        if changed { try save(migration) }
    }

    /// What the completion and progress timeouts call for now, if anything.
    func timeoutAction(for migration: MigrationRecord, now: Date) -> (action: MigrationAction, escalation: Escalation, why: String)? {
        guard !migration.escalations.contains(.cancel) else { return nil }
        let limit = policy.completionTimeout(memoryMib: migration.memoryMib)
        if let started = migration.startedAt, now.timeIntervalSince(started) > limit {
            return (.cancel, .cancel, String(format: "completion timeout: not done in %.0f s (%.0f s per GiB)", limit, policy.completionTimeoutPerGiB))
        }
        guard let since = migration.lastProgressAt, now.timeIntervalSince(since) > policy.progressTimeout else { return nil }
        let why = String(format: "no progress in %.0f s", policy.progressTimeout)
        switch policy.escalation {
        case .postcopy:
            // Post-copy always ends: once switched, the progress timeout has nothing left to do.
            return migration.escalations.contains(.postcopy) ? nil : (.postcopy, .postcopy, why)
        case .raiseDowntime:
            let raised = migration.maxDowntimeMs * 2
            return raised <= policy.downtimeCeilingMs ? (.setDowntime(ms: raised), .raiseDowntime, why)
                : (.cancel, .cancel, why + String(format: ", and the downtime target is at its ceiling of %.0f ms", policy.downtimeCeilingMs))
        case .cancel:
            return (.cancel, .cancel, why)
        }
    }

    /// Whether the VM runs on the destination, brought there by this attempt.
    private func arrived(_ migration: MigrationRecord, view: View) -> Bool {
        guard let vm = view.vm(migration.vm, on: migration.destination) else { return false }
        return (vm.state == .running || vm.state == .paused) && vm.incomingMigrationId == migration.attemptID
    }

    private func complete(_ migration: inout MigrationRecord, progress: MigrationProgress?, now: Date, save: (MigrationRecord) throws -> Void) throws {
        migration.phase = .completed
        migration.finishedAt = now
        if let progress {
            migration.transferredBytes = progress.transferredBytes
            migration.remainingBytes = 0
            migration.downtimeMs = progress.downtimeMs
            migration.totalMs = progress.totalMs
            migration.verified = progress.verified
        }
        try save(migration)
        ClusterMetrics.finished(migration)
        logger.info("migration completed", metadata: ["vm": "\(migration.vm)", "to": "\(migration.destination)",
                                                     "downtime_ms": "\(migration.downtimeMs.map { String(format: "%.1f", $0) } ?? "?")"])
    }

    /// A failed attempt: the waiting destination is stopped, and the migration is retried
    /// after the policy's delay or, its attempts spent, given up (the VM stays where it is).
    func settle(_ migration: inout MigrationRecord, failure: String, retry: Bool, view: View, now: Date,
                save: (MigrationRecord) throws -> Void) throws {
        if let destination = view.hosts[migration.destination], migration.phase != .pending {
            do { try agents.discardIncoming(migration.vm, migrationId: migration.attemptID, on: destination) } catch {
                logger.warning("could not stop the waiting destination", metadata: ["vm": "\(migration.vm)", "error": "\(error)"])
            }
        }
        let reason = migration.escalations.contains(.cancel) ? (migration.reason ?? failure) : failure
        migration.failures.append(reason)
        Counter(label: ClusterMetrics.failedAttempts).increment()
        logger.warning("migration attempt failed", metadata: ["vm": "\(migration.vm)", "attempt": "\(migration.attempt)", "why": "\(reason)"])
        if retry && migration.attempt < policy.maxAttempts {
            migration.attempt += 1
            migration.phase = .pending
            migration.notBefore = now.addingTimeInterval(policy.retryDelay)
            migration.escalations = []
            migration.maxDowntimeMs = policy.maxDowntimeMs
            migration.transferredBytes = 0
            migration.remainingBytes = nil
            migration.lowestRemainingBytes = nil
            migration.destinationAddress = nil
            migration.reason = nil
        } else {
            migration.phase = .failed
            migration.finishedAt = now
            migration.reason = migration.attempt > 1 ? "after \(migration.attempt) attempts: \(reason)" : reason
        }
        try save(migration)
        if migration.phase == .failed { ClusterMetrics.finished(migration) }
    }
}
