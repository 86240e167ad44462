import Foundation
import TernKVM
import TernMachine

/// The first pre-copy pass, shared by all page streams: it reads the dirty
/// log after a few pages claimed, then at doubling intervals up to every
/// `interval` pages. Pages found dirty that no stream has sent yet are held
/// back, to be sent at the end of the pass (hot-last with ordering; with
/// XBZRLE, into the cache); pages found dirty after they were sent are kept
/// for the next round. So the pass
/// learns the working set as it goes instead of sending it twice whole.
///
/// With dirty-frequency ordering the pass also defers whole chunks: every
/// page of a 1 MiB chunk in which the guest has been seen writing waits for
/// the end of the pass (then goes coldest first). A guest's working set is
/// a region, not scattered pages; its cold pages are written now and then,
/// so each one sent early in the pass is likely written again before the
/// pass ends, and sent twice. Sent last, they have less time to be.
///
/// Safe against the guest's writes because every page the dirty log names
/// lands in one of the two sets: a page claimed before a write to it is
/// either sent again at the end of the pass or in the next round.
final class FirstPassLearner: @unchecked Sendable {
    // @unchecked Sendable: every field is guarded by `lock`.
    private let lock = NSLock()
    /// Reads and resets the dirty log (KVM's, for the whole guest memory).
    private let readDirtyLog: () throws -> PageSet
    private let interval: Int
    /// Whether pages of hot chunks wait for the end of the pass (dirty-frequency ordering).
    private let deferringHotChunks: Bool
    private var held: PageSet
    private var sent: PageSet
    private var dirtyAfterSending: PageSet
    private var frequency: DirtyFrequency
    private var sinceCheck = 0
    /// Pages between dirty-log reads: short at first, so that the chunks the guest writes in
    /// are known (and cached) before much of the pass has gone by, then doubling up to `interval`.
    private var checkAfter: Int
    static let firstCheckPages = 256
    /// 1 MiB chunks in which the guest has been seen writing: with XBZRLE, the
    /// pass caches their pages, since the next round will likely send them again.
    private var hotChunks: [Bool]
    /// Each dirty-log read: milliseconds since the previous one (or the pass's start) and the pages it found.
    private var samples: [(milliseconds: Double, pages: Int)] = []
    private var lastCheck = ContinuousClock.now

    convenience init(memory: GuestMemory, vm: VirtualMachine, initiallyHeld: PageSet, frequency: DirtyFrequency, interval: Int,
                     deferringHotChunks: Bool = false) {
        self.init(initiallyHeld: initiallyHeld, frequency: frequency, interval: interval, deferringHotChunks: deferringHotChunks) {
            try memory.collectDirtyPages(from: vm)
        }
    }

    init(initiallyHeld: PageSet, frequency: DirtyFrequency, interval: Int, deferringHotChunks: Bool,
         readDirtyLog: @escaping () throws -> PageSet) {
        self.deferringHotChunks = deferringHotChunks
        self.readDirtyLog = readDirtyLog
        self.interval = interval
        checkAfter = min(Self.firstCheckPages, interval)
        held = initiallyHeld
        sent = PageSet(pageCount: initiallyHeld.pageCount)
        dirtyAfterSending = PageSet(pageCount: initiallyHeld.pageCount)
        self.frequency = frequency
        hotChunks = [Bool](repeating: false, count: (initiallyHeld.pageCount + StreamPartition.chunkPages - 1) / StreamPartition.chunkPages)
        initiallyHeld.forEachRange { first, count in
            for chunk in first / StreamPartition.chunkPages...(first + count - 1) / StreamPartition.chunkPages { hotChunks[chunk] = true }
        }
    }

    /// Whether the guest has been seen writing near `page` (its 1 MiB chunk).
    func isInHotChunk(_ page: Int) -> Bool {
        lock.withLock { hotChunks[page / StreamPartition.chunkPages] }
    }

    /// Holes go as zero markers; they count as sent.
    func claimHole(first: Int, count: Int) {
        lock.withLock { sent.insert(range: first..<first + count) }
    }

    /// The parts of first..<first+count to send now (not held back), marked as sent.
    func claim(first: Int, count: Int) throws -> [(first: Int, count: Int)] {
        try lock.withLock {
            let ranges = Self.split(first: first, count: count) { page in
                if held.contains(page) { return true }
                guard deferringHotChunks && hotChunks[page / StreamPartition.chunkPages] else { return false }
                held.insert(page)
                return true
            }
            for range in ranges { sent.insert(range: range.first..<range.first + range.count) }
            // Pages sent, not pages looked at: held-back stretches take no time, and reads of the log in
            // quick succession would make every page look cold to the dirty-frequency counts.
            sinceCheck += ranges.reduce(0) { $0 + $1.count }
            if sinceCheck >= checkAfter {
                sinceCheck = 0
                checkAfter = min(checkAfter * 2, interval)
                let dirty = try readDirtyLog()
                let now = ContinuousClock.now
                samples.append((Double((now - lastCheck) / .microseconds(1)) / 1000, dirty.count))
                lastCheck = now
                frequency.record(dirty)
                dirty.forEachRange { first, count in
                    for page in first..<first + count {
                        if sent.contains(page) { dirtyAfterSending.insert(page) } else { held.insert(page) }
                    }
                    for chunk in first / StreamPartition.chunkPages...(first + count - 1) / StreamPartition.chunkPages { hotChunks[chunk] = true }
                }
            }
            return ranges
        }
    }

    /// The runs of first..<first+count that `isHeld` does not keep back, in order.
    static func split(first: Int, count: Int, isHeld: (Int) -> Bool) -> [(first: Int, count: Int)] {
        var ranges: [(first: Int, count: Int)] = []
        var start = first
        for page in first..<first + count where isHeld(page) {
            if page > start { ranges.append((start, page - start)) }
            start = page + 1
        }
        if first + count > start { ranges.append((start, first + count - start)) }
        return ranges
    }

    /// What a pass cut short still owes beyond the pages no frame carried:
    /// the held pages and those written after they were sent. A held page may
    /// have been carried all the same, as the zero marker of a hole, when the
    /// guest wrote it between one stream staging the marker and `claimHole`
    /// while another stream read the log (which reset its dirty bit).
    var owedIfCutShort: PageSet {
        lock.withLock {
            var owed = held
            owed.formUnion(dirtyAfterSending)
            return owed
        }
    }

    /// After the pass: the held pages (to send now, coldest first), the pages
    /// to re-send in the next round, what was learnt of each page's heat, and
    /// how many pages the guest dirtied in each interval between reads.
    func finish() -> (held: PageSet, dirtyAfterSending: PageSet, frequency: DirtyFrequency,
                      samples: [(milliseconds: Double, pages: Int)]) {
        lock.withLock { (held, dirtyAfterSending, frequency, samples) }
    }
}

extension PageStreams {
    /// The first pass with a learner: each stream claims its pages chunk by chunk.
    func firstPass(learning learner: FirstPassLearner) throws {
        try run { sender in
            let streamer = sender.streamer
            streamer.shouldCache = { learner.isInHotChunk($0) }
            defer { streamer.shouldCache = nil }
            try streamer.memory.forEachExtent { first, count, isHole in
                try sender.partition.forEachPiece(first: first, count: count, stream: sender.index) { first, count in
                    if isHole {
                        try streamer.addZeroPages(firstPage: first, count: count)
                        learner.claimHole(first: first, count: count)
                        return
                    }
                    var chunk = first
                    while chunk < first + count {
                        let chunkCount = min(first + count - chunk, StreamPartition.chunkPages)
                        let ranges = try learner.claim(first: chunk, count: chunkCount)
                        try sender.sendRuns { emit in for range in ranges { try emit(range.first, range.count) } }
                        chunk += chunkCount
                    }
                }
            }
            try streamer.flush()
        }
    }
}
