/// What the stop-and-copy will cost, predicted after a pre-copy round (pure,
/// so it is unit-tested), plus the hand-over's round trips.
///
/// When the last round's pace was set by the sender and the destination
/// rather than by the `--bandwidth` cap, the dirty set costs what a page cost
/// that round, end to end: the round ended with a sync, so that cost holds
/// the link's speed, the encoding and the applying (small XBZRLE deltas are
/// cheap on the wire but not to make and apply: bytes alone predicted a tenth
/// of the real downtime). Otherwise — the first pass, a capped round — the
/// dirty set's bytes at the throughput seen so far. That average is not used
/// once a round has measured a page: it carries the first pass's writes into
/// fresh destination memory, which re-sent pages do not pay (at 300 MB/s of
/// first touch it predicted 2-3 times the downtime that followed, so pre-copy
/// ran rounds it did not need).
public struct DowntimePrediction: Sendable {
    public var dirtyPages: Int
    /// Bytes a dirty page will cost on the wire (a page, or the last round's mean with XBZRLE).
    public var wireBytesPerPage: Double
    public var throughputBytesPerSecond: Double
    public var stateBytes: Int
    public var roundTripMs: Double
    /// Milliseconds a page took in the last round, end to end (sent and applied); nil when the
    /// cap set that round's pace, the round was too small or short to tell, or there is none yet.
    public var pageCostMs: Double?
    /// Disk blocks still to send (`--storage copy`), and what flushing one at the destination cost in the
    /// last round's sync (its random 4 KiB writes reach stable storage before `ready`, inside the downtime).
    public var pendingBlocks = 0
    public var blockFlushCostMs = 0.0

    /// end → ready → go → resumed: one and a half round trips beyond the data.
    static let handOverRoundTrips = 1.5

    public init(dirtyPages: Int, wireBytesPerPage: Double, throughputBytesPerSecond: Double, stateBytes: Int,
                roundTripMs: Double, pageCostMs: Double?) {
        self.dirtyPages = dirtyPages
        self.wireBytesPerPage = wireBytesPerPage
        self.throughputBytesPerSecond = throughputBytesPerSecond
        self.stateBytes = stateBytes
        self.roundTripMs = roundTripMs
        self.pageCostMs = pageCostMs
    }

    public var milliseconds: Double {
        let link = max(throughputBytesPerSecond, 1)
        let pages = pageCostMs.map { Double(dirtyPages) * $0 } ?? Double(dirtyPages) * wireBytesPerPage / link * 1000
        return pages + Double(pendingBlocks) * blockFlushCostMs + Double(stateBytes) / link * 1000 + Self.handOverRoundTrips * roundTripMs
    }
}
