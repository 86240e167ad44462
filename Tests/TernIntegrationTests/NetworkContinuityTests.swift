import Foundation
import Glibc
import Synchronization
import Testing
import TernAPI
import TernMachine
import TernMigration

/// A LAN of two hosts behind a learning switch and a client on the switch, or (with `wanDelayMs`) the same
/// hosts as sites of a WAN whose VM segment is stretched over VXLAN through a delaying router
/// (scripts/lan.sh); made by the test and removed with it.
final class TestLAN {
    static let canCreate = shell("bash \(TernProcess.repository.path)/scripts/lan.sh check").status == 0
    let prefix: String
    let wanDelayMs: Int?
    private static let made = Atomic<Int>(0)

    init(wanDelayMs: Int? = nil) throws {
        prefix = "tl\(getpid() % 10000)n\(Self.made.add(1, ordering: .relaxed).newValue)"
        self.wanDelayMs = wanDelayMs
        let topology = wanDelayMs.map { "DELAY_MS=\($0) WAN_TCP_PORTS=4444 bash \(TernProcess.repository.path)/scripts/lan.sh wan-up" }
            ?? "bash \(TernProcess.repository.path)/scripts/lan.sh up"
        let up = shell("""
            set -e; \(topology) \(prefix)
            bash \(TernProcess.repository.path)/scripts/lan.sh tap \(prefix) h1 tapa
            bash \(TernProcess.repository.path)/scripts/lan.sh tap \(prefix) h2 tapb
            """)
        guard up.status == 0 else { throw ConfigurationError("lan.sh up failed: \(up.output)") }
    }

    func host(_ name: String) -> [String] { ["/usr/sbin/ip", "netns", "exec", "\(prefix)-\(name)"] }

    /// Where the destination listens, and where the source sends the VM (on a WAN, through the delaying router).
    var destinationListen: String { wanDelayMs == nil ? "tcp:10.240.0.2:4444" : "tcp:10.241.2.2:4444" }
    var migrateTo: String { wanDelayMs == nil ? "tcp:10.240.0.2:4444" : "tcp:10.241.100.2:4444" }

    /// Where the switch sends `mac`: "h1", "h2", or "none".
    func switchPort(of mac: String) -> String {
        shell("bash \(TernProcess.repository.path)/scripts/lan.sh fdb \(prefix) \(mac)").output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func client(_ command: String) -> (status: Int32, output: String) { shell("ip netns exec \(prefix)-cl \(command)") }

    /// Makes the client's ARP entry for `ip` permanent. Otherwise an entry gone stale in a slow test has the
    /// client ask again by broadcast, the VM answers from its new host, and that, not the announcement, moves
    /// the network's entry.
    func pinNeighbour(_ ip: String, mac: String) {
        let status = client("ip neigh replace \(ip) lladdr \(mac) dev \(wanDelayMs == nil ? "eth0" : "vx0") nud permanent").status
        #expect(status == 0, "the client's ARP entry for \(ip) is pinned")
    }

    /// A command run in the client's namespace in the background, its output in a file.
    func clientProcess(_ arguments: [String]) throws -> (Process, URL) {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("tern-client-\(UUID().uuidString.prefix(8))")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        process.arguments = ["netns", "exec", "\(prefix)-cl"] + arguments
        process.standardOutput = try FileHandle(forWritingTo: output)
        process.standardError = FileHandle.nullDevice
        try process.run()
        return (process, output)
    }

    deinit { shell("bash \(TernProcess.repository.path)/scripts/lan.sh down \(prefix)") }
}

/// `tern probe` in the client's namespace, probing the VM every millisecond for `seconds`.
final class TestProbe {
    let process: TernProcess
    let migrationReport: URL

    init(on lan: TestLAN, seconds: Int, destination: TernProcess) throws {
        migrationReport = FileManager.default.temporaryDirectory.appendingPathComponent("tern-report-\(UUID().uuidString.prefix(8)).json")
        process = try TernProcess(["probe", "10.240.0.10", "--duration", "\(seconds)", "--json", "--migration-report", migrationReport.path,
                                   "--api-socket", destination.apiSocket], withAPI: false, wrapper: lan.host("cl"))
    }

    /// What the probe saw, once it ends; `migration` is the report it sets the outage beside.
    func result(migration: String, timeout: Double = 60) throws -> ProbeResult {
        try Data(migration.utf8).write(to: migrationReport)
        #expect(process.waitForExit(timeout: timeout) == 0, "\(process.stderr)")
        defer { try? FileManager.default.removeItem(at: migrationReport) }
        return try APIJSON.decoder.decode(ProbeResult.self, from: Data(process.stdout.utf8))
    }

    /// `tern probe --json`, as far as the tests read it.
    struct ProbeResult: Decodable {
        struct Gap: Decodable { var durationMs: Double; var lost: Int; var recovered: Bool }
        struct Analysis: Decodable { var sent: Int; var received: Int; var lost: Int; var switchoverOutage: Gap?; var longestGap: Gap?; var lostOutsideGap: Int; var lostRuns: [[Int]] }
        struct Switchover: Decodable { var downtimeMs: Double?; var outageEndAfterResumeMs: Double; var guestMaxStallMs: Double? }
        var analysis: Analysis
        var switchover: Switchover?
    }
}

/// tools/tcp_stream.py in the client's namespace: one TCP connection to the guest's echo service, every
/// echoed byte checked.
final class TestTCPStream {
    let process: Process
    let output: URL

    init(on lan: TestLAN, seconds: Int) throws {
        (process, output) = try lan.clientProcess(["python3", TernProcess.repository.appendingPathComponent("tools/tcp_stream.py").path,
                                                   "10.240.0.10", "--duration", "\(seconds)", "--rate", "1M", "--stall-timeout", "20"])
    }

    struct Result: Decodable { var ok: Bool; var verifiedBytes: Int; var longestStallS: Double; var resets: Int; var errors: [String] }

    func result(timeout: Double = 60) throws -> Result {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while process.isRunning && Date() < deadline { usleep(20_000) }
        if process.isRunning { process.terminate() }
        defer { try? FileManager.default.removeItem(at: output) }
        return try APIJSON.decoder.decode(Result.self, from: try Data(contentsOf: output))
    }
}

/// After a migration between hosts of one LAN, the switch must learn that the VM's MAC is now behind
/// the destination, or the client's frames keep going to the old host until the entry ages out.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"),
       .enabled(if: TestLAN.canCreate, "needs namespaces, bridges and VXLAN (root, iproute2)"))
struct NetworkContinuityTests {
    static let mac = "52:54:00:7e:00:01"

    /// Migrates the guest (answering at 10.240.0.10) from h1 to h2. `watch` starts what watches the move
    /// (probes, streams) once the VM answers at h1, a second before the migration starts.
    func migrate(on lan: TestLAN, arguments: [String] = [], guest: String = "", watch: (TernProcess) throws -> Void = { _ in })
        throws -> (report: MigrationReport, json: String, destination: TernProcess) {
        let destination = try TernProcess(["run", "--insecure", "--incoming", lan.destinationListen, "--serial", "off",
                                           "--net", "id=net0,tap=tapb"], wrapper: lan.host("h2"))
        let source = try TernProcess.guest("ip=10.240.0.10/24 progress=0 \(guest)", memory: "64M", extra: ["--net", "tap=tapa,mac=\(Self.mac)"],
                                           wrapper: lan.host("h1"))
        try source.waitForAPI()
        _ = try source.waitForStatus { $0.netState == .running }
        // The client reaches the VM at h1: the network learns the MAC there.
        #expect(lan.client("ping -c 3 -i 0.2 -W 1 10.240.0.10").status == 0, "the VM answers at its first host")
        #expect(lan.switchPort(of: Self.mac) == "h1")
        lan.pinNeighbour("10.240.0.10", mac: Self.mac)
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
        try watch(destination)
        usleep(1_000_000)
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", lan.migrateTo, "--json"] + arguments,
                                  withAPI: false)
        #expect(cli.waitForExit(timeout: 120) == 0, "\(cli.stderr)")
        #expect(source.waitForExit(timeout: 20) == 0)
        try destination.waitForAPI()
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .completed)
        return (report, cli.stdout, destination)
    }

    /// The client's probes and its TCP stream through one move: what the prober saw, and the stream's account.
    func migrateWatched(on lan: TestLAN, arguments: [String] = [], guest: String = "", probeSeconds: Int)
        throws -> (probe: TestProbe.ProbeResult, stream: TestTCPStream.Result, report: MigrationReport, destination: TernProcess) {
        var probe: TestProbe?, stream: TestTCPStream?
        let (report, json, destination) = try migrate(on: lan, arguments: arguments, guest: guest) { destination in
            probe = try TestProbe(on: lan, seconds: probeSeconds, destination: destination)
            stream = try TestTCPStream(on: lan, seconds: probeSeconds - 1)
        }
        return (try #require(probe).result(migration: json), try #require(stream).result(), report, destination)
    }

    /// The client's probes go unanswered only around the switch-over, and are answered again soon after the VM resumed.
    func expectOneShortOutage(_ probe: TestProbe.ProbeResult, after report: MigrationReport, within slackMs: Double) throws {
        let analysis = probe.analysis
        let outage = try #require(analysis.switchoverOutage, "the probe saw the switch-over: \(analysis)")
        let switchover = try #require(probe.switchover)
        #expect(outage.recovered, "the VM answered again after the move")
        #expect(analysis.lostOutsideGap == 0, "no probe lost but at the switch-over: lost \(analysis.lostRuns)")
        #expect(switchover.outageEndAfterResumeMs < slackMs, "probes were answered again from \(switchover.outageEndAfterResumeMs) ms after the resume")
        #expect(outage.durationMs < (report.downtimeMs ?? 0) + slackMs, "an outage of \(outage.durationMs) ms against \(report.downtimeMs ?? 0) ms of downtime")
        #expect(switchover.guestMaxStallMs != nil, "the guest's own stall is set beside the outage")
    }

    func expectWhole(_ stream: TestTCPStream.Result) {
        #expect(stream.ok && stream.resets == 0, "the TCP stream came through whole: \(stream.errors)")
        #expect(stream.verifiedBytes > 1 << 20, "the stream carried data across the move (\(stream.verifiedBytes) bytes)")
    }

    @Test func theAnnouncementTeachesTheSwitchWhereTheVMIsNow() throws {
        let lan = try TestLAN()
        let (probe, stream, report, destination) = try migrateWatched(on: lan, probeSeconds: 5)
        try expectOneShortOutage(probe, after: report, within: 100)
        expectWhole(stream)
        #expect(lan.switchPort(of: Self.mac) == "h2", "the RARP from h2 moved the switch's entry")
        // All five rounds (0, 50, 200, 450, 800 ms after the start), and the guest's own gratuitous ARP, acknowledged.
        let announced = Date(timeIntervalSinceNow: 5)
        var counters: [String: Int] = [:]
        repeat {
            let info = try APIJSON.decoder.decode(MachineInfo.self, from: try destination.client.request(.GET, "/v1/vm").body)
            counters = info.devices?.first?.counters ?? [:]
            if counters["announcements_sent"] == 5 && counters["guest_announcements"] == 1 { break }
            usleep(50_000)
        } while Date() < announced
        #expect(counters["announcements_sent"] == 5 && counters["announcements_failed"] == 0, "\(counters)")
        #expect(counters["guest_announcements"] == 1, "the guest announced itself and acknowledged: \(counters)")
        let status = try #require(try destination.status())
        #expect(status.netAnnouncements >= 1)
    }

    /// Without announcements the silent guest teaches the switch nothing: it keeps sending to h1, and none
    /// of the client's probes is answered. (Nothing probes it during the move: a probe caught in the VM's
    /// queue at the pause would be answered from h2, and that answer would teach the switch.)
    @Test func withoutAnnouncementsTheSwitchKeepsSendingToTheOldHost() throws {
        let lan = try TestLAN()
        let (_, _, destination) = try migrate(on: lan, arguments: ["--announce-rounds", "0"])
        #expect(lan.switchPort(of: Self.mac) == "h1", "nothing moved the switch's entry")
        let probe = try TernProcess(["probe", "10.240.0.10", "--duration", "1", "--json"], withAPI: false, wrapper: lan.host("cl"))
        #expect(probe.waitForExit(timeout: 30) == 0, "\(probe.stderr)")
        let result = try APIJSON.decoder.decode(TestProbe.ProbeResult.self, from: Data(probe.stdout.utf8))
        #expect(result.analysis.sent == 1000 && result.analysis.received == 0, "the client's probes go to the old host: \(result.analysis)")
        #expect(result.analysis.longestGap?.recovered == false)
        #expect(lan.switchPort(of: Self.mac) == "h1")
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try destination.client.request(.GET, "/v1/vm").body)
        #expect(info.devices?.first?.counters["announcements_sent"] == 0)
    }

    /// A RARP the destination's TAP refuses (the link is down: the kernel answers EIO) is counted and logged;
    /// the migration still completes.
    @Test func aFailedAnnouncementIsCountedAndTheMigrationStillCompletes() throws {
        let lan = try TestLAN()
        #expect(shell("ip netns exec \(lan.prefix)-h2 ip link set tapb down").status == 0)
        let (report, _, destination) = try migrate(on: lan)
        #expect(report.status == .completed)
        let deadline = Date(timeIntervalSinceNow: 5)
        var counters: [String: Int] = [:]
        repeat {
            let info = try APIJSON.decoder.decode(MachineInfo.self, from: try destination.client.request(.GET, "/v1/vm").body)
            counters = info.devices?.first?.counters ?? [:]
            if counters["announcements_failed"] == 5 { break }
            usleep(50_000)
        } while Date() < deadline
        #expect(counters["announcements_failed"] == 5 && counters["announcements_sent"] == 0, "\(counters)")
        #expect(destination.stderr.contains("the RARP on TAP 'tapb' could not be sent"), "logged")
        #expect(try destination.status()?.phase != .crashed, "the VM runs on")
    }

    /// A destination that was not told where the VM's NIC goes refuses in the handshake, before any page;
    /// the VM runs on at its first host and still answers there.
    @Test func aDestinationWithoutTheNICRefusesBeforeAnyPage() throws {
        let lan = try TestLAN()
        let destination = try TernProcess(["run", "--insecure", "--incoming", lan.destinationListen, "--serial", "off"], wrapper: lan.host("h2"))
        let source = try TernProcess.guest("ip=10.240.0.10/24 progress=0", memory: "64M", extra: ["--net", "id=net0,tap=tapa,mac=\(Self.mac)"],
                                           wrapper: lan.host("h1"))
        try source.waitForAPI()
        _ = try source.waitForStatus { $0.netState == .running }
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", lan.migrateTo, "--json"], withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 1)
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .failed && report.reason?.contains("the VM has a NIC 'net0' (MAC \(Self.mac))") == true, "\(report.reason ?? "")")
        #expect(report.dataPages == 0 && report.rounds.isEmpty, "refused before any page was sent")
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running, "the source keeps its VM")
        #expect(lan.client("ping -c 2 -i 0.2 -W 1 10.240.0.10").status == 0, "and it still answers at its first host")
    }

    /// Post-copy moves execution first: the outage is the short switch-over, not the memory still to come.
    @Test func aPostcopyMoveCostsTheClientOnlyTheSwitchover() throws {
        let lan = try TestLAN()
        let (probe, stream, report, _) = try migrateWatched(on: lan, arguments: ["--mode", "postcopy"], guest: "fill=32", probeSeconds: 5)
        #expect(report.mode == "postcopy")
        try expectOneShortOutage(probe, after: report, within: 100)
        expectWhole(stream)
    }

    /// Across a WAN (seed 004) the VM keeps its address: its segment is stretched over VXLAN, and the
    /// announcement re-points the client's tunnel to the new site. 50 and 200 ms round trips.
    @Test(arguments: [25, 100]) func theVMKeepsItsAddressAcrossAWAN(oneWayDelayMs: Int) throws {
        let lan = try TestLAN(wanDelayMs: oneWayDelayMs)
        let (probe, stream, report, _) = try migrateWatched(on: lan, probeSeconds: 6 + oneWayDelayMs / 10)
        // The announcement crosses to the client in one trip; probes already on their way to the old site are lost.
        try expectOneShortOutage(probe, after: report, within: Double(4 * oneWayDelayMs + 100))
        expectWhole(stream)
        #expect(lan.switchPort(of: Self.mac) == "h2", "the client's VXLAN sends to the new site")
    }
}
