import Foundation
import Synchronization
import Testing
import TernCluster

/// Agents of a pretend cluster, in memory: migrations run until the test ends them.
final class FakeAgents: HostAgents, MigrationTokenIssuer {
    struct State {
        var hosts: [String: HostStatus] = [:]
        var down: Set<String> = []
        /// Every migration id a source was told to start, in order (repeats included).
        var started: [String] = []
        var actions: [(vm: String, action: MigrationAction)] = []
        var discarded: [String] = []
    }
    let state = Mutex(State())

    init(hosts: [String], capacity: UInt64 = 1024) {
        state.withLock { state in
            for name in hosts { state.hosts[name] = host(name, capacity: capacity) }
        }
    }

    struct Unreachable: Error {}

    func add(_ vm: VMStatus, on host: String) { state.withLock { $0.hosts[host]!.vms.append(vm) } }

    func status(of host: HostRecord) throws -> HostStatus {
        try state.withLock { state in
            if state.down.contains(host.name) { throw Unreachable() }
            return state.hosts[host.name]!
        }
    }

    func createVM(_ spec: VMSpec, on host: HostRecord) throws -> VMStatus {
        let status = VMStatus(spec: spec, state: .running)
        add(status, on: host.name)
        return status
    }

    func prepareIncoming(_ spec: VMSpec, migrationId: String, on host: HostRecord) throws -> String {
        state.withLock { state in
            if !(state.hosts[host.name]!.vms.contains { $0.incomingMigrationId == migrationId }) {
                state.hosts[host.name]!.vms.append(VMStatus(spec: spec, state: .incoming, incomingMigrationId: migrationId))
            }
        }
        return "tcp:\(host.name):7500"
    }

    func startMigration(_ request: AgentMigrateRequest, vm: String, on host: HostRecord) throws {
        state.withLock { state in
            state.started.append(request.migrationId)
            let index = state.hosts[host.name]!.vms.firstIndex { $0.name == vm }!
            if state.hosts[host.name]!.vms[index].outgoing?.migrationId != request.migrationId {
                state.hosts[host.name]!.vms[index].outgoing = MigrationProgress(migrationId: request.migrationId, state: .running, phase: "precopy",
                                                                                remainingBytes: 64 << 20, rounds: 1)
            }
        }
    }

    func migration(of vm: String, on host: HostRecord) throws -> MigrationProgress? {
        try status(of: host).vms.first { $0.name == vm }?.outgoing
    }

    func act(_ action: MigrationAction, vm: String, on host: HostRecord) throws {
        state.withLock { $0.actions.append((vm, action)) }
    }

    func discardIncoming(_ vm: String, migrationId: String, on host: HostRecord) throws {
        state.withLock { state in
            state.discarded.append(migrationId)
            state.hosts[host.name]!.vms.removeAll { $0.incomingMigrationId == migrationId && $0.state == .incoming }
        }
    }

    func token(vm: String, source: String, destination: String, lifetime: Double) throws -> String { "token-\(vm)" }

    /// Ends the running migration of `vm` on `source`: the VM arrives, or stays where it is.
    func finish(_ vm: String, on source: String, success: Bool, remaining: UInt64? = nil) {
        state.withLock { state in
            let index = state.hosts[source]!.vms.firstIndex { $0.name == vm }!
            guard var outgoing = state.hosts[source]!.vms[index].outgoing else { return }
            if let remaining {
                outgoing.remainingBytes = remaining
                state.hosts[source]!.vms[index].outgoing = outgoing
                return
            }
            outgoing.state = success ? .completed : .failed
            outgoing.reason = success ? nil : "the destination went away"
            outgoing.downtimeMs = success ? 12 : nil
            state.hosts[source]!.vms[index].outgoing = outgoing
            guard success else { return }
            state.hosts[source]!.vms[index].state = .departed
            for name in state.hosts.keys {
                if let arrived = state.hosts[name]!.vms.firstIndex(where: { $0.incomingMigrationId == outgoing.migrationId }) {
                    state.hosts[name]!.vms[arrived].state = .running
                }
            }
        }
    }

    func running(_ vm: String) -> [String] {
        state.withLock { state in state.hosts.filter { $0.value.vms.contains { $0.name == vm && $0.state == .running } }.map(\.key).sorted() }
    }
}

final class TestClock: Sendable {
    let now = Mutex(Date(timeIntervalSince1970: 1_000_000))
    func advance(_ seconds: Double) { now.withLock { $0 = $0.addingTimeInterval(seconds) } }
    var read: @Sendable () -> Date { { self.now.withLock { $0 } } }
}

struct ControllerTests {
    let clock = TestClock()
    let store = MemoryClusterStore()
    let agents = FakeAgents(hosts: ["h1", "h2", "h3"])

    func controller(_ configure: (inout MigrationPolicy) -> Void = { _ in }) throws -> ClusterController {
        var policy = MigrationPolicy()
        policy.retryDelay = 5
        configure(&policy)
        let controller = ClusterController(store: store, agents: agents, tokens: agents, policy: policy, clock: clock.read)
        for name in ["h1", "h2", "h3"] where try store.hosts().contains(where: { $0.name == name }) == false {
            try controller.addHost(HostRecord(name: name, address: "\(name):7400"))
        }
        return controller
    }

    func migration(_ vm: String) throws -> MigrationRecord { try #require(try store.migrations().first { $0.vm == vm }) }

    @Test func anEvacuationRunsWithinTheLimitsAndCompletesWhenEveryVMHasArrived() throws {
        let controller = try controller { $0.maxParallelMigrations = 2 }
        for index in 1...4 { agents.add(vm("v\(index)", 64), on: "h1") }
        let operation = try controller.evacuate("h1")
        #expect(try store.hosts().first { $0.name == "h1" }?.draining == true)
        controller.tick()
        #expect(try store.migrations().filter { $0.phase == .running }.count == 2, "two at once, as the policy allows")
        #expect(Set(try store.migrations().filter { $0.phase == .running }.map(\.destination)) == ["h2", "h3"], "one into each host")
        for round in 0..<3 {
            for running in try store.migrations().filter({ $0.phase == .running }) { agents.finish(running.vm, on: "h1", success: true) }
            controller.tick()
            #expect(try store.migrations().filter { $0.phase.isActive }.count <= 2, "round \(round)")
        }
        #expect(try store.migrations().allSatisfy { $0.phase == .completed && $0.downtimeMs == 12 })
        #expect(try store.operations().first { $0.id == operation.id }?.phase == .completed)
        for index in 1...4 { #expect(agents.running("v\(index)").count == 1 && agents.running("v\(index)") != ["h1"]) }
    }

    @Test func aFailedAttemptStopsTheWaitingDestinationAndIsRetriedAfterTheDelayThenGivenUp() throws {
        let controller = try controller { $0.maxAttempts = 2 }
        agents.add(vm("v", 64), on: "h1")
        _ = try controller.migrate("v", to: "h2")
        controller.tick()
        let first = try migration("v")
        agents.finish("v", on: "h1", success: false)
        controller.tick()
        #expect(try migration("v").phase == .pending && migration("v").attempt == 2)
        #expect(agents.state.withLock { $0.discarded } == [first.attemptID], "the empty VM waiting at h2 is stopped")
        controller.tick()
        #expect(try migration("v").phase == .pending, "not before the retry delay")
        clock.advance(6)
        controller.tick()
        #expect(try migration("v").phase == .running)
        #expect(agents.state.withLock { Set($0.started) } == [first.id, first.id + ".2"], "the retry is a new migration to the agents")
        agents.finish("v", on: "h1", success: false)
        controller.tick()
        let given = try migration("v")
        #expect(given.phase == .failed && given.reason?.hasPrefix("after 2 attempts") == true, "\(given.reason ?? "")")
        #expect(try store.operations().first?.phase == .failed)
        #expect(agents.running("v") == ["h1"], "the VM stays where it was")
    }

    @Test func noProgressForTheTimeoutSwitchesToPostcopyOnce() throws {
        let controller = try controller { $0.progressTimeout = 10; $0.escalation = .postcopy }
        agents.add(vm("v", 64), on: "h1")
        _ = try controller.migrate("v", to: "h2")
        controller.tick()
        controller.tick()
        clock.advance(6)
        agents.finish("v", on: "h1", success: false, remaining: 32 << 20)
        controller.tick()
        clock.advance(6)
        controller.tick()
        #expect(agents.state.withLock { $0.actions.isEmpty }, "a new low 6 s ago is progress")
        clock.advance(5)
        controller.tick()
        clock.advance(11)
        controller.tick()
        #expect(agents.state.withLock { $0.actions.map(\.action) } == [.postcopy])
        #expect(try migration("v").escalations == [.postcopy])
    }

    @Test func raisingTheDowntimeDoublesItUpToTheCeilingThenCancels() throws {
        let controller = try controller { $0.progressTimeout = 10; $0.escalation = .raiseDowntime; $0.maxDowntimeMs = 300; $0.downtimeCeilingMs = 1200 }
        agents.add(vm("v", 64), on: "h1")
        _ = try controller.migrate("v", to: "h2")
        controller.tick()
        for _ in 0..<4 {
            clock.advance(11)
            controller.tick()
        }
        #expect(agents.state.withLock { $0.actions.map(\.action) } == [.setDowntime(ms: 600), .setDowntime(ms: 1200), .cancel])
        #expect(try migration("v").reason?.contains("ceiling of 1200 ms") == true)
    }

    @Test func theCompletionTimeoutCancelsByTheVMsSize() throws {
        let controller = try controller { $0.completionTimeoutPerGiB = 160; $0.progressTimeout = 1000 }
        agents.add(vm("v", 64), on: "h1")
        _ = try controller.migrate("v", to: "h2")
        controller.tick()
        clock.advance(9)
        controller.tick()
        #expect(agents.state.withLock { $0.actions.isEmpty }, "64 MiB at 160 s per GiB: 10 s")
        clock.advance(2)
        controller.tick()
        #expect(agents.state.withLock { $0.actions.map(\.action) } == [.cancel])
    }

    @Test func aSecondControllerOnTheSameStoreFinishesWithoutStartingAnyVMTwice() throws {
        let first = try controller { $0.maxParallelMigrations = 1 }
        for index in 1...3 { agents.add(vm("v\(index)", 64), on: "h1") }
        _ = try first.evacuate("h1")
        first.tick()
        agents.finish(try #require(try store.migrations().first { $0.phase == .running }).vm, on: "h1", success: true)
        // The first controller stops here; its successor reads the same records.
        let second = try controller { $0.maxParallelMigrations = 1 }
        for _ in 0..<6 {
            second.tick()
            for running in try store.migrations().filter({ $0.phase == .running }) { agents.finish(running.vm, on: "h1", success: true) }
        }
        second.tick()
        #expect(try store.migrations().allSatisfy { $0.phase == .completed && $0.attempt == 1 })
        let started = agents.state.withLock { $0.started }
        #expect(Set(started).count == 3 && started.count == 3, "each VM's migration was started once: \(started)")
    }

    @Test func aMigrationWhoseSourceForgotItIsSettledByWhereTheVMIs() throws {
        let controller = try controller()
        agents.add(vm("v", 64), on: "h1")
        _ = try controller.migrate("v", to: "h2")
        controller.tick()
        agents.finish("v", on: "h1", success: true)
        // The source's agent restarted and kept no record of the VM that left.
        agents.state.withLock { $0.hosts["h1"]!.vms.removeAll { $0.name == "v" } }
        controller.tick()
        #expect(try migration("v").phase == .completed)
    }

    @Test func whileTheStoreIsDownNothingStartsAndMigrationsInFlightAreSettledAfter() throws {
        let controller = try controller { $0.maxParallelMigrations = 1 }
        agents.add(vm("a", 64), on: "h1")
        agents.add(vm("b", 64), on: "h1")
        _ = try controller.evacuate("h1")
        controller.tick()
        let running = try #require(try store.migrations().first { $0.phase == .running })
        store.failing.store(true, ordering: .relaxed)
        agents.finish(running.vm, on: "h1", success: true)
        controller.tick()
        #expect(controller.storeUnavailable != nil)
        #expect(agents.state.withLock { $0.started.count } == 1, "no migration starts without the store")
        #expect(throws: ClusterController.Refusal.self) { try controller.evacuate("h2") }
        store.failing.store(false, ordering: .relaxed)
        controller.tick()
        #expect(try migration(running.vm).phase == .completed)
        #expect(agents.state.withLock { $0.started.count } == 2, "the next one starts once the store is back")
    }

    @Test func anEvacuationOfAnUnreachableHostOrWithNowhereToGoChangesNothing() throws {
        let controller = try controller()
        agents.add(vm("huge", 2000), on: "h1")
        #expect(throws: ClusterController.Refusal.self) { try controller.evacuate("h1") }
        agents.state.withLock { _ = $0.down.insert("h3") }
        #expect(throws: ClusterController.Refusal.self) { try controller.evacuate("h3") }
        #expect(throws: ClusterController.Refusal.self) { try controller.evacuate("nope") }
        #expect(try store.migrations().isEmpty && store.operations().isEmpty)
        #expect(try store.hosts().allSatisfy { !$0.draining })
    }
}
