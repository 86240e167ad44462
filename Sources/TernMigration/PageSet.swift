import TernKVM
import TernMachine
import TernWire

/// A set of guest pages, one bit per page of the memfd (page index = file
/// offset / 4096), e.g. the pages KVM's dirty log reports.
public struct PageSet: Equatable, Sendable {
    public private(set) var words: [UInt64]
    public let pageCount: Int

    public init(pageCount: Int) {
        self.pageCount = pageCount
        words = [UInt64](repeating: 0, count: (pageCount + 63) / 64)
    }

    public var count: Int { words.reduce(0) { $0 + $1.nonzeroBitCount } }
    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    public mutating func insert(_ page: Int) { words[page / 64] |= 1 << UInt64(page % 64) }
    public mutating func remove(_ page: Int) { words[page / 64] &= ~(1 << UInt64(page % 64)) }

    public mutating func insert(range: Range<Int>) {
        var page = range.lowerBound
        while page < range.upperBound {
            if page % 64 == 0 && page + 64 <= range.upperBound {
                words[page / 64] = .max
                page += 64
            } else {
                insert(page)
                page += 1
            }
        }
    }

    /// Replaces the bits wholesale (decoding); bits past `pageCount` are cleared.
    mutating func replaceWords(_ newWords: [UInt64]) {
        precondition(newWords.count == words.count)
        words = newWords
        if pageCount % 64 != 0 { words[words.count - 1] &= (1 << UInt64(pageCount % 64)) - 1 }
    }

    /// Adds every member of another set of the same size.
    public mutating func formUnion(_ other: PageSet) {
        for (i, word) in other.words.enumerated() where word != 0 { words[i] |= word }
    }

    /// The members as runs of consecutive pages, in order.
    public var ranges: [(first: Int, count: Int)] {
        var runs: [(first: Int, count: Int)] = []
        forEachRange { runs.append(($0, $1)) }
        return runs
    }

    /// Removes every member of another set of the same size.
    public mutating func subtract(_ other: PageSet) {
        for (i, word) in other.words.enumerated() where word != 0 { words[i] &= ~word }
    }

    /// The first member at or after `page`, if any.
    public func next(from page: Int) -> Int? {
        guard page < pageCount else { return nil }
        var index = page / 64
        var word = words[index] & (~0 << UInt64(page % 64))
        while true {
            if word != 0 {
                let found = index * 64 + word.trailingZeroBitCount
                return found < pageCount ? found : nil
            }
            index += 1
            guard index < words.count else { return nil }
            word = words[index]
        }
    }
    public func contains(_ page: Int) -> Bool { words[page / 64] & (1 << UInt64(page % 64)) != 0 }

    /// Adds a slot's dirty bitmap, whose bit 0 is the page at `firstPage`.
    public mutating func merge(bitmap: [UInt64], firstPage: Int) {
        if firstPage % 64 == 0 {
            let base = firstPage / 64
            for (i, word) in bitmap.enumerated() where word != 0 && base + i < words.count { words[base + i] |= word }
            return
        }
        for (i, word) in bitmap.enumerated() where word != 0 {
            var bits = word
            while bits != 0 {
                let bit = bits.trailingZeroBitCount
                bits &= bits - 1
                let page = firstPage + i * 64 + bit
                if page < pageCount { insert(page) }
            }
        }
    }

    /// Calls `body` with each maximal run of consecutive member pages (first, count).
    public func forEachRange(_ body: (Int, Int) throws -> Void) rethrows {
        var start = -1
        var length = 0
        for (index, word) in words.enumerated() {
            if word == 0 {
                if length > 0 { try body(start, length); length = 0 }
                continue
            }
            if word == .max && length > 0 && start + length == index * 64 { length += 64; continue }
            var bits = word
            var position = 0
            while position < 64 {
                if bits & 1 != 0 {
                    let page = index * 64 + position
                    if length > 0 && start + length == page { length += 1 } else {
                        if length > 0 { try body(start, length) }
                        start = page
                        length = 1
                    }
                } else if length > 0 && start + length == index * 64 + position {
                    try body(start, length)
                    length = 0
                }
                bits >>= 1
                position += 1
            }
        }
        if length > 0 { try body(start, length) }
    }
}

extension GuestMemory {
    /// Reads and resets KVM's dirty log for every slot of this memory, and the pages devices wrote.
    func collectDirtyPages(from vm: VirtualMachine) throws -> PageSet {
        var set = PageSet(pageCount: Int(size / UInt64(PageRun.pageSize)))
        for (slot, region) in regions.enumerated() {
            set.merge(bitmap: try vm.dirtyLog(slot: UInt32(slot)), firstPage: Int(region.fileOffset / UInt64(PageRun.pageSize)))
        }
        // Pages devices wrote from their threads, which KVM's log does not see.
        set.merge(bitmap: deviceWrites.take(), firstPage: 0)
        return set
    }
}

/// How often each page has been found dirty, on top of the dirty log (Svärd
/// et al., CloudCom 2011): the priority for dynamic page transfer reordering.
public struct DirtyFrequency: Sendable {
    public private(set) var counts: [UInt8]
    /// Syncs recorded so far.
    public private(set) var syncs = 0
    static let holdBackCountCeiling = 128

    public init(pageCount: Int) { counts = [UInt8](repeating: 0, count: pageCount) }

    /// Pages found dirty in at least one sync so far: the region the guest writes in.
    public var pagesEverDirty: Int { counts.reduce(0) { $0 + ($1 > 0 ? 1 : 0) } }

    /// Counts one more sync in which these pages were dirty (saturating).
    public mutating func record(_ dirty: PageSet) {
        syncs += 1
        dirty.forEachRange { first, count in
            for page in first..<first + count where counts[page] < .max { counts[page] += 1 }
        }
    }

    /// The members of `pages` from least to most often dirtied (stable within a count).
    public func ordered(_ pages: PageSet) -> [Int] {
        coldestFirst(pages) { _ in false }.send
    }

    /// The members of `pages` that `hold` does not keep, coldest first, and those it keeps.
    private func coldestFirst(_ pages: PageSet, hold: (Int) -> Bool) -> (send: [Int], held: PageSet) {
        var held = PageSet(pageCount: counts.count)
        var buckets = [[Int]](repeating: [], count: 256)
        pages.forEachRange { first, count in
            for page in first..<first + count {
                if hold(page) { held.insert(page) } else { buckets[Int(counts[page])].append(page) }
            }
        }
        return (buckets.flatMap { $0 }, held)
    }

    /// Splits `pages` into those to send now, least often dirtied first, and
    /// the hottest, held back: dirty in the latest sync (`stillHot`) and in at
    /// least half of the syncs so far (two at least; at most 128, below the
    /// counter's ceiling, for guests whose first pass read the log hundreds of
    /// times). Those would be dirty again before the switch anyway;
    /// re-sending them every round is what ordering alone cannot avoid, since
    /// hot pages sent last are still sent. A held page the latest sync did not
    /// find dirty has cooled down and goes now.
    public func holdingBackHottest(_ pages: PageSet, stillHot: PageSet) -> (send: [Int], held: PageSet) {
        let threshold = min(max(2, (syncs + 1) / 2), Self.holdBackCountCeiling)
        return coldestFirst(pages) { Int(counts[$0]) >= threshold && stillHot.contains($0) }
    }
}

extension PageSet {
    /// Every page of guest RAM that holds data (the memfd's holes are zero and left out).
    init(pagesWithDataIn memory: GuestMemory) throws {
        self.init(pageCount: Int(memory.size / UInt64(PageRun.pageSize)))
        try memory.forEachExtent { first, count, isHole in
            if !isHole { insert(range: first..<first + count) }
        }
    }
}
