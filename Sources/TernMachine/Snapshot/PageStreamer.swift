import Glibc
import TernWire

/// What went on the wire as page frames.
public struct PageStreamCounters: Sendable, Equatable {
    public var bytes: UInt64 = 0
    public var dataPages: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var frames: UInt64 = 0
    /// Pages sent as XBZRLE deltas (counted in dataPages too) and their encoded bytes.
    public var deltaPages: UInt64 = 0
    public var deltaBytes: UInt64 = 0
    /// zstd: payload bytes before and after compression, over the frames it made smaller.
    public var compressedInputBytes: UInt64 = 0
    public var compressedOutputBytes: UInt64 = 0
    /// Pages not sent because the receiver already holds their bytes (SentPageFingerprints).
    public var unchangedPages: UInt64 = 0
    /// zstd: frames sent raw without trying, after frames that did not compress (CompressionBackoff).
    public var compressionSkippedFrames: UInt64 = 0
    public init() {}
}

/// Turns ranges of guest pages into `pages` frames: the sending half shared
/// by snapshots and migration.
///
/// Pages are copied from the VMM's mapping of the memfd into a staging
/// buffer. The copy is what makes a running guest safe to send: the frame's
/// checksum and the bytes sent are both taken from the staged copy, while
/// any later write to the page is in the dirty log for the next round. Zero
/// pages are found in the copy and go as markers; known holes go as markers
/// without being read.
public final class PageStreamer {
    /// 512 KiB frames: the staged bytes are still in the CPU's cache when they
    /// are checksummed and written to the socket (and, at the destination,
    /// read, checked and written to memory). 8 MiB frames went through memory
    /// three times at each end, and the 64 MiB stop-and-copy of a guest that
    /// rewrites 64 MiB took about 45 ms instead of 23-25 in side-by-side runs
    /// (`bash bench/stop_and_copy.sh` shows the split; this host's noise is large).
    public static let defaultFramePages = 128
    static let maximumRunPages: UInt32 = 1024
    /// The most bytes one run covers.
    public static let maximumRunBytes = Int(maximumRunPages) * PageRun.pageSize
    /// Runs up to this size are read through the mapping without populating it first.
    static let mappedReadLimit = 4 * PageRun.pageSize
    static let maximumRunsPerFrame = 4096

    public let memory: GuestMemory
    public let stream: FDStream
    /// Called with a frame's size before it is written: rate limits and cancellation hook in here.
    public var beforeFrame: ((Int) throws -> Void)?
    public private(set) var counters = PageStreamCounters()
    /// Pages per frame: large for bulk throughput, small where latency matters (post-copy).
    public let framePages: Int
    /// Flags of the frames written (post-copy marks demand replies).
    public var frameFlags: UInt32 = 0
    /// Called, once a frame is written, with the memfd pages of each of its runs (a pre-copy round that
    /// may be cut short for post-copy needs to know what actually left); and at once for pages that
    /// XBZRLE found unchanged, which need nothing sent.
    public var runSent: ((_ firstPage: Int, _ count: Int) -> Void)?

    private let staging: UnsafeMutableRawBufferPointer
    private var stagedPages = 0
    private var runs: [(run: PageRun, stagingPage: Int)] = []
    /// XBZRLE (pre-copy only): pages the cache holds go as deltas against it.
    public var cache: XBZRLECache?
    /// Whether pages sent whole enter the cache (from the first re-send on; the
    /// first pass would only fill it with pages that are never sent again).
    public var cacheWholePages = false
    /// Otherwise, which pages sent whole enter the cache anyway (the first pass caches the
    /// neighbourhoods it has seen the guest write, whose pages are likely to come again).
    public var shouldCache: ((Int) -> Bool)?
    private let deltas: UnsafeMutableRawBufferPointer
    private var deltaUsed = 0
    /// zstd per frame (`--compress zstd`); a frame it cannot shrink goes as it is.
    public var compressor: ZstdCompressor?
    /// Which frames zstd is tried on: it backs off while frames do not compress.
    private var backoff = CompressionBackoff()
    /// Pre-copy: what the receiver holds of each page, so that pages unchanged since they were sent stay here.
    public var fingerprints: SentPageFingerprints?
    /// The fingerprint of each staged page, recorded once its frame is written.
    private let stagedFingerprints: UnsafeMutableBufferPointer<UInt64>

    public init(memory: GuestMemory, stream: FDStream, framePages: Int = PageStreamer.defaultFramePages) {
        self.memory = memory
        self.stream = stream
        self.framePages = framePages
        staging = .allocate(byteCount: framePages * PageRun.pageSize, alignment: 4096)
        deltas = .allocate(byteCount: framePages * PageRun.pageSize, alignment: 64)
        stagedFingerprints = .allocate(capacity: framePages)
        stagedFingerprints.initialize(repeating: 0)
    }

    deinit {
        staging.deallocate()
        deltas.deallocate()
        stagedFingerprints.deallocate()
    }

    /// Pages known to be zero (memfd holes): markers only, nothing is read.
    public func addZeroPages(firstPage: Int, count: Int) throws {
        var page = firstPage
        var left = count
        while left > 0 {
            let address = memory.address(ofPage: page)
            guard let region = memory.region(containing: address) else { throw GuestMemory.Error.outOfRange(address, length: 4096) }
            let pagesInRegion = Int((region.end.rawValue - address.rawValue) / UInt64(PageRun.pageSize))
            var take = min(left, pagesInRegion)
            if let last = runs.last, last.run.kind == .zero, last.run.pageCount < Self.maximumRunPages,
               last.run.address.rawValue + UInt64(last.run.byteCount) == address.rawValue {
                take = min(take, Int(Self.maximumRunPages - last.run.pageCount))
                runs[runs.count - 1].run.pageCount += UInt32(take)
            } else {
                if runs.count >= Self.maximumRunsPerFrame { try flush() }
                take = min(take, Int(Self.maximumRunPages))
                runs.append((PageRun(address: address, pageCount: UInt32(take), kind: .zero), -1))
            }
            counters.zeroPages += UInt64(take)
            page += take
            left -= take
        }
    }

    /// Pages to read and send, as data or (if they turn out all zero) as markers.
    public func addPages(firstPage: Int, count: Int) throws {
        var page = firstPage
        let end = firstPage + count
        while page < end {
            // Room for the whole batch first: a flush in the middle of it would
            // reset the staging and delta offsets that its runs point into.
            let batch = min(end - page, framePages)
            if stagedPages + batch > framePages || runs.count + batch > Self.maximumRunsPerFrame { try flush() }
            let n = min(end - page, framePages - stagedPages)
            let destination = staging.baseAddress! + stagedPages * PageRun.pageSize
            try readMemory(into: destination, bytes: n * PageRun.pageSize, fileOffset: page * PageRun.pageSize)
            for i in 0..<n {
                let bytes = UnsafeRawBufferPointer(start: destination + i * PageRun.pageSize, count: PageRun.pageSize)
                if Checksum.isZero(bytes) {
                    // The receiver's copy becomes zero: so must the cached one, or a later delta
                    // (or "unchanged") would be computed against contents the receiver no longer has.
                    if let cache, cache.contains(page + i) { cache.insert(page: page + i, bytes: bytes) }
                    append(.zero, page: page + i, stagingPage: -1)
                    continue
                }
                let fingerprint = fingerprints == nil ? 0 : SentPageFingerprints.of(bytes)
                if let fingerprints, fingerprints.holds(page: page + i, fingerprint: fingerprint) {
                    // The dirty log named it, but it holds what was sent last: nothing needs to travel.
                    counters.unchangedPages += 1
                    runSent?(page + i, 1)
                    continue
                }
                if let cache, let length = cache.encode(page: page + i, bytes: bytes,
                                                                into: UnsafeMutableRawBufferPointer(rebasing: deltas[deltaUsed...])) {
                    // Identical to what the receiver holds: nothing needs to travel, and it counts as sent.
                    if length == 0 {
                        counters.dataPages += 1
                        counters.deltaPages += 1
                        runSent?(page + i, 1)
                        continue
                    }
                    // stagingPage of a delta run: where its bytes are in `deltas`, and how many.
                    runs.append((PageRun(address: memory.address(ofPage: page + i), pageCount: 1, kind: .delta), deltaUsed << 16 | length))
                    deltaUsed += length
                    counters.dataPages += 1
                    counters.deltaPages += 1
                    counters.deltaBytes += UInt64(length)
                } else {
                    if let cache, cacheWholePages || shouldCache?(page + i) == true, !cache.contains(page + i) {
                        cache.insert(page: page + i, bytes: bytes)
                    }
                    stagedFingerprints[stagedPages + i] = fingerprint
                    append(.data, page: page + i, stagingPage: stagedPages + i)
                }
            }
            stagedPages += n
            page += n
        }
    }

    private func readMemory(into destination: UnsafeMutableRawPointer, bytes: Int, fileOffset: Int) throws {
        // Through the mapping: KVM faults guest memory in through it, so the pages the guest wrote are
        // mapped already (a 1 GiB guest that filled 512 MiB has 512 MiB of the mapping resident) and this
        // is a plain copy, where pread looks each page up in the page cache again. Against pread for
        // runs over 4 pages, six interleaved runs each of `python3 bench/migration.py --vmms tern --cases
        // hot960,flat64 --warm-host-gib 2` gave flat64 a 64 MiB stop-and-copy of 17-23 ms in four runs
        // (25-27 ms at best with pread) and a median downtime of 21 ms against 32; hot960 did not change.
        // A long run is populated first, in one call, for pages the guest never touched (written by the
        // loader, a restore, or an earlier migration into this VM): a fault apiece costs more than the
        // copy. Short runs (the scattered dirty pages of later rounds) are in the mapping anyway.
        let source = memory.mapping.base + fileOffset
        if bytes <= Self.mappedReadLimit || madvise(source, bytes, 22 /* MADV_POPULATE_READ */) == 0 {
            destination.copyMemory(from: source, byteCount: bytes)
            return
        }
        // Without MADV_POPULATE_READ (Linux before 5.14): pread, which never faults pages in.
        var done = 0
        while done < bytes {
            let n = pread(memory.file.rawValue, destination + done, bytes - done, off_t(fileOffset + done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw FDStream.IOError(operation: "reading guest memory", errno: n == 0 ? EIO : errno) }
            done += n
        }
    }

    private func append(_ kind: PageRun.Kind, page: Int, stagingPage: Int) {
        let address = memory.address(ofPage: page)
        if let last = runs.last, last.run.kind == kind, last.run.pageCount < Self.maximumRunPages,
           last.run.address.rawValue + UInt64(last.run.byteCount) == address.rawValue,
           kind == .zero || last.stagingPage + Int(last.run.pageCount) == stagingPage {
            runs[runs.count - 1].run.pageCount += 1
        } else {
            // addPages made room for its whole batch, so this never needs to flush.
            precondition(runs.count < Self.maximumRunsPerFrame, "PageStreamer: no room for a run inside a batch")
            runs.append((PageRun(address: address, pageCount: 1, kind: kind), stagingPage))
        }
        if kind == .data { counters.dataPages += 1 } else { counters.zeroPages += 1 }
    }

    /// Drops what is staged but not yet written (a round cut short before its next frame) and takes it
    /// off the counters, which count pages as they are staged.
    public func discardPending() {
        for entry in runs {
            switch entry.run.kind {
            case .data: counters.dataPages -= UInt64(entry.run.pageCount)
            case .zero: counters.zeroPages -= UInt64(entry.run.pageCount)
            case .delta:
                counters.dataPages -= 1
                counters.deltaPages -= 1
                counters.deltaBytes -= UInt64(entry.stagingPage & 0xFFFF)
            }
        }
        runs.removeAll(keepingCapacity: true)
        stagedPages = 0
        deltaUsed = 0
    }

    /// Writes what is pending as one frame.
    public func flush() throws {
        guard !runs.isEmpty else { stagedPages = 0; deltaUsed = 0; return }
        // Each run's header, plus a delta's u32 length right after it.
        let slotSize = PageRun.headerSize + 4
        let headers = UnsafeMutableRawBufferPointer.allocate(byteCount: runs.count * slotSize, alignment: 8)
        defer { headers.deallocate() }
        var pieces: [UnsafeRawBufferPointer] = []
        pieces.reserveCapacity(runs.count * 2)
        var size = FrameHeader.size
        for (index, entry) in runs.enumerated() {
            let slot = UnsafeMutableRawBufferPointer(rebasing: headers[index * slotSize..<(index + 1) * slotSize])
            slot.copyBytes(from: entry.run.encodedHeader)
            if entry.run.kind == .delta {
                let offset = entry.stagingPage >> 16, length = entry.stagingPage & 0xFFFF
                slot.storeBytes(of: UInt32(length).littleEndian, toByteOffset: PageRun.headerSize, as: UInt32.self)
                pieces.append(UnsafeRawBufferPointer(slot))
                pieces.append(UnsafeRawBufferPointer(rebasing: deltas[offset..<offset + length]))
                size += slotSize + length
                continue
            }
            pieces.append(UnsafeRawBufferPointer(rebasing: slot[0..<PageRun.headerSize]))
            size += PageRun.headerSize
            if entry.run.kind == .data {
                pieces.append(UnsafeRawBufferPointer(start: staging.baseAddress! + entry.stagingPage * PageRun.pageSize, count: entry.run.byteCount))
                size += entry.run.byteCount
            }
        }
        var flags = frameFlags
        var packed: UnsafeRawBufferPointer?
        if let compressor {
            if backoff.shouldTry() {
                let input = size - FrameHeader.size
                packed = try compressor.compress(pieces, size: input).flatMap { $0.count + 4 < input ? $0 : nil }
                backoff.record(input: input, output: packed.map { $0.count + 4 })
            }
            counters.compressionSkippedFrames = backoff.skippedFrames
        }
        if let packed {
            counters.compressedInputBytes += UInt64(size - FrameHeader.size)
            counters.compressedOutputBytes += UInt64(packed.count + 4)
            flags |= PageRun.compressedFrameFlag
            withUnsafeBytes(of: UInt32(size - FrameHeader.size).littleEndian) { lengthBytes in
                headers.baseAddress!.copyMemory(from: lengthBytes.baseAddress!, byteCount: 4)
            }
            pieces = [UnsafeRawBufferPointer(rebasing: headers[0..<4]), packed]
            size = FrameHeader.size + 4 + packed.count
        }
        try beforeFrame?(size)
        try stream.writeFrame(.pages, flags: flags, payload: pieces)
        if runSent != nil || fingerprints != nil {
            for entry in runs {
                let first = Int(try memory.fileOffset(of: entry.run.address, length: UInt64(entry.run.byteCount)) / UInt64(PageRun.pageSize))
                runSent?(first, Int(entry.run.pageCount))
                // Only now does the receiver hold them; a frame dropped unsent (discardPending) records nothing.
                if let fingerprints {
                    for k in 0..<Int(entry.run.pageCount) {
                        fingerprints.record(page: first + k, fingerprint: entry.run.kind == .data ? stagedFingerprints[entry.stagingPage + k] : 0)
                    }
                }
            }
        }
        counters.bytes += UInt64(size)
        counters.frames += 1
        runs.removeAll(keepingCapacity: true)
        stagedPages = 0
        deltaUsed = 0
    }
}

extension GuestMemory {
    /// The guest address of a memfd page index.
    public func address(ofPage page: Int) -> GuestAddress {
        let offset = UInt64(page) * UInt64(PageRun.pageSize)
        let region = regions.last { $0.fileOffset <= offset }!
        return region.start + (offset - region.fileOffset)
    }

    /// Calls `body` for each extent of the memfd in order: holes (never
    /// written, so zero without reading them) and ranges that hold data.
    /// Page indices are memfd pages (file offset / 4096).
    /// `pages` limits the walk to those pages (default: all of RAM).
    public func forEachExtent(in pages: Range<Int>? = nil, _ body: (_ firstPage: Int, _ count: Int, _ isHole: Bool) throws -> Void) throws {
        let page = UInt64(PageRun.pageSize)
        let fd = file.rawValue
        var offset = UInt64(pages?.lowerBound ?? 0) * page
        let end = pages.map { UInt64($0.upperBound) * page } ?? size
        while offset < end {
            // lseek whences SEEK_DATA (3) and SEEK_HOLE (4); ENXIO from SEEK_DATA means "no data until the end".
            let nextData = lseek(fd, off_t(offset), 3)
            let holeEnd = nextData < 0 ? end : min(UInt64(nextData) / page * page, end)
            if holeEnd > offset {
                try body(Int(offset / page), Int((holeEnd - offset) / page), true)
                offset = holeEnd
            }
            guard offset < end else { break }
            let nextHole = lseek(fd, off_t(offset), 4)
            let dataEnd = nextHole < 0 ? end : min((UInt64(nextHole) + page - 1) / page * page, end)
            try body(Int(offset / page), Int((dataEnd - offset) / page), false)
            offset = dataEnd
        }
    }
}
