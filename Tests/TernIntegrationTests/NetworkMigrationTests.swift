import Foundation
import Synchronization
import Glibc
import Testing
import TernAPI
import TernMachine
import TernMigration

/// Runs a command to completion; returns its exit status and output.
@discardableResult
func shell(_ command: String, timeout: Double = 60) -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/bin/bash")
    process.arguments = ["-c", command]
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    guard (try? process.run()) != nil else { return (-1, "cannot run bash") }
    let deadline = Date(timeIntervalSinceNow: timeout)
    while process.isRunning && Date() < deadline { usleep(20_000) }
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self))
}

/// Two hosts: network namespaces joined by a veth pair, made by the test itself (scripts/netns.sh).
final class TestHosts {
    static let canCreate = shell("bash \(TernProcess.repository.path)/scripts/netns.sh check").status == 0
    let prefix: String
    let subnet: Int

    /// Suites run side by side: each pair of hosts needs names of its own, or one test's `up` removes another's namespaces.
    private static let made = Atomic<Int>(0)

    init() throws {
        prefix = "tt\(getpid() % 100000)n\(Self.made.add(1, ordering: .relaxed).newValue)"
        subnet = 200 + Int(getpid() % 50)
        let up = shell("NETNS_SUBNET=\(subnet) bash \(TernProcess.repository.path)/scripts/netns.sh up \(prefix)")
        guard up.status == 0 else { throw ConfigurationError("netns.sh up failed: \(up.output)") }
    }

    var sourceHost: [String] { ["/usr/sbin/ip", "netns", "exec", "\(prefix)-a"] }
    var destinationHost: [String] { ["/usr/sbin/ip", "netns", "exec", "\(prefix)-b"] }
    var destinationAddress: String { "10.\(subnet).0.2" }

    /// A TCP connection from the source host that sends nothing (a stranger at the destination's port), held open until terminated.
    func sourceHostConnect(host: String, port: UInt16) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: sourceHost[0])
        process.arguments = Array(sourceHost.dropFirst()) + ["python3", "-c",
            "import socket, time; s = socket.create_connection(('\(host)', \(port))); time.sleep(60)"]
        try process.run()
        return process
    }

    deinit { shell("bash \(TernProcess.repository.path)/scripts/netns.sh down \(prefix)") }
}

@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"),
       .enabled(if: TestHosts.canCreate, "needs network namespaces (root, iproute2)"))
struct NetworkMigrationTests {
    /// With `disk`, the VM writes a disk that moves with it (`--storage copy`) to a path the destination names.
    func migrate(hosts: TestHosts, destinationListen: String, migrateTo: String, relay: String? = nil,
                 disk: TestDisk? = nil) throws -> (MigrationReport, TernProcess) {
        let destination = try TernProcess(["run", "--insecure", "--incoming", destinationListen, "--serial", "off"]
                                              + (disk.map { ["--disk", "id=disk0,path=\($0.path).moved"] } ?? []), wrapper: hosts.destinationHost)
        var relayProcess: Process?
        if let relay {
            // The relay says when it listens (namespaces share the file system): a fixed sleep was too short under load.
            let ready = FileManager.default.temporaryDirectory.appendingPathComponent("tern-relay-\(UUID().uuidString)").path
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
            process.arguments = ["netns", "exec", "\(hosts.prefix)-b", "python3", TernProcess.repository.appendingPathComponent("tools/delay_relay.py").path]
                + relay.split(separator: " ").map(String.init) + ["--ready-file", ready]
            process.standardError = FileHandle.nullDevice
            try process.run()
            relayProcess = process
            let deadline = Date(timeIntervalSinceNow: 20)
            while !FileManager.default.fileExists(atPath: ready) && process.isRunning && Date() < deadline { usleep(20_000) }
            try #require(FileManager.default.fileExists(atPath: ready), "the relay did not start listening")
        }
        defer { relayProcess?.terminate() }
        let diskWorkload = disk == nil ? "" : " disk=write disk_pattern=rand disk_flush=4 disk_verify=2 disk_rate=8"
        let source = try TernProcess.guest("fill=64 dirty=16 pattern=random rate=50 progress=0" + diskWorkload, memory: "256M",
                                           extra: disk.map { ["--disk", "path=\($0.path)"] } ?? [], wrapper: hosts.sourceHost)
        try source.waitForAPI()
        let before = try source.waitForStatus { $0.phase == .dirty }
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", migrateTo, "--json", "--verify"]
                                      + (disk == nil ? [] : ["--storage", "copy"]), withAPI: false)
        #expect(cli.waitForExit(timeout: 120) == 0, "\(cli.stderr)")
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .completed)
        #expect(report.verification?.match == true)
        try destination.waitForAPI()
        let moved = try destination.waitForStatus { $0.iterations > before.iterations }
        #expect(moved.errors == 0)
        if disk != nil {
            #expect((report.storage?.disks.first?.blocks ?? 0) > 0 && report.storage?.sourceDigests == report.storage?.destinationDigests)
            let checked = try destination.waitForStatus(timeout: 30) { $0.diskVerified > moved.diskVerified + 100 }
            #expect(checked.diskErrors == 0, "the disk arrived whole on the other host")
        }
        #expect(source.waitForExit() == 0)
        return (report, destination)
    }

    @Test func migratesBetweenTwoHostsOverAVethPair() throws {
        let hosts = try TestHosts()
        let address = "tcp:\(hosts.destinationAddress):4444"
        let (report, _) = try migrate(hosts: hosts, destinationListen: address, migrateTo: address)
        #expect(report.downtimeClock == "shared-monotonic", "same kernel, so the monotonic clock is shared")
    }

    @Test func migratesOverAnEmulatedWAN() throws {
        // 25 ms each way (50 ms RTT) and 1 Gbit/s, by the delay relay inside the destination host.
        let hosts = try TestHosts()
        let relay = "--listen \(hosts.destinationAddress):4000 --connect 127.0.0.1:4001 --delay-ms 25 --rate-mbit 1000"
        let (report, _) = try migrate(hosts: hosts, destinationListen: "tcp:127.0.0.1:4001",
                                      migrateTo: "tcp:\(hosts.destinationAddress):4000", relay: relay)
        let downtime = try #require(report.downtimeMs)
        #expect(downtime >= 50, "the hand-over needs at least a round trip over the slow link")
        #expect(report.setupMs >= 50, "the handshake is a round trip")
        #expect(report.throughputMBps < 130, "the link carries at most 125 MB/s")
    }

    /// The disk moves with the VM between two hosts, across the 50 ms, 1 Gbit/s link, while the guest writes it.
    @Test func aDiskMovesWithTheVMOverAnEmulatedWAN() throws {
        let hosts = try TestHosts()
        let disk = TestDisk(size: 16 << 20)
        try writeImage(disk.path, size: 16 << 20, data: [0..<(8 << 20)])
        let relay = "--listen \(hosts.destinationAddress):4000 --connect 127.0.0.1:4001 --delay-ms 25 --rate-mbit 1000"
        let (report, destination) = try migrate(hosts: hosts, destinationListen: "tcp:127.0.0.1:4001",
                                                migrateTo: "tcp:\(hosts.destinationAddress):4000", relay: relay, disk: disk)
        #expect(report.storage?.mode == .copy)
        #expect((report.storage?.disks.first?.bytes ?? 0) >= 8 << 20, "the disk's data crossed the link")
        #expect(FileManager.default.fileExists(atPath: disk.path + ".moved"))
        _ = destination
    }
}
