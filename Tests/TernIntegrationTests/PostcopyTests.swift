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
    func migrateAndCheck(cmdline: String, arguments: [String]) throws -> MigrationReport {
        let pair = try MigrationPair(cmdline: cmdline)
        let before = try pair.source.waitForStatus { $0.phase == .dirty }
        let (report, cli) = try pair.migrate(arguments + ["--verify"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true, "the destination's memory once complete equals the source's at the switch")
        #expect(pair.source.waitForExit(timeout: 10) == 0)
        try pair.destination.waitForAPI()
        let moved = try pair.destination.waitForStatus { $0.iterations > before.iterations }
        let later = try pair.destination.waitForStatus { $0.verified > moved.verified }
        #expect(later.errors == 0, "the guest's checksum of its working set holds after post-copy")
        return r
    }

    @Test func postcopySendsEachPageOnceAndTheGuestGoesOn() throws {
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 progress=0", arguments: ["--mode", "postcopy"])
        let p = try #require(r.postcopy)
        #expect(r.executionMovedAtMs != nil && r.memoryCompleteAtMs != nil)
        #expect(r.executionMovedAtMs! < r.memoryCompleteAtMs!)
        #expect(p.pagesPushed + p.pagesPulled == r.postcopyPagesSent, "every page arrived once, pushed or pulled")
        #expect(p.faults > 0, "the guest ran before its memory was complete")
        #expect(p.faultLatencyMaxMs >= p.faultLatencyP99Ms && p.faultLatencyP99Ms >= p.faultLatencyP50Ms)
        // Each non-zero page once: the bytes on the wire are within 2% of the guest's non-zero memory.
        let payload = Double(r.dataPages) * 4096
        #expect(Double(r.transferredBytes) <= payload * 1.02 + 1_000_000)
        #expect(r.rounds.count == 1, "no pre-copy round")
        #expect(try #require(r.downtimeMs) < 300)
    }

    @Test func hybridRunsPrecopyRoundsThenPostcopy() throws {
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 progress=0", arguments: ["--mode", "hybrid", "--precopy-rounds", "2"])
        #expect(r.rounds.count == 3, "two pre-copy rounds and the post-copy phase")
        #expect(r.switchoverReason?.contains("post-copy") == true)
        #expect(r.postcopy != nil)
    }

    @Test func autoSwitchesToPostcopyWhenPrecopyCannotMeetTheTarget() throws {
        // A 5 ms target against a guest rewriting 32 MiB flat out: pre-copy cannot converge.
        let r = try migrateAndCheck(cmdline: "fill=64 dirty=32 progress=0",
                                    arguments: ["--mode", "auto", "--max-downtime", "5", "--max-rounds", "4"])
        #expect(r.switchoverReason?.contains("switching to post-copy") == true, "\(r.switchoverReason ?? "")")
        #expect(r.postcopy != nil)
    }

    @Test func autoStaysPrecopyWhenItConverges() throws {
        let r = try migrateAndCheck(cmdline: "fill=32 dirty=4 pattern=random rate=10 progress=0", arguments: ["--mode", "auto"])
        #expect(r.postcopy == nil)
        #expect(r.switchoverReason?.hasPrefix("converged") == true)
    }
}
