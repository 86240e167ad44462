import Foundation
import Glibc
import Testing
import TernAPI
import TernMachine
import TernMigration

/// A raw image with random data in `data` ranges, explicit (allocated) zeros in `zeroed` ranges, and holes elsewhere.
func writeImage(_ path: String, size: Int, data: [Range<Int>], zeroed: [Range<Int>] = []) throws {
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else { throw ConfigurationError("cannot create \(path)") }
    defer { close(fd) }
    ftruncate(fd, off_t(size))
    var generator = SystemRandomNumberGenerator()
    for range in data {
        let bytes = (0..<range.count).map { _ in UInt8.random(in: 1...255, using: &generator) }
        _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(range.lowerBound)) }
    }
    for range in zeroed {
        let zeros = [UInt8](repeating: 0, count: range.count)
        _ = zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(range.lowerBound)) }
    }
    fsync(fd)
}

/// Bytes the file system holds for a file (holes excluded).
func allocatedBytes(_ path: String) -> Int {
    var info = stat()
    guard stat(path, &info) == 0 else { return -1 }
    return Int(info.st_blocks) * 512
}

/// `--storage copy`: the VM's disk moves with it, while the guest writes it, in every migration mode;
/// the destination's image is complete only once the source commits, and a failure leaves none.
@Suite(.serialized, .enabled(if: FileManager.default.isWritableFile(atPath: "/dev/kvm"), "needs /dev/kvm"))
struct StorageMigrationTests {
    static let workload = "fill=32 dirty=16 pattern=random rate=50 disk=write disk_pattern=rand disk_flush=4 disk_verify=2 disk_rate=8 progress=0"

    /// The guest writes at random (with flushes) through the whole migration; on the destination it
    /// re-reads the blocks it wrote and finds every one as it last wrote it, and --verify's disk digests match.
    @Test(arguments: [["--mode", "precopy"], ["--mode", "postcopy"], ["--mode", "hybrid"]])
    func aCopiedDiskArrivesWholeWhileTheGuestWritesIt(mode: [String]) throws {
        let disk = TestDisk(size: 8 << 20)
        try writeImage(disk.path, size: 8 << 20, data: [0..<(2 << 20)])
        let target = disk.path + ".copy"
        // The guest writes inside the 2 MiB of data (disk_blocks=512): the hole stays one, and goes as zero markers.
        let pair = try MigrationPair(cmdline: Self.workload + " disk_blocks=512", memory: "128M", sourceArguments: ["--disk", "path=\(disk.path)"],
                                     destinationArguments: ["--disk", "id=disk0,path=\(target)"])
        let before = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 200 }
        let (report, cli) = try pair.migrate(["--verify", "--storage", "copy"] + mode)
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        let storage = try #require(r.storage)
        #expect(storage.mode == .copy && storage.mirror == .rounds)
        let copied = try #require(storage.disks.first)
        #expect(copied.id == "disk0" && copied.sizeBytes == 8 << 20)
        #expect(copied.blocks >= 512, "at least the 2 MiB of data went: \(copied.blocks) blocks")
        #expect(copied.zeroBlocks >= 1536, "the image's 6 MiB hole went as zero markers: \(copied.zeroBlocks)")
        #expect(copied.dirtyBlocksPerRound.last == 0, "the last round, paused, left nothing behind")
        #expect(storage.sourceDigests == storage.destinationDigests && storage.sourceDigests?.count == 1)
        #expect(r.transferredBytes > copied.bytes, "the report's total counts the disk's bytes")
        #expect(FileManager.default.fileExists(atPath: target), "the copy took its name at the commit")
        #expect(!FileManager.default.fileExists(atPath: target + ".tern-partial"))
        #expect(pair.source.waitForExit(timeout: 30) == 0)

        try pair.destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.destination.client.request(.GET, "/v1/vm").body)
        #expect(info.devices?.first?.path == target)
        let moved = try #require(try pair.destination.status())
        #expect(moved.diskWrites >= before.diskWrites)
        let later = try pair.destination.waitForStatus(timeout: 30) { $0.diskVerified > moved.diskVerified + 200 && $0.diskWrites > moved.diskWrites + 200 }
        #expect(later.diskErrors == 0, "no write was lost or stale across the migration")
        #expect(try pair.destination.client.request(.PUT, "/v1/vm/quit").status == 204)
    }

    /// `--storage-mirror sync`: each guest write reaches the destination before it completes, so after the
    /// bulk pass nothing is left marked however fast the guest writes (flat out here), in pre-copy and hybrid.
    @Test(arguments: [["--mode", "precopy"], ["--mode", "hybrid"]])
    func aSynchronousMirrorKeepsTheCopyCurrent(mode: [String]) throws {
        let disk = TestDisk(size: 8 << 20)
        try writeImage(disk.path, size: 8 << 20, data: [0..<(2 << 20)])
        let target = disk.path + ".copy"
        let pair = try MigrationPair(cmdline: "disk=write disk_pattern=rand disk_flush=4 disk_verify=2 progress=0", memory: "64M",
                                     sourceArguments: ["--disk", "path=\(disk.path)"], destinationArguments: ["--disk", "id=disk0,path=\(target)"])
        _ = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 200 }
        let (report, cli) = try pair.migrate(["--verify", "--storage", "copy", "--storage-mirror", "sync"] + mode)
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        let storage = try #require(r.storage)
        #expect(storage.mirror == .sync)
        let copied = try #require(storage.disks.first)
        #expect((copied.mirroredWrites ?? 0) > 0, "the guest's writes went to both sides")
        #expect(copied.dirtyBlocksPerRound.last == 0)
        try pair.destination.waitForAPI()
        let moved = try #require(try pair.destination.status())
        let later = try pair.destination.waitForStatus(timeout: 30) { $0.diskVerified > moved.diskVerified + 200 }
        #expect(later.diskErrors == 0, "no write was lost or stale across the migration")
        #expect(try pair.destination.client.request(.PUT, "/v1/vm/quit").status == 204)
    }

    /// The control for the copied-disk tests: a destination that opens a stale copy of the image (shared storage
    /// that is not shared) gives the guest blocks it wrote before; its own check finds them.
    @Test func theGuestsCheckFindsAStaleDisk() throws {
        let disk = TestDisk(size: 8 << 20)
        let stale = disk.path + ".stale"
        let pair = try MigrationPair(cmdline: Self.workload, memory: "128M", sourceArguments: ["--disk", "path=\(disk.path)"],
                                     destinationArguments: ["--disk", "id=disk0,path=\(stale)"])
        _ = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 200 }
        try FileManager.default.copyItem(atPath: disk.path, toPath: stale)
        _ = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 2000 }
        let (report, cli) = try pair.migrate(["--storage", "shared"])
        #expect(report?.status == .completed, "\(report?.reason ?? cli.stderr)")
        try pair.destination.waitForAPI()
        let found = try pair.destination.waitForStatus(timeout: 30) { $0.diskErrors > 0 }
        #expect(found.diskErrors > 0)
        try? FileManager.default.removeItem(atPath: stale)
    }

    /// A paused VM's disk arrives byte for byte: data as data, holes and blocks of zeros as markers,
    /// so the copy holds no more than the data (the zeros the source had written are holes here).
    @Test func aPausedVMsDiskArrivesByteForByteAndSparse() throws {
        let disk = TestDisk(size: 16 << 20)
        try writeImage(disk.path, size: 16 << 20, data: [0..<(1 << 20), (4 << 20)..<(5 << 20) + 4096], zeroed: [(8 << 20)..<(12 << 20)])
        let target = disk.path + ".copy"
        // The guest writes only inside the first MiB, which holds data already: what is allocated stays put.
        let pair = try MigrationPair(cmdline: "disk=write disk_pattern=rand disk_flush=4 disk_rate=2 disk_blocks=256 progress=0", memory: "64M",
                                     sourceArguments: ["--disk", "path=\(disk.path)"], destinationArguments: ["--disk", "id=disk0,path=\(target)"])
        _ = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 50 }
        #expect(try pair.source.client.request(.PUT, "/v1/vm/pause").status == 204)
        let (report, cli) = try pair.migrate(["--verify", "--storage", "copy"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .completed, "\(r.reason ?? "")")
        #expect(r.verification?.match == true)
        try pair.destination.waitForAPI()
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.destination.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .paused, "a paused VM arrives paused")
        let original = try Data(contentsOf: URL(fileURLWithPath: disk.path)), copy = try Data(contentsOf: URL(fileURLWithPath: target))
        #expect(original == copy, "the copy is the image, byte for byte")
        #expect(allocatedBytes(target) <= allocatedBytes(disk.path) - (4 << 20), "the written zeros are holes in the copy")
        #expect(allocatedBytes(target) < 8 << 20, "the copy is sparse: \(allocatedBytes(target)) bytes allocated")
        #expect(try pair.destination.client.request(.PUT, "/v1/vm/quit").status == 204)
    }

    /// Each bad target fails the migration in the handshake or during the copy, with its reason; the source
    /// runs on with its disk, and the destination leaves no image behind.
    @Test func aBadTargetFailsTheMigrationAndTheSourceRunsOn() throws {
        let disk = TestDisk(size: 8 << 20)
        try writeImage(disk.path, size: 8 << 20, data: [0..<(6 << 20)])
        let folder = URL(fileURLWithPath: disk.path).deletingLastPathComponent().path
        let small = folder + "/small.img"
        try writeImage(small, size: 4 << 20, data: [])
        let large = folder + "/large.img"
        try writeImage(large, size: 16 << 20, data: [])
        let cases: [(target: String, environment: [String: String], refusal: String)] = [
            (small, [:], "disk 'disk0': \(small) is 4194304 bytes, smaller than the VM's disk (8388608 bytes)"),
            (large, [:], "disk 'disk0': \(large) is 16777216 bytes, larger than the VM's disk (8388608 bytes)"),
            (disk.path, [:], "disk 'disk0': \(disk.path) is in use by another process"),
            (folder + "/digest.img", ["TERN_MIGRATION_FAULT": "wrong-disk-digest"], "the disks' digests differ"),
        ]
        for (target, environment, refusal) in cases {
            let pair = try MigrationPair(cmdline: "disk=write disk_pattern=rand disk_rate=2 progress=0", memory: "64M",
                                         sourceArguments: ["--disk", "path=\(disk.path)"], destinationArguments: ["--disk", "id=disk0,path=\(target)"],
                                         environment: environment)
            _ = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 10 }
            let (report, cli) = try pair.migrate(["--storage", "copy", "--verify"])
            let r = try #require(report, "no report: \(cli.stderr)")
            #expect(r.status == .failed && r.reason?.contains(refusal) == true, "\(target): \(r.reason ?? "")")
            let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
            #expect(info.state == .running, "the source keeps its VM")
            #expect(!FileManager.default.fileExists(atPath: target + ".tern-partial"), "\(target): no partial image is left")
            let status = try pair.source.waitForStatus(timeout: 20) { $0.diskWrites > 50 }
            #expect(status.diskErrors == 0)
        }
        #expect(!FileManager.default.fileExists(atPath: folder + "/digest.img"), "a copy whose digest differs never takes its name")
        #expect(try Data(contentsOf: URL(fileURLWithPath: small)) == Data(count: 4 << 20), "a refused target is not touched")
    }

    /// A destination disk that fills up in the middle of the copy (a 4 MiB tmpfs for 6 MiB of data) fails
    /// the migration with ENOSPC's reason, deletes what it received, and the source runs on.
    @Test func aFullDestinationDiskFailsTheMigrationCleanly() throws {
        let disk = TestDisk(size: 8 << 20)
        try writeImage(disk.path, size: 8 << 20, data: [0..<(6 << 20)])
        let mount = URL(fileURLWithPath: disk.path).deletingLastPathComponent().path + "/small-fs"
        try FileManager.default.createDirectory(atPath: mount, withIntermediateDirectories: true)
        try #require(shell("mount -t tmpfs -o size=4m tern-test \(mount)").status == 0, "cannot mount a tmpfs")
        defer { _ = shell("umount \(mount)") }
        let pair = try MigrationPair(cmdline: "disk=write disk_pattern=rand disk_rate=2 progress=0", memory: "64M",
                                     sourceArguments: ["--disk", "path=\(disk.path)"], destinationArguments: ["--disk", "id=disk0,path=\(mount)/disk.img"])
        _ = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 10 }
        let (report, cli) = try pair.migrate(["--storage", "copy"])
        let r = try #require(report, "no report: \(cli.stderr)")
        #expect(r.status == .failed && r.reason?.contains("the destination's disk is full: No space left on device") == true, "\(r.reason ?? "")")
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running)
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount).isEmpty, "the partial image was deleted")
        #expect(pair.destination.waitForExit(timeout: 20) != nil)
    }

    /// A destination killed in the middle of the copy (a 2 MB/s cap keeps it there) leaves only an image
    /// named as partial, never one that looks complete; the source runs on with its disk untouched.
    @Test func aDestinationKilledMidCopyLeavesOnlyAPartialImage() throws {
        let disk = TestDisk(size: 16 << 20)
        try writeImage(disk.path, size: 16 << 20, data: [0..<(12 << 20)])
        let target = disk.path + ".copy"
        let pair = try MigrationPair(cmdline: "disk=write disk_pattern=rand disk_rate=1 progress=0", memory: "64M",
                                     sourceArguments: ["--disk", "path=\(disk.path)"], destinationArguments: ["--disk", "id=disk0,path=\(target)"])
        _ = try pair.source.waitForStatus(timeout: 30) { $0.diskWrites > 10 }
        let cli = try TernProcess(["migrate", "--insecure", "--api-socket", pair.source.apiSocket, "--to", pair.address, "--json",
                                   "--storage", "copy", "--bandwidth", "2M"], withAPI: false)
        let deadline = Date(timeIntervalSinceNow: 60)
        while Date() < deadline, (pair.source.migrationReport()?.storage?.disks.first?.bytes ?? 0) < 2 << 20 { usleep(50_000) }
        #expect((pair.source.migrationReport()?.storage?.disks.first?.bytes ?? 0) >= 2 << 20, "the copy got under way")
        kill(pair.destination.process.processIdentifier, SIGKILL)
        _ = cli.waitForExit(timeout: 60)
        let r = try #require(try? APIJSON.decoder.decode(MigrationReport.self, from: Data(cli.stdout.utf8)), "no report: \(cli.stderr)")
        #expect(r.status == .failed)
        let info = try APIJSON.decoder.decode(MachineInfo.self, from: try pair.source.client.request(.GET, "/v1/vm").body)
        #expect(info.state == .running, "the source runs on")
        #expect(!FileManager.default.fileExists(atPath: target), "nothing under the final name")
        #expect(FileManager.default.fileExists(atPath: target + ".tern-partial"), "what arrived is clearly marked as partial")
        let status = try pair.source.waitForStatus(timeout: 20) { $0.diskVerified > 50 }
        #expect(status.diskErrors == 0)
    }

    /// Like QEMU's image locking: a second VM cannot open an image a running VM writes.
    @Test func anImageInUseIsRefusedAtStartup() throws {
        let disk = TestDisk(size: 4 << 20)
        let first = try TernProcess.guest("disk=write progress=0", memory: "64M", extra: ["--disk", "path=\(disk.path)"])
        try first.waitForAPI()
        let second = try TernProcess(["run", "--kernel", TernProcess.guest, "--memory", "32M", "--serial", "off", "--disk", "path=\(disk.path)"])
        #expect(second.waitForExit(timeout: 20) == 1)
        #expect(second.stderr.contains("device 'disk0': disk image \(disk.path) is in use by another process"), "\(second.stderr)")
        #expect(try first.client.request(.PUT, "/v1/vm/quit").status == 204)
        #expect(first.waitForExit() == 0)
        let third = try TernProcess(["run", "--kernel", TernProcess.guest, "--memory", "32M", "--serial", "off", "--disk", "path=\(disk.path)"])
        try third.waitForAPI()
        #expect(try third.client.request(.PUT, "/v1/vm/quit").status == 204, "once the first VM ended, the image is free")
    }
}
