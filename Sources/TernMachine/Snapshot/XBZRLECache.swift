import TernWire

/// The sender's cache for XBZRLE: the last version of each page it sent,
/// within a fixed budget. A page sent again is encoded against its cached
/// version (which is exactly what the receiver holds), and the cache then
/// takes the new version. FIFO eviction: cheap, and pre-copy re-sends the
/// same dirty pages round after round, which FIFO keeps while they fit.
public final class XBZRLECache {
    public struct Statistics: Codable, Equatable, Sendable {
        public var cacheBytes: UInt64 = 0
        public var hits: UInt64 = 0
        public var misses: UInt64 = 0
        /// Cached pages whose delta was not worth sending (too many changes).
        public var overflows: UInt64 = 0
        /// Hits where the page had not changed at all: nothing was sent for them.
        public var unchanged: UInt64 = 0
        public var encodedBytes: UInt64 = 0
        public var bytesSaved: Int64 = 0
        public init() {}
    }

    /// A delta must save at least this much over the page to be sent instead of it.
    static let minimumSaving = 64

    let slots: Int
    private let storage: UnsafeMutableRawBufferPointer
    private var slotOfPage: [Int: Int] = [:]
    private var pageInSlot: [Int]
    private var hand = 0
    public private(set) var statistics = Statistics()

    public init(bytes: UInt64) {
        slots = max(1, Int(bytes / UInt64(PageRun.pageSize)))
        storage = .allocate(byteCount: slots * PageRun.pageSize, alignment: 4096)
        pageInSlot = [Int](repeating: -1, count: slots)
        statistics.cacheBytes = UInt64(slots * PageRun.pageSize)
    }

    deinit { storage.deallocate() }

    private func slotBuffer(_ slot: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: storage[slot * PageRun.pageSize..<(slot + 1) * PageRun.pageSize])
    }

    /// Encodes `page` (index) whose new contents are `bytes` against its cached
    /// version; returns the delta length in `output`, or nil to send the page
    /// whole. Either way the cache ends up holding `bytes` for the page if it
    /// held it before; call `insert` for pages sent whole that it did not hold.
    public func encode(page: Int, bytes: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        guard let slot = slotOfPage[page] else {
            statistics.misses += 1
            return nil
        }
        let cached = slotBuffer(slot)
        let length = XBZRLE.encode(old: UnsafeRawBufferPointer(cached), new: bytes, into: output,
                                   limit: PageRun.pageSize - Self.minimumSaving)
        cached.copyMemory(from: bytes)
        guard let length else {
            statistics.overflows += 1
            return nil
        }
        statistics.hits += 1
        if length == 0 {
            statistics.unchanged += 1
            statistics.bytesSaved += Int64(PageRun.pageSize + PageRun.headerSize)
            return 0
        }
        statistics.encodedBytes += UInt64(length)
        statistics.bytesSaved += Int64(PageRun.pageSize - length - 4)
        return length
    }

    /// Remembers a page sent whole, evicting the oldest entry when full.
    public func insert(page: Int, bytes: UnsafeRawBufferPointer) {
        if let slot = slotOfPage[page] {
            slotBuffer(slot).copyMemory(from: bytes)
            return
        }
        let slot = hand
        hand = (hand + 1) % slots
        if pageInSlot[slot] >= 0 { slotOfPage[pageInSlot[slot]] = nil }
        pageInSlot[slot] = page
        slotOfPage[page] = slot
        slotBuffer(slot).copyMemory(from: bytes)
    }

    public func contains(_ page: Int) -> Bool { slotOfPage[page] != nil }
}
