import Foundation
import Glibc
import Synchronization
import TernDevices
import TernKVM
import TernMachine
import TernWire

/// Where a `--storage copy` migration's disks land at the destination, chosen
/// before the VM is built: each disk the VM has is named here (`--disk
/// id=NAME,path=FILE`). A missing file is received as `FILE.tern-partial`
/// and takes its name only when the source commits, so a partly received
/// image never looks complete (a failure deletes it; a killed destination
/// leaves it under the partial name). An existing file is replaced the same
/// way, and must have the VM's disk's size; a block device, which cannot be
/// renamed, is written in place.
struct StorageTargets {
    struct Target {
        let id: String
        let sizeBytes: UInt64
        /// The final path.
        let path: String
        /// Where the blocks are written until the commit (nil: in place).
        let partialPath: String?
    }

    static let partialSuffix = ".tern-partial"
    let targets: [Target]

    /// Checks each announced disk's target and creates the partial files; returns the device list
    /// with the disks pointing at where they are written. Throws a refusal before anything is created.
    static func prepare(_ announcement: StorageAnnouncement, devices: [DeviceSpec]) throws -> (StorageTargets, [DeviceSpec]) {
        var targets: [Target] = []
        for disk in announcement.disks {
            guard case .disk(let spec)? = devices.first(where: { $0.id == disk.id }) else {
                throw MigrationDestination.Refusal("the VM has a disk '\(disk.id)': name where it lands here with --disk id=\(disk.id),path=FILE")
            }
            var info = stat()
            if stat(spec.path, &info) == 0 {
                let kind = info.st_mode & S_IFMT
                guard kind == S_IFREG || kind == S_IFBLK else {
                    throw MigrationDestination.Refusal("disk '\(disk.id)': \(spec.path) is neither a regular file nor a block device")
                }
                if DiskImage.isLockedElsewhere(spec.path) {
                    throw MigrationDestination.Refusal("disk '\(disk.id)': \(spec.path) is in use by another process (it holds the image's lock)")
                }
                let size = kind == S_IFBLK ? try blockDeviceSize(spec.path, id: disk.id) : UInt64(info.st_size)
                if size != disk.sizeBytes {
                    throw MigrationDestination.Refusal(
                        "disk '\(disk.id)': \(spec.path) is \(size) bytes, \(size < disk.sizeBytes ? "smaller" : "larger") than the VM's disk (\(disk.sizeBytes) bytes)")
                }
                targets.append(Target(id: disk.id, sizeBytes: disk.sizeBytes, path: spec.path, partialPath: kind == S_IFBLK ? nil : spec.path + partialSuffix))
            } else if errno == ENOENT {
                targets.append(Target(id: disk.id, sizeBytes: disk.sizeBytes, path: spec.path, partialPath: spec.path + partialSuffix))
            } else {
                throw MigrationDestination.Refusal("disk '\(disk.id)': \(spec.path): \(String(cString: strerror(errno)))")
            }
        }
        let prepared = StorageTargets(targets: targets)
        for target in targets {
            guard let partial = target.partialPath else { continue }
            do {
                try createSparse(partial, size: target.sizeBytes)
            } catch {
                prepared.discard()
                throw MigrationDestination.Refusal("disk '\(target.id)': \(error)")
            }
        }
        let rewritten = devices.map { device -> DeviceSpec in
            guard case .disk(var spec) = device, let target = targets.first(where: { $0.id == spec.id }), let partial = target.partialPath else { return device }
            spec.path = partial
            return .disk(spec)
        }
        return (prepared, rewritten)
    }

    /// Gives every received image its final name (the source committed); returns what failed.
    func commit(images: [DiskImage]) -> [String] {
        var failures: [String] = []
        for (target, image) in zip(targets, images) {
            guard let partial = target.partialPath else { continue }
            if rename(partial, target.path) != 0 {
                failures.append("disk '\(target.id)': renaming \(partial) to \(target.path): \(String(cString: strerror(errno)))")
                continue
            }
            image.renamed(to: target.path)
            Self.syncDirectory(of: target.path)
        }
        return failures
    }

    /// Deletes the partial images (the migration failed before the commit).
    func discard() {
        for target in targets { if let partial = target.partialPath { unlink(partial) } }
    }

    private static func createSparse(_ path: String, size: UInt64) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else { throw MigrationDestination.Refusal("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(path)
            throw MigrationDestination.Refusal("cannot size \(path) to \(size) bytes: \(reason)")
        }
    }

    private static func blockDeviceSize(_ path: String, id: String) throws -> UInt64 {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw MigrationDestination.Refusal("disk '\(id)': cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0 else { throw MigrationDestination.Refusal("disk '\(id)': \(path): \(String(cString: strerror(errno)))") }
        return UInt64(end)
    }

    private static func syncDirectory(of path: String) {
        let fd = open(URL(fileURLWithPath: path).deletingLastPathComponent().path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }
}

/// Writes a `--storage copy` migration's blocks into the destination's disks as
/// they arrive, checked against each disk's bounds, and keeps each block's CRC
/// for `--verify`.
///
/// @unchecked Sendable: one thread applies blocks at a time, the control connection's or, under
/// `--storage-mirror sync`, the mirror connection's until it is joined.
final class StorageReceiver: @unchecked Sendable {
    struct Disk {
        let id: String
        let image: DiskImage
        let blockCount: UInt64
        let digests: PageDigests?
    }

    let disks: [Disk]
    let targets: StorageTargets
    /// Frame bytes applied so far (the mirror's thread adds, the control connection's reads).
    private let received = Atomic<UInt64>(0)

    init(targets: StorageTargets, images: [DiskImage], verify: Bool) {
        self.targets = targets
        disks = zip(targets.targets, images).map { target, image in
            let blocks = (image.size + UInt64(BlockFrame.blockSize) - 1) / UInt64(BlockFrame.blockSize)
            return Disk(id: target.id, image: image, blockCount: blocks, digests: verify ? PageDigests(pageCount: Int(blocks)) : nil)
        }
    }

    /// Reads and applies one `blocks` frame: all of it is checked before any block is written.
    func apply(_ header: FrameHeader, from source: some ByteSource) throws {
        let limit = BlockFrame.headerSize + BlockFrame.maximumRuns * BlockFrame.runSize + BlockFrame.maximumDataBlocks * BlockFrame.blockSize
        guard header.length >= UInt64(BlockFrame.headerSize), header.length <= UInt64(limit) else {
            throw MigrationDestination.Refusal("a blocks frame of \(header.length) bytes")
        }
        let payload = try source.readExactly(Int(header.length), what: "blocks frame")
        try source.checkPayload(payload, of: header, what: "blocks frame")
        let frame = try BlockFrame(decoding: payload)
        guard Int(frame.disk) < disks.count else {
            throw MigrationDestination.Refusal("a blocks frame for disk \(frame.disk); the VM has \(disks.count) disk\(disks.count == 1 ? "" : "s") to copy")
        }
        let disk = disks[Int(frame.disk)]
        for run in frame.runs where run.blocks.upperBound > disk.blockCount {
            throw MigrationDestination.Refusal("a blocks frame for blocks \(run.blocks.lowerBound)..<\(run.blocks.upperBound) of disk '\(disk.id)', which has \(disk.blockCount)")
        }
        var dataOffset = frame.encodedSize
        var written: UInt64 = 0
        for run in frame.runs {
            let offset = run.first * UInt64(BlockFrame.blockSize)
            // The disk's last block may be partial: what lies past its end is padding.
            let length = min(UInt64(run.count) * UInt64(BlockFrame.blockSize), disk.image.size - offset)
            let failure: Int32?
            switch run.kind {
            case .data:
                let bytes = Int(run.count) * BlockFrame.blockSize
                failure = payload.withUnsafeBytes { raw in
                    let data = UnsafeRawBufferPointer(rebasing: raw[dataOffset..<dataOffset + bytes])
                    disk.digests?.record(first: Int(run.first), pages: data)
                    return disk.image.write(UnsafeRawBufferPointer(rebasing: data[0..<Int(length)]), at: offset)
                }
                dataOffset += bytes
                written += length
            case .zeros:
                failure = disk.image.zero(at: offset, length: length, deallocate: true)
                disk.digests?.recordZero(first: Int(run.first), count: Int(run.count))
            }
            if let failure {
                let why = failure == ENOSPC ? "the destination's disk is full" : "write failed"
                throw MigrationDestination.Refusal("disk '\(disk.id)' (\(disk.image.path)): \(why): \(String(cString: strerror(failure)))")
            }
        }
        received.add(UInt64(FrameHeader.size) + header.length, ordering: .relaxed)
        if written > 0 { startWritebackIfDue(disks: Int(frame.disk), bytes: written) }
    }

    /// Bytes written to each disk since its writeback was last started.
    private var unwritten: [UInt64] = []
    static let writebackBatchBytes: UInt64 = 16 << 20

    /// Starts writing back a disk's received blocks every 16 MiB, so that the flush before `ready`, inside
    /// the downtime, has only the last of them left (flushing a freshly received GiB took seconds). Per
    /// frame it cost more than the writes: random 4 KiB blocks went at a tenth of the speed.
    private func startWritebackIfDue(disks index: Int, bytes: UInt64) {
        if unwritten.count < disks.count { unwritten = [UInt64](repeating: 0, count: disks.count) }
        unwritten[index] += bytes
        guard unwritten[index] >= Self.writebackBatchBytes else { return }
        unwritten[index] = 0
        disks[index].image.startWriteback(at: 0, length: 0)
    }

    /// At each round's sync, while the VM still runs at the source: puts everything received so far on
    /// stable storage before the sync is answered, so that the round's time includes this host's disk
    /// (the convergence logic then sees a destination disk slower than the link) and the flush before
    /// `ready`, inside the downtime, has only the last round's blocks left. Starting writeback alone left
    /// gigabytes to flush there (166-209 ms of downtime for a 4 GiB disk).
    func flushRound() throws {
        let now = received.load(ordering: .relaxed)
        guard now > flushedBytes else { return }
        try flush()
        flushedBytes = now
    }
    private var flushedBytes: UInt64 = 0

    /// Puts everything received on stable storage (before `ready`).
    func flush() throws {
        for disk in disks {
            if let failure = disk.image.flush() {
                throw MigrationDestination.Refusal("disk '\(disk.id)' (\(disk.image.path)): flush failed: \(String(cString: strerror(failure)))")
            }
        }
    }

    func digests() -> [UInt64] { disks.map { $0.digests?.digest() ?? 0 } }
}

/// `--storage-mirror sync`: the destination's side of the disks' own connection. Every block arrives
/// on it, the bulk pass's and each guest write the source mirrors; a frame with the acknowledge flag
/// is answered (an empty pong) once its blocks are written, which is when the guest's write completes
/// at the source.
final class StorageMirrorReceiver: Sendable {
    static let acknowledgeFlag: UInt32 = 1
    let connection: Connection
    private let failure = Mutex<String?>(nil)
    private let done = DispatchSemaphore(value: 0)

    init(connection: Connection, storage: StorageReceiver, controlConnection: Connection?) {
        self.connection = connection
        spawnThread(named: "tern-disk-mirror") { [self] in
            let error = receive(into: storage)
            if let error {
                failure.withLock { if $0 == nil { $0 = "the disks' mirror connection: \(error)" } }
                // The control connection's reader learns of it at its next read.
                if let controlConnection { shutdown(controlConnection.rawValue, Int32(SHUT_RD)) }
            }
            done.signal()
        }
    }

    private func receive(into storage: StorageReceiver) -> String? {
        let stream = connection.stream
        return readFramesUntilStreamEnd(on: stream, what: "the mirror connection") { header in
            guard header.type == .blocks else { return false }
            try storage.apply(header, from: stream)
            if header.flags & Self.acknowledgeFlag != 0 { try stream.writeFrame(.pong, payload: [UInt8]()) }
            return true
        }
    }

    var failed: String? { failure.withLock { $0 } }

    /// Waits for the mirror's end (the source sends it once the VM is paused and every block is out).
    func join() throws {
        done.wait()
        done.signal()
        if let failed { throw MigrationDestination.Refusal(failed) }
    }

    func cancel() {
        failure.withLock { if $0 == nil { $0 = "cancelled" } }
        shutdown(connection.rawValue, Int32(SHUT_RDWR))
    }
}
