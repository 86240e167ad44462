import CKVM
import Glibc
import TernWire

/// Applies `pages` frames from a byte source to guest memory: the receiving
/// half shared by snapshot restore and migration.
///
/// With 4 KiB pages, data runs go through a bounce buffer and pwrite into the
/// memfd, not through the VMM's mapping: populating the mapping page by page
/// costs more than the copy itself, and the guest faults in what it uses
/// anyway. Huge pages and preallocated memory are read into in place. Zero
/// runs punch holes in 4 KiB pages, so a page that held data earlier
/// (pre-copy re-sends) really becomes zero and its memory is released.
public final class PageRunApplier {
    public enum Delivery {
        /// Each page exactly once (a snapshot).
        case exactlyOnce
        /// Pages may come again with newer contents (pre-copy rounds).
        case repeated
    }

    let memory: GuestMemory
    let delivery: Delivery
    private(set) var coverage: PageCoverage
    public private(set) var dataPages: UInt64 = 0
    public private(set) var zeroPages: UInt64 = 0
    public private(set) var deltaPages: UInt64 = 0
    private let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 << 20, alignment: 4096)
    /// With parallel streams: the stream this applier reads, whose pages alone it accepts.
    public var stream: (partition: StreamPartition, index: Int)?
    /// With --verify: each page's CRC, recorded as it lands (shared by the appliers of all streams).
    public var digests: PageDigests?
    /// Whether zstd-compressed frames are expected (the source announced `--compress zstd`).
    public var decompressionAllowed = false
    private lazy var decompressor = ZstdDecompressor()
    private var compressedPayload: [UInt8] = []
    private var decompressed: [UInt8] = []
    /// Batches a frame's small reads (run headers, delta lengths, deltas) into few large ones.
    private let frameReader = FramePayloadReader()
    private var runHeaderBytes = [UInt8](repeating: 0, count: PageRun.headerSize)
    private var deltaLengthBytes = [UInt8](repeating: 0, count: 4)

    public init(memory: GuestMemory, delivery: Delivery) {
        self.memory = memory
        self.delivery = delivery
        coverage = PageCoverage(memory: memory)
    }

    deinit { bounce.deallocate() }

    /// True once every page of RAM has arrived at least once.
    public var isComplete: Bool { coverage.isComplete }
    public var missingPages: UInt64 { coverage.missing }
    /// Pages that have arrived at least once (appliers of parallel streams cover disjoint pages).
    public var coveredPages: UInt64 { coverage.covered }

    /// Reads one pages frame's payload (its header already read) and applies it.
    /// Data lands in memory before the frame's CRC is known: a caller that
    /// sees this throw must discard the memory, never run it.
    public func apply(_ header: FrameHeader, from source: some ByteSource) throws {
        guard header.flags & PageRun.compressedFrameFlag != 0 else {
            frameReader.begin(source, length: Int(header.length))
            return try applyRuns(length: Int(header.length), from: frameReader,
                                 expectedCRC: source.authenticatesPayloads ? nil : header.payloadCRC)
        }
        guard decompressionAllowed else { throw WireError.malformed("a compressed pages frame, but compression was not agreed") }
        guard header.length > 4 else { throw WireError.malformed("a compressed pages frame of \(header.length) bytes") }
        // The CRC covers the bytes on the wire; what zstd makes of checked bytes needs no second check.
        compressedPayload = try source.readExactly(Int(header.length), what: "compressed pages frame")
        try source.checkPayload(compressedPayload, of: header, what: "compressed pages frame")
        let length = Int(UInt32(compressedPayload[0]) | UInt32(compressedPayload[1]) << 8 | UInt32(compressedPayload[2]) << 16 | UInt32(compressedPayload[3]) << 24)
        guard length > 0, length <= PageRun.maximumUncompressedFrame else {
            throw WireError.malformed("a compressed pages frame announcing \(length) bytes")
        }
        if decompressed.count < length { decompressed = [UInt8](repeating: 0, count: length) }
        try compressedPayload.withUnsafeBytes { packed in
            try decompressed.withUnsafeMutableBytes { output in
                let target = UnsafeMutableRawBufferPointer(rebasing: output[0..<length])
                try decompressor.decompress(UnsafeRawBufferPointer(rebasing: packed[4...]), into: target)
                try applyRuns(length: length, from: RawBufferSource(UnsafeRawBufferPointer(target)), expectedCRC: nil)
            }
        }
    }

    /// Reads `length` bytes of runs and applies them; checks their CRC when one is given.
    private func applyRuns(length: Int, from source: some ByteSource, expectedCRC: UInt32?) throws {
        var remaining = length
        // A decompressed frame was checked on the wire, and a TLS channel checks every record: no pass over their bytes.
        var crc: UInt32? = expectedCRC == nil ? nil : 0
        while remaining > 0 {
            guard remaining >= PageRun.headerSize else { throw WireError.malformed("pages frame ends inside a run header") }
            try runHeaderBytes.withUnsafeMutableBytes { try source.readExactly(into: $0, what: "page run header") }
            crc = crc.map { Checksum.crc32c(runHeaderBytes, seed: $0) }
            remaining -= PageRun.headerSize
            let run = try PageRun(decodingHeader: runHeaderBytes)
            guard memory.region(containing: run.address, length: UInt64(run.byteCount)) != nil else {
                throw WireError.malformed("page run \(run.address)+\(run.pageCount) pages lies outside guest RAM")
            }
            if run.kind == .delta {
                guard delivery == .repeated else { throw WireError.malformed("a delta page in a stream that sends each page once") }
                guard coverage.contains(run) else {
                    throw WireError.malformed("a delta for page \(run.address), which this side never received")
                }
            }
            let fileOffset = try memory.fileOffset(of: run.address, length: UInt64(run.byteCount))
            if let stream, !stream.partition.carries(first: Int(fileOffset) / PageRun.pageSize, count: Int(run.pageCount), stream: stream.index) {
                throw WireError.malformed("page run \(run.address)+\(run.pageCount) pages arrived on stream \(stream.index), which does not carry it")
            }
            // Pages never received are still as the fresh memory made them: zero.
            let wasCovered = run.kind == .zero && coverage.containsAny(run)
            try coverage.mark(run, allowRepeats: delivery == .repeated)
            switch run.kind {
            case .delta:
                guard remaining >= 4 else { throw WireError.malformed("pages frame ends inside a delta length") }
                try deltaLengthBytes.withUnsafeMutableBytes { try source.readExactly(into: $0, what: "delta length") }
                crc = crc.map { Checksum.crc32c(deltaLengthBytes, seed: $0) }
                let length = deltaLengthBytes.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(as: UInt32.self))) }
                remaining -= 4
                guard length > 0, length < PageRun.pageSize, length <= remaining else {
                    throw WireError.malformed("a delta of \(length) bytes for page \(run.address)")
                }
                let delta = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<length])
                try source.readExactly(into: delta, what: "delta")
                crc = crc.map { Checksum.crc32c(UnsafeRawBufferPointer(delta), seed: $0) }
                remaining -= length
                try applyDelta(UnsafeRawBufferPointer(delta), toFileOffset: fileOffset, page: run.address)
                digests?.record(first: Int(fileOffset) / PageRun.pageSize,
                                pages: UnsafeRawBufferPointer(start: memory.mapping.base + Int(fileOffset), count: PageRun.pageSize))
                dataPages += 1
                deltaPages += 1
            case .zero:
                zeroPages += UInt64(run.pageCount)
                digests?.recordZero(first: Int(fileOffset) / PageRun.pageSize, count: Int(run.pageCount))
                if !wasCovered { continue }
                if memory.takesPagesInPlace {
                    // Keep preallocated pages allocated, and huge pages whole: zero them in place.
                    UnsafeMutableRawBufferPointer(start: memory.mapping.base + Int(fileOffset), count: run.byteCount)
                        .initializeMemory(as: UInt8.self, repeating: 0)
                    continue
                }
                let result = ckvm_punch_hole(memory.file.rawValue, Int64(fileOffset), Int64(run.byteCount))
                guard result == 0 else { throw FDStream.IOError(operation: "zeroing guest memory", errno: errno) }
            case .data:
                guard remaining >= run.byteCount else { throw WireError.malformed("pages frame ends inside page data") }
                crc = try copy(run.byteCount, from: source, toFileOffset: fileOffset, crc: crc)
                remaining -= run.byteCount
                dataPages += UInt64(run.pageCount)
            }
        }
        if let expectedCRC, crc != expectedCRC { throw WireError.checksumMismatch("pages frame (\(length) bytes)") }
    }

    /// Applies an XBZRLE delta to the page in place, through the mapping: the
    /// page arrived before (the coverage says so), so it is in the memfd and
    /// touching it costs a minor fault, not an allocation — far cheaper than
    /// reading and writing it back with two syscalls, which made the deltas of
    /// a stop-and-copy the largest part of its downtime. A delta that fails to
    /// decode leaves the page half-changed; the transfer fails and the memory
    /// is never run, as for any bad frame.
    private func applyDelta(_ delta: UnsafeRawBufferPointer, toFileOffset offset: UInt64, page: GuestAddress) throws {
        let current = UnsafeMutableRawBufferPointer(start: memory.mapping.base + Int(offset), count: PageRun.pageSize)
        do {
            try XBZRLE.decode(delta, into: current)
        } catch {
            throw WireError.malformed("delta for page \(page): \(error)")
        }
    }

    private func copy(_ count: Int, from source: some ByteSource, toFileOffset start: UInt64, crc: UInt32?) throws -> UInt32? {
        if memory.takesPagesInPlace {
            // Straight into guest RAM, one copy fewer; checked where it landed (a bad frame fails the whole transfer).
            if !memory.isPreallocated { try memory.populate(fileOffset: Int(start), count: count) }
            let target = UnsafeMutableRawBufferPointer(start: memory.mapping.base + Int(start), count: count)
            try source.readExactly(into: target, what: "page data")
            digests?.record(first: Int(start) / PageRun.pageSize, pages: UnsafeRawBufferPointer(target))
            return crc.map { Checksum.crc32c(UnsafeRawBufferPointer(target), seed: $0) }
        }
        var crc = crc
        var fileOffset = start
        var left = count
        while left > 0 {
            let chunk = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<min(left, bounce.count)])
            try source.readExactly(into: chunk, what: "page data")
            crc = crc.map { Checksum.crc32c(UnsafeRawBufferPointer(chunk), seed: $0) }
            // Runs start on a page and the bounce buffer holds whole pages, so chunks do too.
            digests?.record(first: Int(fileOffset) / PageRun.pageSize, pages: UnsafeRawBufferPointer(chunk))
            var written = 0
            while written < chunk.count {
                let n = pwrite(memory.file.rawValue, chunk.baseAddress! + written, chunk.count - written, off_t(fileOffset) + off_t(written))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw FDStream.IOError(operation: "writing guest memory", errno: errno) }
                written += n
            }
            fileOffset += UInt64(chunk.count)
            left -= chunk.count
        }
        return crc
    }
}
