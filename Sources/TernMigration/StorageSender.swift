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
/// round's sync, through the same rate limiter as pages.
final class StorageSender: Sendable {
    struct Disk: Sendable {
        let id: String
        let device: VirtioBlock
        /// Each block's CRC as sent (--verify).
        let digests: PageDigests?
    }

    let disks: [Disk]
    private let reports: Mutex<[DiskMigrationReport]>

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

    /// Starts tracking the guest's writes, sends each disk's unallocated ranges as zero markers and
    /// marks its allocated blocks for the rounds to send.
    func beginBulkPass(on stream: FDStream, rateLimit: RateLimiter) throws {
        for (index, disk) in disks.enumerated() {
            let changed = disk.device.changedBlocks
            changed.startTracking()
            let size = disk.device.image.size
            try disk.device.image.forEachExtent(granule: UInt64(BlockRunHeader.blockSize)) { range, isHole in
                let blocks = Int(range.lowerBound / UInt64(BlockRunHeader.blockSize))..<Int((range.upperBound + UInt64(BlockRunHeader.blockSize) - 1) / UInt64(BlockRunHeader.blockSize))
                if isHole {
                    try sendZeros(blocks, of: index, on: stream, rateLimit: rateLimit)
                } else {
                    changed.mark(offset: range.lowerBound, length: min(range.upperBound, size) - range.lowerBound)
                }
            }
        }
    }

    /// Sends every block marked now, each disk from its start; blocks the guest marks behind the
    /// cursor wait for the next round. Stops between frames when `shouldStop` says so (what was not
    /// sent stays marked). Returns the blocks sent.
    @discardableResult
    func sendChangedBlocks(on stream: FDStream, rateLimit: RateLimiter, shouldStop: () -> Bool = { false }) throws -> Int {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: BlockRunHeader.maximumDataBlocks * BlockRunHeader.blockSize,
                                                            alignment: 4096)
        defer { buffer.deallocate() }
        var sent = 0
        for (index, disk) in disks.enumerated() {
            var cursor = 0
            while true {
                if shouldStop() { throw PageSender.Stopped() }
                guard let run = disk.device.changedBlocks.takeRun(from: cursor, maximum: BlockRunHeader.maximumDataBlocks) else { break }
                try send(run, of: index, on: stream, rateLimit: rateLimit, buffer: buffer)
                sent += run.count
                cursor = run.upperBound
            }
        }
        return sent
    }

    /// Records, per disk, the blocks still marked after a round.
    func endRound() {
        let pending = disks.map { UInt64($0.device.changedBlocks.dirtyCount) }
        reports.withLock { reports in
            for i in reports.indices { reports[i].dirtyBlocksPerRound.append(pending[i]) }
        }
    }

    /// The migration ended, either way: writes are no longer tracked.
    func finish() { for disk in disks { disk.device.changedBlocks.stopTracking() } }

    /// Each disk's digest as sent (--verify), comparable with the destination's.
    func digests() -> [UInt64] { disks.map { $0.digests?.digest() ?? 0 } }

    /// Reads `run` and sends it as frames of data blocks and zero markers (an all-zero block goes as a marker).
    private func send(_ run: Range<Int>, of index: Int, on stream: FDStream, rateLimit: RateLimiter,
                      buffer: UnsafeMutableRawBufferPointer) throws {
        let disk = disks[index]
        let bytes = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<run.count * BlockRunHeader.blockSize])
        if let error = disk.device.image.read(into: bytes, at: UInt64(run.lowerBound) * UInt64(BlockRunHeader.blockSize)) {
            throw MigrationSource.Failure("reading disk '\(disk.id)' (\(disk.device.image.path)): \(String(cString: strerror(error)))")
        }
        var start = 0
        while start < run.count {
            let zero = Self.isZero(bytes, block: start)
            var end = start + 1
            while end < run.count, Self.isZero(bytes, block: end) == zero { end += 1 }
            let blocks = run.lowerBound + start..<run.lowerBound + end
            if zero {
                try sendZeros(blocks, of: index, on: stream, rateLimit: rateLimit)
            } else {
                let data = UnsafeRawBufferPointer(rebasing: bytes[start * BlockRunHeader.blockSize..<end * BlockRunHeader.blockSize])
                let header = BlockRunHeader(disk: UInt16(index), kind: .data, first: UInt64(blocks.lowerBound), count: UInt32(blocks.count)).encoded
                rateLimit.consume(FrameHeader.size + header.count + data.count)
                try header.withUnsafeBytes { try stream.writeFrame(.blocks, payload: [$0, data]) }
                disk.digests?.record(first: blocks.lowerBound, pages: data)
                reports.withLock {
                    $0[index].bytes += UInt64(FrameHeader.size + header.count + data.count)
                    $0[index].blocks += UInt64(blocks.count)
                }
            }
            start = end
        }
    }

    private func sendZeros(_ blocks: Range<Int>, of index: Int, on stream: FDStream, rateLimit: RateLimiter) throws {
        var first = blocks.lowerBound
        while first < blocks.upperBound {
            let count = min(blocks.upperBound - first, BlockRunHeader.maximumZeroBlocks)
            let header = BlockRunHeader(disk: UInt16(index), kind: .zeros, first: UInt64(first), count: UInt32(count)).encoded
            rateLimit.consume(FrameHeader.size + header.count)
            try stream.writeFrame(.blocks, payload: header)
            disks[index].digests?.recordZero(first: first, count: count)
            reports.withLock {
                $0[index].bytes += UInt64(FrameHeader.size + header.count)
                $0[index].zeroBlocks += UInt64(count)
            }
            first += count
        }
    }

    static func isZero(_ bytes: UnsafeMutableRawBufferPointer, block: Int) -> Bool {
        let words = UnsafeRawBufferPointer(rebasing: bytes[block * BlockRunHeader.blockSize..<(block + 1) * BlockRunHeader.blockSize])
            .bindMemory(to: UInt64.self)
        var any: UInt64 = 0
        for word in words { any |= word }
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
}
