import Foundation
import Glibc
import Synchronization
import Testing
import TernAPI
import TernCluster
import TernMachine

/// A cluster made by scripts/cluster.sh for one test: a LAN of host namespaces with an agent
/// each, and a controller (SQLite) in the client namespace; removed with it.
final class TestCluster {
    let prefix: String
    let directory: String
    let hosts: Int
    private static let made = Atomic<Int>(0)
    static var binaryDirectory: String { URL(fileURLWithPath: TernProcess.binary).deletingLastPathComponent().path }

    init(hosts: Int = 4, agentMemory: String = "2G", controller: String = "", etcd: Bool = false, controllers: Int = 1) throws {
        prefix = "tc\(getpid() % 10000)n\(Self.made.add(1, ordering: .relaxed).newValue)"
        directory = NSTemporaryDirectory() + "tern-cluster-\(prefix)"
        self.hosts = hosts
        try? FileManager.default.removeItem(atPath: directory)
        let up = shell("""
            LAN_HOSTS=\(hosts) AGENT_MEMORY=\(agentMemory) AGENT_ARGS='--sample-interval 1' CONTROLLER_ARGS='--interval 0.2 \(controller)' TERN_BIN_DIR=\(Self.binaryDirectory) \
            \(etcd ? "ETCD=1" : "") CONTROLLERS=\(controllers) bash \(TernProcess.repository.path)/scripts/cluster.sh up \(prefix) \(directory)
            """)
        guard up.status == 0 else { throw ConfigurationError("cluster.sh up failed: \(up.output)") }
    }

    deinit {
        shell("bash \(TernProcess.repository.path)/scripts/cluster.sh down \(prefix) \(directory)")
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// The controller `tern cluster` and the helpers below talk to (1, or 2 once the first is gone).
    var controller = 1
    var controllerSocket: String { directory + (controller == 1 ? "/controller.sock" : "/controller\(controller).sock") }

    /// `tern cluster SUBCOMMAND ARGS --controller SOCKET`.
    @discardableResult
    func cluster(_ subcommand: String, _ arguments: String = "") -> (status: Int32, output: String) {
        shell("\(TernProcess.binary) cluster \(subcommand) --controller \(controllerSocket) \(arguments)", timeout: 180)
    }

    func get<T: Decodable>(_ type: T.Type, _ uri: String) throws -> T {
        let response = try APIClient(socketPath: controllerSocket).request(.GET, uri, timeout: .seconds(10))
        guard response.status == 200 else { throw ConfigurationError("GET \(uri): \(response.status) \(response.errorMessage ?? "")") }
        return try ClusterJSON.decoder.decode(type, from: response.body)
    }

    func migrations() throws -> [MigrationRecord] { try get([MigrationRecord].self, "/v1/migrations") }
    func placements() throws -> [ControllerAPI.PlacedVM] { try get([ControllerAPI.PlacedVM].self, "/v1/vms") }
    func hostViews() throws -> [ControllerAPI.HostView] { try get([ControllerAPI.HostView].self, "/v1/hosts") }

    func createVMs(_ names: [String], on host: String, cmdline: String, memory: String = "64M") throws {
        for name in names {
            let created = cluster("create-vm", "\(name) --host \(host) --kernel \(TernProcess.guest) --memory \(memory) --cmdline '\(cmdline)'")
            guard created.status == 0 else { throw ConfigurationError("create-vm \(name): \(created.output)") }
        }
        try waitFor("the VMs run on \(host)", timeout: 30) {
            let running = try self.placements().filter { $0.host == host && $0.vm.state == .running }.map(\.vm.name)
            return Set(names).isSubset(of: Set(running))
        }
    }

    /// The API socket of `vm` as `host`'s agent started it.
    func vmSocket(_ vm: String, on host: String) -> String { "\(directory)/\(host)/vms/\(vm).sock" }

    func guestStatus(_ vm: String, on host: String) throws -> TestGuestStatus? {
        let response = try APIClient(socketPath: vmSocket(vm, on: host))
            .request(.GET, "/v1/vm/memory?address=\(TestGuestStatus.address.rawValue)&length=\(TestGuestStatus.size)")
        guard response.status == 200 else { return nil }
        return TestGuestStatus(bytes: [UInt8](response.body))
    }

    func pid(of process: String) -> Int32? {
        (try? String(contentsOfFile: "\(directory)/\(process).pid", encoding: .utf8)).flatMap { Int32($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
    }

    /// SIGKILL to `ip netns exec`'s child, ternd itself (the pid file holds the exec'd process).
    func kill(_ process: String) {
        guard let pid = pid(of: process) else { return }
        Glibc.kill(pid, SIGKILL)
        for _ in 0..<100 where Glibc.kill(pid, 0) == 0 { usleep(20_000) }
    }

    func restartAgent(_ host: Int) throws {
        let started = shell("TERN_BIN_DIR=\(Self.binaryDirectory) bash \(TernProcess.repository.path)/scripts/cluster.sh agent \(prefix) \(directory) \(host)")
        guard started.status == 0 else { throw ConfigurationError("agent h\(host): \(started.output)") }
    }

    func restartController(_ arguments: String) throws {
        let started = shell("""
            CONTROLLER_ARGS='--interval 0.2 \(arguments)' TERN_BIN_DIR=\(Self.binaryDirectory) \
            bash \(TernProcess.repository.path)/scripts/cluster.sh controller \(prefix) \(directory)
            """)
        guard started.status == 0 else { throw ConfigurationError("controller: \(started.output)") }
    }

    /// How many times `vm` was started to receive a migration, on all hosts (from the agents' VM logs).
    func incomingStarts(of vm: String) -> Int {
        (1...hosts).reduce(0) { total, host in
            let log = (try? String(contentsOfFile: "\(directory)/h\(host)/vms/\(vm).log", encoding: .utf8)) ?? ""
            return total + log.components(separatedBy: "waiting for an incoming migration on").count - 1
        }
    }

    /// A command in the client's namespace, where the controller runs.
    func inClient(_ command: String) -> (status: Int32, output: String) { shell("ip netns exec \(prefix)-cl \(command)", timeout: 60) }

    /// The controller's /metrics (its read-only listener), as samples by series.
    func controllerMetrics() -> [String: Double] { parsePrometheus(inClient("curl -sf http://127.0.0.1:8080/metrics").output) }

    /// Host N's agent's /metrics, over mutual TLS with the controller's certificate.
    func agentMetrics(_ host: Int) -> [String: Double] {
        let certs = directory + "/certs"
        return parsePrometheus(inClient("curl -sf --cacert \(certs)/ca/ca.pem --cert \(certs)/controller/cert.pem --key \(certs)/controller/key.pem "
                                        + "--resolve h\(host):7400:10.240.0.\(host) https://h\(host):7400/metrics").output)
    }

    var controllerLog: String { (try? String(contentsOfFile: directory + "/controller.log", encoding: .utf8)) ?? "" }
}

func waitFor(_ what: String, timeout: Double, _ condition: () throws -> Bool) throws {
    let deadline = Date(timeIntervalSinceNow: timeout)
    while Date() < deadline {
        if (try? condition()) == true { return }
        usleep(100_000)
    }
    if try condition() { return }
    throw ConfigurationError("timed out after \(timeout) s waiting until \(what)")
}

/// Prometheus's text format, strictly: every line a comment or `series value`, else the parse fails (an empty result).
func parsePrometheus(_ text: String) -> [String: Double] {
    var samples: [String: Double] = [:]
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
            Issue.record("not a Prometheus sample: \(line)")
            return [:]
        }
        samples[String(line[..<space])] = value
    }
    return samples
}

/// The most migrations that ran at once among `records`, by the controller's start and finish times.
func peakConcurrency(_ records: [MigrationRecord]) -> Int {
    let events = records.compactMap { record -> [(Date, Int)]? in
        guard let start = record.startedAt, let end = record.finishedAt else { return nil }
        return [(start, 1), (end, -1)]
    }.flatMap { $0 }.sorted { ($0.0, $0.1) < ($1.0, $1.1) }
    var current = 0, peak = 0
    for (_, change) in events {
        current += change
        peak = max(peak, current)
    }
    return peak
}

@Suite(.serialized, .enabled(if: TestLAN.canCreate, "needs network namespaces and bridges (root, iproute2)"))
struct ClusterTests {
    static let working = "fill=16 dirty=8 pattern=random rate=2 verify=2"

    /// Every VM's guest still works and its own checksum holds, where the cluster says it is.
    func expectGuestsHealthy(_ cluster: TestCluster, _ names: [String]) throws {
        let placements = try cluster.placements()
        for name in names {
            let holders = placements.filter { $0.vm.name == name && $0.vm.state == .running }
            #expect(holders.count == 1, "\(name) runs on exactly one host: \(holders.map(\.host))")
            guard let host = holders.first?.host, let before = try cluster.guestStatus(name, on: host) else {
                Issue.record("no guest status for \(name)")
                continue
            }
            usleep(300_000)
            let after = try #require(try cluster.guestStatus(name, on: host))
            #expect(after.errors == 0, "\(name)'s guest found no checksum mismatch")
            #expect(after.iterations > before.iterations, "\(name)'s guest is still working on \(host)")
        }
    }

    @Test func evacuatingAHostMovesEveryWorkingVMWithinTheLimits() throws {
        let cluster = try TestCluster(controller: "--max-parallel 2 --max-outbound 3 --max-inbound 1 --bandwidth 20M --verify")
        let names = (1...6).map { "vm\($0)" }
        try cluster.createVMs(names, on: "h1", cmdline: Self.working)
        let evacuation = cluster.cluster("evacuate", "h1 --wait")
        #expect(evacuation.status == 0, "the evacuation completes: \(evacuation.output)")

        let migrations = try cluster.migrations()
        #expect(migrations.count == 6)
        #expect(migrations.allSatisfy { $0.phase == .completed && $0.attempt == 1 }, "\(migrations.map { ($0.vm, $0.phase, $0.failures) })")
        #expect(migrations.allSatisfy { $0.verified == true }, "--verify: both sides' digests matched for every VM")
        #expect(Set(migrations.map(\.vm)) == Set(names))
        // The limits bind: two at once in the cluster, never two into one host.
        #expect(peakConcurrency(migrations) == 2, "the cluster ran at most (and, with six to move, exactly) 2 at once")
        for host in ["h2", "h3", "h4"] {
            #expect(peakConcurrency(migrations.filter { $0.destination == host }) <= 1, "at most one migration into \(host) at once")
        }
        // Placement by free memory spreads six equal VMs two to a host.
        #expect(Dictionary(grouping: migrations, by: \.destination).mapValues(\.count) == ["h2": 2, "h3": 2, "h4": 2])
        let h1 = try #require(try cluster.hostViews().first { $0.name == "h1" })
        #expect(h1.draining && h1.vms == 0, "h1 is empty and takes no VMs")
        try expectGuestsHealthy(cluster, names)
        #expect(cluster.cluster("hosts").output.contains("draining"))

        let metrics = cluster.controllerMetrics()
        #expect(metrics["tern_cluster_migrations_total{outcome=\"completed\"}"] == 6)
        #expect(metrics["tern_cluster_migration_downtime_seconds_count"] == 6)
        #expect(metrics["tern_cluster_migration_duration_seconds_count"] == 6)
        #expect((metrics["tern_cluster_migration_bytes_total"] ?? 0) > Double(6 * 16 << 20), "at least each guest's 16 MiB of data")
        #expect(metrics["tern_cluster_vms{host=\"h1\"}"] == 0 && metrics["tern_cluster_vms{host=\"h2\"}"] == 2)
        #expect(metrics["tern_cluster_hosts{state=\"draining\"}"] == 1)
        let source = cluster.agentMetrics(1), destination = cluster.agentMetrics(2)
        #expect(source["tern_agent_migrations_out_total{outcome=\"completed\"}"] == 6, "\(source)")
        #expect(destination["tern_agent_vms{host=\"h2\",state=\"running\"}"] == 2, "\(destination)")
        #expect(destination["tern_agent_memory_committed_bytes{host=\"h2\"}"] == Double(128 << 20))

        // The answers match docs/cluster-api.yaml.
        var files: [String] = []
        for path in ["/v1/hosts", "/v1/vms", "/v1/migrations", "/v1/operations"] {
            let file = cluster.directory + "/answer" + path.replacingOccurrences(of: "/", with: "-") + ".json"
            try APIClient(socketPath: cluster.controllerSocket).request(.GET, path).body.write(to: URL(fileURLWithPath: file))
            files.append("\(path)=\(file)")
        }
        let check = shell("python3 \(TernProcess.repository.path)/tools/check_cluster_api.py \(TernProcess.repository.path)/docs/cluster-api.yaml "
                          + files.joined(separator: " "))
        #expect(check.status == 0, "\(check.output)")
    }

    @Test func theWebPageShowsHostsAndMigrationsInAHeadlessBrowser() throws {
        let chromium = shell("command -v chromium").output.trimmingCharacters(in: .whitespacesAndNewlines)
        try #require(!chromium.isEmpty, "chromium is not installed (scripts/setup.sh installs it)")
        // p1 dirties flat out against a 2 MB/s cap: its migration stays in pre-copy, in flight, until the
        // progress timeout switches it to post-copy, 15 s after it last gained (ample for two renderings).
        let cluster = try TestCluster(hosts: 2, controller: "--bandwidth 2M --max-parallel 1 --progress-timeout 15 --escalation postcopy")
        try cluster.createVMs(["p1"], on: "h1", cmdline: "fill=4 dirty=16 pattern=random verify=0")
        try cluster.createVMs(["p2"], on: "h1", cmdline: "fill=4")
        func render() throws -> (dom: String, log: String) {
            let log = cluster.directory + "/chromium.log"
            let dom = cluster.inClient("\(chromium) --headless --no-sandbox --disable-gpu --virtual-time-budget=2500 --enable-logging=stderr --v=0 "
                                       + "--user-data-dir=\(cluster.directory)/chromium --dump-dom http://127.0.0.1:8080/ 2>\(log)")
            #expect(dom.status == 0)
            return (dom.output, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
        }
        #expect(cluster.cluster("evacuate", "h1").status == 0)
        try waitFor("p1's migration is sending", timeout: 30) {
            try cluster.migrations().contains { $0.vm == "p1" && $0.phase == .running && $0.transferredBytes > 0 }
        }
        let during = try render()
        #expect(during.dom.contains(#"data-host="h1" data-state="draining""#), "the page shows h1 draining")
        #expect(during.dom.contains(#"data-migration="p1" data-phase="running""#), "and p1's migration in flight")
        #expect(try cluster.migrations().first { $0.vm == "p1" }?.escalations.isEmpty == true, "still in pre-copy when rendered")
        try waitFor("the evacuation completes", timeout: 120) { try cluster.migrations().allSatisfy { $0.phase == .completed } }
        let after = try render()
        for name in ["p1", "p2"] { #expect(after.dom.contains(#"data-migration="\#(name)" data-phase="completed""#)) }
        #expect(after.dom.contains(#"data-vm="p1""#) && after.dom.contains("2 hosts, 2 VMs, 0 migrations in flight"))
        #expect(after.dom.contains(#"<div id="status" class="ok"></div>"#), "the page reached the controller")
        for log in [during.log, after.log] {
            #expect(!log.contains("Uncaught") && !log.contains(":CONSOLE("), "the page's script ran without errors or console output")
        }
    }

    @Test func anEvacuationWithNowhereToGoIsRefusedAndNothingMoves() throws {
        let cluster = try TestCluster(hosts: 2, agentMemory: "200M")
        try cluster.createVMs(["big1", "big2"], on: "h1", cmdline: "fill=8", memory: "96M")
        try cluster.createVMs(["other"], on: "h2", cmdline: "fill=8", memory: "96M")
        let refused = cluster.cluster("evacuate", "h1")
        #expect(refused.status != 0)
        #expect(refused.output.contains("nowhere to put VM"), "the reason is given: \(refused.output)")
        // Largest first, each where most is free: big1 takes h2's 104 MiB, leaving 8 for big2.
        #expect(refused.output.contains("'big2': it needs 96 MiB") && refused.output.contains("8 MiB (h2)"),
                "with the room there is: \(refused.output)")
        #expect(try cluster.migrations().isEmpty, "no migration was planned")
        let h1 = try #require(try cluster.hostViews().first { $0.name == "h1" })
        #expect(!h1.draining, "a refused evacuation does not drain the host")
        #expect(try cluster.placements().filter { $0.host == "h1" && $0.vm.state == .running }.count == 2)
    }

    @Test func aKilledAgentsVMsKeepRunningAndItsSuccessorAdoptsThem() throws {
        let cluster = try TestCluster(hosts: 2)
        try cluster.createVMs(["a", "b"], on: "h1", cmdline: Self.working)
        let pids = try cluster.placements().filter { $0.host == "h1" }.compactMap(\.vm.pid)
        let before = try #require(try cluster.guestStatus("a", on: "h1"))
        cluster.kill("h1/agent")
        try waitFor("the controller sees h1 unreachable", timeout: 10) {
            try cluster.hostViews().first { $0.name == "h1" }?.reachable == false
        }
        usleep(500_000)
        let during = try #require(try cluster.guestStatus("a", on: "h1"), "the VM's own API answers without its agent")
        #expect(during.iterations > before.iterations, "the guest kept working while its agent was down")

        try cluster.restartAgent(1)
        try waitFor("the new agent reports both VMs running", timeout: 10) {
            try cluster.placements().filter { $0.host == "h1" && $0.vm.state == .running }.count == 2
        }
        #expect(Set(try cluster.placements().filter { $0.host == "h1" }.compactMap(\.vm.pid)) == Set(pids), "the same processes, adopted")
        let moved = cluster.cluster("migrate", "a --to h2 --wait")
        #expect(moved.status == 0, "an adopted VM migrates: \(moved.output)")
        try expectGuestsHealthy(cluster, ["a", "b"])
    }

    @Test func aControllerKilledMidEvacuationIsResumedByItsSuccessorWithoutMigratingAnyVMTwice() throws {
        let options = "--max-parallel 1 --bandwidth 10M"
        let cluster = try TestCluster(hosts: 3, controller: options)
        let names = ["r1", "r2", "r3", "r4"]
        try cluster.createVMs(names, on: "h1", cmdline: Self.working)
        #expect(cluster.cluster("evacuate", "h1").status == 0)
        try waitFor("one migration has completed and the next runs", timeout: 60) {
            let migrations = try cluster.migrations()
            return migrations.contains { $0.phase == .completed } && migrations.contains { $0.phase == .running }
        }
        cluster.kill("controller")
        usleep(1_500_000)
        try cluster.restartController(options)
        try waitFor("the evacuation completes under the new controller", timeout: 120) {
            try cluster.get([OperationRecord].self, "/v1/operations").first?.phase == .completed
        }
        let migrations = try cluster.migrations()
        #expect(migrations.count == 4 && migrations.allSatisfy { $0.phase == .completed && $0.attempt == 1 },
                "\(migrations.map { ($0.vm, $0.phase, $0.attempt, $0.failures) })")
        for name in names {
            #expect(cluster.incomingStarts(of: name) == 1, "\(name) was received once")
        }
        try expectGuestsHealthy(cluster, names)
    }

    @Test func aFailedMigrationLeavesTheVMOnItsHostAndIsRetried() throws {
        let cluster = try TestCluster(hosts: 2, controller: "--bandwidth 5M --retry-delay 1")
        try cluster.createVMs(["f"], on: "h1", cmdline: "fill=32 dirty=8 pattern=random rate=2 verify=2")
        #expect(cluster.cluster("migrate", "f --to h2").status == 0)
        // The destination dies mid-copy: the first attempt fails.
        try waitFor("the first attempt is sending", timeout: 30) {
            try cluster.migrations().first.map { $0.phase == .running && $0.transferredBytes > 4 << 20 } ?? false
        }
        let record = try JSONDecoder().decode(IncomingRecordPid.self, from: Data(contentsOf: URL(fileURLWithPath: "\(cluster.directory)/h2/vms/f.json")))
        Glibc.kill(record.process.pid, SIGKILL)
        try waitFor("the retry completes", timeout: 90) { try cluster.migrations().first?.phase == .completed }
        let migration = try #require(try cluster.migrations().first)
        #expect(migration.attempt == 2 && migration.failures.count == 1, "one failure, then a retry: \(migration.failures)")
        try expectGuestsHealthy(cluster, ["f"])
    }

    @Test func balanceEvensOutTheHostsAndTheAgentsReportEachVMsActivity() throws {
        let cluster = try TestCluster(hosts: 3)
        try cluster.createVMs(["idle1", "idle2", "idle3"], on: "h1", cmdline: "fill=8")
        try cluster.createVMs(["busy"], on: "h1", cmdline: "fill=8 dirty=32 pattern=seq rate=20 verify=0")
        // Dirty rates from the dirty log: the busy guest paces 20 MB/s, the idle ones write their heartbeat only.
        try waitFor("every VM's activity has been sampled twice", timeout: 20) {
            try cluster.placements().allSatisfy { $0.vm.activity?.cpuFraction != nil }
        }
        let activity = Dictionary(uniqueKeysWithValues: try cluster.placements().map { ($0.vm.name, try #require($0.vm.activity)) })
        #expect(activity["busy"]!.dirtyBytesPerSecond > 5e6, "\(activity["busy"]!)")
        #expect(activity["busy"]!.dirtyBytesPerSecond < 30e6, "no more than the guest's pace allows: \(activity["busy"]!)")
        for name in ["idle1", "idle2", "idle3"] { #expect(activity[name]!.dirtyBytesPerSecond < 1e6, "\(activity[name]!)") }
        #expect(cluster.cluster("vms").output.contains("DIRTY MB/s"))

        let balance = cluster.cluster("balance", "--wait")
        #expect(balance.status == 0, "\(balance.output)")
        let counts = Dictionary(grouping: try cluster.placements().filter { $0.vm.state == .running }, by: \.host).mapValues(\.count)
        #expect(counts == ["h1": 2, "h2": 1, "h3": 1], "four equal VMs end two, one and one: \(counts)")
        #expect(try cluster.migrations().count == 2)
        let again = cluster.cluster("balance")
        #expect(again.status == 0 && again.output.contains("already balanced"), "\(again.output)")
        #expect(try cluster.migrations().count == 2, "a balanced cluster is left alone")
        try expectGuestsHealthy(cluster, ["idle1", "idle2", "idle3", "busy"])
    }

    struct IncomingRecordPid: Decodable {
        struct Process: Decodable { var pid: Int32 }
        var process: Process
    }

    @Test func aMigrationThatMakesNoProgressEscalatesToPostcopyAndCompletes() throws {
        // Dirtying flat out against a 2 MB/s cap: pre-copy never gains on the guest.
        let cluster = try TestCluster(hosts: 2, controller: "--bandwidth 2M --progress-timeout 2 --escalation postcopy")
        try cluster.createVMs(["hot"], on: "h1", cmdline: "fill=16 dirty=16 pattern=random verify=0")
        let moved = cluster.cluster("migrate", "hot --to h2 --wait")
        #expect(moved.status == 0, "\(moved.output)")
        let migration = try #require(try cluster.migrations().first)
        #expect(migration.phase == .completed)
        #expect(migration.escalations == [.postcopy], "the progress timeout switched it to post-copy")
        #expect(try cluster.placements().contains { $0.vm.name == "hot" && $0.host == "h2" && $0.vm.state == .running })
    }

    @Test func aMigrationThatMakesNoProgressIsCancelledWhenThePolicySaysSoAndTheVMStays() throws {
        let cluster = try TestCluster(hosts: 2, controller: "--bandwidth 2M --progress-timeout 2 --escalation cancel --max-attempts 1")
        try cluster.createVMs(["stay"], on: "h1", cmdline: "fill=16 dirty=16 pattern=random verify=2")
        let moved = cluster.cluster("migrate", "stay --to h2 --wait")
        #expect(moved.status != 0)
        #expect(moved.output.contains("no progress in 2 s"), "\(moved.output)")
        let migration = try #require(try cluster.migrations().first)
        #expect(migration.phase == .failed && migration.escalations == [.cancel])
        try waitFor("the waiting destination is gone", timeout: 10) {
            try !cluster.placements().contains { $0.host == "h2" }
        }
        try expectGuestsHealthy(cluster, ["stay"])
    }

    @Test func withEtcdASecondControllerTakesOverAKilledLeaderAndFinishesWithoutMigratingAnyVMTwice() throws {
        let cluster = try TestCluster(hosts: 3, controller: "--max-parallel 1 --bandwidth 10M", etcd: true, controllers: 2)
        #expect(cluster.cluster("status").output.contains("controller c1 (etcd:http://10.240.0.100:2379): leading"))
        cluster.controller = 2
        #expect(cluster.cluster("status").output.contains("following c1"), "\(cluster.cluster("status").output)")
        #expect(cluster.cluster("evacuate", "h1").status != 0, "a follower refuses to change the cluster")
        cluster.controller = 1
        let names = ["e1", "e2", "e3", "e4"]
        try cluster.createVMs(names, on: "h1", cmdline: Self.working)
        #expect(try cluster.hostViews().allSatisfy { $0.leaseAlive == true }, "every agent keeps its liveness lease")
        #expect(cluster.cluster("evacuate", "h1").status == 0)
        try waitFor("one migration has completed and the next runs", timeout: 60) {
            let migrations = try cluster.migrations()
            return migrations.contains { $0.phase == .completed } && migrations.contains { $0.phase == .running }
        }
        cluster.kill("controller")
        cluster.controller = 2
        try waitFor("c2 leads once c1's lease has expired", timeout: 15) { cluster.cluster("status").output.contains("c2 (etcd") && cluster.cluster("status").output.contains("leading") }
        try waitFor("the evacuation completes under c2", timeout: 120) {
            try cluster.get([OperationRecord].self, "/v1/operations").first?.phase == .completed
        }
        let migrations = try cluster.migrations()
        #expect(migrations.count == 4 && migrations.allSatisfy { $0.phase == .completed && $0.attempt == 1 },
                "\(migrations.map { ($0.vm, $0.phase, $0.attempt, $0.failures) })")
        for name in names { #expect(cluster.incomingStarts(of: name) == 1, "\(name) was received once") }
        try expectGuestsHealthy(cluster, names)
    }

    @Test func whileEtcdIsUnreachableNoMigrationStartsAndTheOneInFlightFinishes() throws {
        let cluster = try TestCluster(hosts: 3, controller: "--max-parallel 1 --bandwidth 8M", etcd: true)
        let names = ["u1", "u2", "u3"]
        try cluster.createVMs(names, on: "h1", cmdline: "fill=24 dirty=8 pattern=random rate=2 verify=2")
        #expect(cluster.cluster("evacuate", "h1").status == 0)
        try waitFor("the first migration is sending", timeout: 30) {
            try cluster.migrations().contains { $0.phase == .running && $0.transferredBytes > 1 << 20 }
        }
        let moving = try #require(try cluster.migrations().first { $0.phase == .running })
        let etcd = try #require(cluster.pid(of: "etcd"))
        kill(etcd, SIGSTOP)
        defer { kill(etcd, SIGCONT) }
        // The migration in flight needs no controller: the VM arrives at its destination.
        try waitFor("\(moving.vm) runs at \(moving.destination)", timeout: 60) {
            let response = try APIClient(socketPath: cluster.vmSocket(moving.vm, on: moving.destination)).request(.GET, "/v1/vm", timeout: .seconds(2))
            return response.status == 200 && String(decoding: response.body, as: UTF8.self).contains("\"running\"")
        }
        sleep(4)
        #expect(names.map { cluster.incomingStarts(of: $0) }.reduce(0, +) == 1, "nothing else started while etcd was away")
        kill(etcd, SIGCONT)
        try waitFor("the evacuation completes once etcd is back", timeout: 120) {
            try cluster.get([OperationRecord].self, "/v1/operations").first?.phase == .completed
        }
        #expect(try cluster.migrations().allSatisfy { $0.phase == .completed && $0.attempt == 1 })
        for name in names { #expect(cluster.incomingStarts(of: name) == 1) }
        try expectGuestsHealthy(cluster, names)
    }
}
