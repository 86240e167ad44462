import Foundation
import Testing
@testable import TernMigration

struct PendingDigestTests {
    struct Broken: Error {}

    final class Counter: @unchecked Sendable {
        private let lock = NSLock()
        private var count = 0
        func increment() { lock.withLock { count += 1 } }
        var value: Int { lock.withLock { count } }
    }

    @Test func startedDigestIsComputedOnceAndAwaited() throws {
        let calls = Counter()
        let digest = PendingDigest {
            calls.increment()
            usleep(50_000)
            return 42
        }
        digest.start()
        digest.start()
        #expect(try digest.value() == 42)
        #expect(try digest.value() == 42)
        #expect(calls.value == 1, "started twice and read twice, computed once")
    }

    @Test func aDigestNobodyStartedIsComputedWhenAskedFor() throws {
        let calls = Counter()
        let digest = PendingDigest {
            calls.increment()
            return 7
        }
        #expect(try digest.value() == 7)
        digest.start()
        #expect(calls.value == 1)
    }

    @Test func aFailureReachesTheReader() {
        let digest = PendingDigest { throw Broken() }
        digest.start()
        #expect(throws: Broken.self) { try digest.value() }
    }
}
