import Foundation
import Testing
import TernAPI
import TernMachine
import TernWire

/// Cold migration: snapshot a running guest in one tern process, restore it in another.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct SnapshotTests {
    /// CRC32C of all guest RAM, read through the API in 32 MiB pieces.
    func memoryDigest(_ tern: TernProcess, size: UInt64) throws -> UInt32 {
        var crc: UInt32 = 0
        var address: UInt64 = 0
        while address < size {
            let length = min(32 << 20, size - address)
            let response = try tern.client.request(.GET, "/v1/vm/memory?address=\(address)&length=\(length)")
            try #require(response.status == 200)
            crc = response.body.withUnsafeBytes { Checksum.crc32c($0, seed: crc) }
            address += length
        }
        return crc
    }

    @Test func restoredGuestContinuesWhereItStopped() throws {
        let source = try TernProcess.guest("fill=32 dirty=8 pattern=random progress=0", memory: "64M")
        try source.waitForAPI()
        _ = try source.waitForStatus { $0.passes > 2 }
        let file = source.directory.appendingPathComponent("vm.snap").path
        let cli = try TernProcess(["snapshot", "--api-socket", source.apiSocket, "--to", file, "--json"], withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 0, "snapshot failed: \(cli.stderr)")
        let stats = try APIJSON.decoder.decode(SnapshotStatistics.self, from: Data(cli.stdout.utf8))
        #expect(stats.dataPages + stats.zeroPages == (64 << 20) / 4096)
        #expect(stats.dataPages >= (32 << 20) / 4096, "the filled memory is in the file")

        // The source is left paused: its memory is the snapshot's memory.
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .paused)
        let sourceDigest = try memoryDigest(source, size: 64 << 20)
        let sourceStatus = try #require(try source.status())
        #expect(try source.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(source.waitForExit() == 0)

        let restored = try TernProcess(["run", "--restore", file, "--paused", "--serial", "off"])
        try restored.waitForAPI()
        #expect(try memoryDigest(restored, size: 64 << 20) == sourceDigest, "memory is byte-identical at restore")
        let restoredInfo = try APIJSON.decoder.decode(MachineInfo.self, from: try restored.client.request(.GET, "/v1/vm").body)
        #expect(restoredInfo.name == info.name && info.name?.isEmpty == false, "the VM keeps its name")
        #expect(try restored.status() == sourceStatus)
        #expect(try restored.client.request(.PUT, "/v1/vm/resume").status == 204)
        // The snapshot may have caught the guest between counting a pass and verifying it,
        // so wait for both counters to move on rather than expect one from the other.
        let later = try restored.waitForStatus {
            $0.iterations > sourceStatus.iterations && $0.verified > sourceStatus.verified && $0.passes > sourceStatus.passes
        }
        #expect(later.errors == 0, "the guest's own checksum of its working set still matches")
    }

    /// The process writing a snapshot killed at points through the write: the directory then holds no file,
    /// or a whole snapshot that restores, never a partial one or a leftover temporary file.
    @Test(arguments: [5, 40, 120])
    func aSnapshotKilledMidWriteLeavesNothingOrAWholeFile(killAfterMs: Int) throws {
        let tern = try TernProcess.guest("fill=96 dirty=4 pattern=random progress=0", memory: "128M")
        try tern.waitForAPI()
        _ = try tern.waitForStatus { $0.phase == .dirty }
        let directory = tern.directory.appendingPathComponent("snapshots").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let file = directory + "/vm.snap"
        let cli = try TernProcess(["snapshot", "--api-socket", tern.apiSocket, "--to", file], withAPI: false)
        usleep(UInt32(killAfterMs * 1000))
        kill(tern.process.processIdentifier, SIGKILL)
        _ = tern.waitForExit(timeout: 10)
        _ = cli.waitForExit(timeout: 10)
        let left = try FileManager.default.contentsOfDirectory(atPath: directory)
        #expect(left.allSatisfy { $0 == "vm.snap" }, "no temporary file is left: \(left)")
        if left.contains("vm.snap") {
            let restored = try TernProcess(["run", "--restore", file, "--paused", "--serial", "off"])
            try restored.waitForAPI()
        }
    }

    @Test func snapshotWithResumeKeepsTheGuestRunning() throws {
        let tern = try TernProcess.guest("dirty=4 progress=0", memory: "32M")
        try tern.waitForAPI()
        let before = try tern.waitForStatus { $0.iterations > 100 }
        let file = tern.directory.appendingPathComponent("vm.snap").path
        let cli = try TernProcess(["snapshot", "--api-socket", tern.apiSocket, "--to", file, "--resume"], withAPI: false)
        #expect(cli.waitForExit(timeout: 60) == 0)
        #expect(cli.stdout.contains("snapshot \(file):"))
        _ = try tern.waitForStatus(timeout: 5) { $0.iterations > before.iterations + 1000 }
    }

    @Test func restoreRefusesMismatchesAndDamagedFilesWithoutStarting() throws {
        let tern = try TernProcess.guest("dirty=4 progress=0", memory: "32M")
        try tern.waitForAPI()
        _ = try tern.waitForStatus { $0.iterations > 100 }
        let file = tern.directory.appendingPathComponent("vm.snap").path
        #expect(try TernProcess(["snapshot", "--api-socket", tern.apiSocket, "--to", file], withAPI: false).waitForExit(timeout: 60) == 0)
        let pristine = try Data(contentsOf: URL(fileURLWithPath: file))

        func expectRefusal(_ arguments: [String], _ text: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let attempt = try TernProcess(["run"] + arguments + ["--serial", "off"])
            let code = attempt.waitForExit(timeout: 30)
            #expect(code != nil && code != 0, sourceLocation: sourceLocation)
            #expect(attempt.stderr.contains(text), "stderr: \(attempt.stderr)", sourceLocation: sourceLocation)
            #expect(!FileManager.default.fileExists(atPath: attempt.apiSocket), sourceLocation: sourceLocation)
        }
        try expectRefusal(["--restore", file, "--memory", "64M"], "but --memory says 64M")
        try expectRefusal(["--restore", file, "--cpus", "2"], "but --cpus says 2")
        try expectRefusal(["--restore", "/nonexistent.snap"], "cannot read snapshot")

        var damaged = [UInt8](pristine)
        damaged[damaged.count / 2] ^= 0xFF
        let damagedPath = tern.directory.appendingPathComponent("damaged.snap").path
        _ = FileManager.default.createFile(atPath: damagedPath, contents: Data(damaged))
        try expectRefusal(["--restore", damagedPath], "unusable")
        _ = FileManager.default.createFile(atPath: damagedPath, contents: pristine.prefix(pristine.count - 100))
        try expectRefusal(["--restore", damagedPath], "unusable")
        try expectRefusal(["--restore", TernProcess.guest], "not a Tern snapshot")
        #expect(try Data(contentsOf: URL(fileURLWithPath: file)) == pristine, "the snapshot file is untouched")
    }
}
