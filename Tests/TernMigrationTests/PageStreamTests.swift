import Foundation
import Glibc
import Testing
import TernMachine
import TernWire
@testable import TernMigration

/// Page streams without a VM: guest memory (a memfd) sent through page
/// senders into files and applied to another memory, with zstd and with
/// parallel streams, and the receiver's checks on both.
struct PageStreamTests {
    static let size: UInt64 = 16 << 20

    /// Memory with text-like (compressible), random (incompressible) and zero pages.
    func sourceMemory() throws -> GuestMemory {
        let memory = try GuestMemory(size: Self.size)
        var generator = SystemRandomNumberGenerator()
        for page in stride(from: 0, to: Int(Self.size / 4096), by: 3) {
            let random = (0..<512).map { _ in generator.next() as UInt64 }.withUnsafeBytes { Array($0) }
            let bytes: [UInt8] = page % 4 == 0 ? random
                : Array(String(repeating: "page \(page) of a guest's memory; ", count: 120).utf8.prefix(4096))
            try memory.write(bytes, at: GuestAddress(UInt64(page) * 4096))
        }
        return memory
    }

    func temporaryFile() -> FDStream {
        var template = Array("/tmp/tern-pages-XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        template.withUnsafeBufferPointer { _ = unlink($0.baseAddress!) }
        return FDStream(fd: fd)
    }

    /// Sends every page on `streams` streams (into files); returns the files, rewound, and the counters.
    func send(_ memory: GuestMemory, streams: Int, zstd: Bool) throws -> ([FDStream], PageStreamCounters) {
        let files = (0..<streams).map { _ in temporaryFile() }
        let partition = StreamPartition(streams: streams)
        var total = PageStreamCounters()
        for (index, file) in files.enumerated() {
            let sender = PageSender(memory: memory, stream: file, partition: partition, index: index,
                                    rateLimit: RateLimiter(bytesPerSecond: nil), shouldStop: { false })
            if zstd { sender.streamer.compressor = ZstdCompressor(level: 1) }
            try sender.sendAll()
            total.add(sender.counters)
            lseek(file.fd, 0, SEEK_SET)
        }
        return (files, total)
    }

    func applyAll(_ file: FDStream, to applier: PageRunApplier) throws {
        while true {
            let header: FrameHeader
            do { header = try file.readFrameHeader() } catch WireError.truncated { return }
            try applier.apply(header, from: file)
        }
    }

    func contents(_ memory: GuestMemory) throws -> [UInt8] { try memory.read(GuestAddress(0), count: Int(Self.size)) }

    @Test func zstdFramesArriveIdentical() throws {
        let memory = try sourceMemory()
        let (files, counters) = try send(memory, streams: 1, zstd: true)
        defer { files.forEach { close($0.fd) } }
        #expect(counters.compressedInputBytes > 0)
        #expect(counters.compressedOutputBytes < counters.compressedInputBytes / 2, "text pages compress well")
        let copy = try GuestMemory(size: Self.size)
        let applier = PageRunApplier(memory: copy, delivery: .repeated)
        applier.decompressionAllowed = true
        try applyAll(files[0], to: applier)
        #expect(applier.isComplete)
        #expect(try contents(copy) == contents(memory))
    }

    /// Random pages first, then text: zstd backs off over the random half and compresses the text again.
    @Test func zstdBacksOffWhereFramesDoNotCompressAndComesBack() throws {
        let memory = try GuestMemory(size: Self.size)
        var generator = SystemRandomNumberGenerator()
        let pages = Int(Self.size / 4096)
        for page in 0..<pages {
            let bytes: [UInt8] = page < pages / 2 ? (0..<512).map { _ in generator.next() as UInt64 }.withUnsafeBytes { Array($0) }
                : Array(String(repeating: "page \(page) of a guest's memory; ", count: 120).utf8.prefix(4096))
            try memory.write(bytes, at: GuestAddress(UInt64(page) * 4096))
        }
        let (files, counters) = try send(memory, streams: 1, zstd: true)
        defer { files.forEach { close($0.fd) } }
        let halfFrames = UInt64(pages / 2 / PageStreamer.defaultFramePages)
        #expect(counters.compressionSkippedFrames >= halfFrames / 2, "most random frames go untried: \(counters.compressionSkippedFrames) of \(halfFrames)")
        #expect(counters.compressedInputBytes >= UInt64(Self.size / 2) * 3 / 4, "the text half is compressed again")
        let copy = try GuestMemory(size: Self.size)
        let applier = PageRunApplier(memory: copy, delivery: .repeated)
        applier.decompressionAllowed = true
        try applyAll(files[0], to: applier)
        #expect(try contents(copy) == contents(memory))
    }

    @Test func theBackoffDoublesUpToItsLimitAndResetsOnAFrameThatCompresses() {
        var backoff = CompressionBackoff()
        var tried: [Int] = []
        for frame in 0..<300 where backoff.shouldTry() {
            tried.append(frame)
            backoff.record(input: 1000, output: frame < 200 ? 950 : 100)
        }
        // Tries after gaps of 1, 2, 4 ... 64, 64 ...; from frame 200 on, the first try that compresses resets it.
        #expect(Array(tried.prefix(8)) == [0, 2, 5, 10, 19, 36, 69, 134])
        let firstGood = tried.first { $0 >= 200 }!
        #expect(tried.drop { $0 < firstGood }.elementsEqual(firstGood..<300), "every frame is tried once frames compress again")
        #expect(CompressionBackoff.worthwhile(input: 800, output: 700) && !CompressionBackoff.worthwhile(input: 800, output: 701))
    }

    @Test func compressedFramesNeedAgreement() throws {
        let (files, _) = try send(try sourceMemory(), streams: 1, zstd: true)
        defer { files.forEach { close($0.fd) } }
        let applier = PageRunApplier(memory: try GuestMemory(size: Self.size), delivery: .repeated)
        #expect(throws: WireError.malformed("a compressed pages frame, but compression was not agreed")) { try applyAll(files[0], to: applier) }
    }

    /// A compressed frame whose CRC is right but whose content is hostile: refused, never a crash.
    @Test(arguments: ["bad zstd", "length too large", "length too small"])
    func hostileCompressedFramesAreRefused(damage: String) throws {
        let (files, _) = try send(try sourceMemory(), streams: 1, zstd: true)
        defer { files.forEach { close($0.fd) } }
        let header = try files[0].readFrameHeader()
        #expect(header.flags & PageRun.compressedFrameFlag != 0)
        var payload = try files[0].readExactly(Int(header.length), what: "payload")
        switch damage {
        case "bad zstd": payload[4] ^= 0xFF // the zstd frame's magic number
        case "length too large": payload[3] = 0x7F
        default: payload[0] = 0; payload[1] = 0x10; payload[2] = 0; payload[3] = 0
        }
        let forged = FrameHeader(type: .pages, flags: header.flags, length: UInt64(payload.count), payloadCRC: Checksum.crc32c(payload))
        let applier = PageRunApplier(memory: try GuestMemory(size: Self.size), delivery: .repeated)
        applier.decompressionAllowed = true
        #expect(throws: WireError.self) { try applier.apply(forged, from: BufferSource(payload)) }
    }

    @Test func parallelStreamsCarryDisjointPartsAndArriveIdentical() throws {
        let memory = try sourceMemory()
        let (files, counters) = try send(memory, streams: 3, zstd: false)
        defer { files.forEach { close($0.fd) } }
        #expect(counters.dataPages + counters.zeroPages == Self.size / 4096, "each page on exactly one stream")
        let copy = try GuestMemory(size: Self.size)
        var covered: UInt64 = 0
        for (index, file) in files.enumerated() {
            let applier = PageRunApplier(memory: copy, delivery: .repeated)
            applier.stream = (StreamPartition(streams: 3), index)
            try applyAll(file, to: applier)
            covered += applier.coveredPages
        }
        #expect(covered == Self.size / 4096)
        #expect(try contents(copy) == contents(memory))
    }

    @Test func aPageOnTheWrongStreamIsRefused() throws {
        let (files, _) = try send(try sourceMemory(), streams: 2, zstd: false)
        defer { files.forEach { close($0.fd) } }
        let applier = PageRunApplier(memory: try GuestMemory(size: Self.size), delivery: .repeated)
        applier.stream = (StreamPartition(streams: 2), 0)
        #expect {
            try applyAll(files[1], to: applier)
        } throws: { "\($0)".contains("arrived on stream 0, which does not carry it") }
    }

    /// A cached page that becomes zero and then returns to its old contents must
    /// arrive as those contents, not as "unchanged" against the stale cache.
    @Test func xbzrleCacheFollowsAPageThroughZero() throws {
        let memory = try GuestMemory(size: Self.size)
        let file = temporaryFile()
        defer { close(file.fd) }
        let sender = PageSender(memory: memory, stream: file, rateLimit: RateLimiter(bytesPerSecond: nil), shouldStop: { false })
        sender.streamer.cache = XBZRLECache(bytes: 1 << 20)
        sender.streamer.cacheWholePages = true
        var generator = SystemRandomNumberGenerator()
        let contents = (0..<512).map { _ in generator.next() as UInt64 }.withUnsafeBytes { Array($0) }
        let page = GuestAddress(5 * 4096)
        var one = PageSet(pageCount: Int(Self.size / 4096))
        one.insert(5)
        for bytes in [contents, [UInt8](repeating: 0, count: 4096), contents] {
            try memory.write(bytes, at: page)
            try sender.send(one)
        }
        lseek(file.fd, 0, SEEK_SET)
        let copy = try GuestMemory(size: Self.size)
        let applier = PageRunApplier(memory: copy, delivery: .repeated)
        try applyAll(file, to: applier)
        #expect(try copy.read(page, count: 4096) == contents)
    }

    func randomPage() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<512).map { _ in generator.next() as UInt64 }.withUnsafeBytes { Array($0) }
    }

    /// A sender that skips pages holding what it sent last (pre-copy's rounds).
    func fingerprintingSender(_ memory: GuestMemory, into file: FDStream) -> PageSender {
        let sender = PageSender(memory: memory, stream: file, rateLimit: RateLimiter(bytesPerSecond: nil), shouldStop: { false })
        sender.streamer.fingerprints = SentPageFingerprints(pageCount: Int(Self.size / 4096))
        return sender
    }

    /// Pages the dirty log names again without their bytes having changed stay here; the one that
    /// changed goes, and the copy ends identical.
    @Test func unchangedPagesAreNotSentAgain() throws {
        let memory = try sourceMemory()
        let file = temporaryFile()
        defer { close(file.fd) }
        let sender = fingerprintingSender(memory, into: file)
        var pages = PageSet(pageCount: Int(Self.size / 4096))
        for page in stride(from: 0, to: 300, by: 3) { pages.insert(page) }
        try sender.send(pages)
        let first = sender.counters
        #expect(first.dataPages == 100 && first.unchangedPages == 0)
        try sender.send(pages)
        #expect(sender.counters.unchangedPages == 100)
        #expect(sender.counters.bytes == first.bytes, "nothing went the second time")
        let changed = randomPage()
        try memory.write(changed, at: GuestAddress(30 * 4096))
        try sender.send(pages)
        #expect(sender.counters.dataPages == first.dataPages + 1)
        #expect(sender.counters.unchangedPages == 199)
        lseek(file.fd, 0, SEEK_SET)
        let copy = try GuestMemory(size: Self.size)
        try applyAll(file, to: PageRunApplier(memory: copy, delivery: .repeated))
        #expect(try copy.read(GuestAddress(0), count: 300 * 4096) == memory.read(GuestAddress(0), count: 300 * 4096))
    }

    /// A page sent whole, then as a zero marker (or, with XBZRLE, as a delta), then back to its first
    /// contents must go again: the receiver no longer holds what was first sent.
    @Test(arguments: [false, true])
    func aPageBackToContentsSentEarlierGoesAgain(xbzrle: Bool) throws {
        let memory = try GuestMemory(size: Self.size)
        let file = temporaryFile()
        defer { close(file.fd) }
        let sender = fingerprintingSender(memory, into: file)
        if xbzrle {
            sender.streamer.cache = XBZRLECache(bytes: 1 << 20)
            sender.streamer.cacheWholePages = true
        }
        let contents = randomPage()
        var between = contents
        if xbzrle { between[100] ^= 0xFF } else { between = [UInt8](repeating: 0, count: 4096) }
        let page = GuestAddress(5 * 4096)
        var one = PageSet(pageCount: Int(Self.size / 4096))
        one.insert(5)
        var received: [[UInt8]] = []
        let copy = try GuestMemory(size: Self.size)
        let applier = PageRunApplier(memory: copy, delivery: .repeated)
        for bytes in [contents, between, contents] {
            try memory.write(bytes, at: page)
            let start = lseek(file.fd, 0, SEEK_CUR)
            try sender.send(one)
            lseek(file.fd, start, SEEK_SET)
            try applyAll(file, to: applier)
            received.append(try copy.read(page, count: 4096))
        }
        #expect(received == [contents, between, contents])
        #expect(sender.counters.unchangedPages == 0)
        if xbzrle { #expect(sender.counters.deltaPages == 2) }
    }

    /// A frame dropped before it was written (a round cut short) leaves nothing recorded: its pages
    /// go the next time they are sent.
    @Test func pagesOfAFrameDroppedUnsentGoNextTime() throws {
        let memory = try sourceMemory()
        let file = temporaryFile()
        defer { close(file.fd) }
        let sender = fingerprintingSender(memory, into: file)
        try sender.streamer.addPages(firstPage: 0, count: 12)
        sender.streamer.discardPending()
        var pages = PageSet(pageCount: Int(Self.size / 4096))
        pages.insert(range: 0..<12)
        try sender.send(pages)
        #expect(sender.counters.unchangedPages == 0)
        #expect(sender.counters.dataPages == 4, "pages 0, 3, 6 and 9 hold data")
        #expect(sender.counters.zeroPages == 8)
    }

    /// Into huge-page memory, pages are read in place (the memory is populated a run at a time),
    /// and a page sent again as zero is zeroed where it is: the copy ends identical.
    @Test(.enabled(if: (try? GuestMemory(size: 16 << 20, hugePages: .on)) != nil, "mounting a private tmpfs needs CAP_SYS_ADMIN"))
    func pagesLandInHugePageMemoryIdentical() throws {
        let memory = try sourceMemory()
        let (files, _) = try send(memory, streams: 1, zstd: false)
        defer { files.forEach { close($0.fd) } }
        let copy = try GuestMemory(size: Self.size, hugePages: .on)
        let applier = PageRunApplier(memory: copy, delivery: .repeated)
        try applyAll(files[0], to: applier)
        #expect(applier.isComplete)
        #expect(try contents(copy) == contents(memory))

        // Page 0 (random data) becomes zero at the source and is sent again.
        let file = temporaryFile()
        defer { close(file.fd) }
        try memory.write([UInt8](repeating: 0, count: 4096), at: GuestAddress(0))
        let sender = PageSender(memory: memory, stream: file, rateLimit: RateLimiter(bytesPerSecond: nil), shouldStop: { false })
        var first = PageSet(pageCount: Int(Self.size / 4096))
        first.insert(0)
        try sender.send(first)
        lseek(file.fd, 0, SEEK_SET)
        try applyAll(file, to: applier)
        #expect(try copy.read(GuestAddress(0), count: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(try contents(copy) == contents(memory))
    }

    /// --verify's digest kept page by page as frames land (data, zero and delta
    /// runs, two streams) equals one read from memory afterwards, at both ends.
    @Test func digestsKeptAsPagesLandMatchADigestReadFromMemory() throws {
        let memory = try sourceMemory()
        let pageCount = Int(Self.size / 4096)
        let digests = PageDigests(pageCount: pageCount)
        let copy = try GuestMemory(size: Self.size)
        let (files, _) = try send(memory, streams: 2, zstd: false)
        defer { files.forEach { close($0.fd) } }
        let partition = StreamPartition(streams: 2)
        let appliers = (0..<2).map { index in
            let applier = PageRunApplier(memory: copy, delivery: .repeated)
            applier.stream = (partition, index)
            applier.digests = digests
            return applier
        }
        for (file, applier) in zip(files, appliers) { try applyAll(file, to: applier) }
        let first = digests.digest()
        #expect(try first == MemoryDigest.compute(copy))
        #expect(try first == MemoryDigest.compute(memory))

        // A second round, with XBZRLE, of pages stream 0 carries: a cached page changed a little
        // (a delta), a page zeroed, a zero page written.
        let file = temporaryFile()
        defer { close(file.fd) }
        let sender = PageSender(memory: memory, stream: file, rateLimit: RateLimiter(bytesPerSecond: nil), shouldStop: { false })
        sender.streamer.cache = XBZRLECache(bytes: 1 << 20)
        sender.streamer.cacheWholePages = true
        var pages = PageSet(pageCount: pageCount)
        pages.insert(0)
        try sender.send(pages)
        try memory.write([UInt8](repeating: 0xA5, count: 64), at: GuestAddress(100))
        try memory.write([UInt8](repeating: 0, count: 4096), at: GuestAddress(3 * 4096))
        try memory.write(Array("now written".utf8), at: GuestAddress(1 * 4096))
        for page in [1, 3] { pages.insert(page) }
        try sender.send(pages)
        #expect(sender.counters.deltaPages == 1)
        #expect(partition.carries(first: 0, count: 4, stream: 0))
        lseek(file.fd, 0, SEEK_SET)
        try applyAll(file, to: appliers[0])
        #expect(appliers[0].deltaPages == 1)
        let second = digests.digest()
        #expect(second != first)
        #expect(try second == MemoryDigest.compute(copy))
        #expect(try second == MemoryDigest.compute(memory))
        // A subset, as post-copy asks for the pages already present.
        #expect(try digests.digest { $0 % 2 == 0 } == MemoryDigest.compute(memory) { $0 % 2 == 0 })
    }

    /// The digest read by several threads, each over its share of memory, is the one read by one.
    @Test func digestReadByThreadsIsTheSameDigest() throws {
        let memory = try sourceMemory()
        let one = try MemoryDigest.compute(memory)
        for threads in [2, 3, 7] { #expect(try MemoryDigest.compute(memory, threads: threads) == one) }
        try memory.write([1], at: GuestAddress(Self.size - 1))
        #expect(try MemoryDigest.compute(memory, threads: 3) != one, "a byte in the last share changes it")
    }

    @Test func partitionPiecesCoverEveryPageOnce() {
        for streams in 1...5 {
            let partition = StreamPartition(streams: streams)
            var seen = [Int](repeating: 0, count: 3000)
            for index in 0..<streams {
                partition.forEachPiece(first: 17, count: 2900, stream: index) { first, count in
                    #expect(partition.carries(first: first, count: count, stream: index))
                    for page in first..<first + count { seen[page] += 1 }
                }
            }
            #expect(seen[17..<2917].allSatisfy { $0 == 1 } && seen[0..<17].allSatisfy { $0 == 0 })
        }
    }
}

extension PageSender {
    /// This stream's share of every page of RAM, never-written pages as zero markers unread.
    func sendAll() throws {
        try streamer.memory.forEachExtent { first, count, isHole in
            try partition.forEachPiece(first: first, count: count, stream: index) { first, count in
                if isHole { try streamer.addZeroPages(firstPage: first, count: count) } else { try streamer.addPages(firstPage: first, count: count) }
            }
        }
        try streamer.flush()
    }
}
