import Foundation
/// When pre-copy stops iterating and hands over (pure, so it is unit-tested).
///
/// The downtime target is a ceiling, not a goal: once the predicted
/// stop-and-copy fits it, more rounds are still worth their (short) time
/// while each one shrinks the dirty set a lot, because every round takes
/// downtime off the switch. So the policy switches over when the prediction
/// fits and either it is already small (3% of the target) or the last
/// round shrank the dirty set by less than a quarter. When it does not fit,
/// it gives up on converging after three rounds that each keep 90% or more
/// of the smallest dirty set seen, and in any case at the round or time limit.
public struct SwitchoverPolicy: Sendable {
    public var maxDowntimeMs: Double
    public var maxRounds: Int
    public var timeoutSeconds: Double

    static let smallFraction = 0.03
    public static let worthwhileShrink = 0.75
    static let stallRatio = 0.9
    static let stallRoundsAllowed = 3

    public enum Decision: Equatable, Sendable {
        case iterate
        case switchover(String)
    }

    /// Between-round memory of the policy.
    public struct History: Sendable {
        var previousDirty: Int?
        var smallestDirty = Int.max
        var stalls = 0
        public init() {}
    }

    public init(maxDowntimeMs: Double, maxRounds: Int, timeoutSeconds: Double) {
        self.maxDowntimeMs = maxDowntimeMs
        self.maxRounds = maxRounds
        self.timeoutSeconds = timeoutSeconds
    }

    /// Whether, going by the first pass's dirty-log reads, the guest would write again at least
    /// `worthwhileShrink` of the `dirtyPages` it left while the next round sent them (`roundMs`): then that
    /// round could not shrink the set and only adds its bytes. A read that found `n` pages after `t` ms
    /// tells the guest's pace; assuming writes spread at random over the pages the guest was seen writing
    /// during the pass (`workingSetPages`, the dirty set at least; a set rewritten in order is covered
    /// sooner, so this errs towards another round), the share of the set still clean after the round is
    /// (1 - n/W)^(roundMs/t). The working set matters once rounds clear each page's dirty bit as they copy
    /// it: the set the pass leaves is then only what the guest wrote after the copy, a part of the region it
    /// writes in, and reads that counted writes over the whole region against that part made a guest writing
    /// 64 MiB at random at 200 MB/s look as if it rewrote its 5453 dirty pages within one round. Reads at
    /// least as long as the round and finding three quarters of the set say so directly; shorter ones (a
    /// host that sends the pass fast) by extrapolation. A read that found the whole set or more counts as
    /// one page short of it: the estimate then grows with `n` without a jump, and a read far longer than the
    /// round still says little.
    public static func guestRewritesWithinARound(samples: [(milliseconds: Double, pages: Int)], dirtyPages: Int,
                                                 roundMs: Double, workingSetPages: Int = 0) -> Bool {
        guard dirtyPages > 0, roundMs > 0 else { return false }
        let spread = Double(max(dirtyPages, workingSetPages))
        return samples.contains { sample in
            guard sample.milliseconds > 0, sample.pages > 0 else { return false }
            let covered = min(Double(sample.pages), spread - 1) / spread
            let stillClean = pow(1 - covered, roundMs / sample.milliseconds)
            return 1 - stillClean >= worthwhileShrink
        }
    }

    /// Called after round `round` (0-based) with the dirty pages it left and the predicted downtime.
    /// `dirtySetRewrittenWithinARound`: the guest was seen dirtying as many pages as a round would
    /// leave (three quarters of `dirtyPages`) in less time than that round would take, so no round
    /// can shrink the set: the first pass tells what the first re-send round would otherwise find out.
    public func decide(afterRound round: Int, dirtyPages: Int, predictedMs: Double, elapsedSeconds: Double,
                       dirtySetRewrittenWithinARound: Bool = false, history: inout History) -> Decision {
        defer {
            history.previousDirty = dirtyPages
            history.smallestDirty = min(history.smallestDirty, dirtyPages)
        }
        if predictedMs <= maxDowntimeMs {
            if predictedMs <= maxDowntimeMs * Self.smallFraction || dirtyPages == 0 { return .switchover("converged") }
            if dirtySetRewrittenWithinARound {
                return .switchover("converged (the guest re-dirties its working set faster than a round could send it)")
            }
            if let previous = history.previousDirty, Double(dirtyPages) > Self.worthwhileShrink * Double(previous) {
                return .switchover("converged (further rounds would shrink the dirty set too little)")
            }
        }
        if round + 1 >= maxRounds { return .switchover("max-rounds (\(maxRounds)) reached") }
        if elapsedSeconds >= timeoutSeconds { return .switchover("timeout (\(Int(timeoutSeconds)) s) reached") }
        if predictedMs > maxDowntimeMs {
            history.stalls = Double(dirtyPages) >= Self.stallRatio * Double(history.smallestDirty) ? history.stalls + 1 : 0
            if history.stalls >= Self.stallRoundsAllowed { return .switchover("not converging (the dirty set stopped shrinking)") }
        }
        return .iterate
    }
}
