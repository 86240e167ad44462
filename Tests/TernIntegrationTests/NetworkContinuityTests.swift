import Foundation
import Glibc
import Synchronization
import Testing
import TernAPI
import TernMachine
import TernMigration

/// A LAN of two hosts behind a learning switch, and a client on the switch (scripts/lan.sh), made
/// by the test and removed with it.
final class TestLAN {
    static let canCreate = shell("bash \(TernProcess.repository.path)/scripts/lan.sh check").status == 0
    let prefix: String
    private static let made = Atomic<Int>(0)

    init() throws {
        prefix = "tl\(getpid() % 10000)n\(Self.made.add(1, ordering: .relaxed).newValue)"
        let up = shell("""
            set -e; bash \(TernProcess.repository.path)/scripts/lan.sh up \(prefix)
            bash \(TernProcess.repository.path)/scripts/lan.sh tap \(prefix) h1 tapa
            bash \(TernProcess.repository.path)/scripts/lan.sh tap \(prefix) h2 tapb
            """)
        guard up.status == 0 else { throw ConfigurationError("lan.sh up failed: \(up.output)") }
    }

    func host(_ name: String) -> [String] { ["/usr/sbin/ip", "netns", "exec", "\(prefix)-\(name)"] }

    /// Where the switch sends `mac`: "h1", "h2", or "none".
    func switchPort(of mac: String) -> String {
        shell("bash \(TernProcess.repository.path)/scripts/lan.sh fdb \(prefix) \(mac)").output.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    func client(_ command: String) -> (status: Int32, output: String) { shell("ip netns exec \(prefix)-cl \(command)") }

    deinit { shell("bash \(TernProcess.repository.path)/scripts/lan.sh down \(prefix)") }
}

/// After a migration between hosts of one LAN, the switch must learn that the VM's MAC is now behind
/// the destination, or the client's frames keep going to the old host until the entry ages out.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"),
       .enabled(if: TestLAN.canCreate, "needs namespaces, bridges and VXLAN (root, iproute2)"))
struct NetworkContinuityTests {
    static let mac = "52:54:00:7e:00:01"

    /// Migrates the guest (answering at 10.240.0.10) from h1 to h2; returns the destination.
    func migrate(on lan: TestLAN, announce: [String]) throws -> TernProcess {
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:10.240.0.2:4444", "--serial", "off",
                                           "--net", "id=net0,tap=tapb"], wrapper: lan.host("h2"))
        let source = try TernProcess.guest("ip=10.240.0.10/24 progress=0", memory: "64M", extra: ["--net", "tap=tapa,mac=\(Self.mac)"],
                                           wrapper: lan.host("h1"))
        try source.waitForAPI()
        _ = try source.waitForStatus { $0.netState == .running }
        // The client reaches the VM at h1: the switch learns the MAC there.
        #expect(lan.client("ping -c 3 -i 0.2 -W 1 10.240.0.10").status == 0, "the VM answers at its first host")
        #expect(lan.switchPort(of: Self.mac) == "h1")
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", "tcp:10.240.0.2:4444", "--json"] + announce,
                                  withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        #expect(source.waitForExit(timeout: 20) == 0)
        try destination.waitForAPI()
        return destination
    }

    @Test func theAnnouncementTeachesTheSwitchWhereTheVMIsNow() throws {
        let lan = try TestLAN()
        let destination = try migrate(on: lan, announce: [])
        let deadline = Date(timeIntervalSinceNow: 5)
        while lan.switchPort(of: Self.mac) != "h2" && Date() < deadline { usleep(20_000) }
        #expect(lan.switchPort(of: Self.mac) == "h2", "the RARP from h2 moved the switch's entry")
        #expect(lan.client("ping -c 3 -i 0.2 -W 1 10.240.0.10").status == 0, "the client reaches the VM on its new host")
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

    /// Without announcements the silent guest teaches the switch nothing: it keeps sending to h1.
    @Test func withoutAnnouncementsTheSwitchKeepsSendingToTheOldHost() throws {
        let lan = try TestLAN()
        let destination = try migrate(on: lan, announce: ["--announce-rounds", "0"])
        usleep(1_000_000)
        #expect(lan.switchPort(of: Self.mac) == "h1", "nothing moved the switch's entry")
        #expect(lan.client("ping -c 2 -i 0.2 -W 1 10.240.0.10").status != 0, "the client's frames go to the old host")
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try destination.client.request(.GET, "/v1/vm").body)
        #expect(info.devices?.first?.counters["announcements_sent"] == 0)
    }
}
