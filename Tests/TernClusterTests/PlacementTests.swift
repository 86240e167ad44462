import Foundation
import Testing
import TernCluster

func vm(_ name: String, _ memory: UInt64, state: VMRunState = .running) -> VMStatus {
    VMStatus(spec: VMSpec(name: name, kernel: "/guest", memoryMib: memory), state: state)
}

func host(_ name: String, capacity: UInt64, _ vms: [VMStatus] = []) -> HostStatus {
    HostStatus(name: name, migrationAddress: "10.0.0.1", memoryCapacityMib: capacity, cpus: 2, vms: vms, agentStartedAtUnixMs: 0)
}

struct PlacementTests {
    @Test func largestVMsGoFirstEachToTheHostWithTheMostFree() throws {
        let moves = try Placement.plan([vm("small", 64), vm("big", 512), vm("mid", 256)],
                                       candidates: [host("a", capacity: 1024), host("b", capacity: 800)], reservedMib: [:])
        #expect(moves.map(\.vm.name) == ["big", "mid", "small"])
        // a: 1024 → big → 512; b: 800 → mid → 544; small goes where most is left: b (544 > 512).
        #expect(moves.map(\.destination) == ["a", "b", "b"])
    }

    @Test func memoryPromisedToMigrationsInFlightIsNotOffered() throws {
        let moves = try Placement.plan([vm("x", 300)], candidates: [host("a", capacity: 1000), host("b", capacity: 600)],
                                       reservedMib: ["a": 800])
        #expect(moves.map(\.destination) == ["b"])
    }

    @Test func vmsArrivingCountAgainstAHostButLostOnesDoNot() {
        let status = host("a", capacity: 1000, [vm("in", 200, state: .incoming), vm("gone", 300, state: .lost), vm("left", 100, state: .departed)])
        #expect(status.committedMib == 200)
        #expect(status.freeMib == 800)
        #expect(status.residentVMs.isEmpty)
    }

    @Test func aVMWithNowhereToGoRefusesThePlanAndSaysWhatRoomThereIs() {
        #expect(throws: Placement.Refusal.noDestination(vm: "b", needsMib: 96, bestHost: "h2", bestFreeMib: 8)) {
            try Placement.plan([vm("a", 96), vm("b", 96)], candidates: [host("h2", capacity: 200, [vm("c", 96)])], reservedMib: [:])
        }
        #expect(throws: Placement.Refusal.noDestination(vm: "a", needsMib: 1, bestHost: nil, bestFreeMib: 0)) {
            try Placement.plan([vm("a", 1)], candidates: [], reservedMib: [:])
        }
    }

    @Test func balancingMovesTheLargestVMThatNarrowsTheGapUntilNoneDoes() {
        let moves = Placement.balance([host("a", capacity: 1000, [vm("v1", 100), vm("v2", 100), vm("v3", 300), vm("v4", 100)]),
                                       host("b", capacity: 1000, [vm("w", 100)]), host("c", capacity: 1000)], reservedMib: [:])
        // a 600, b 100, c 0: v3 (300) to c: 300/100/300; then v1 (100) a→b: 200/200/300; then nothing narrows c−a.
        #expect(moves.map { "\($0.vm.name)>\($0.destination)" } == ["v3>c", "v1>b"])
    }

    @Test func aBalancedClusterAndOneOfHostsOfDifferentSizesAreLeftAsTheyAre() {
        #expect(Placement.balance([host("a", capacity: 1000, [vm("x", 100)]), host("b", capacity: 1000)], reservedMib: [:]).isEmpty,
                "one VM: moving it only moves the gap")
        // The same share of each: 25% of 800 and 25% of 400.
        #expect(Placement.balance([host("a", capacity: 800, [vm("x", 200)]), host("b", capacity: 400, [vm("y", 100)])], reservedMib: [:]).isEmpty)
        #expect(Placement.balance([host("a", capacity: 1000, [vm("big", 900)]), host("b", capacity: 500)], reservedMib: [:]).isEmpty,
                "a VM that does not fit stays")
    }

    @Test func equalHostsAreChosenByNameSoThatAPlanRepeats() throws {
        let moves = try Placement.plan([vm("a", 10), vm("b", 10)], candidates: [host("z", capacity: 100), host("m", capacity: 100)], reservedMib: [:])
        #expect(moves.map(\.destination) == ["m", "z"])
    }
}

func record(_ vm: String, from source: String, to destination: String, priority: Double = 0, phase: MigrationPhase = .pending) -> MigrationRecord {
    var record = MigrationRecord(vm: vm, source: source, destination: destination, memoryMib: 64, operationId: nil, priority: priority,
                                 maxDowntimeMs: 300, createdAt: Date(timeIntervalSince1970: 0))
    record.phase = phase
    return record
}

struct AdmissionTests {
    let reachable: Set<String> = ["h1", "h2", "h3", "h4"]

    @Test func theClusterLimitCapsMigrationsAtOnce() {
        var policy = MigrationPolicy()
        policy.maxParallelMigrations = 2
        policy.maxOutboundPerHost = 10
        let pending = (1...5).map { record("v\($0)", from: "h1", to: "h\($0 % 3 + 2)", priority: Double($0)) }
        let active = [record("busy", from: "h2", to: "h3", phase: .running)]
        #expect(Admission.admit(pending: pending, active: active, policy: policy, reachable: reachable).map(\.vm) == ["v1"])
    }

    @Test func perHostLimitsSkipAMigrationWithoutHoldingBackTheNext() {
        var policy = MigrationPolicy()
        policy.maxParallelMigrations = 10
        policy.maxOutboundPerHost = 2
        policy.maxInboundPerHost = 1
        let pending = [record("a", from: "h1", to: "h2", priority: 1), record("b", from: "h1", to: "h2", priority: 2),
                       record("c", from: "h1", to: "h3", priority: 3), record("d", from: "h1", to: "h4", priority: 4),
                       record("e", from: "h2", to: "h4", priority: 5)]
        // a takes h2's inbound slot, so b waits; c takes h1's second outbound slot, so d waits; e fits.
        #expect(Admission.admit(pending: pending, active: [], policy: policy, reachable: reachable).map(\.vm) == ["a", "c", "e"])
        #expect(Admission.admit(pending: pending, active: [], policy: { var p = policy; p.maxInboundPerHost = 2; return p }(),
                                reachable: reachable).map(\.vm) == ["a", "b", "e"])
        #expect(Admission.admit(pending: Array(pending.suffix(1)), active: [], policy: policy, reachable: reachable).map(\.vm) == ["e"])
    }

    @Test func noMigrationStartsToOrFromAnUnreachableHost() {
        let pending = [record("a", from: "h1", to: "h9"), record("b", from: "h9", to: "h2"), record("c", from: "h1", to: "h2")]
        #expect(Admission.admit(pending: pending, active: [], policy: MigrationPolicy(), reachable: reachable).map(\.vm) == ["c"])
    }

    @Test func ternsOrderStartsTheLargestFirst() {
        let small = Admission.priority(for: vm("s", 64), planIndex: 0, order: .tern)
        let large = Admission.priority(for: vm("l", 512), planIndex: 1, order: .tern)
        #expect(large < small)
        #expect(Admission.priority(for: vm("s", 64), planIndex: 0, order: .fifo) < Admission.priority(for: vm("l", 512), planIndex: 1, order: .fifo))
    }
}
