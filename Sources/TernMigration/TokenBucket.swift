import Foundation

/// Caps a byte rate (`--bandwidth`): a sender asks before each write and is
/// made to wait until the bytes fit. The bucket holds at most `burst` bytes,
/// so an idle spell does not bank an unbounded burst that would swamp the
/// guest's network neighbours afterwards.
public struct TokenBucket: Sendable {
    public let bytesPerSecond: Double
    public let burst: Double
    private var tokens: Double
    private var last: ContinuousClock.Instant

    public init(bytesPerSecond: UInt64, burst: UInt64? = nil, now: ContinuousClock.Instant = .now) {
        self.bytesPerSecond = Double(bytesPerSecond)
        // Enough for one full frame, or 20 ms of traffic, whichever is larger.
        self.burst = Double(burst ?? max(UInt64(9 << 20), bytesPerSecond / 50))
        tokens = self.burst
        last = now
    }

    /// How long to wait before `bytes` may go (zero if they may go now); takes the tokens. With
    /// `debtLimit`, the bucket owes at most one burst.
    public mutating func reserve(_ bytes: Int, now: ContinuousClock.Instant = .now, debtLimit: Bool = false) -> Duration {
        let elapsed = max(now - last, .zero)
        last = max(now, last)
        tokens = min(burst, tokens + bytesPerSecond * elapsed.inSeconds)
        tokens -= Double(bytes)
        if debtLimit { tokens = max(tokens, -burst) }
        guard tokens < 0 else { return .zero }
        return .nanoseconds(Int64(-tokens / bytesPerSecond * 1e9))
    }
}

/// A token bucket shared by a sender's frames that can be lifted (for the stop-and-copy).
final class RateLimiter: @unchecked Sendable {
    // @unchecked: `bucket`, `lifted` and `waited` are guarded by `lock`.
    private let lock = NSLock()
    private var bucket: TokenBucket?
    private var lifted = false
    private var waited = 0.0

    init(bytesPerSecond: UInt64?) { bucket = bytesPerSecond.map { TokenBucket(bytesPerSecond: $0) } }

    /// Takes the tokens for `bytes`, sleeping until they fit.
    func consume(_ bytes: Int) {
        let wait = reserve(bytes)
        if wait > .zero { Thread.sleep(forTimeInterval: wait.inSeconds) }
    }

    /// Counts bytes that went without waiting (post-copy's demand replies, which a vCPU waits for):
    /// the senders that do wait make up for them, so the link still carries no more than the cap.
    /// The debt is bounded by one burst, so a spell of faults cannot hold the push back for long.
    func charge(_ bytes: Int) { lock.withLock { _ = bucket?.reserve(bytes, debtLimit: true) } }

    /// Takes the tokens for `bytes` and says how long to wait before going on; the caller waits as it
    /// sees fit (post-copy's push waits for new requests too).
    func reserve(_ bytes: Int) -> Duration {
        lock.withLock {
            let wait = bucket?.reserve(bytes) ?? .zero
            waited += wait.inSeconds
            return wait
        }
    }

    /// Seconds senders have spent waiting for tokens (summed over streams).
    var waitedSeconds: Double { lock.withLock { waited } }

    /// For the stop-and-copy: no cap from here on, whatever `setRate` says later.
    func lift() {
        lock.withLock {
            bucket = nil
            lifted = true
        }
    }

    /// A new cap (nil: none) from now on, as `tern migrate-set` asks; the bucket starts full again.
    func setRate(_ bytesPerSecond: UInt64?) {
        lock.withLock {
            guard !lifted else { return }
            bucket = bytesPerSecond.map { TokenBucket(bytesPerSecond: $0) }
        }
    }
}
