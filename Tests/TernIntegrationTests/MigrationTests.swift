import Foundation
import Glibc
import Testing
import TernAPI
import TernMachine
import TernMigration
import TernWire

/// A free TCP port on loopback (bound then released: good enough for tests run one at a time).
func freePort() -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = 0
    _ = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    return UInt16(bigEndian: address.sin_port)
}

/// Source and destination tern processes and the migration between them.
struct MigrationPair {
    let source: TernProcess
    let destination: TernProcess
    let address: String

    init(cmdline: String, memory: String = "256M", sourceArguments: [String] = [], destinationArguments: [String] = [],
         environment: [String: String] = [:], address: String? = nil) throws {
        self.address = address ?? "tcp:127.0.0.1:\(freePort())"
        destination = try TernProcess(["run", "--insecure", "--incoming", self.address, "--serial", "off"] + destinationArguments, environment: environment)
        source = try TernProcess.guest(cmdline, memory: memory, extra: sourceArguments)
        try source.waitForAPI()
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
    }

    /// Runs `tern migrate ... --json` and decodes its report.
    func migrate(_ extra: [String] = [], timeout: Double = 120) throws -> (MigrationReport?, TernProcess) {
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", address, "--json"] + extra, withAPI: false)
        _ = cli.waitForExit(timeout: timeout)
        return (try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), cli)
    }
}

@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct MigrationTests {
    @Test(arguments: [
        "progress=0",
        "fill=64 dirty=16 progress=0",
        "fill=64 dirty=32 pattern=random rate=100 progress=0",
        "fill=96 dirty=64 pattern=hotspot progress=0",
        "fill=32 dirty=16 pattern=seq bytes=64 progress=0",
    ])
    func guestKeepsRunningOnTheDestination(cmdline: String) throws {
        let pair = try MigrationPair(cmdline: cmdline)
        let before = try pair.source.waitForStatus { $0.phase == .dirty || $0.phase == .idle }
        let sourceInfo = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        let (report, cli) = try pair.migrate(["--verify", "--max-downtime", "300"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(cli.waitForExit() == 0)
        #expect(r.verification?.match == true)
        #expect(r.order == "dirty-frequency", "the default order")
        #expect(r.downtimeMs != nil && r.downtimeMs! > 0)
        #expect(r.transferredBytes > 0 && r.dataPages + r.zeroPages >= (256 << 20) / 4096)
        #expect(!r.rounds.isEmpty)
        // The first pass's re-send probe (at most 1024 pages) counts as re-sent, not in round 0.
        #expect((r.resendProbePages ?? 0) <= 1024)
        #expect(r.resentPages == r.rounds.dropFirst().reduce(r.resendProbePages ?? 0) { $0 + $1.pages })
        #expect(r.rounds[0].pages == (256 << 20) / 4096, "round 0 is the first pass over all of RAM")
        // The source hands over and exits; the guest continues on the destination.
        #expect(pair.source.waitForExit(timeout: 10) == 0)
        try pair.destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.destination.client.request(.GET, "/v1/vm").body)
        #expect(info.memoryHugePages == sourceInfo.memoryHugePages, "a pre-copy destination takes huge pages where the source could")
        #expect(info.vcpus == sourceInfo.vcpus && info.cmdline == sourceInfo.cmdline)
        #expect(info.kernel == sourceInfo.kernel && !info.kernel.isEmpty, "the kernel the VM was booted with, as the source named it")
        let moved = try #require(try pair.destination.status())
        #expect(moved.iterations >= before.iterations, "the iteration count continues, it does not restart")
        let later = try pair.destination.waitForStatus { $0.iterations > moved.iterations }
        #expect(later.errors == 0, "the guest's own checksum of its working set still holds")
        if moved.phase == .dirty {
            _ = try pair.destination.waitForStatus { $0.verified > moved.verified }
        }
    }

    /// Every vCPU moves, the ones the guest never started (waiting for their startup IPI) among them.
    @Test func aTwoVcpuVMMigrates() throws {
        let destinationPort = freePort()
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(destinationPort)", "--serial", "off"])
        let source = try TernProcess.guest("fill=32 dirty=8 pattern=random rate=50 progress=0", memory: "256M", extra: ["--cpus", "2"])
        try source.waitForAPI()
        let before = try source.waitForStatus { $0.phase == .dirty }
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming migration") && Date() < deadline { usleep(20_000) }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", "tcp:127.0.0.1:\(destinationPort)", "--json", "--verify"],
                                  withAPI: false)
        _ = cli.waitForExit(timeout: 60)
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true, "both vCPUs' state and the memory match")
        try destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try destination.client.request(.GET, "/v1/vm").body)
        #expect(info.vcpus == 2)
        _ = try destination.waitForStatus { $0.iterations > before.iterations && $0.errors == 0 }
    }

    /// During pre-copy the run state is the user's (pausing helps a migration converge, as with QEMU's `stop`)
    /// and the VM arrives paused; from the switch-over on the migration owns it and the API refuses.
    @Test func pausingDuringPrecopyIsKeptAndTheSwitchOwnsTheRunState() throws {
        let (pair, cli) = try startCappedMigration()
        let before = try #require(try pair.source.status())
        #expect(try pair.source.client.request(.PUT, "/v1/vm/pause").status == 204, "a pause during pre-copy is the user's to make")
        let paused = try #require(try pair.source.status())
        #expect(try pair.source.client.request(.PUT, "/v1/vm/migration/parameters", body: Data(#"{"bandwidth": 0}"#.utf8)).status == 200)
        // The switch-over pauses and resumes the VM itself: watch for it and try to resume meanwhile.
        var refused: String?
        let deadline = Date(timeIntervalSinceNow: 30)
        while Date() < deadline, refused == nil, cli.process.isRunning {
            if let report = pair.source.migrationReport(), report.status == .stopAndCopy || report.status == .completing {
                let answer = try? pair.source.client.request(.PUT, "/v1/vm/resume")
                if answer?.status == 409 { refused = answer?.errorMessage }
            }
        }
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        let r = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(r.status == .completed, "\(r.reason ?? "")")
        // Refused either while the switch runs or, if the poll came just after the hand-over (the report still
        // says completing), because the VM has left: it is never resumed here.
        if let refused { #expect(refused.contains("switching over") || refused.contains("exited"), "\(refused)") }
        try pair.destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.destination.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .paused, "paused during pre-copy, so paused on arrival")
        #expect(try pair.destination.status()?.iterations == paused.iterations)
        #expect(paused.iterations >= before.iterations)
        #expect(try pair.destination.client.request(.PUT, "/v1/vm/resume").status == 204)
        _ = try pair.destination.waitForStatus { $0.iterations > paused.iterations && $0.errors == 0 }
    }

    /// A VM paused at the source arrives paused (as QEMU keeps a stopped VM stopped) and runs once resumed there.
    @Test(arguments: [["--mode", "precopy"], ["--mode", "postcopy"]])
    func aPausedVMArrivesPaused(mode: [String]) throws {
        let pair = try MigrationPair(cmdline: "fill=32 dirty=8 pattern=random rate=50 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        #expect(try pair.source.client.request(.PUT, "/v1/vm/pause").status == 204)
        let paused = try #require(try pair.source.status())
        let (report, cli) = try pair.migrate(["--verify"] + mode)
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        try pair.destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.destination.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .paused)
        usleep(300_000)
        #expect(try pair.destination.status()?.iterations == paused.iterations, "it did not run while paused")
        #expect(pair.destination.stderr.contains("paused as it was at the source"), "\(pair.destination.stderr)")
        #expect(try pair.destination.client.request(.PUT, "/v1/vm/resume").status == 204)
        _ = try pair.destination.waitForStatus { $0.iterations > paused.iterations && $0.errors == 0 }
    }

    /// A migrated VM ends cleanly on SIGTERM, like any other (the signal handling moves from waiting to running).
    @Test func aMigratedVMStopsOnSIGTERM() throws {
        let pair = try MigrationPair(cmdline: "progress=0")
        let (report, cli) = try pair.migrate()
        #expect(try #require(report, "no report: \(cli.stderr)").status == .completed)
        try pair.destination.waitForAPI()
        kill(pair.destination.process.processIdentifier, SIGTERM)
        #expect(pair.destination.waitForExit(timeout: 5) == 0, "\(pair.destination.stderr)")
        #expect(pair.destination.stderr.contains("stopped by signal 15"))
        #expect(!FileManager.default.fileExists(atPath: pair.destination.apiSocket))
    }

    /// A destination that prepared its RAM while waiting (pages land in place), with two streams.
    @Test func preallocatedDestinationReceivesIdenticalMemory() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=random rate=100 progress=0",
                                     destinationArguments: ["--memory", "256M", "--prealloc"])
        #expect(pair.destination.stderr.contains("preallocated 256M of guest RAM"), "\(pair.destination.stderr)")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--verify", "--streams", "2"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        try pair.destination.waitForAPI()
        let moved = try pair.destination.waitForStatus { $0.iterations > before.iterations }
        let later = try pair.destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0)
    }

    @Test func preallocOnAnIncomingVMNeedsItsSize() throws {
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(freePort())", "--prealloc"])
        #expect(destination.waitForExit() != 0)
        #expect(destination.stderr.contains("--prealloc with --incoming needs --memory"))
    }

    @Test func xbzrleSendsResentPagesAsDeltas() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=random rate=100 bytes=64 progress=0")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--compress", "xbzrle", "--xbzrle-cache", "64M", "--verify", "--bandwidth", "50M"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true, "pages rebuilt from deltas are byte-identical")
        #expect(r.compression == "xbzrle")
        let x = try #require(r.xbzrle)
        #expect(x.hits > 0 && (r.deltaPages ?? 0) > 0, "re-sent pages went as deltas")
        #expect(x.bytesSaved > 0)
        try pair.destination.waitForAPI()
        let moved = try pair.destination.waitForStatus { $0.iterations > before.iterations }
        let later = try pair.destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0)
    }

    @Test func dirtyFrequencyOrderingWithXBZRLE() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=hotspot rate=100 bytes=64 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--order", "dirty-frequency", "--compress", "xbzrle", "--verify", "--bandwidth", "50M"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.order == "dirty-frequency")
        #expect(r.verification?.match == true)
        #expect(r.resentPages == r.rounds.dropFirst().reduce(r.resendProbePages ?? 0) { $0 + $1.pages })
    }

    /// Ordering alone holds the hot pages back for the stop-and-copy; memory still arrives whole.
    @Test func dirtyFrequencyOrderingHoldsHotPagesBack() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=hotspot rate=100 bytes=64 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--order", "dirty-frequency", "--verify", "--bandwidth", "50M", "--max-downtime", "50"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        #expect(r.rounds.count >= 3, "a re-send round between the first pass and the switch")
        #expect((r.heldBackPages ?? 0) > 0, "the hot spot's pages waited for the stop-and-copy")
        let last = try #require(r.rounds.last)
        #expect(last.pages >= r.heldBackPages ?? 0, "held-back pages went in the stop-and-copy")
    }

    @Test func parallelStreamsWithEveryOption() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=hotspot rate=100 bytes=64 progress=0")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--streams", "4", "--compress", "xbzrle,zstd", "--order", "dirty-frequency",
                                              "--verify", "--bandwidth", "50M"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true, "four streams, deltas and zstd rebuild identical memory")
        #expect(r.streams == 4 && r.compression == "xbzrle,zstd" && r.order == "dirty-frequency")
        let zstdIn = try #require(r.zstdInputBytes), zstdOut = try #require(r.zstdOutputBytes)
        #expect(zstdOut > 0 && zstdOut < zstdIn, "zstd shrank the frames it was used on")
        #expect((r.deltaPages ?? 0) > 0, "re-sent pages went as deltas")
        try pair.destination.waitForAPI()
        let moved = try pair.destination.waitForStatus { $0.iterations > before.iterations }
        let later = try pair.destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0)
    }

    /// Random writes while four streams each carry their share round after round:
    /// a page's newer copy must never be overtaken by an older one. In address
    /// order, the one test of `--order sequential` end to end.
    @Test func parallelStreamsKeepEveryPagesLatestCopy() throws {
        let pair = try MigrationPair(cmdline: "fill=96 dirty=64 pattern=random rate=200 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--streams", "4", "--order", "sequential", "--verify", "--max-downtime", "50"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.order == "sequential")
        #expect(r.verification?.match == true)
        #expect(r.rounds.count >= 2, "at least one re-send round")
        try pair.destination.waitForAPI()
        let moved = try #require(try pair.destination.status())
        let later = try pair.destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0)
    }

    @Test func strangersCannotJoinAMigrationAsStreams() throws {
        /// A fake source asks for two streams, then presents `joins` as extra connections (index, token transform).
        func attempt(_ joins: [(index: UInt32, token: (UInt64) -> UInt64)], expecting text: String,
                     sourceLocation: SourceLocation = #_sourceLocation) throws {
            let port = freePort()
            let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(port)", "--serial", "off"])
            let deadline = Date(timeIntervalSinceNow: 10)
            while !destination.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
            let endpoint = Endpoint.tcp(host: "127.0.0.1", port: port)
            var control = Optional(try endpoint.connect())
            // A destination that never answers fails the test instead of hanging it.
            var limit = timeval(tv_sec: 30, tv_usec: 0)
            setsockopt(control!.rawValue, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
            let controlStream = FDStream(fd: control!.rawValue)
            let hello = Hello(bootID: "test", machine: MachineDescription(memorySize: 64 << 20, vcpuCount: 1, kernelPath: "", commandLine: ""),
                              cpuid: [], devices: ["UART"], streams: 2)
            try controlStream.writeFrame(.hello, payload: hello.encoded)
            let (_, reply) = try controlStream.readFrame()
            let verdict = try Verdict(decoding: reply)
            #expect(verdict.accepted && verdict.token != 0, sourceLocation: sourceLocation)
            var extras: [AnyObject] = []
            for join in joins {
                let extra = try endpoint.connect()
                try FDStream(fd: extra.rawValue).writeFrame(.streamHello, payload: StreamHello(token: join.token(verdict.token), index: join.index).encoded)
                extras.append(extra)
                usleep(100_000)
            }
            // The fake source gives up: a destination whose streams all joined sees its control stream end.
            usleep(300_000)
            control = nil
            let code = destination.waitForExit(timeout: 20)
            #expect(code != nil && code != 0, sourceLocation: sourceLocation)
            #expect(destination.stderr.contains(text), "stderr: \(destination.stderr)", sourceLocation: sourceLocation)
            #expect(!destination.stderr.contains("the VM runs here now"), sourceLocation: sourceLocation)
            _ = extras
        }
        // Strangers are turned away, and the migration fails only when its streams have not joined in time.
        try attempt([(5, { $0 })], expecting: "a page stream presented index 5; this migration has streams 0 to 1")
        try attempt([(0, { $0 })], expecting: "a page stream presented index 0")
        try attempt([(1, { $0 ^ 1 })], expecting: "wrong migration token")
        try attempt([(1, { $0 ^ 1 })], expecting: "1 page stream did not join within 5 s")
        // A stranger first, then the real stream: the migration goes on (and ends with its source, not the stranger).
        try attempt([(7, { $0 }), (1, { $0 })], expecting: "input ended")
    }

    /// Waits until the source reports pages on their way (a fixed sleep is too short on a loaded machine).
    func waitUntilPagesMove(_ source: TernProcess) throws {
        let deadline = Date(timeIntervalSinceNow: 30)
        while Date() < deadline {
            if let report = source.migrationReport(), report.status == .precopy, report.transferredBytes > 0 { return }
            usleep(50_000)
        }
        Issue.record("the migration did not start sending pages within 30 s")
        throw CancellationError()
    }

    /// A pre-copy slow enough to be interrupted (128 MiB at 20 MB/s), once its pages are moving.
    func startCappedMigration() throws -> (MigrationPair, TernProcess) {
        let pair = try MigrationPair(cmdline: "fill=128 dirty=16 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", pair.source.apiSocket, "--to", pair.address, "--json",
                                   "--bandwidth", "20M"], withAPI: false)
        try waitUntilPagesMove(pair.source)
        return (pair, cli)
    }

    @Test func killingTheDestinationMidMigrationLeavesTheSourceRunning() throws {
        let (pair, cli) = try startCappedMigration()
        kill(pair.destination.process.processIdentifier, SIGKILL)
        #expect(cli.waitForExit(timeout: 60) == 1)
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .failed)
        #expect(report.reason?.isEmpty == false, "the report says why")
        #expect(report.switchoverReason == nil, "it failed during pre-copy, before any switch-over")
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running)
        let now = try #require(try pair.source.status())
        _ = try pair.source.waitForStatus(timeout: 5) { $0.iterations > now.iterations }
    }

    /// A migration of a dirtying guest to a destination started with `TERN_MIGRATION_FAULT=fault`, and its report.
    func migrateIntoFault(_ fault: String, _ extra: [String] = []) throws -> (MigrationPair, MigrationReport, TernProcess) {
        let pair = try MigrationPair(cmdline: "fill=32 dirty=8 progress=0", environment: ["TERN_MIGRATION_FAULT": fault])
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(extra)
        return (pair, try #require(report, "no report: \(cli.stderr)"), cli)
    }

    /// The source's VM is in `state` (running by default: then its guest is seen counting on).
    func expectSourceVM(of pair: MigrationPair, is state: MachineState = .running, _ comment: Comment? = nil,
                        sourceLocation: SourceLocation = #_sourceLocation) throws {
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == state, comment, sourceLocation: sourceLocation)
        guard state == .running else { return }
        let now = try #require(try pair.source.status())
        _ = try pair.source.waitForStatus(timeout: 5) { $0.iterations > now.iterations }
    }

    @Test func destinationDyingAtSwitchOverResumesTheSource() throws {
        let (pair, r, _) = try migrateIntoFault("die-before-ready")
        #expect(r.status == .failed)
        #expect(r.switchoverReason != nil, "it got as far as the switch-over")
        #expect(r.reason?.isEmpty == false, "the report says why")
        try expectSourceVM(of: pair, "paused for the stop-and-copy, resumed after the failure")
        #expect(pair.destination.waitForExit() != 0)
    }

    /// After `go` the source cannot know whether the destination runs the VM: if `resumed` never comes, it keeps
    /// its VM paused, not running (running it in both places would fork it), reports failed and says why.
    @Test func aDestinationLostAfterGoLeavesTheSourcePaused() throws {
        let (pair, r, cli) = try migrateIntoFault("die-after-go")
        #expect(r.status == .failed)
        #expect(r.reason?.contains("the VM stays paused here") == true, "\(r.reason ?? "")")
        #expect(cli.waitForExit() != 0)
        try expectSourceVM(of: pair, is: .paused, "the source keeps the VM, paused")
        let held = try #require(try pair.source.status())
        usleep(300_000)
        #expect(try pair.source.status()?.iterations == held.iterations, "nothing runs here")
        #expect(pair.destination.waitForExit() != 0)
        // The operator, knowing the destination is dead, resumes it here: nothing was lost.
        #expect(try pair.source.client.request(.PUT, "/v1/vm/resume").status == 204)
        _ = try pair.source.waitForStatus(timeout: 5) { $0.iterations > held.iterations && $0.errors == 0 }
    }

    /// A destination that cannot take the VM state says so in its `ready`; the source resumes and reports why.
    @Test func aRejectedStateResumesTheSourceWithTheReason() throws {
        let (pair, r, _) = try migrateIntoFault("reject-state")
        #expect(r.status == .failed)
        #expect(r.reason?.contains("the destination rejected the VM") == true && r.reason?.contains("reject-state") == true, "\(r.reason ?? "")")
        try expectSourceVM(of: pair)
        #expect(pair.destination.waitForExit() != 0)
        #expect(!pair.destination.stderr.contains("the VM runs here now"))
    }

    /// `--verify` with digests that differ: the migration fails before the hand-over and the VM runs on here.
    @Test func aDigestMismatchFailsTheMigrationAndKeepsTheSource() throws {
        let (pair, r, _) = try migrateIntoFault("wrong-memory-digest", ["--verify"])
        #expect(r.status == .failed)
        #expect(r.verification?.match == false)
        #expect(r.verification.map { $0.sourceMemoryDigest != $0.destinationMemoryDigest } == true)
        #expect(r.reason?.contains("verification failed") == true, "\(r.reason ?? "")")
        try expectSourceVM(of: pair)
        #expect(pair.destination.waitForExit() != 0)
        #expect(pair.destination.stderr.contains("the source aborted: digests differ"), "\(pair.destination.stderr)")
    }

    @Test func cancelKeepsTheSourceAndTheDestinationNeverRuns() throws {
        let (pair, cli) = try startCappedMigration()
        let cancel = try TernProcess(["migrate-cancel", "--api-socket", pair.source.apiSocket], withAPI: false)
        #expect(cancel.waitForExit() == 0)
        #expect(cli.waitForExit(timeout: 30) == 1)
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .cancelled)
        let now = try #require(try pair.source.status())
        _ = try pair.source.waitForStatus(timeout: 5) { $0.iterations > now.iterations }
        #expect(pair.destination.waitForExit(timeout: 10) != 0)
        #expect(!pair.destination.stderr.contains("the VM runs here now"))
        #expect(pair.destination.stderr.contains("the source aborted: cancelled by the user"), "\(pair.destination.stderr)")
        // The last migration's report stays readable on the source, as a table or as JSON.
        let status = try TernProcess(["migrate-status", "--api-socket", pair.source.apiSocket], withAPI: false)
        #expect(status.waitForExit() == 0)
        #expect(status.stdout.contains("cancelled (cancelled by the user)") && status.stdout.contains("precopy"), "\(status.stdout)")
        let json = try TernProcess(["migrate-status", "--api-socket", pair.source.apiSocket, "--json"], withAPI: false)
        #expect(json.waitForExit() == 0)
        #expect(try APIJSON.decoder.decode(MigrationReport.self, from: Data(json.stdout.utf8)).status == .cancelled)
    }

    /// `--max-rounds` forces the switch-over of a guest that cannot converge, and the report says so.
    @Test func maxRoundsForcesTheSwitchOver() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=random progress=0")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--max-downtime", "1", "--max-rounds", "2", "--verify"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.switchoverReason == "max-rounds (2) reached", "\(r.switchoverReason ?? "")")
        #expect(r.rounds.count == 3, "two rounds, then the stop-and-copy")
        #expect(r.verification?.match == true)
        try pair.destination.waitForAPI()
        _ = try pair.destination.waitForStatus { $0.iterations > before.iterations }
    }

    /// The downtime the user asks for bounds the pause: a guest dirtying its memory converges and switches
    /// within `--max-downtime`, and the rounds before the switch predicted as much.
    @Test func theDowntimeStaysWithinMaxDowntime() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=random rate=50 progress=0")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--max-downtime", "100"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.switchoverReason?.hasPrefix("converged") == true, "\(r.switchoverReason ?? "")")
        let downtime = try #require(r.downtimeMs)
        #expect(downtime > 0 && downtime < 100, "\(downtime) ms of downtime against --max-downtime 100")
        #expect(r.maxDowntimeMs == 100)
        let lastPrediction = try #require(r.rounds.dropLast().last?.predictedDowntimeMs)
        #expect(lastPrediction <= 100, "the switch-over came when the prediction fitted: \(lastPrediction) ms")
        try pair.destination.waitForAPI()
        _ = try pair.destination.waitForStatus { $0.iterations > before.iterations && $0.errors == 0 }
    }

    /// Pages the guest never wrote travel as zero markers: an idle 256 MiB guest moves in well under a megabyte
    /// per ten MiB of RAM, and the report counts the markers.
    @Test func zeroPagesTravelAsMarkers() throws {
        let pair = try MigrationPair(cmdline: "progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .idle }
        let (report, cli) = try pair.migrate(["--verify"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        let pages = UInt64((256 << 20) / 4096)
        #expect(r.zeroPages > pages * 9 / 10, "\(r.zeroPages) zero pages of \(pages)")
        #expect(r.dataPages < pages / 10, "\(r.dataPages) data pages")
        #expect(r.transferredBytes < 8_000_000, "\(r.transferredBytes) bytes for an idle 256 MiB guest")
        #expect(r.ramBytes == 256 << 20)
    }

    /// Without --json a person sees progress while pre-copy runs (round, percent, throughput, predicted downtime)
    /// and a readable table at the end.
    @Test func aPersonSeesProgressAndATable() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=16 pattern=random rate=50 progress=0")
        _ = try pair.source.waitForStatus { $0.phase == .dirty }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", pair.source.apiSocket, "--to", pair.address, "--bandwidth", "20M"],
                                  withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        #expect(cli.stderr.contains("precopy round 0"), "\(cli.stderr)")
        #expect(cli.stderr.range(of: #"round 0 +\d+%  \d+\.\d MB sent"#, options: .regularExpression) != nil, "\(cli.stderr)")
        #expect(cli.stdout.range(of: #"(?m)^status +completed$"#, options: .regularExpression) != nil, "\(cli.stdout)")
        #expect(cli.stdout.range(of: #"(?m)^downtime +\d+\.\d ms \(shared-monotonic clock"#, options: .regularExpression) != nil, "\(cli.stdout)")
        #expect(cli.stdout.range(of: #"(?m)^bandwidth cap +20\.0 MB/s$"#, options: .regularExpression) != nil, "\(cli.stdout)")
        #expect(cli.stdout.contains("round      pages       zero        MB   dirty after"), "\(cli.stdout)")
        // One line per round, the first of them the whole of RAM.
        #expect(cli.stdout.range(of: #"(?m)^    0 +65536 "#, options: .regularExpression) != nil, "\(cli.stdout)")
    }

    /// `--timeout` forces the switch-over once it has passed; `--bandwidth` held the first pass to the cap.
    @Test func timeoutForcesTheSwitchOverAndTheCapHolds() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=32 pattern=random rate=100 progress=0")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--max-downtime", "1", "--timeout", "1", "--bandwidth", "20M"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.switchoverReason == "timeout (1 s) reached", "\(r.switchoverReason ?? "")")
        let first = try #require(r.rounds.first)
        // The bucket starts with up to 9 MiB; the rest of the 64 MiB fill went at 20 MB/s.
        #expect(Double(first.bytes) > 64e6)
        #expect((Double(first.bytes) - 9.5e6) / 20e6 <= first.durationMs / 1000 + 0.05,
                "\(first.bytes) bytes in \(first.durationMs) ms under a 20 MB/s cap")
        try pair.destination.waitForAPI()
        _ = try pair.destination.waitForStatus { $0.iterations > before.iterations }
    }

    /// `tern migrate-set` (QEMU's migrate-set-parameters) lifts the cap and raises the downtime target of a
    /// migration that, as started, would crawl (64 MiB at 10 MB/s) and never converge (a 16 MiB set rewritten
    /// flat out cannot go in 1 ms).
    @Test func migrateSetChangesTheLimitsOfARunningMigration() throws {
        let pair = try MigrationPair(cmdline: "fill=64 dirty=16 pattern=random progress=0")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", pair.source.apiSocket, "--to", pair.address, "--json", "--verify",
                                   "--bandwidth", "10M", "--max-downtime", "1"], withAPI: false)
        let deadline = Date(timeIntervalSinceNow: 30)
        while Date() < deadline, (pair.source.migrationReport()?.transferredBytes ?? 0) < 12_000_000 { usleep(50_000) }
        let set = try TernProcess(["migrate-set", "--api-socket", pair.source.apiSocket, "--bandwidth", "unlimited", "--max-downtime", "1000"],
                                  withAPI: false)
        #expect(set.waitForExit() == 0, "\(set.stderr)")
        #expect(set.stdout.contains("max downtime 1000.0 ms, bandwidth cap none"), "\(set.stdout)")
        #expect(cli.waitForExit(timeout: 60) == 0, "\(cli.stderr)")
        let r = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.maxDowntimeMs == 1000 && r.bandwidthLimit == nil)
        #expect(r.switchoverReason?.hasPrefix("converged") == true, "the new target fits: \(r.switchoverReason ?? "")")
        #expect(r.totalMs < 5000, "at 10 MB/s the fill alone would take over five seconds: \(r.totalMs) ms")
        #expect(r.verification?.match == true)
        try pair.destination.waitForAPI()
        _ = try pair.destination.waitForStatus { $0.iterations > before.iterations }

        // Nothing to change once it is over, and nothing to change it to that the start would refuse.
        let late = try TernProcess(["migrate-set", "--api-socket", pair.destination.apiSocket, "--max-downtime", "5"], withAPI: false)
        #expect(late.waitForExit() != 0)
        #expect(late.stderr.contains("no migration is in progress"), "\(late.stderr)")
        let none = try TernProcess(["migrate-set", "--api-socket", pair.destination.apiSocket], withAPI: false)
        #expect(none.waitForExit() != 0)
        #expect(none.stderr.contains("give --max-downtime, --bandwidth or both"), "\(none.stderr)")
    }

    /// Ctrl-C on `tern migrate` cancels as `tern migrate-cancel` does, and the report still comes.
    @Test func interruptingTernMigrateCancelsIt() throws {
        let (pair, cli) = try startCappedMigration()
        kill(cli.process.processIdentifier, SIGINT)
        #expect(cli.waitForExit(timeout: 30) == 1)
        #expect(cli.stderr.contains("cancelling the migration"), "\(cli.stderr)")
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .cancelled)
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running)
        let now = try #require(try pair.source.status())
        _ = try pair.source.waitForStatus(timeout: 5) { $0.iterations > now.iterations }
        #expect(pair.destination.waitForExit(timeout: 10) != 0)
        #expect(!pair.destination.stderr.contains("the VM runs here now"))
    }

    /// `unix:PATH` at both ends, as `tcp:`, with a second stream on the same path.
    @Test func migratesOverAUnixSocket() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("tern-incoming-\(UUID().uuidString).sock").path
        let pair = try MigrationPair(cmdline: "fill=32 dirty=8 pattern=random rate=50 progress=0", address: "unix:\(path)")
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(["--verify", "--streams", "2"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.destination == "unix:\(path)")
        #expect(r.verification?.match == true)
        #expect(r.downtimeClock == "shared-monotonic", "a Unix socket is always this host")
        #expect(pair.source.waitForExit(timeout: 10) == 0)
        try pair.destination.waitForAPI()
        _ = try pair.destination.waitForStatus { $0.iterations > before.iterations && $0.errors == 0 }
    }

    @Test func quitEndsADestinationThatIsStillWaiting() throws {
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(freePort())", "--serial", "off"])
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
        let info = try destination.client.request(.GET, "/v1/vm")
        #expect(info.status == 503)
        #expect(info.errorMessage?.contains("waiting for an incoming migration") == true)
        #expect(try destination.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(destination.waitForExit() == 0)
        #expect(!FileManager.default.fileExists(atPath: destination.apiSocket))
    }

    @Test func incompatibleDestinationIsRefusedBeforeAnyMemoryMoves() throws {
        let pair = try MigrationPair(cmdline: "progress=0", destinationArguments: ["--memory", "128M"])
        let (report, _) = try pair.migrate()
        let r = try #require(report)
        #expect(r.status == .failed)
        #expect(r.reason?.contains("--memory 128M") == true)
        #expect(r.transferredBytes < 4096, "no memory was sent")
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running)
    }

    @Test func secondMigrationToAUsedDestinationIsRefused() throws {
        let pair = try MigrationPair(cmdline: "progress=0")
        let (first, _) = try pair.migrate()
        #expect(first?.status == .completed)
        let other = try TernProcess.guest("progress=0", memory: "256M")
        try other.waitForAPI()
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", other.apiSocket, "--to", pair.address, "--json"], withAPI: false)
        #expect(cli.waitForExit(timeout: 30) == 1)
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .failed)
        #expect(report.reason?.contains("cannot connect") == true)
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try other.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running, "the refused source's VM runs on")
        let now = try #require(try other.status())
        _ = try other.waitForStatus(timeout: 5) { $0.iterations > now.iterations }
        // The migrated VM runs on at the destination, untouched by the second attempt.
        let moved = try #require(try pair.destination.status())
        _ = try pair.destination.waitForStatus(timeout: 5) { $0.iterations > moved.iterations }
    }

    @Test func sourceSurvivesAPeerThatIsNotTern() throws {
        // A server that answers the hello with garbage.
        let port = freePort()
        let listener = try Endpoint.tcp(host: "127.0.0.1", port: port).listen()
        let server = Thread {
            if let connection = try? Endpoint.accept(listener) {
                var buffer = [UInt8](repeating: 0, count: 4096)
                _ = read(connection.rawValue, &buffer, buffer.count)
                _ = write(connection.rawValue, "HTTP/1.1 400 Bad Request\r\n\r\n", 28)
                usleep(200_000)
            }
        }
        server.start()
        let source = try TernProcess.guest("progress=0")
        try source.waitForAPI()
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", source.apiSocket, "--to", "tcp:127.0.0.1:\(port)", "--json"], withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 1)
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8))
        #expect(report.status == .failed)
        #expect(report.reason?.contains("no valid answer") == true, "\(report.reason ?? "")")
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running)
    }

    /// Garbage on a destination's port is refused with its reason, and the destination goes on waiting.
    @Test func destinationRejectsStreamsThatAreNotTern() throws {
        let port = freePort()
        let destination = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(port)", "--serial", "off"])
        let deadline = Date(timeIntervalSinceNow: 10)
        while !destination.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
        var refusals = 0
        func attack(_ bytes: [UInt8], expecting text: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let connection = try Endpoint.tcp(host: "127.0.0.1", port: port).connect()
            _ = bytes.withUnsafeBytes { write(connection.rawValue, $0.baseAddress, $0.count) }
            shutdown(connection.rawValue, Int32(SHUT_WR))
            refusals += 1
            let seen = Date(timeIntervalSinceNow: 20)
            while destination.stderr.components(separatedBy: "refused a connection").count - 1 < refusals && Date() < seen { usleep(20_000) }
            let last = destination.stderr.components(separatedBy: "refused a connection").last ?? ""
            #expect(last.contains(text) && last.contains("still waiting for the source"), "stderr: \(destination.stderr)", sourceLocation: sourceLocation)
            #expect(destination.process.isRunning, "the destination waits on", sourceLocation: sourceLocation)
            #expect(!destination.stderr.contains("the VM runs here now"), sourceLocation: sourceLocation)
        }
        defer {
            _ = try? destination.client.request(.PUT, "/v1/vm/quit")
            #expect(destination.waitForExit() == 0, "a quit while waiting ends it cleanly")
        }
        try attack(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8), expecting: "checksum mismatch")
        try attack([], expecting: "truncated")
        try attack([UInt8](repeating: 0, count: 24), expecting: "checksum mismatch")
        // A well-formed frame of the wrong kind.
        try attack(MigrationStreams.frame(.pages, []), expecting: "not a Tern migration source")
        // A hello with the wrong magic.
        try attack(MigrationStreams.frame(.hello, Array("NOTTERN!".utf8) + [UInt8](repeating: 1, count: 40)), expecting: "not a Tern migration source")
    }

    @Test func portInUseIsAClearError() throws {
        let port = freePort()
        let first = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(port)", "--serial", "off"])
        let deadline = Date(timeIntervalSinceNow: 10)
        while !first.stderr.contains("waiting for an incoming") && Date() < deadline { usleep(20_000) }
        let second = try TernProcess(["run", "--insecure", "--incoming", "tcp:127.0.0.1:\(port)", "--serial", "off"])
        let code = second.waitForExit()
        #expect(code != nil && code != 0)
        #expect(second.stderr.contains("cannot listen on tcp:127.0.0.1:\(port)"))
        #expect(!FileManager.default.fileExists(atPath: second.apiSocket))
    }
}

/// Hand-made migration streams for the receiver's bad-input tests.
enum MigrationStreams {
    static func frame(_ type: FrameType, _ payload: [UInt8]) -> [UInt8] {
        FrameHeader(type: type, length: UInt64(payload.count), payloadCRC: Checksum.crc32c(payload)).encoded + payload
    }
}
