import Foundation
import TernKVM
import TernMachine

/// Runs one job on N page streams at once and waits for all of them: index 0
/// on the calling thread, each other index on a thread of its own (a stream
/// spends its time blocked in send, which must not hold up the others).
/// The first error is rethrown once every stream has stopped; `failed` lets
/// the others notice it between frames and stop early.
final class StreamWorkers: @unchecked Sendable {
    // @unchecked Sendable: every mutable field is guarded by `condition`.
    private let condition = NSCondition()
    private var job: ((Int) throws -> Void)?
    private var generation = 0
    private var running = 0
    private var firstError: (any Error)?
    private var stopping = false
    let count: Int

    init(count: Int, name: String) {
        self.count = count
        for index in 1..<max(count, 1) {
            spawnThread(named: "\(name)-\(index)") { [self] in loop(index) }
        }
    }

    /// Whether a stream of the current job has failed.
    var failed: Bool { condition.withLock { firstError != nil } }

    func run(_ body: @escaping (Int) throws -> Void) throws {
        condition.withLock {
            job = body
            firstError = nil
            running = count - 1
            generation += 1
            condition.broadcast()
        }
        do { try body(0) } catch { record(error) }
        try condition.withLock {
            while running > 0 { condition.wait() }
            job = nil
            if let error = firstError { throw error }
        }
    }

    /// Ends the threads (after the last job).
    func stop() {
        condition.withLock {
            stopping = true
            condition.broadcast()
        }
    }

    /// Keeps the first error, unless it was only a stream stopping on request (`PageSender.Stopped`)
    /// and another stream then failed for real: that failure is the one to report.
    private func record(_ error: any Error) {
        condition.withLock {
            if firstError == nil || (firstError is PageSender.Stopped && !(error is PageSender.Stopped)) { firstError = error }
        }
    }

    private func loop(_ index: Int) {
        var seen = 0
        while true {
            let body: ((Int) throws -> Void)? = condition.withLock {
                while generation == seen && !stopping { condition.wait() }
                seen = generation
                return stopping ? nil : job
            }
            guard let body else { return }
            do { try body(index) } catch { record(error) }
            condition.withLock {
                running -= 1
                condition.broadcast()
            }
        }
    }
}
