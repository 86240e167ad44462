import Foundation
import TernMachine

extension MigrationSource {
    /// Pages the first pass re-sends to measure what a re-sent page costs.
    static let resendProbePages = 1024

    /// What a re-sent page costs end to end, measured at the end of the first pass, which cannot tell it:
    /// its pages land in fresh destination memory, and this host backs that at 0.3-0.5 GB/s, where pages
    /// sent again land in memory the destination holds and go 3-7 times faster (first passes of
    /// random256 at 13 µs a page predicted 244 ms for 18563 dirty pages, sent in 32 ms: docs/MIGRATION.md,
    /// "Pre-copy", step 3, has the runs). Priced at the pass's pace, the first prediction was so long that
    /// the first pass's dirty-log reads seemed to show the guest rewriting its set within a round, and
    /// pre-copy switched with 30-40 ms of downtime where rounds would have taken it to 5-8.
    ///
    /// The probe: drain the streams (a sync), re-send up to `resendProbePages` of the pages written after
    /// they were sent (the next round owes them anyway; the rearm clears their bits before the copy, so a
    /// later write is logged again), sync again; less the round trip, over the pages (`measuredPageCost`,
    /// as for a round). They are taken out of `owed`; `pages` is how many of them went (the rest were
    /// unchanged). nil (nothing sent) when fewer than `pagesToMeasureCost` are owed.
    func measureResendCost(sender: PageStreams, rateLimit: RateLimiter, owed: inout PageSet, round: Int,
                           roundTripMs: Double) throws -> (pageCostMs: Double?, pages: Int)? {
        guard owed.count >= Int(Self.pagesToMeasureCost) else { return nil }
        var probe = PageSet(pageCount: owed.pageCount)
        var left = Self.resendProbePages
        owed.forEachRange { first, count in
            guard left > 0 else { return }
            let take = min(count, left)
            probe.insert(range: first..<first + take)
            left -= take
        }
        try sender.synchronise(round: round) { [unowned self] in try readReply($0, expecting: .pong, what: "the sync before the re-send probe").1 }
        let waitedBefore = rateLimit.waitedSeconds
        let before = sender.counters
        let start = ContinuousClock.now
        try sender.send(probe)
        try sender.synchronise(round: round) { [unowned self] in try readReply($0, expecting: .pong, what: "the sync after the re-send probe").1 }
        let duration = milliseconds(since: start)
        owed.subtract(probe)
        let cost = Self.measuredPageCost(pages: UInt64(probe.count), durationMs: duration, waitedSeconds: rateLimit.waitedSeconds - waitedBefore,
                                         streams: sender.senders.count, roundTripMs: roundTripMs)
        logger.debug("re-send probe: \(probe.count) pages in \(String(format: "%.1f", duration)) ms\(cost == nil ? " (not used: round trip \(roundTripMs) ms)" : "")")
        // Pages sent, not counting those found unchanged (they went nowhere).
        let sent = sender.counters
        return (cost, Int((sent.dataPages + sent.zeroPages) - (before.dataPages + before.zeroPages)))
    }
}
