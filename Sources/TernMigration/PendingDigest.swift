import Foundation
import TernKVM
import TernMachine

/// A digest computed on a thread of its own while other work goes on (post-copy's
/// source digest, taken while pages are pushed); `value()` waits for it, and starts it
/// if nothing did (e.g. a post-copy interrupted right after its hand-over).
final class PendingDigest: @unchecked Sendable {
    // @unchecked Sendable: `result` and `started` are guarded by `condition`; `compute` is immutable.
    private let condition = NSCondition()
    private let compute: @Sendable () throws -> UInt64
    private var result: Result<UInt64, any Error>?
    private var started = false

    init(_ compute: @escaping @Sendable () throws -> UInt64) {
        self.compute = compute
    }

    /// Starts computing on a thread of its own (once; later calls do nothing).
    func start() {
        guard claim() else { return }
        spawnThread(named: "digest") { [self] in finish(Result { try compute() }) }
    }

    /// The digest, once computed.
    func value() throws -> UInt64 {
        if claim() { finish(Result { try compute() }) }
        return try condition.withLock {
            while result == nil { condition.wait() }
            return try result!.get()
        }
    }

    /// Whether the caller is the one to compute.
    private func claim() -> Bool {
        condition.withLock {
            defer { started = true }
            return !started
        }
    }

    private func finish(_ outcome: Result<UInt64, any Error>) {
        condition.withLock {
            result = outcome
            condition.broadcast()
        }
    }
}
