/// What a run of probes saw, worked out from when each probe went and when replies came back.
/// Pure: the prober's sockets and threads only collect the two lists.
public struct ProbeAnalysis: Codable, Equatable, Sendable {
    /// A reply as it arrived: which probe it answers, and when (realtime clock, ns).
    public struct Reply: Equatable, Sendable {
        public var sequence: Int
        public var arrivedNs: UInt64
        public init(sequence: Int, arrivedNs: UInt64) {
            self.sequence = sequence
            self.arrivedNs = arrivedNs
        }
    }

    /// The longest time without a reply, bounded by the replies either side of it (or by the run's
    /// start or end, where no reply came before or after).
    public struct Gap: Codable, Equatable, Sendable {
        public var durationMs: Double
        public var startUnixMs: Double
        public var endUnixMs: Double
        /// Probes sent inside the gap that were never answered.
        public var lost: Int
        /// False when no reply came after the gap: the target was still unreachable when probing ended.
        public var recovered: Bool
    }

    public var sent: Int
    public var received: Int
    public var lost: Int
    /// Replies to a probe already answered.
    public var duplicates: Int
    /// Replies that arrived after a reply to a later probe.
    public var reordered: Int
    public var longestGap: Gap?

    /// The probes a move left unanswered, by when they were sent, as ping measures downtime: from the
    /// first lost probe to the first one answered after the last (or to the end, if none was).
    public struct Outage: Codable, Equatable, Sendable {
        public var durationMs: Double
        public var startUnixMs: Double
        public var endUnixMs: Double
        public var firstLost: Int?
        public var lastLost: Int?
        public var lost: Int
        /// False when no probe sent after the outage was answered.
        public var recovered: Bool
    }

    /// Given a switch-over window: the runs of unanswered probes whose sending overlaps the window, joined.
    /// (By send time, not by the gap between replies: replies the old host sent just before the pause, or
    /// probes caught in the VM's queue and answered by the new host, arrive in the middle of the outage.)
    public var switchoverOutage: Outage?
    /// Probes lost anywhere but in the switch-over's outage (with a window) or the longest gap (without).
    public var lostOutsideGap: Int
    /// The unanswered probes as runs of sequence numbers, first and last (the first 100 runs).
    public var lostRuns: [[Int]]
    public var roundTripMedianMs: Double?
    public var roundTripP99Ms: Double?
    public var roundTripMaxMs: Double?

    /// - Parameters:
    ///   - sentNs: when each probe went, indexed by its sequence number.
    ///   - replies: the replies in the order they arrived.
    ///   - endNs: when the last probe's reply was due (its send plus one interval): where a gap with
    ///     no reply after it ends.
    ///   - switchover: when the VM paused and resumed (realtime clock, ns), if it moved during the run.
    public init(sentNs: [UInt64], replies: [Reply], endNs: UInt64, switchover: ClosedRange<UInt64>? = nil) {
        sent = sentNs.count
        var answered = [Bool](repeating: false, count: sentNs.count)
        var roundTrips: [UInt64] = []
        duplicates = 0
        reordered = 0
        var highest = -1
        // Replies that answer a probe sent in this run, each probe once, in arrival order.
        var firsts: [Reply] = []
        for reply in replies where reply.sequence >= 0 && reply.sequence < sentNs.count {
            if answered[reply.sequence] { duplicates += 1; continue }
            answered[reply.sequence] = true
            if reply.sequence < highest { reordered += 1 }
            highest = max(highest, reply.sequence)
            firsts.append(reply)
            roundTrips.append(reply.arrivedNs &- sentNs[reply.sequence])
        }
        received = firsts.count
        lost = sent - received
        let runs = Self.unansweredRuns(answered)
        lostRuns = runs.prefix(100).map { [$0.first, $0.last] }

        // Candidate gaps: before the first reply, between consecutive replies, and after the last one
        // while the target still did not answer (the last probe went unanswered).
        var candidates: [Candidate] = []
        if let firstSent = sentNs.first {
            var previous: Reply?
            for reply in firsts {
                candidates.append((previous?.arrivedNs ?? firstSent, reply.arrivedNs, previous?.sequence, reply.sequence))
                previous = reply
            }
            let tailStart = previous?.arrivedNs ?? firstSent
            if answered.last == false, endNs > tailStart { candidates.append((tailStart, endNs, previous?.sequence, nil)) }
        }
        roundTrips.sort()
        let typicalRoundTrip = roundTrips.isEmpty ? 0 : roundTrips[roundTrips.count / 2]
        func gap(_ c: Candidate) -> Gap {
            // A lost probe belongs to the gap its reply would have fallen in, arriving a typical round trip
            // after it went. (Bounding by the sequence numbers answered either side would misplace it: a
            // probe caught in the VM's queue at the pause is answered late, by the destination.)
            let low = c.before == nil ? 0 : c.start, high = c.after == nil ? UInt64.max : c.end
            var inGap = 0
            for (sequence, time) in sentNs.enumerated() where !answered[sequence] {
                let due = time &+ typicalRoundTrip
                if due >= low && due <= high { inGap += 1 }
            }
            return Gap(durationMs: Double(c.end &- c.start) / 1e6, startUnixMs: Double(c.start) / 1e6, endUnixMs: Double(c.end) / 1e6,
                       lost: inGap, recovered: c.after != nil)
        }
        let longest = candidates.max { $0.end &- $0.start < $1.end &- $1.start }
        longestGap = longest.map(gap)
        // Only a switch-over that happened while probing.
        let probed = switchover.flatMap { window in sentNs.first.flatMap { window.overlaps($0...max($0, endNs)) ? window : nil } }
        switchoverOutage = probed.map { window in
            // The runs whose sending, up to the next probe's, touches the window.
            let touching = runs.filter { run in
                sentNs[run.first] <= window.upperBound && (run.last + 1 < sentNs.count ? sentNs[run.last + 1] : endNs) >= window.lowerBound
            }
            guard let first = touching.first?.first, let last = touching.last?.last else {
                let at = Double(window.lowerBound) / 1e6
                return Outage(durationMs: 0, startUnixMs: at, endUnixMs: at, firstLost: nil, lastLost: nil, lost: 0, recovered: true)
            }
            let recovered = last + 1 < sentNs.count
            let end = recovered ? sentNs[last + 1] : endNs
            return Outage(durationMs: Double(end - sentNs[first]) / 1e6, startUnixMs: Double(sentNs[first]) / 1e6,
                          endUnixMs: Double(end) / 1e6, firstLost: first, lastLost: last,
                          lost: (first...last).count { !answered[$0] }, recovered: recovered)
        }
        lostOutsideGap = lost - ((switchover == nil ? longestGap?.lost : switchoverOutage?.lost) ?? 0)

        func percentile(_ p: Double) -> Double? {
            guard !roundTrips.isEmpty else { return nil }
            let index = min(roundTrips.count - 1, Int((p * Double(roundTrips.count)).rounded(.up)) - 1)
            return Double(roundTrips[max(0, index)]) / 1e6
        }
        roundTripMedianMs = percentile(0.5)
        roundTripP99Ms = percentile(0.99)
        roundTripMaxMs = roundTrips.last.map { Double($0) / 1e6 }
    }

    /// A time without replies (realtime ns), and the probes answered by the replies either side of it.
    private typealias Candidate = (start: UInt64, end: UInt64, before: Int?, after: Int?)

    /// Runs of consecutive unanswered probes, first and last sequence numbers.
    static func unansweredRuns(_ answered: [Bool]) -> [(first: Int, last: Int)] {
        var runs: [(first: Int, last: Int)] = []
        var sequence = 0
        while sequence < answered.count {
            guard !answered[sequence] else { sequence += 1; continue }
            let first = sequence
            while sequence < answered.count && !answered[sequence] { sequence += 1 }
            runs.append((first, sequence - 1))
        }
        return runs
    }
}

/// The switch-over's outage set beside the migration's own switch-over and the guest's own longest stall.
public struct SwitchoverComparison: Codable, Equatable, Sendable {
    /// Tern's downtime figure from the migration report.
    public var downtimeMs: Double?
    public var pausedAtUnixMs: Double
    public var resumedAtUnixMs: Double
    /// How long before the pause the first lost probe went (negative: after the pause).
    public var outageStartBeforePauseMs: Double
    /// How long after the resume the first probe to be answered again went: the time the network took to
    /// find the VM's new place.
    public var outageEndAfterResumeMs: Double
    /// The guest's own longest stall, on its clock (status block).
    public var guestMaxStallMs: Double?

    public init(outage: ProbeAnalysis.Outage, downtimeMs: Double?, pausedAtUnixMs: Double, resumedAtUnixMs: Double, guestMaxStallMs: Double?) {
        self.downtimeMs = downtimeMs
        self.pausedAtUnixMs = pausedAtUnixMs
        self.resumedAtUnixMs = resumedAtUnixMs
        outageStartBeforePauseMs = pausedAtUnixMs - outage.startUnixMs
        outageEndAfterResumeMs = outage.endUnixMs - resumedAtUnixMs
        self.guestMaxStallMs = guestMaxStallMs
    }
}
