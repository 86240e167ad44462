import Foundation
import Glibc
import Synchronization
import TernDevices
import TernMachine
import TernWire

/// The source's side of `--storage copy`: moves each disk as pre-copy moves
/// memory. The bulk pass sends the image's unallocated ranges as zero
/// markers and marks its allocated blocks for sending; from then on every
/// guest write marks its blocks again (BlockDirtyMap). A round sends what is
/// marked, taking each run's bits just before reading it; the last round runs
/// while the VM is paused and its disks quiesced, so the destination ends
/// with the image as the guest last flushed it.
///
/// Blocks go on the control connection, between memory's frames and the
/// round's sync, through the same rate limiter as pages. Under
/// `--storage-mirror sync` they go on a connection of their own (SyncMirror),
/// and each guest write is sent there before it completes instead of being
/// marked, so a guest that writes faster than rounds could send cannot keep
/// the disk from converging.
final class StorageSender: Sendable {
    struct Disk: Sendable {
        let id: String
        let device: VirtioBlock
        /// Each block's CRC as sent (--verify).
        let digests: PageDigests?
    }

    let disks: [Disk]
    private let reports: Mutex<[DiskMigrationReport]>
    /// `--storage-mirror sync`: the disks' connection, once joined.
    private let mirror = Mutex<SyncMirror?>(nil)

    init(disks: [(id: String, device: VirtioBlock)], verify: Bool) {
        self.disks = disks.map { Disk(id: $0.id, device: $0.device, digests: verify ? PageDigests(pageCount: $0.device.changedBlocks.blockCount) : nil) }
        reports = Mutex(disks.map { DiskMigrationReport(id: $0.id, sizeBytes: $0.device.image.size) })
    }

    var announcement: StorageAnnouncement {
        StorageAnnouncement(mode: .copy, disks: disks.map { .init(id: $0.id, sizeBytes: $0.device.image.size) })
    }

    var report: [DiskMigrationReport] { reports.withLock { $0 } }

    /// Blocks marked and not sent yet, over all disks: what the downtime prediction counts beside pages.
    var pendingBlocks: Int { disks.reduce(0) { $0 + $1.device.changedBlocks.dirtyCount } }

    /// Bytes sent so far, headers included.
    var bytesSent: UInt64 { reports.withLock { $0.reduce(0) { $0 + $1.bytes } } }

    /// From here on the disks' blocks go on `stream`, and the guest's writes are mirrored there as they complete.
    func attachMirror(_ stream: FDStream) {
        let syncMirror = SyncMirror(stream: stream, disks: disks.count)
        mirror.withLock { $0 = syncMirror }
        for (index, disk) in disks.enumerated() {
            disk.device.setWriteMirror { [self] offset, length in mirrorWrite(disk: index, offset: offset, length: length) }
        }
    }

    /// The stream the disks' frames go on, and the lock each frame is sent under (nil: only the migration's thread sends).
    private func channel(default stream: FDStream) -> (stream: FDStream, lock: NSLock?) {
        guard let syncMirror = mirror.withLock({ $0 }) else { return (stream, nil) }
        return (syncMirror.stream, syncMirror.lock)
    }

    private func locked<R>(_ lock: NSLock?, _ body: () throws -> R) rethrows -> R {
        guard let lock else { return try body() }
        return try lock.withLock(body)
    }

    /// Starts tracking the guest's writes, sends each disk's unallocated ranges as zero markers and
    /// marks its allocated blocks for the rounds to send.
    func beginBulkPass(on stream: FDStream, rateLimit: RateLimiter) throws {
        let (target, lock) = channel(default: stream)
        for (index, disk) in disks.enumerated() {
            // Under the sync mirror a disk's whole pass holds the mirror's lock: a guest write into a hole,
            // mirrored at once, must not be overtaken by the zero marker for that hole, found before the
            // write and sent after it. (Holes are found by lseek and their markers are small: a short hold.)
            try locked(lock) {
                let changed = disk.device.changedBlocks
                changed.startTracking()
                let size = disk.device.image.size
                let frames = BlockFrameBuilder(disk: UInt16(index))
                try disk.device.image.forEachExtent(granule: UInt64(BlockFrame.blockSize)) { range, isHole in
                    if isHole {
                        let blocks = Self.blocks(of: range)
                        var first = blocks.lowerBound
                        while first < blocks.upperBound {
                            let count = min(blocks.upperBound - first, BlockFrame.maximumZeroBlocks)
                            if frames.isFull { try send(frames, on: target, rateLimit: rateLimit) }
                            frames.addZeros(first: first, count: count)
                            disk.digests?.recordZero(first: first, count: count)
                            first += count
                        }
                    } else {
                        changed.mark(offset: range.lowerBound, length: min(range.upperBound, size) - range.lowerBound)
                    }
                }
                try send(frames, on: target, rateLimit: rateLimit)
            }
        }
    }

    /// Sends every block marked now, each disk from its start; blocks the guest marks behind the
    /// cursor wait for the next round. Stops between frames when `shouldStop` says so (what was not
    /// taken stays marked; what was, goes). Returns the blocks sent.
    @discardableResult
    func sendChangedBlocks(on stream: FDStream, rateLimit: RateLimiter, shouldStop: () -> Bool = { false }) throws -> Int {
        let (target, lock) = channel(default: stream)
        var sent = 0
        for (index, disk) in disks.enumerated() {
            let frames = BlockFrameBuilder(disk: UInt16(index))
            var cursor = 0
            var more = true
            while more {
                if shouldStop() { throw PageSender.Stopped() }
                // A frame's blocks are taken, read and sent under the mirror's lock: a guest write mirrored
                // meanwhile goes after them, so an older copy never lands over a newer one.
                more = try locked(lock) {
                    while !frames.isFull {
                        // Each block of the run may become a run of its own (data and zeros alternating).
                        let room = min(frames.dataRoom, BlockFrame.maximumRuns - frames.runs.count)
                        guard let run = disk.device.changedBlocks.takeRun(from: cursor, maximum: room) else { break }
                        if let error = frames.read(run, from: disk.device.image) {
                            throw MigrationSource.Failure("reading disk '\(disk.id)' (\(disk.device.image.path)): \(String(cString: strerror(error)))")
                        }
                        sent += run.count
                        cursor = run.upperBound
                    }
                    let full = frames.isFull
                    try send(frames, on: target, rateLimit: rateLimit)
                    return full
                }
            }
        }
        return sent
    }

    /// A guest write, mirrored before it completes (`--storage-mirror sync`, on the device's thread):
    /// its blocks are read back from the image and sent, and the destination's acknowledgement awaited.
    /// False (the blocks are then marked) once the mirror has failed or ended.
    private func mirrorWrite(disk index: Int, offset: UInt64, length: UInt64) -> Bool {
        guard let syncMirror = mirror.withLock({ $0 }), length > 0 else { return false }
        return syncMirror.lock.withLock {
            guard syncMirror.usable else { return false }
            let frames = syncMirror.builders[index]
            let blocks = Self.blocks(of: offset..<offset + length)
            var first = blocks.lowerBound
            do {
                while first < blocks.upperBound {
                    let count = min(blocks.upperBound - first, frames.dataRoom, BlockFrame.maximumRuns - frames.runs.count)
                    if let error = frames.read(first..<first + count, from: disks[index].device.image) {
                        throw MigrationSource.Failure("reading disk '\(disks[index].id)': \(String(cString: strerror(error)))")
                    }
                    first += count
                    try send(frames, on: syncMirror.stream, rateLimit: nil, flags: StorageMirrorReceiver.acknowledgeFlag)
                    let header = try syncMirror.stream.readFrameHeader()
                    guard header.type == .pong, header.length == 0 else {
                        throw MigrationSource.Failure("the destination answered a mirrored write with a \(header.type) frame")
                    }
                }
                reports.withLock { $0[index].mirroredWrites = ($0[index].mirroredWrites ?? 0) + 1 }
                return true
            } catch {
                frames.clear()
                syncMirror.fail("\(error)")
                return false
            }
        }
    }

    /// The VM is paused and every block sent: the mirror ends, and the destination's reader with it.
    func endMirror() throws {
        guard let syncMirror = mirror.withLock({ $0 }) else { return }
        for disk in disks { disk.device.setWriteMirror(nil) }
        try syncMirror.lock.withLock {
            if let failure = syncMirror.failure { throw MigrationSource.Failure("the disks' mirror failed: \(failure)") }
            syncMirror.fail("ended")
            try syncMirror.stream.writeFrame(.streamEnd, payload: [UInt8]())
        }
    }

    /// Records, per disk, the blocks still marked after a round.
    func endRound() {
        let pending = disks.map { UInt64($0.device.changedBlocks.dirtyCount) }
        reports.withLock { reports in
            for i in reports.indices { reports[i].dirtyBlocksPerRound.append(pending[i]) }
        }
    }

    /// The migration ended, either way: writes are neither mirrored nor tracked any more.
    func finish() {
        for disk in disks {
            disk.device.setWriteMirror(nil)
            disk.device.changedBlocks.stopTracking()
        }
        if let syncMirror = mirror.withLock({ $0 }) { syncMirror.lock.withLock { syncMirror.fail("ended") } }
    }

    /// Each disk's digest as sent (--verify), comparable with the destination's.
    func digests() -> [UInt64] { disks.map { $0.digests?.digest() ?? 0 } }

    /// Writes what `frames` gathered as one frame (nothing if empty), and empties it.
    private func send(_ frames: BlockFrameBuilder, on stream: FDStream, rateLimit: RateLimiter?, flags: UInt32 = 0) throws {
        guard !frames.runs.isEmpty else { return }
        let index = Int(frames.disk)
        let header = BlockFrame(disk: frames.disk, runs: frames.runs).encoded
        let data = UnsafeRawBufferPointer(rebasing: frames.buffer[0..<frames.dataBlocks * BlockFrame.blockSize])
        rateLimit?.consume(FrameHeader.size + header.count + data.count)
        try header.withUnsafeBytes { try stream.writeFrame(.blocks, flags: flags, payload: [$0, data]) }
        var offset = 0
        for run in frames.runs where run.kind == .data {
            let bytes = Int(run.count) * BlockFrame.blockSize
            disks[index].digests?.record(first: Int(run.first), pages: UnsafeRawBufferPointer(rebasing: data[offset..<offset + bytes]))
            offset += bytes
        }
        let zeroBlocks = frames.runs.reduce(UInt64(0)) { $0 + ($1.kind == .zeros ? UInt64($1.count) : 0) }
        let (dataBlocks, frameBytes) = (UInt64(frames.dataBlocks), UInt64(FrameHeader.size + header.count + data.count))
        reports.withLock {
            $0[index].bytes += frameBytes
            $0[index].blocks += dataBlocks
            $0[index].zeroBlocks += zeroBlocks
        }
        frames.clear()
    }

    static func blocks(of range: Range<UInt64>) -> Range<Int> {
        let size = UInt64(BlockFrame.blockSize)
        return Int(range.lowerBound / size)..<Int((range.upperBound + size - 1) / size)
    }
}

/// `--storage-mirror sync` at the source: the disks' own connection, and the lock that keeps one frame
/// at a time on it (a round's take-read-send against a guest write's).
final class SyncMirror: @unchecked Sendable {
    // @unchecked: `failure` and the builders are used under `lock`.
    let stream: FDStream
    let lock = NSLock()
    /// One frame builder per disk for mirrored writes (1 MiB each, allocated once).
    let builders: [BlockFrameBuilder]
    private(set) var failure: String?

    init(stream: FDStream, disks: Int) {
        self.stream = stream
        builders = (0..<disks).map { BlockFrameBuilder(disk: UInt16($0)) }
    }

    /// Whether writes can still be mirrored (under `lock`).
    var usable: Bool { failure == nil }
    /// Marks the mirror failed or ended (under `lock`): later writes are marked instead.
    func fail(_ reason: String) { if failure == nil { failure = reason } }
}

/// One `blocks` frame being gathered: its runs, and its data blocks in order in a 1 MiB buffer.
final class BlockFrameBuilder {
    let disk: UInt16
    private(set) var runs: [BlockFrame.Run] = []
    private(set) var dataBlocks = 0
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: BlockFrame.maximumDataBlocks * BlockFrame.blockSize, alignment: 4096)

    init(disk: UInt16) { self.disk = disk }
    deinit { buffer.deallocate() }

    var dataRoom: Int { BlockFrame.maximumDataBlocks - dataBlocks }
    var isFull: Bool { dataRoom == 0 || runs.count == BlockFrame.maximumRuns }

    func clear() {
        runs.removeAll(keepingCapacity: true)
        dataBlocks = 0
    }

    func addZeros(first: Int, count: Int) { append(first: first, count: count, kind: .zeros) }

    /// Reads `blocks` (at most `dataRoom`, and no more than runs left) into the buffer; all-zero blocks
    /// become zero runs and leave no data. Returns the errno of a failed read.
    func read(_ blocks: Range<Int>, from image: DiskImage) -> Int32? {
        let start = dataBlocks * BlockFrame.blockSize
        let area = UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + blocks.count * BlockFrame.blockSize])
        if let error = image.read(into: area, at: UInt64(blocks.lowerBound) * UInt64(BlockFrame.blockSize)) { return error }
        for (i, block) in blocks.enumerated() {
            let source = start + i * BlockFrame.blockSize
            let bytes = UnsafeRawBufferPointer(rebasing: buffer[source..<source + BlockFrame.blockSize])
            if Self.isZero(bytes) {
                append(first: block, count: 1, kind: .zeros)
            } else {
                let target = dataBlocks * BlockFrame.blockSize
                if target != source { (buffer.baseAddress! + target).copyMemory(from: bytes.baseAddress!, byteCount: BlockFrame.blockSize) }
                append(first: block, count: 1, kind: .data)
                dataBlocks += 1
            }
        }
        return nil
    }

    /// Adds blocks to the last run when they continue it.
    private func append(first: Int, count: Int, kind: BlockFrame.Kind) {
        if let last = runs.last, last.kind == kind, last.blocks.upperBound == UInt64(first),
           kind == .data || Int(last.count) + count <= BlockFrame.maximumZeroBlocks {
            runs[runs.count - 1].count += UInt32(count)
        } else {
            runs.append(BlockFrame.Run(first: UInt64(first), count: UInt32(count), kind: kind))
        }
    }

    static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var any: UInt64 = 0
        for word in bytes.bindMemory(to: UInt64.self) { any |= word }
        return any == 0
    }
}

/// One disk's account of a `--storage copy` migration.
public struct DiskMigrationReport: Codable, Equatable, Sendable {
    public var id: String
    public var sizeBytes: UInt64
    /// On the wire, frame headers included.
    public var bytes: UInt64 = 0
    /// Data blocks (4 KiB) sent, counting each time a block was sent again.
    public var blocks: UInt64 = 0
    /// Blocks sent as zero markers.
    public var zeroBlocks: UInt64 = 0
    /// Blocks the guest had changed and were still to send, after each round.
    public var dirtyBlocksPerRound: [UInt64] = []
    /// `--storage-mirror sync`: guest writes sent to the destination before they completed.
    public var mirroredWrites: UInt64?

    public init(id: String, sizeBytes: UInt64) {
        self.id = id
        self.sizeBytes = sizeBytes
    }
}

/// How the disks moved (`MigrationReport.storage`).
public struct StorageReport: Codable, Equatable, Sendable {
    public var mode: StorageMode
    /// How writes made during the copy reach the destination (`copy` only).
    public var mirror: StorageMirror?
    public var disks: [DiskMigrationReport]
    /// --verify: each disk's digest on both sides, in the disks' order.
    public var sourceDigests: [String]?
    public var destinationDigests: [String]?
}

/// How a disk's writes made during the copy reach the destination.
public enum StorageMirror: String, Codable, Sendable {
    /// Marked, and sent again by the next round (the last one inside the downtime), as memory's dirty pages are.
    case rounds
    /// Written on both sides before the guest's write completes (VMware's mirror driver, QEMU's
    /// write-blocking mirror), on a connection of the disks' own.
    case sync
}
