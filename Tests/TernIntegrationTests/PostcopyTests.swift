import Foundation
import Glibc
import Testing
import TernAPI
import TernMachine
import TernMigration

/// Post-copy, hybrid and auto migrations of the bundled guest between tern processes.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct PostcopyTests {
    /// Migrates and checks what every mode must give: completion, identical memory, a guest that goes on.
    func migrateAndCheck(cmdline: String, arguments: [String], destinationArguments: [String] = []) throws -> MigrationReport {
        let pair = try MigrationPair(cmdline: cmdline, destinationArguments: destinationArguments)
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let sourceInfo = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        let (report, cli) = try pair.migrate(arguments + ["--verify"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true, "the destination's memory once complete equals the source's at the switch")
        #expect(pair.source.waitForExit(timeout: 10) == 0)
        try pair.destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.destination.client.request(.GET, "/v1/vm").body)
        // 4 KiB pages for a post-copy from the start, unless told otherwise; memory preallocated before
        // the hello follows --thp as it stands (its pages are never allocated during post-copy).
        let fourKiB = destinationArguments.contains("off")
            || arguments.contains("postcopy") && !destinationArguments.contains("on") && !destinationArguments.contains("--prealloc")
        #expect(info.memoryHugePages == (fourKiB ? false : sourceInfo.memoryHugePages),
                "huge pages for hybrid and auto, 4 KiB pages for a post-copy from the start unless --thp on")
        let moved = try pair.destination.waitForStatus { $0.iterations > before.iterations }
        let later = try pair.destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0, "the guest's checksum of its working set holds after post-copy")
        return r
    }

    @Test func postcopySendsEachPageOnceAndTheGuestGoesOn() throws {
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 progress=0", arguments: ["--mode", "postcopy"])
        let p = try #require(r.postcopy)
        #expect(r.order == "none", "post-copy alone runs no pre-copy round to order")
        #expect(r.switchoverReason == "post-copy: execution moves first")
        #expect(r.executionMovedAtMs != nil && r.memoryCompleteAtMs != nil)
        #expect(r.executionMovedAtMs! < r.memoryCompleteAtMs!)
        #expect(p.pagesPushed + p.pagesPulled == r.postcopyPagesSent, "every page arrived once, pushed or pulled")
        #expect(p.secondCopiesDropped == r.postcopyPagesResent, "each page sent twice had one copy dropped")
        #expect(try #require(r.postcopyPagesResent) <= p.requests, "only requested pages are sent twice")
        #expect(p.faults > 0, "the guest ran before its memory was complete")
        #expect(p.faultLatencyMaxMs >= p.faultLatencyP99Ms && p.faultLatencyP99Ms >= p.faultLatencyP50Ms)
        // Each non-zero page once: the bytes on the wire are within 2% of the guest's non-zero memory, its
        // 64 MiB fill and under a MiB of kernel, tables and stack (counted here, not from Tern's report).
        let nonZero = Double(64 << 20)
        #expect(Double(r.transferredBytes) >= nonZero)
        #expect(Double(r.transferredBytes) <= (nonZero + Double(1 << 20)) * 1.02, "\(r.transferredBytes) bytes for 64 MiB")
        #expect(r.rounds.count == 1, "no pre-copy round")
        #expect(try #require(r.downtimeMs) < 300)
        #expect(r.streams == 2, "a post-copy from the start pushes over two streams unless told otherwise")
    }

    /// With `--streams N` the push runs on every connection: each carries pages, and each page still goes once.
    @Test func postcopyPushesOverEveryStream() throws {
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 progress=0", arguments: ["--mode", "postcopy", "--streams", "3"])
        let p = try #require(r.postcopy)
        #expect(r.streams == 3)
        let byStream = try #require(r.postcopyPagesByStream)
        #expect(byStream.count == 3)
        #expect(byStream.allSatisfy { $0 > 1000 }, "every stream carried a share of the 16384 pages: \(byStream)")
        let sent = try #require(r.postcopyPagesSent)
        #expect(p.pagesPushed + p.pagesPulled == sent, "every page arrived once, pushed or pulled")
        // The streams carry the push (and nothing twice but what a demand reply overtook).
        #expect(byStream.reduce(0, +) >= p.pagesPushed)
        #expect(byStream.reduce(0, +) <= sent + p.secondCopiesDropped)
        #expect(Double(r.transferredBytes) <= (Double(64 << 20) + Double(1 << 20)) * 1.02, "\(r.transferredBytes) bytes for 64 MiB")
    }

    /// A preallocated destination places pages by minor faults (written into the file, then mapped).
    @Test(arguments: [["--mode", "postcopy"], ["--mode", "hybrid", "--precopy-rounds", "2"]])
    func postcopyIntoPreallocatedMemory(arguments: [String]) throws {
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 pattern=random rate=100 progress=0", arguments: arguments,
                                    destinationArguments: ["--memory", "256M", "--prealloc"])
        let p = try #require(r.postcopy)
        #expect(p.pagesPushed + p.pagesPulled == r.postcopyPagesSent)
        #expect(p.faults > 0)
    }

    /// Into huge pages (`--thp on`, which hybrid takes anyway): pages are written into the file and then mapped,
    /// holes fault as missing, the unreceived rest of a huge page as minor; hybrid unmaps the pages its rounds left stale.
    @Test(.enabled(if: (try? GuestMemory(size: 16 << 20, hugePages: .on)) != nil, "mounting a private tmpfs needs CAP_SYS_ADMIN"),
          arguments: [["--mode", "postcopy"], ["--mode", "hybrid", "--precopy-rounds", "2"]])
    func postcopyIntoHugePages(arguments: [String]) throws {
        // The push paced to 50 MB/s: the guest touches pages still missing whatever the host's speed (on a busy
        // host an unpaced push once delivered every page before the destination's vCPU ran).
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 pattern=random rate=100 progress=0", arguments: arguments + ["--bandwidth", "50M"],
                                    destinationArguments: ["--thp", "on"])
        let p = try #require(r.postcopy)
        #expect(p.pagesPushed + p.pagesPulled == r.postcopyPagesSent)
        #expect(p.faults > 0)
    }

    /// Into huge pages (the default: stale pages are unmapped at the switch) and 4 KiB pages (they are punched out).
    @Test(arguments: [[], ["--thp", "off"]])
    func hybridRunsPrecopyRoundsThenPostcopy(destinationArguments: [String]) throws {
        // Random writes, which rounds do shrink (a set rewritten flat out would end pre-copy after its first pass).
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 pattern=random rate=100 progress=0",
                                    arguments: ["--mode", "hybrid", "--precopy-rounds", "2", "--max-downtime", "1"],
                                    destinationArguments: destinationArguments)
        #expect(r.rounds.count == 3, "two pre-copy rounds and the post-copy phase")
        // The first pass's re-send probe, when it runs, counts as re-sent too.
        #expect(r.resentPages == r.rounds[1].pages + (r.resendProbePages ?? 0), "only the second pre-copy round (and the probe) re-sent pages")
        #expect(r.switchoverReason?.contains("post-copy") == true)
        #expect(r.postcopy != nil)
    }

    /// Hybrid against a guest rewriting 32 MiB at random flat out, which pre-copy cannot fit into a 5 ms downtime:
    /// pre-copy's rounds end (they stop shrinking the dirty set) and post-copy moves the rest. (A set rewritten in
    /// order can be caught between two sweeps: since rounds clear each page's dirty bit as they copy it, such a
    /// guest's rounds shrink to a few milliseconds.)
    @Test func hybridMovesAGuestThatPrecopyCannotConverge() throws {
        // Over a 50 MB/s cap the guest outruns the link whatever the host's speed (uncapped, a busy host once
        // slowed the guest enough for a round to meet the target).
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 pattern=random progress=0",
                                    arguments: ["--mode", "hybrid", "--precopy-rounds", "3", "--max-downtime", "5", "--bandwidth", "50M"])
        let precopyRounds = r.rounds.dropLast()
        #expect(!precopyRounds.isEmpty && precopyRounds.count <= 3)
        #expect(precopyRounds.last.map { $0.predictedDowntimeMs > 5 } == true,
                "pre-copy predicted more than the target when it stopped: \(r.rounds.map { ($0.pages, $0.dirtyPages, $0.predictedDowntimeMs) })")
        let p = try #require(r.postcopy)
        #expect(p.pagesPushed + p.pagesPulled == r.postcopyPagesSent)
        #expect(try #require(r.downtimeMs) < 300)
    }

    /// `--bandwidth` paces post-copy's push as it does pre-copy (the cap is lifted only inside the downtime).
    @Test func bandwidthPacesThePostcopyPush() throws {
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=8 pattern=random rate=20 progress=0",
                                    arguments: ["--mode", "postcopy", "--bandwidth", "40M"])
        let p = try #require(r.postcopy)
        let seconds = p.memoryCompleteAfterMs / 1000
        let postcopyBytes = Double(try #require(r.rounds.last).bytes)
        // The bucket starts full (9 MiB at most), and the rest goes at 40 MB/s.
        #expect(postcopyBytes / 40e6 - seconds < 0.4, "\(postcopyBytes) bytes in \(seconds) s under a 40 MB/s cap")
        #expect(postcopyBytes > 60e6)
    }

    /// While post-copy pushes, the progress a `tern migrate` without --json shows moves on.
    @Test func postcopyProgressMovesOn() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=8 pattern=random rate=20 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", pair.source.apiSocket, "--to", pair.address, "--mode", "postcopy",
                                   "--bandwidth", "20M"], withAPI: false)
        var seen: [MigrationReport] = []
        let deadline = Date(timeIntervalSinceNow: 30)
        while Date() < deadline, cli.process.isRunning {
            if let report = pair.source.migrationReport(), report.status == .postcopy { seen.append(report) }
            usleep(200_000)
        }
        #expect(cli.waitForExit(timeout: 30) == 0, "\(cli.stderr)")
        let percents = seen.compactMap(\.roundPercent)
        let (first, last) = (try #require(seen.first, "no progress seen during post-copy"), try #require(seen.last))
        #expect(percents.count >= 3 && (percents.last ?? 0) > (percents.first ?? 0), "\(percents)")
        #expect(last.transferredBytes > first.transferredBytes + 10_000_000)
        #expect(cli.stderr.contains("pushing the pages still owed"), "\(cli.stderr)")
    }

    @Test func autoSwitchesToPostcopyWhenPrecopyCannotMeetTheTarget() throws {
        // A 5 ms target against a guest rewriting 32 MiB at random flat out, over a 50 MB/s cap: whatever
        // the host's speed, the guest dirties its set far faster than the link sends it, so pre-copy cannot converge
        // (on a busy host an uncapped round was once fast enough to meet the target).
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 pattern=random progress=0",
                                    arguments: ["--mode", "auto", "--max-downtime", "5", "--max-rounds", "4", "--bandwidth", "50M"])
        #expect(r.switchoverReason?.contains("switching to post-copy") == true, "\(r.switchoverReason ?? "")")
        #expect(r.postcopy != nil)
    }

    /// A VM that arrived by one kind of migration leaves by another: pre-copy, then post-copy from that
    /// destination (4 KiB pages, its memory received by pre-copy), then hybrid from the post-copy's
    /// destination (its memory placed by userfaultfd), each verified, the guest counting on throughout.
    @Test func aVMMovesOnFromHostToHost() throws {
        var current = try TernProcess.guest("fill=64 dirty=16 pattern=random rate=50 progress=0", memory: "256M")
        try current.waitForAPI()
        var last = try current.waitForStatus { $0.phase == .dirty }
        for mode in [["--mode", "precopy"], ["--mode", "postcopy"], ["--mode", "hybrid", "--precopy-rounds", "1"]] {
            let port = freePort()
            let next = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(port)", "--serial", "off"])
            let deadline = Date(timeIntervalSinceNow: 10)
            while !next.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
            let cli = try TernProcess(["migrate", "--insecure", "--api-socket", current.apiSocket, "--to", "tcp:127.0.0.1:\(port)", "--json", "--verify"] + mode,
                                      withAPI: false)
            _ = cli.waitForExit(timeout: 60)
            let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "\(mode): no report: \(cli.stderr)")
            #expect(r.status == .completed, "\(mode): \(r.reason ?? "")")
            #expect(r.verification?.match == true, "\(mode)")
            #expect(current.waitForExit(timeout: 10) == 0)
            try next.waitForAPI()
            let moved = try next.waitForStatus { $0.iterations > last.iterations }
            #expect(moved.errors == 0, "\(mode)")
            // A post-copy counts as completed once the destination holds all memory, so the next hop may
            // start at once (a VM whose memory is still arriving is refused); the guest checks its memory first.
            last = try next.waitForStatus { $0.verified > moved.verified }
            current = next
        }
        #expect(last.errors == 0)
    }

    /// `tern migrate-postcopy` (QEMU's migrate-start-postcopy) switches a hybrid migration in the middle of
    /// its first pass: post-copy takes exactly what the pass had not sent and what the guest wrote since.
    @Test func migratePostcopySwitchesInTheMiddleOfARound() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=4 pattern=random rate=50 progress=0")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", pair.source.apiSocket, "--to", pair.address, "--json", "--verify",
                                   "--mode", "hybrid", "--precopy-rounds", "20", "--bandwidth", "20M"], withAPI: false)
        // Into the first pass (64 MiB at 20 MB/s: over three seconds), well past the bucket's first burst.
        let deadline = Date(timeIntervalSinceNow: 30)
        while Date() < deadline, (pair.source.migrationReport()?.transferredBytes ?? 0) < 16_000_000 { usleep(50_000) }
        let request = try TernProcess(["migrate-postcopy", "--api-socket", pair.source.apiSocket], withAPI: false)
        #expect(request.waitForExit() == 0, "\(request.stderr)")
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        let r = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.switchoverReason == "post-copy requested (tern migrate-postcopy) during pre-copy round 0", "\(r.switchoverReason ?? "")")
        #expect(r.verification?.match == true)
        #expect(r.rounds.count == 2, "the first pass, cut short, and post-copy")
        #expect(r.resentPages == 0, "no pre-copy round after the first pass: post-copy's pages are not re-sends")
        let first = try #require(r.rounds.first)
        #expect(first.bytes < 40_000_000, "the pass stopped when asked, not at its end: \(first.bytes) bytes")
        let p = try #require(r.postcopy)
        #expect(p.pagesPushed + p.pagesPulled == r.postcopyPagesSent)
        // Each page about once: the 64 MiB fill and under a MiB of the rest, plus the guest's 4 MiB working set
        // once more (rewritten after the pass sent it). Sending the pass's pages again would add 16 MB or more.
        #expect(Double(r.transferredBytes) <= Double(65 << 20) * 1.02 + Double(4 << 20) + 1e6, "\(r.transferredBytes) bytes")
        #expect(pair.source.waitForExit(timeout: 10) == 0)
        try pair.destination.waitForAPI()
        let moved = try pair.destination.waitForStatus { $0.iterations > before.iterations }
        _ = try pair.destination.waitForStatus { $0.verified > moved.verified && $0.errors == 0 }
    }

    /// A pre-copy cannot be switched (its destination was not set up for post-copy), nor a migration that is not there.
    @Test func migratePostcopyRefusesWhatItCannotSwitch() throws {
        let idle = try TernProcess.guest("progress=0")
        try idle.waitForAPI()
        let none = try TernProcess(["migrate-postcopy", "--api-socket", idle.apiSocket], withAPI: false)
        #expect(none.waitForExit() != 0)
        #expect(none.stderr.contains("no migration is in progress"), "\(none.stderr)")

        let pair = try MigrationPair(cmdline: "fill=64 dirty=16 pattern=random rate=50 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", pair.source.apiSocket, "--to", pair.address, "--json", "--bandwidth", "20M"],
                                  withAPI: false)
        let deadline = Date(timeIntervalSinceNow: 30)
        while Date() < deadline, (pair.source.migrationReport()?.transferredBytes ?? 0) == 0 { usleep(50_000) }
        let refused = try TernProcess(["migrate-postcopy", "--api-socket", pair.source.apiSocket], withAPI: false)
        #expect(refused.waitForExit() != 0)
        #expect(refused.stderr.contains("start it with --mode hybrid or --mode auto"), "\(refused.stderr)")
        #expect(cli.waitForExit(timeout: 60) == 0, "the pre-copy goes on undisturbed")
        let r = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(r.status == .completed && r.postcopy == nil)
    }

    @Test func autoStaysPrecopyWhenItConverges() throws {
        let r = try migrateAndCheck(cmdline: "fill=32 dirty=4 pattern=random rate=10 progress=0", arguments: ["--mode", "auto"])
        #expect(r.postcopy == nil)
        #expect(r.switchoverReason?.hasPrefix("converged") == true)
    }
}

/// Post-copy whose connection is cut (a relay between the two processes is
/// killed) and then resumed with `tern migrate --resume`.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct PostcopyRecoveryTests {
    /// A rate-limited relay, so post-copy lasts long enough to be cut.
    func startRelay(from port: UInt16, to destination: UInt16, rateMbit: Int) throws -> Process {
        // A unique name: a relay killed earlier leaves its file behind, which must not pass for this one's.
        let ready = FileManager.default.temporaryDirectory.appendingPathComponent("tern-relay-\(UUID().uuidString)").path
        let relay = Process()
        relay.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        relay.arguments = ["python3", TernProcess.repository.appendingPathComponent("tools/delay_relay.py").path,
                           "--listen", "127.0.0.1:\(port)", "--connect", "127.0.0.1:\(destination)", "--delay-ms", "0",
                           "--rate-mbit", "\(rateMbit)", "--ready-file", ready, "--quiet"]
        try relay.run()
        let deadline = Date(timeIntervalSinceNow: 10)
        while !FileManager.default.fileExists(atPath: ready) && Date() < deadline { usleep(20_000) }
        try #require(FileManager.default.fileExists(atPath: ready) && relay.isRunning, "the relay did not start listening")
        return relay
    }

    /// Destinations on 4 KiB pages (the default for post-copy) and, where a private tmpfs can be mounted, on huge pages.
    static let destinationPageChoices: [[String]] = [[]] + ((try? GuestMemory(size: 16 << 20, hugePages: .on)) != nil ? [["--thp", "on"]] : [])

    /// Over mutual TLS too: the resume's connection is secured as the first one was.
    @Test(arguments: destinationPageChoices, [TestChannel.insecure, .tls])
    func aCutConnectionIsResumedAndTheMemoryIsIdentical(destinationArguments: [String], channel: TestChannel) throws {
        let certificates = channel == .tls ? try TestCertificates() : nil
        let destinationPort = freePort(), relayPort = freePort()
        let destination = try TernProcess(["run", "--incoming", "tcp:127.0.0.1:\(destinationPort)", "--serial", "off"] + destinationArguments
                                          + channel.destinationArguments(certificates))
        let source = try TernProcess.guest("fill=64 dirty=32 progress=0", memory: "256M")
        try source.waitForAPI()
        let before = try source.waitForStatus { $0.phase == .dirty }
        let sourceInfo = try APIJSON.decoder.decode(MachineInfo.self, from: try source.client.request(.GET, "/v1/vm").body)
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
        let relay = try startRelay(from: relayPort, to: destinationPort, rateMbit: 200)
        defer { if relay.isRunning { kill(relay.processIdentifier, SIGKILL); relay.waitUntilExit() } }

        // Two streams: the relay's death cuts the push streams and the demand channel with the control connection.
        let cli = try TernProcess(["migrate", "--api-socket", source.apiSocket, "--to", "tcp:127.0.0.1:\(relayPort)", "--json",
                                   "--mode", "postcopy", "--streams", "2", "--verify"] + channel.migrateArguments(certificates), withAPI: false)
        // Cut the link once execution has moved and pages are still flowing.
        let cutBy = Date(timeIntervalSinceNow: 30)
        var seen = source.migrationReport()
        while seen?.status != .postcopy && Date() < cutBy {
            usleep(20_000)
            seen = source.migrationReport()
        }
        // Says what went wrong if the window was missed (this test failed once in a full local run, unexplained).
        try #require(seen?.status == .postcopy, "status when the cut was due: \(seen?.status.rawValue ?? "none") \(seen?.reason ?? ""); migrate: \(cli.stderr)")
        usleep(300_000)
        kill(relay.processIdentifier, SIGKILL)
        relay.waitUntilExit()
        #expect(cli.waitForExit(timeout: 60) == 1)
        let paused = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "\(cli.stderr)")
        #expect(paused.status == .postcopyPaused, "\(paused.reason ?? "")")
        #expect(paused.reason?.contains("--resume") == true)

        // Both ends wait: the source keeps its pages and refuses to run the VM too; the destination serves its API.
        #expect(try source.client.request(.PUT, "/v1/vm/resume").status == 409)
        try destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try destination.client.request(.GET, "/v1/vm").body)
        #expect(info.memoryHugePages == (destinationArguments.isEmpty ? false : sourceInfo.memoryHugePages), "placed the way this case tests")
        let waiting = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("tern migrate --resume") && Date() < waiting { usleep(20_000) }
        #expect(destination.stderr.contains("post-copy connection lost"))

        // A stranger on the incoming address is turned away; the wait goes on.
        // The log line comes just before the listener is bound again: retry a refused connect for a while.
        let connectDeadline = Date(timeIntervalSinceNow: 10)
        var strangerOrNil = try? Endpoint.tcp(host: "127.0.0.1", port: destinationPort).connect()
        while strangerOrNil == nil && Date() < connectDeadline {
            usleep(50_000)
            strangerOrNil = try? Endpoint.tcp(host: "127.0.0.1", port: destinationPort).connect()
        }
        let stranger = try #require(strangerOrNil, "the destination did not listen again")
        _ = Array("GET / HTTP/1.0\r\n\r\n".utf8).withUnsafeBytes { write(stranger.rawValue, $0.baseAddress, $0.count) }
        usleep(200_000)

        let resume = try TernProcess(["migrate", "--api-socket", source.apiSocket, "--resume", "--to", "tcp:127.0.0.1:\(destinationPort)",
                                      "--json"], withAPI: false)
        #expect(resume.waitForExit(timeout: 60) == 0, "\(resume.stderr)")
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(resume.stdout.utf8)), "\(resume.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true, "memory after the resume is identical to the source's at the switch")
        let p = try #require(r.postcopy)
        #expect(p.reconnections == 1)
        #expect(r.postcopyPagesByStream?.count == 2, "the push ran on both streams before the cut, on one after")
        #expect(destination.stderr.contains("refused a connection while waiting for the resume"))
        #expect(source.waitForExit(timeout: 10) == 0)
        let moved = try destination.waitForStatus { $0.iterations > before.iterations }
        let later = try destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0)
    }

    /// While post-copy still owes pages, the source is the only holder of them: `tern quit` is refused and
    /// SIGTERM waits until the destination has all memory; then the source ends by itself.
    @Test func theSourceOutlivesQuitAndSIGTERMUntilPostcopyHasDelivered() throws {
        let destinationPort = freePort(), relayPort = freePort()
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(destinationPort)", "--serial", "off"])
        let source = try TernProcess.guest("fill=64 dirty=32 progress=0", memory: "256M")
        try source.waitForAPI()
        _ = try source.waitForStatus { $0.phase == .dirty }
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
        // 80 Mbit/s: the 64 MiB the guest holds take about 7 s to push, long enough to ask the source to end.
        let relay = try startRelay(from: relayPort, to: destinationPort, rateMbit: 80)
        // SIGKILL: a relay told to stop keeps running while the connections it relayed linger, and holds the test's output open.
        defer { if relay.isRunning { kill(relay.processIdentifier, SIGKILL); relay.waitUntilExit() } }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", "tcp:127.0.0.1:\(relayPort)",
                                   "--json", "--mode", "postcopy", "--verify"], withAPI: false)
        let movedBy = Date(timeIntervalSinceNow: 30)
        var seen = source.migrationReport()
        while seen?.status != .postcopy && Date() < movedBy {
            usleep(20_000)
            seen = source.migrationReport()
        }
        try #require(seen?.status == .postcopy, "\(seen?.status.rawValue ?? "none"): \(cli.stderr)")
        let quit = try source.client.request(.PUT, "/v1/vm/quit")
        #expect(quit.status == 409, "quit refused while pages are owed")
        #expect(quit.errorMessage?.contains("holds pages it still needs") == true, "\(quit.errorMessage ?? "")")
        kill(source.process.processIdentifier, SIGTERM)
        let logged = Date(timeIntervalSinceNow: 10)
        while !source.stderr.contains("deferred") && Date() < logged { usleep(20_000) }
        #expect(source.stderr.contains("signal 15 deferred"), "\(source.stderr)")
        #expect(source.process.isRunning, "the source holds on to the pages")

        #expect(cli.waitForExit(timeout: 90) == 0, "\(cli.stderr)")
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "\(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        #expect(source.waitForExit(timeout: 20) == 0)
        try destination.waitForAPI()
        #expect(try destination.status() != nil)
    }

    /// A post-copy to a destination started with `TERN_MIGRATION_FAULT=fault`: the migration must pause
    /// (`postcopy-paused`) with the destination waiting as `waitingFor` says, then `--resume` must complete it
    /// with identical memory, and the guest run on intact. `checkWaiting` looks at the destination's log.
    func pausedThenResumed(fault: String, waitingFor: String, checkWaiting: (String) -> Void) throws -> (MigrationReport, TernProcess) {
        let port = freePort()
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(port)", "--serial", "off"],
                                          environment: ["TERN_MIGRATION_FAULT": fault])
        let source = try TernProcess.guest("fill=32 dirty=16 progress=0", memory: "128M")
        try source.waitForAPI()
        let before = try source.waitForStatus { $0.phase == .dirty }
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }

        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", "tcp:127.0.0.1:\(port)", "--json",
                                   "--mode", "postcopy", "--verify"], withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 1)
        let paused = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "\(cli.stderr)")
        #expect(paused.status == .postcopyPaused, "\(paused.reason ?? "")")
        let waiting = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains(waitingFor) && Date() < waiting { usleep(20_000) }
        checkWaiting(destination.stderr)

        let resume = try TernProcess(["migrate", "--api-socket", source.apiSocket, "--resume", "--json"], withAPI: false)
        #expect(resume.waitForExit(timeout: 60) == 0, "\(resume.stderr)")
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(resume.stdout.utf8)), "\(resume.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true, "memory after the resume is identical to the source's at the switch")
        #expect(r.postcopy?.reconnections == 1)
        #expect(source.waitForExit(timeout: 10) == 0)
        let moved = try destination.waitForStatus { $0.iterations > before.iterations }
        let later = try destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0)
        return (r, destination)
    }

    /// A post-copy frame damaged on the way (it fails its CRC at the destination) is dropped before any of its
    /// pages is placed, and the migration waits for `--resume` as for a cut connection; its pages go again.
    @Test func aDamagedFrameWaitsForTheResumeAndItsPagesComeAgain() throws {
        _ = try pausedThenResumed(fault: "corrupt-postcopy-frame", waitingFor: "tern migrate --resume") { log in
            #expect(log.contains("checksum mismatch") && log.contains("post-copy connection lost"), "\(log)")
            #expect(!log.contains("post-copy failed"), "the VM is not paused for good")
        }
    }

    /// The destination holds all memory but its `complete` never reaches the source: the source
    /// pauses, the destination stays resumable, and `--resume` ends the migration on both sides.
    @Test func aLostCompleteIsResumedAndBothSidesEnd() throws {
        let (_, destination) = try pausedThenResumed(fault: "lose-complete", waitingFor: "before the source confirmed") { log in
            #expect(log.contains("all memory is here"))
        }
        #expect(destination.stderr.contains("`complete` sent again after the resume"))
    }
}
