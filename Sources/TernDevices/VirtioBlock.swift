import Synchronization

/// virtio-blk (virtio 1.x, 5.2 "Block Device") on a raw image: read, write,
/// flush, get-id, discard and write-zeroes, one request at a time on the
/// device's worker thread, data moved straight between the image and the
/// request's guest buffers.
public final class VirtioBlock: VirtioBackend {
    public let image: DiskImage
    public let serial: String
    public let statistics = DeviceCounters<BlockRequestKind>()
    /// The blocks the guest changed, while a storage migration tracks them.
    public let changedBlocks: BlockDirtyMap
    /// A synchronous storage mirror: called with each write's range once the image has it, on the
    /// device's thread, before the guest's request completes; true if it reached the other side
    /// (then the blocks need not be marked).
    public typealias WriteMirror = @Sendable (_ offset: UInt64, _ length: UInt64) -> Bool
    private let writeMirror = Mutex<WriteMirror?>(nil)

    public func setWriteMirror(_ mirror: WriteMirror?) { writeMirror.withLock { $0 = mirror } }

    /// What a write (or discard, or write-zeroes) changed: mirrored, or marked for the next round.
    private func changed(offset: UInt64, length: UInt64) {
        if let mirror = writeMirror.withLock({ $0 }), mirror(offset, length) { return }
        changedBlocks.mark(offset: offset, length: length)
    }

    enum RequestType: UInt32 {
        case read = 0, write = 1, flush = 4, getID = 8, discard = 11, writeZeroes = 13
    }

    enum Status: UInt8 {
        case ok = 0, ioError = 1, unsupported = 2
    }

    enum Feature {
        static let segmentMaximum: UInt64 = 1 << 2
        static let readOnly: UInt64 = 1 << 5
        static let blockSize: UInt64 = 1 << 6
        static let flush: UInt64 = 1 << 9
        static let discard: UInt64 = 1 << 13
        static let writeZeroes: UInt64 = 1 << 14
    }

    static let sectorSize: UInt64 = 512
    static let queueSize: UInt16 = 256
    /// Segments one discard or write-zeroes request may carry.
    static let maximumZeroSegments: UInt32 = 16
    /// Sectors one discard or write-zeroes segment may cover (4 GiB).
    static let maximumZeroSectors: UInt32 = 1 << 23
    /// The length of the ID a get-id request returns (VIRTIO_BLK_ID_BYTES).
    static let idLength = 20

    /// `serial`: what get-id answers (the device's id, cut to 20 bytes).
    public init(image: DiskImage, serial: String) {
        self.image = image
        self.serial = serial
        changedBlocks = BlockDirtyMap(diskSize: image.size)
    }

    public var deviceType: VirtioDeviceType { .block }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize] }

    public var offeredFeatures: UInt64 {
        var features = VirtioFeature.version1 | Feature.segmentMaximum | Feature.blockSize | Feature.flush
        features |= image.readOnly ? Feature.readOnly : Feature.discard | Feature.writeZeroes
        return features
    }

    public var identity: BackendIdentity { .disk(path: image.path, size: image.size, readOnly: image.readOnly) }

    /// struct virtio_blk_config, up to write_zeroes_may_unmap.
    public var configuration: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 60)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
            withUnsafeBytes(of: value.littleEndian) { for (i, byte) in $0.enumerated() { bytes[offset + i] = byte } }
        }
        put(image.size / Self.sectorSize, at: 0)           // capacity
        put(UInt32(Self.queueSize) - 2, at: 12)             // seg_max: a chain also holds the header and status
        put(UInt32(Self.sectorSize), at: 20)                // blk_size
        put(Self.maximumZeroSectors, at: 36)                // max_discard_sectors
        put(Self.maximumZeroSegments, at: 40)               // max_discard_seg
        put(UInt32(1), at: 44)                              // discard_sector_alignment
        put(Self.maximumZeroSectors, at: 48)                // max_write_zeroes_sectors
        put(Self.maximumZeroSegments, at: 52)               // max_write_zeroes_seg
        bytes[56] = 1                                       // write_zeroes_may_unmap
        return bytes
    }

    public func serve(queue: Int, _ virtqueue: inout SplitVirtqueue, features: UInt64) throws(VirtqueueError) -> Bool {
        var used = false
        while let chain = try virtqueue.next() {
            let written = handle(chain, ram: virtqueue.ram)
            try virtqueue.complete(chain.head, written: written)
            used = true
        }
        return used
    }

    public func flush() -> Int32? { image.flush() }

    /// Requests arrive only by notification.
    public func readinessSources(queues: [VirtqueueState]) -> [Int32] { [] }

    /// Serves one request; returns the bytes written into its device-writable buffers.
    func handle(_ chain: DescriptorChain, ram: any GuestRAM) -> UInt32 {
        let readable = GuestBuffers(chain.readable, ram: ram)
        let writable = GuestBuffers(chain.writable, ram: ram)
        // A request without room for its status byte cannot even be failed: it is returned unanswered.
        guard writable.count >= 1 else {
            statistics.count(.malformed)
            return 0
        }
        // The used length is 32 bits: a chain whose buffers add up to more is failed, not served.
        let tooLarge = writable.count > Int(UInt32.max) - 1 || readable.count > Int(UInt32.max)
        let (dataIn, statusByte) = writable.split(at: writable.count - 1)
        let (headerBuffers, dataOut) = readable.split(at: 16)
        let finish = { (status: Status, written: Int) -> UInt32 in
            statusByte.write([status.rawValue], ram: ram)
            if status != .ok { self.statistics.count(.failed) }
            return UInt32(clamping: written + 1)
        }
        guard headerBuffers.count == 16, !tooLarge else { return finish(.ioError, 0) }
        let header = headerBuffers.read(limit: 16)
        let type = header.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 0, as: UInt32.self)) }
        let sector = header.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self)) }

        switch RequestType(rawValue: type) {
        case .read:
            guard let offset = range(sector: sector, length: UInt64(dataIn.count)) else { return finish(.ioError, 0) }
            // A read that fails part-way may have filled some of the buffers: they count as written either way.
            let failed = image.read(into: dataIn, at: offset) != nil
            dataIn.noteWritten(dataIn.count, ram: ram)
            if failed { return finish(.ioError, 0) }
            statistics.count(.read, bytesIn: dataIn.count)
            return finish(.ok, dataIn.count)
        case .write:
            guard !image.readOnly, let offset = range(sector: sector, length: UInt64(dataOut.count)) else {
                return finish(.ioError, 0)
            }
            // Marked after the write, failed or not (a failed one may have changed part of the range).
            let failed = image.write(from: dataOut, at: offset) != nil
            changed(offset: offset, length: UInt64(dataOut.count))
            if failed { return finish(.ioError, 0) }
            statistics.count(.write, bytesOut: dataOut.count)
            return finish(.ok, 0)
        case .flush:
            if image.flush() != nil { return finish(.ioError, 0) }
            statistics.count(.flush)
            return finish(.ok, 0)
        case .getID:
            var id = Array(serial.utf8.prefix(Self.idLength))
            id += [UInt8](repeating: 0, count: Self.idLength - id.count)
            let done = dataIn.write(Array(id.prefix(dataIn.count)), ram: ram)
            return finish(.ok, done)
        case .discard, .writeZeroes:
            guard !image.readOnly else { return finish(.ioError, 0) }
            return finish(zero(dataOut, type: RequestType(rawValue: type)!), 0)
        case nil:
            return finish(.unsupported, 0)
        }
    }

    /// The byte offset of `length` bytes at `sector`, if they are whole sectors inside the image.
    private func range(sector: UInt64, length: UInt64) -> UInt64? {
        guard length % Self.sectorSize == 0, sector <= image.size / Self.sectorSize else { return nil }
        let offset = sector * Self.sectorSize
        guard length <= image.size - offset else { return nil }
        return offset
    }

    /// Discard or write-zeroes: a list of {sector, sectors, flags} segments.
    private func zero(_ data: GuestBuffers, type: RequestType) -> Status {
        guard data.count > 0, data.count % 16 == 0, data.count / 16 <= Int(Self.maximumZeroSegments) else { return .ioError }
        let bytes = data.read(limit: data.count)
        for start in stride(from: 0, to: bytes.count, by: 16) {
            let (sector, sectors, flags) = bytes.withUnsafeBytes { raw in
                (UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: start, as: UInt64.self)),
                 UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: start + 8, as: UInt32.self)),
                 UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: start + 12, as: UInt32.self)))
            }
            // Discard takes no flags; write-zeroes knows only "may unmap" (bit 0).
            guard sectors <= Self.maximumZeroSectors, flags & ~(type == .writeZeroes ? 1 : 0) == 0 else { return .unsupported }
            guard let offset = range(sector: sector, length: UInt64(sectors) * Self.sectorSize) else { return .ioError }
            let deallocate = type == .discard || flags & 1 != 0
            let failed = image.zero(at: offset, length: UInt64(sectors) * Self.sectorSize, deallocate: deallocate) != nil
            changed(offset: offset, length: UInt64(sectors) * Self.sectorSize)
            if failed { return .ioError }
        }
        statistics.count(type == .discard ? .discard : .writeZeroes)
        return .ok
    }
}
