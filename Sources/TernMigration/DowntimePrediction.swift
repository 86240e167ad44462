/// What the stop-and-copy will cost, predicted after a pre-copy round (pure,
/// so it is unit-tested): the dirty set's size on the wire at the throughput
/// seen so far, plus the hand-over's round trips — or, when the last round's
/// pace was set by the sender and the destination rather than by the
/// `--bandwidth` cap, at least the dirty set times what a page cost that
/// round. Small XBZRLE deltas are cheap on the wire but not to encode and
/// apply, and bytes alone predicted a tenth of the real downtime.
public struct DowntimePrediction: Sendable {
    public var dirtyPages: Int
    /// Bytes a dirty page will cost on the wire (a page, or the last round's mean with XBZRLE).
    public var wireBytesPerPage: Double
    public var throughputBytesPerSecond: Double
    public var stateBytes: Int
    public var roundTripMs: Double
    /// Milliseconds a page took in the last round, end to end (sent and applied);
    /// nil when the cap set that round's pace or there is no such round yet.
    public var pageCostMs: Double?

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
        let onTheWire = (Double(dirtyPages) * wireBytesPerPage + Double(stateBytes)) / max(throughputBytesPerSecond, 1) * 1000
        let byPageCost = Double(dirtyPages) * (pageCostMs ?? 0)
        return max(onTheWire, byPageCost) + Self.handOverRoundTrips * roundTripMs
    }
}
