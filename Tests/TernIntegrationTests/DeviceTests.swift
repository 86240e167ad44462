import Foundation
import Synchronization
import Glibc
import Testing
import TernAPI
import TernMachine
import TernMigration

/// A raw disk image in a test's own directory, removed with it.
final class TestDisk {
    let path: String

    init(size: Int, in directory: URL? = nil, name: String = "disk.img") {
        let folder = directory ?? URL(fileURLWithPath: NSTemporaryDirectory()).appendingPathComponent("tern-disk-\(UUID().uuidString.prefix(8))")
        try? FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        path = folder.appendingPathComponent(name).path
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        _ = truncate(path, off_t(size))
    }

    /// Bytes of the image that are not zero (what the guest has written).
    var nonZeroBytes: Int {
        guard let data = FileManager.default.contents(atPath: path) else { return 0 }
        return data.reduce(0) { $0 + ($1 != 0 ? 1 : 0) }
    }

    deinit { try? FileManager.default.removeItem(atPath: URL(fileURLWithPath: path).deletingLastPathComponent().path) }
}

/// The bundled guest drives virtio-blk and virtio-net from ring 3 on real KVM,
/// and checks by itself that no write it made was lost or came back stale.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct DeviceTests {
    @Test func theGuestWritesFlushesAndVerifiesItsDisk() throws {
        let disk = TestDisk(size: 16 << 20)
        let tern = try TernProcess.guest("disk=write disk_pattern=rand disk_flush=8 progress=0", memory: "64M",
                                         extra: ["--disk", "path=\(disk.path)"])
        try tern.waitForAPI()
        let status = try tern.waitForStatus(timeout: 30) { $0.diskVerified >= 20 && $0.diskFlushes >= 5 }
        #expect(status.diskState == .running)
        #expect(status.diskErrors == 0)
        #expect(status.diskCapacity == 16 << 20, "the guest read the capacity from the configuration space")
        #expect(status.diskWrites > 0 && status.diskBytes >= status.diskWrites * 4096)
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try tern.client.request(.GET, "/v1/vm").body)
        let device = try #require(info.devices?.first)
        #expect(device.id == "disk0" && device.kind == "virtio-blk" && device.address == 0xFEB0_0000 && device.sizeBytes == 16 << 20)
        #expect((device.counters["writes"] ?? 0) > 0 && (device.counters["flushes"] ?? 0) > 0 && device.counters["failed"] == 0)
        #expect(try tern.client.request(.PUT, "/v1/vm/pause").status == 204, "a pause flushes what was written")
        #expect(disk.nonZeroBytes > 0, "the writes are in the image file")
        #expect(try tern.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(tern.waitForExit() == 0)
    }

    /// Bad devices are one line on stderr and exit status 1 (64 for a malformed option), before any VM exists.
    @Test func badDevicesAreOneClearErrorAtStartup() throws {
        let disk = TestDisk(size: 1 << 20)
        let cases: [([String], Int32, String)] = [
            (["--disk", "path=/nonexistent/disk.img"], 1, "device 'disk0': cannot open disk image /nonexistent/disk.img: No such file or directory"),
            (["--disk", "path=/tmp"], 1, "cannot open disk image /tmp: Is a directory"),
            (["--disk", "path=\(disk.path),id=a", "--disk", "path=\(disk.path),id=a"], 64, "two devices have the id 'a'"),
            (["--disk", "path=\(disk.path),size=3"], 64, "--disk: unknown key 'size'"),
            (["--net", "tap=ternnosuchtap0"], 1, "no network interface 'ternnosuchtap0'"),
            (["--net", "tap=lo"], 1, "interface 'lo' is not a TAP device"),
            (["--net", "tap=t0,mac=01:00:00:00:00:01"], 64, "a multicast address cannot be a NIC's"),
        ]
        for (arguments, status, message) in cases {
            let tern = try TernProcess(["run", "--kernel", TernProcess.guest, "--memory", "32M", "--serial", "off"] + arguments)
            #expect(tern.waitForExit(timeout: 20) == status, "\(arguments): \(tern.stderr)")
            #expect(tern.stderr.contains(message), "\(arguments): \(tern.stderr)")
            #expect(!FileManager.default.fileExists(atPath: tern.apiSocket), "\(arguments): no API socket is left")
        }
    }

    @Test func aReadOnlyDiskRefusesTheGuestsWrites() throws {
        let disk = TestDisk(size: 4 << 20)
        let tern = try TernProcess.guest("disk=write progress=0", memory: "64M", extra: ["--disk", "path=\(disk.path),readonly=on"])
        try tern.waitForAPI()
        let status = try tern.waitForStatus(timeout: 20) { $0.diskState == .failed || $0.diskErrors > 0 }
        #expect(status.diskWrites == 0 || status.diskErrors > 0)
        #expect(disk.nonZeroBytes == 0, "nothing reached a read-only image")
    }

    /// Snapshot in the middle of the disk workload, restore on the same image: the guest's
    /// tags (in its RAM) and the image agree, so no write was lost or done twice. With the
    /// image wiped behind its back, the same check finds the damage, so it can fail.
    @Test func aSnapshotInTheMiddleOfTheDiskWorkloadLosesNoWrite() throws {
        let disk = TestDisk(size: 8 << 20)
        let source = try TernProcess.guest("disk=write disk_pattern=rand disk_flush=4 disk_verify=2 progress=0", memory: "64M",
                                           extra: ["--disk", "path=\(disk.path)"])
        try source.waitForAPI()
        _ = try source.waitForStatus(timeout: 30) { $0.diskWrites > 300 }
        let file = source.directory.appendingPathComponent("vm.snap").path
        let cli = try TernProcess(["snapshot", "--api-socket", source.apiSocket, "--to", file], withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 0, "snapshot failed: \(cli.stderr)")
        let atSnapshot = try #require(try source.status())
        #expect(try source.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(source.waitForExit() == 0)
        let pristine = try Data(contentsOf: URL(fileURLWithPath: disk.path))

        let restored = try TernProcess(["run", "--restore", file, "--serial", "off"])
        try restored.waitForAPI()
        let later = try restored.waitForStatus(timeout: 30) { $0.diskVerified > atSnapshot.diskVerified + 100 }
        #expect(later.diskErrors == 0, "every block read back matched the tag the guest kept")
        #expect(later.diskWrites > atSnapshot.diskWrites)
        #expect(try restored.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(restored.waitForExit() == 0)

        // The control: the same snapshot over an image that lost its writes.
        try Data(count: pristine.count).write(to: URL(fileURLWithPath: disk.path))
        let damaged = try TernProcess(["run", "--restore", file, "--serial", "off"])
        try damaged.waitForAPI()
        let found = try damaged.waitForStatus(timeout: 30) { $0.diskErrors > 0 }
        #expect(found.diskErrors > 0, "the guest notices blocks that lost their contents")
    }

    /// A destination opens only what it names itself: a VM whose disk it was not told about is refused in
    /// the handshake (the source keeps running it), as is a destination device the VM does not have.
    @Test func aDestinationOpensOnlyTheDevicesItNames() throws {
        let disk = TestDisk(size: 4 << 20)
        for (arguments, refusal) in [([String](), "the VM has a disk 'disk0': name where it lands here with --disk id=disk0,path=FILE"),
                                     (["--disk", "id=disk0,path=\(disk.path)", "--disk", "id=extra,path=\(disk.path)"],
                                      "device 'extra' is configured here, but the VM has no such device")] {
            let pair = try MigrationPair(cmdline: "disk=write progress=0", memory: "64M", sourceArguments: ["--disk", "path=\(disk.path)"],
                                         destinationArguments: arguments)
            let (report, cli) = try pair.migrate()
            let r = try #require(report, "no report: \(cli.stderr)")
            #expect(r.status == .failed && r.reason?.contains(refusal) == true, "\(r.reason ?? "")")
            let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
            #expect(info.state == .running, "the source keeps its VM")
        }
    }

    @Test func aRestoreRefusesADiskOfAnotherSize() throws {
        let disk = TestDisk(size: 4 << 20)
        let source = try TernProcess.guest("disk=write progress=0", memory: "64M", extra: ["--disk", "path=\(disk.path),id=data"])
        try source.waitForAPI()
        _ = try source.waitForStatus(timeout: 20) { $0.diskWrites > 10 }
        let file = source.directory.appendingPathComponent("vm.snap").path
        #expect(try TernProcess(["snapshot", "--api-socket", source.apiSocket, "--to", file], withAPI: false).waitForExit(timeout: 60) == 0)
        // The image is locked while the source runs: end it first.
        #expect(try source.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(source.waitForExit() == 0)
        let other = TestDisk(size: 8 << 20)
        let attempt = try TernProcess(["run", "--restore", file, "--disk", "path=\(other.path),id=data", "--serial", "off"])
        #expect(attempt.waitForExit(timeout: 20) == 1)
        #expect(attempt.stderr.contains("device 'data' does not match the VM's: disk \(other.path) is 8388608 bytes, the VM's disk was 4194304"),
                "stderr: \(attempt.stderr)")
        let renamed = try TernProcess(["run", "--restore", file, "--disk", "path=\(disk.path),id=other", "--serial", "off"])
        #expect(renamed.waitForExit(timeout: 20) == 1)
        #expect(renamed.stderr.contains("devices [data]"), "stderr: \(renamed.stderr)")
    }

    @Test(arguments: [["--mode", "precopy"], ["--mode", "postcopy"], ["--mode", "hybrid"]])
    func aLiveMigrationWithTheDiskWorkloadLosesNoWrite(mode: [String]) throws {
        let disk = TestDisk(size: 8 << 20)
        // Shared storage: the destination names the same image for the VM's disk.
        let pair = try MigrationPair(cmdline: "disk=write disk_pattern=rand disk_flush=4 disk_verify=2 disk_rate=4 progress=0",
                                     memory: "128M", sourceArguments: ["--disk", "path=\(disk.path)"],
                                     destinationArguments: ["--disk", "id=disk0,path=\(disk.path)"])
        let before = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 100 }
        let (report, cli) = try pair.migrate(["--verify"] + mode)
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        #expect(pair.source.waitForExit(timeout: 30) == 0)
        try pair.destination.waitForAPI()
        let moved = try #require(try pair.destination.status())
        #expect(moved.diskWrites >= before.diskWrites)
        let later = try pair.destination.waitForStatus(timeout: 30) { $0.diskVerified > moved.diskVerified + 50 && $0.diskWrites > moved.diskWrites + 50 }
        #expect(later.diskErrors == 0, "no write was lost or stale across the switch-over")
    }
}

/// A network namespace holding one TAP with an address, made by the test and
/// removed with it: the guest's NIC sits on the TAP, and traffic never leaves
/// the namespace.
final class TapNamespace {
    let name: String
    let tap = "tap0"
    let hostAddress: String
    let guestAddress: String

    /// Each namespace has a name of its own, even if two exist at once.
    private static let made = Atomic<Int>(0)

    init() throws {
        let id = Int(getpid() % 200) + 20
        name = "ternnet\(getpid() % 100000)n\(Self.made.add(1, ordering: .relaxed).newValue)"
        hostAddress = "10.\(id).77.1"
        guestAddress = "10.\(id).77.2"
        shell("ip netns del \(name) 2>/dev/null")
        let up = shell("""
            set -e; ip netns add \(name); ip -n \(name) link set lo up
            ip -n \(name) tuntap add dev \(tap) mode tap
            ip -n \(name) addr add \(hostAddress)/24 dev \(tap); ip -n \(name) link set \(tap) up
            """)
        guard up.status == 0 else { throw ConfigurationError("cannot make namespace \(name): \(up.output)") }
    }

    var wrapper: [String] { ["/usr/sbin/ip", "netns", "exec", name] }

    func run(_ command: String, timeout: Double = 60) -> (status: Int32, output: String) {
        shell("ip netns exec \(name) \(command)", timeout: timeout)
    }

    deinit {
        shell("for p in $(ip netns pids \(name) 2>/dev/null); do kill -9 $p; done; ip netns del \(name)")
    }
}

@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"),
       .enabled(if: TestHosts.canCreate, "needs network namespaces (root, iproute2)"))
struct NetworkDeviceTests {
    @Test func theGuestAnswersARPPingAndUDPEchoThroughItsTAP() throws {
        let namespace = try TapNamespace()
        let tern = try TernProcess.guest("ip=\(namespace.guestAddress)/24 progress=0", memory: "64M",
                                         extra: ["--net", "tap=\(namespace.tap),mac=52:54:00:ab:cd:01"], wrapper: namespace.wrapper)
        try tern.waitForAPI()
        _ = try tern.waitForStatus(timeout: 20) { $0.netState == .running }
        let ping = namespace.run("ping -c 3 -W 2 -i 0.2 \(namespace.guestAddress)")
        #expect(ping.status == 0, "ping: \(ping.output)")
        #expect(namespace.run("ip neigh show \(namespace.guestAddress)").output.contains("52:54:00:ab:cd:01"), "ARP learned the VM's MAC")
        let echo = namespace.run("python3 \(TernProcess.repository.path)/tools/udp_echo.py \(namespace.guestAddress) --count 200 --size 256")
        #expect(echo.status == 0, "udp_echo: \(echo.output)")
        let result = try JSONSerialization.jsonObject(with: Data(echo.output.utf8)) as? [String: Any]
        #expect(result?["answered"] as? Int == 200 && result?["lost"] as? Int == 0, "\(echo.output)")
        let status = try #require(try tern.status())
        #expect(status.netReceived >= 200 && status.netSent >= 200)
    }

    /// A NIC whose guest has not set it up (or a paused VM) leaves frames on the TAP and does not spin on them.
    @Test func aNICTheGuestDoesNotDriveCostsNoCPU() throws {
        let namespace = try TapNamespace()
        let tern = try TernProcess.guest("progress=0", memory: "32M", extra: ["--net", "tap=\(namespace.tap)"], wrapper: namespace.wrapper)
        try tern.waitForAPI()
        // Frames for the TAP: pings to the guest's would-be address (ARP requests, broadcast).
        let pinger = Process()
        pinger.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        pinger.arguments = ["netns", "exec", namespace.name, "ping", "-i", "0.05", "-c", "80", "-W", "1", namespace.guestAddress]
        pinger.standardOutput = FileHandle.nullDevice
        pinger.standardError = FileHandle.nullDevice
        try pinger.run()
        defer { if pinger.isRunning { pinger.terminate() } }
        func workerTicks() -> Int? {
            let tasks = "/proc/\(tern.process.processIdentifier)/task"
            for task in (try? FileManager.default.contentsOfDirectory(atPath: tasks)) ?? [] {
                guard (try? String(contentsOfFile: "\(tasks)/\(task)/comm", encoding: .utf8))?.hasPrefix("virtio-net0") == true,
                      let stat = try? String(contentsOfFile: "\(tasks)/\(task)/stat", encoding: .utf8) else { continue }
                let fields = stat.split(separator: ")").last?.split(separator: " ") ?? []
                guard fields.count > 13, let user = Int(fields[11]), let system = Int(fields[12]) else { return nil }
                return user + system
            }
            return nil
        }
        sleep(1)
        let before = try #require(workerTicks(), "no virtio-net0 thread")
        sleep(2)
        let after = try #require(workerTicks())
        #expect(after - before < 20, "the NIC's worker used \(after - before) ticks of CPU in 2 s")
    }

    /// Two hosts (namespaces joined by a veth), each with a TAP of the same name on which the
    /// VM's NIC lands: after the move the VM answers on the destination host with the same MAC.
    @Test func aMigratedNICKeepsItsMACAndAnswersOnTheDestination() throws {
        let hosts = try TestHosts()
        let mac = "52:54:00:ab:cd:02", guest = "10.\(hosts.subnet).77.2"
        for host in ["\(hosts.prefix)-a", "\(hosts.prefix)-b"] {
            let up = shell("set -e; ip -n \(host) tuntap add dev tap0 mode tap; ip -n \(host) addr add 10.\(hosts.subnet).77.1/24 dev tap0; ip -n \(host) link set tap0 up")
            try #require(up.status == 0, "\(up.output)")
        }
        let port = freePort()
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:\(hosts.destinationAddress):\(port)", "--serial", "off",
                                           "--net", "id=net0,tap=tap0"], wrapper: hosts.destinationHost)
        let source = try TernProcess.guest("ip=\(guest)/24 dirty=8 rate=20 progress=0", memory: "64M",
                                           extra: ["--net", "tap=tap0,mac=\(mac)"], wrapper: hosts.sourceHost)
        try source.waitForAPI()
        _ = try source.waitForStatus(timeout: 20) { $0.netState == .running }
        #expect(shell("ip netns exec \(hosts.prefix)-a ping -c 2 -W 2 -i 0.2 \(guest)").status == 0, "the VM answers on the source host")
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", "tcp:\(hosts.destinationAddress):\(port)", "--json"],
                                  withAPI: false, wrapper: hosts.sourceHost)
        #expect(cli.waitForExit(timeout: 60) == 0, "migrate: \(cli.stderr) \(cli.stdout)")
        #expect(source.waitForExit(timeout: 10) == 0)
        try destination.waitForAPI()
        let ping = shell("ip netns exec \(hosts.prefix)-b ping -c 3 -W 2 -i 0.2 \(guest)")
        #expect(ping.status == 0, "the VM answers on the destination host: \(ping.output)")
        #expect(shell("ip netns exec \(hosts.prefix)-b ip neigh show \(guest)").output.contains(mac), "with the same MAC")
        let moved = try #require(try destination.status())
        #expect(moved.netReceived > 0 && moved.errors == 0)
    }
}
