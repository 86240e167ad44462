import Foundation
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
        #expect(try tern.client.request(.PUT, "/v1/vm/pause").status == 204, "a pause flushes what was written")
        #expect(disk.nonZeroBytes > 0, "the writes are in the image file")
        #expect(try tern.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(tern.waitForExit() == 0)
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

    @Test func aRestoreRefusesADiskOfAnotherSize() throws {
        let disk = TestDisk(size: 4 << 20)
        let source = try TernProcess.guest("disk=write progress=0", memory: "64M", extra: ["--disk", "path=\(disk.path),id=data"])
        try source.waitForAPI()
        _ = try source.waitForStatus(timeout: 20) { $0.diskWrites > 10 }
        let file = source.directory.appendingPathComponent("vm.snap").path
        #expect(try TernProcess(["snapshot", "--api-socket", source.apiSocket, "--to", file], withAPI: false).waitForExit(timeout: 60) == 0)
        let other = TestDisk(size: 8 << 20)
        let attempt = try TernProcess(["run", "--restore", file, "--disk", "path=\(other.path),id=data", "--serial", "off"])
        #expect(attempt.waitForExit(timeout: 20) == 1)
        #expect(attempt.stderr.contains("device 'data' does not match the VM's: disk \(other.path) is 8388608 bytes, the VM's disk was 4194304"),
                "stderr: \(attempt.stderr)")
        let renamed = try TernProcess(["run", "--restore", file, "--disk", "path=\(disk.path),id=other", "--serial", "off"])
        #expect(renamed.waitForExit(timeout: 20) == 1)
        #expect(renamed.stderr.contains("devices [data]"), "stderr: \(renamed.stderr)")
    }

    @Test func aLiveMigrationWithTheDiskWorkloadLosesNoWrite() throws {
        let disk = TestDisk(size: 8 << 20)
        let pair = try MigrationPair(cmdline: "disk=write disk_pattern=rand disk_flush=4 disk_verify=2 disk_rate=4 progress=0",
                                     memory: "128M", sourceArguments: ["--disk", "path=\(disk.path)"])
        let before = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 100 }
        let (report, cli) = try pair.migrate(["--verify"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        #expect(pair.source.waitForExit(timeout: 10) == 0)
        try pair.destination.waitForAPI()
        let moved = try #require(try pair.destination.status())
        #expect(moved.diskWrites >= before.diskWrites)
        let later = try pair.destination.waitForStatus(timeout: 30) { $0.diskVerified > moved.diskVerified + 50 && $0.diskWrites > moved.diskWrites + 50 }
        #expect(later.diskErrors == 0, "no write was lost or stale across the switch-over")
    }
}
