import Foundation
import Testing
import TernKVM
import TernMachine
import TernWire
@testable import TernMigration

struct PageSetTests {
    /// The obvious implementation, to check the fast one against.
    func naiveRanges(_ set: PageSet) -> [[Int]] {
        var ranges: [[Int]] = []
        var page = 0
        while page < set.pageCount {
            if set.contains(page) {
                let start = page
                while page < set.pageCount && set.contains(page) { page += 1 }
                ranges.append([start, page - start])
            } else {
                page += 1
            }
        }
        return ranges
    }

    @Test func rangesMatchANaiveScan() {
        var generator = SystemRandomNumberGenerator()
        for trial in 0..<200 {
            var set = PageSet(pageCount: 1000 + trial)
            let density = Double(trial % 10) / 10
            for page in 0..<set.pageCount where Double.random(in: 0..<1, using: &generator) < density { set.insert(page) }
            if trial % 7 == 0 { for page in 64..<256 { set.insert(page) } } // whole words
            var ranges: [[Int]] = []
            set.forEachRange { ranges.append([$0, $1]) }
            #expect(ranges == naiveRanges(set), "trial \(trial)")
            #expect(ranges.reduce(0) { $0 + $1[1] } == set.count)
        }
    }

    @Test func mergesBitmapsAtAnyOffset() {
        var aligned = PageSet(pageCount: 256)
        aligned.merge(bitmap: [0b1011, 1 << 63], firstPage: 64)
        #expect(aligned.contains(64) && aligned.contains(65) && aligned.contains(67) && !aligned.contains(66))
        #expect(aligned.contains(191))
        var shifted = PageSet(pageCount: 256)
        shifted.merge(bitmap: [0b101], firstPage: 10)
        #expect(shifted.contains(10) && shifted.contains(12) && shifted.count == 2)
        var clipped = PageSet(pageCount: 70)
        clipped.merge(bitmap: [.max, .max], firstPage: 10)
        #expect(clipped.count == 60)
    }

    @Test func subtractsAndListsRanges() {
        var set = PageSet(pageCount: 300)
        set.insert(range: 0..<200)
        var other = PageSet(pageCount: 300)
        other.insert(range: 10..<150)
        other.insert(250)
        set.subtract(other)
        #expect(set.ranges.map { [$0.first, $0.count] } == [[0, 10], [150, 50]])
    }

    /// The blocks a hybrid's switch unmaps: whole 2 MiB blocks holding a stale page, adjacent ones as one run, the last cut at RAM's end.
    @Test func blocksHoldingPagesAreWholeAndMerged() {
        let blockPages = PostcopyReceiver.blockPages
        var stale = PageSet(pageCount: 3 * blockPages + 100)
        for page in [5, 7, 2 * blockPages + 300, 3 * blockPages + 1] { stale.insert(page) }
        let blocks = PostcopyReceiver.blocks(holding: stale)
        #expect(blocks.map { [$0.first, $0.count] } == [[0, blockPages], [2 * blockPages, blockPages + 100]])
        #expect(PostcopyReceiver.blocks(holding: PageSet(pageCount: 64)).isEmpty)
    }
}

struct TokenBucketTests {
    @Test func paysOutAtTheConfiguredRate() {
        let start = ContinuousClock.now
        var bucket = TokenBucket(bytesPerSecond: 100_000_000, burst: 1_000_000, now: start)
        #expect(bucket.reserve(1_000_000, now: start) == .zero, "the first burst is free")
        let wait = bucket.reserve(10_000_000, now: start)
        #expect(abs(Double(wait.components.attoseconds) / 1e18 + Double(wait.components.seconds) - 0.1) < 0.001)
        // After the wait has elapsed, the debt is paid: 1 MB more after 10 ms is on time.
        #expect(bucket.reserve(1_000_000, now: start + .milliseconds(110)) == .zero)
    }

    @Test func idleTimeDoesNotBankMoreThanTheBurst() {
        let start = ContinuousClock.now
        var bucket = TokenBucket(bytesPerSecond: 1_000_000, burst: 100_000, now: start)
        _ = bucket.reserve(100_000, now: start)
        let wait = bucket.reserve(200_000, now: start + .seconds(60))
        #expect(wait > .milliseconds(90), "a minute idle buys only one burst")
    }

    /// Bytes charged without waiting (post-copy's demand replies) leave a debt of one burst at most.
    @Test func chargedBytesOweAtMostOneBurst() {
        let start = ContinuousClock.now
        var bucket = TokenBucket(bytesPerSecond: 1_000_000, burst: 100_000, now: start)
        _ = bucket.reserve(5_000_000, now: start, debtLimit: true)
        let wait = bucket.reserve(0, now: start)
        #expect(wait <= .milliseconds(101) && wait >= .milliseconds(99), "\(wait): one burst's worth, not five seconds")
    }
}

struct EndpointTests {
    @Test func parsesAddresses() throws {
        #expect(try Endpoint(parsing: "tcp:127.0.0.1:4444") == .tcp(host: "127.0.0.1", port: 4444))
        #expect(try Endpoint(parsing: "tcp:[::1]:80") == .tcp(host: "::1", port: 80))
        #expect(try Endpoint(parsing: "tcp:localhost:1") == .tcp(host: "localhost", port: 1))
        #expect(try Endpoint(parsing: "unix:/tmp/m.sock") == .unix(path: "/tmp/m.sock"))
        #expect(try Endpoint(parsing: "tcp:[::1]:80").description == "tcp:[::1]:80")
    }

    @Test(arguments: ["", "tcp:", "tcp:host", "tcp:host:0", "tcp:host:70000", "tcp::80", "udp:1.2.3.4:5", "unix:", "127.0.0.1:4444"])
    func rejectsBadAddresses(text: String) {
        #expect(throws: ConfigurationError.self) { try Endpoint(parsing: text) }
    }
}

struct MessageTests {
    let description = MachineDescription(memorySize: 256 << 20, vcpuCount: 2, kernelPath: "/k", commandLine: "x=1")

    @Test func helloRoundTripsAndRejectsStrangers() throws {
        let hello = Hello(bootID: "abc", machine: description,
                          cpuid: [CPUIDEntry(function: 1, eax: 1, ebx: 2, ecx: 3, edx: 4)], devices: ["UART"])
        #expect(try Hello(decoding: hello.encoded) == hello)
        var wrongMagic = hello.encoded
        wrongMagic[0] ^= 1
        #expect(throws: WireError.self) { try Hello(decoding: wrongMagic) }
        var older = hello.encoded
        older[8] = UInt8(Hello.protocolVersion - 1) // the version before this one
        #expect(throws: WireError.unsupportedVersion("migration protocol \(Hello.protocolVersion - 1); this tern speaks \(Hello.protocolVersion)")) {
            try Hello(decoding: older)
        }
        for streams: UInt32 in [0, 17] {
            var tooMany = hello
            tooMany.streams = streams
            #expect(throws: WireError.self) { try Hello(decoding: tooMany.encoded) }
        }
        var parallel = hello
        parallel.streams = 4
        parallel.features = Hello.zstdFeature
        parallel.authorization = "header.claims.signature"
        parallel.machine.name = "web-1"
        #expect(try Hello(decoding: parallel.encoded) == parallel)
        var longToken = hello
        longToken.authorization = String(repeating: "x", count: Hello.maximumAuthorizationBytes + 1)
        #expect(throws: WireError.self) { try Hello(decoding: longToken.encoded) }
        for length in 0..<hello.encoded.count {
            #expect(throws: WireError.self) { try Hello(decoding: Array(hello.encoded.prefix(length))) }
        }
    }

    @Test func theVMsNameTravelsAndOlderDescriptionsHaveNone() throws {
        var named = description
        named.name = "web-1"
        #expect(try MachineDescription(section: named.section) == named)
        // Version 2 is version 3 without the trailing name.
        var body = named.section.body
        body.removeLast(4 + 5)
        let older = try MachineDescription(section: StateSection(tag: MachineDescription.tag, version: 2, body: body))
        #expect(older.name == "" && older.memorySize == named.memorySize)
        var hostile = description
        hostile.name = "a b"
        #expect(throws: WireError.self) { try MachineDescription(section: hostile.section) }
    }

    @Test func controlMessagesRoundTrip() throws {
        let verdict = Verdict(accepted: false, reason: "no", memoryDigest: 7, stateDigest: nil, bootID: "b", token: 0xfeed, tokenID: "jti-1")
        #expect(try Verdict(decoding: verdict.encoded) == verdict)
        let streamHello = StreamHello(token: 42, index: 3)
        #expect(try StreamHello(decoding: streamHello.encoded) == streamHello)
        #expect(throws: WireError.self) { try StreamHello(decoding: Array(streamHello.encoded.dropLast())) }
        let completion = Completion(pausedMonotonicNs: 1, pausedRealtimeNs: 2, memoryDigest: nil, stateDigest: 9)
        #expect(try Completion(decoding: completion.encoded) == completion)
        #expect(try Go(decoding: Go(keepPaused: true).encoded).keepPaused)
        #expect(try !Go(decoding: []).keepPaused, "an empty go runs the VM")
        #expect(throws: WireError.self) { try Go(decoding: [2]) }
        let resumed = Resumed(monotonicNs: 5, realtimeNs: 6)
        #expect(try Resumed(decoding: resumed.encoded) == resumed)
        #expect(throws: WireError.self) { try Resumed(decoding: resumed.encoded + [0]) }
    }

    @Test func cpuCompatibilityNamesMissingFeatures() {
        let host = [CPUIDEntry(function: 1, eax: 0, ebx: 0, ecx: 0b0110, edx: 0xFF), CPUIDEntry(function: 7, eax: 0, ebx: 0xF, ecx: 0, edx: 0)]
        let fits = [CPUIDEntry(function: 1, eax: 0, ebx: 0, ecx: 0b0010 | 1 << 31, edx: 0x0F)]
        #expect(CPUCompatibility.missingFeatures(guest: fits, host: host) == nil, "the hypervisor bit is Tern's own")
        let needsMore = [CPUIDEntry(function: 7, eax: 0, ebx: 0x1F, ecx: 0, edx: 0)]
        #expect(CPUCompatibility.missingFeatures(guest: needsMore, host: host)?.contains("leaf 7 register 0 bits 0x10") == true)
    }
}

struct SwitchoverPolicyTests {
    let policy = SwitchoverPolicy(maxDowntimeMs: 300, maxRounds: 10, timeoutSeconds: 60)

    func run(_ rounds: [(dirty: Int, predicted: Double)], elapsed: Double = 1) -> [SwitchoverPolicy.Decision] {
        var history = SwitchoverPolicy.History()
        return rounds.enumerated().map { index, round in
            policy.decide(afterRound: index, dirtyPages: round.dirty, predictedMs: round.predicted, elapsedSeconds: elapsed, history: &history)
        }
    }

    @Test func switchesAtOnceWhenTheRestIsSmall() {
        #expect(run([(100, 5)]) == [.switchover("converged")])
        #expect(run([(0, 2)]) == [.switchover("converged")])
    }

    @Test func keepsIteratingWhileRoundsStillShrinkTheDirtySet() {
        let decisions = run([(60_000, 280), (20_000, 120), (16_000, 90)])
        #expect(decisions[0] == .iterate, "fits, but the first round says nothing about shrinking yet")
        #expect(decisions[1] == .iterate, "shrank to a third: another round is worth it")
        #expect(decisions[2] == .switchover("converged (further rounds would shrink the dirty set too little)"))
    }

    /// The first pass's reads of the dirty log, against the set it left and the next round's time.
    @Test func judgesFromThePassWhetherTheGuestOutrunsARound() {
        func rewrites(_ samples: [(milliseconds: Double, pages: Int)], _ dirty: Int, _ roundMs: Double) -> Bool {
            SwitchoverPolicy.guestRewritesWithinARound(samples: samples, dirtyPages: dirty, roundMs: roundMs)
        }
        // A read as long as the round that found three quarters of the set (what the policy always took).
        #expect(rewrites([(40, 12_300)], 16_384, 40))
        // A shorter read, from a pass sent fast: 11000 of 16384 pages in 23 ms, a round of 40 ms.
        #expect(rewrites([(23, 11_000)], 16_384, 40))
        // A guest writing at 200 MB/s (1123 pages in 23 ms) into a 37000-page set that a round sends in 108 ms.
        #expect(!rewrites([(23, 1_123)], 37_000, 108))
        // Half the set in a read as long as the round: another round would still halve it.
        #expect(!rewrites([(40, 8_192)], 16_384, 40))
        // A long read that found the whole set says nothing of the pace within a shorter round.
        #expect(!rewrites([(500, 20_000)], 16_384, 40))
        #expect(!rewrites([], 16_384, 40) && !rewrites([(10, 100)], 0, 40))
    }

    /// With the dirty bit cleared as pages are copied, the pass leaves only part of the region the guest writes
    /// in; its reads' writes spread over the whole region, not over that part.
    @Test func judgesTheRewriteAgainstTheRegionTheGuestWritesIn() {
        // A catch-up burst of 2000 pages in 10 ms, a 5453-page set and a 48 ms round: against the set alone it
        // looks covered (89%); spread over the 16384-page region the guest writes in, about half of it.
        #expect(SwitchoverPolicy.guestRewritesWithinARound(samples: [(10, 2_000)], dirtyPages: 5_453, roundMs: 48))
        #expect(!SwitchoverPolicy.guestRewritesWithinARound(samples: [(10, 2_000)], dirtyPages: 5_453, roundMs: 48,
                                                            workingSetPages: 16_384))
        // A set that is the whole region (flat out) is judged as before.
        #expect(SwitchoverPolicy.guestRewritesWithinARound(samples: [(23, 11_000)], dirtyPages: 16_384, roundMs: 40,
                                                           workingSetPages: 16_384))
        var frequency = DirtyFrequency(pageCount: 128)
        var seen = PageSet(pageCount: 128)
        seen.insert(range: 0..<10)
        frequency.record(seen)
        seen.insert(range: 50..<55)
        frequency.record(seen)
        #expect(frequency.pagesEverDirty == 15)
    }

    @Test func switchesAfterTheFirstPassWhenTheGuestRewritesItsSetFasterThanARound() {
        var history = SwitchoverPolicy.History()
        #expect(policy.decide(afterRound: 0, dirtyPages: 16_384, predictedMs: 90, elapsedSeconds: 1,
                              dirtySetRewrittenWithinARound: true, history: &history)
                == .switchover("converged (the guest re-dirties its working set faster than a round could send it)"))
        history = SwitchoverPolicy.History()
        #expect(policy.decide(afterRound: 0, dirtyPages: 16_384, predictedMs: 400, elapsedSeconds: 1,
                              dirtySetRewrittenWithinARound: true, history: &history) == .iterate,
                "a prediction over the target still iterates")
    }

    @Test func givesUpWhenTheDirtySetStopsShrinking() {
        let decisions = run([(100_000, 900), (99_000, 890), (98_000, 880), (99_500, 895)])
        #expect(decisions[0...2] == [.iterate, .iterate, .iterate])
        #expect(decisions[3] == .switchover("not converging (the dirty set stopped shrinking)"))
    }

    @Test func limitsRoundsAndTime() {
        let many = run(Array(repeating: (100_000, 900.0), count: 1) + (1..<10).map { (100_000 / ($0 + 1), 900.0) })
        #expect(many.last == .switchover("max-rounds (10) reached"))
        #expect(run([(100_000, 900)], elapsed: 61) == [.switchover("timeout (60 s) reached")])
    }
}

struct DowntimePredictionTests {
    @Test func withoutAMeasuredPageWholePagesArePricedByTheLink() {
        // 10 000 pages of 4 KiB at 100 MB/s: 410 ms, plus 1.5 round trips of 2 ms.
        let p = DowntimePrediction(dirtyPages: 10_000, wireBytesPerPage: 4096, throughputBytesPerSecond: 100e6,
                                   stateBytes: 0, roundTripMs: 2, pageCostMs: nil)
        #expect(abs(p.milliseconds - 412.6) < 0.01)
    }

    @Test func aPageMeasuredInARoundOutweighsTheFirstPassAverage() {
        // The first pass crawled at 300 MB/s into fresh memory; a re-send round then took 4 µs a page.
        // 4 000 pages: 16 ms, not the 55 ms the average says; the state still goes at the average.
        let p = DowntimePrediction(dirtyPages: 4_000, wireBytesPerPage: 4108, throughputBytesPerSecond: 300e6,
                                   stateBytes: 300_000, roundTripMs: 0.1, pageCostMs: 0.004)
        #expect(abs(p.milliseconds - (16 + 1 + 0.15)) < 0.01)
    }

    @Test func smallDeltasArePricedByWhatAPageCostLastRound() {
        // 10 000 deltas of 80 bytes are 8 ms on the wire, but a page took 4 µs to make and apply: 40 ms.
        var p = DowntimePrediction(dirtyPages: 10_000, wireBytesPerPage: 80, throughputBytesPerSecond: 100e6,
                                   stateBytes: 0, roundTripMs: 0, pageCostMs: 0.004)
        #expect(abs(p.milliseconds - 40) < 0.01)
        p.pageCostMs = nil
        #expect(abs(p.milliseconds - 8) < 0.01, "without a page cost (a capped round) only the wire counts")
    }
}

struct DirtyFrequencyTests {
    @Test func holdsBackPagesDirtiedInHalfTheSyncsOrMore() {
        var frequency = DirtyFrequency(pageCount: 64)
        var always = PageSet(pageCount: 64)
        for page in [3, 40] { always.insert(page) }
        var once = always
        once.insert(10)
        once.insert(20)
        frequency.record(once)
        for _ in 0..<3 { frequency.record(always) }
        var twice = always
        twice.insert(20)
        frequency.record(twice)
        // Five syncs: 3 and 40 dirty in all, 20 in two, 10 in one; threshold max(2, 3) = 3.
        var pending = PageSet(pageCount: 64)
        for page in [3, 10, 20, 40, 50] { pending.insert(page) }
        let split = frequency.holdingBackHottest(pending, stillHot: pending)
        #expect(split.send == [50, 10, 20], "cold to warm, the hot ones left out")
        #expect(split.held.count == 2 && split.held.contains(3) && split.held.contains(40))
        // Page 40 was not dirty in the latest sync: it has cooled down and goes now.
        var latest = PageSet(pageCount: 64)
        latest.insert(3)
        let cooled = frequency.holdingBackHottest(pending, stillHot: latest)
        #expect(cooled.held.count == 1 && cooled.held.contains(3))
        #expect(cooled.send.contains(40))
    }

    @Test func ordersPagesFromColdToHot() {
        var frequency = DirtyFrequency(pageCount: 100)
        var hot = PageSet(pageCount: 100)
        hot.insert(5); hot.insert(7)
        frequency.record(hot)
        var hotter = PageSet(pageCount: 100)
        hotter.insert(7)
        frequency.record(hotter)
        var pages = PageSet(pageCount: 100)
        for page in [1, 5, 7, 9] { pages.insert(page) }
        #expect(frequency.ordered(pages) == [1, 9, 5, 7])
    }
}

/// The first pass's learner, against a scripted dirty log (one answer per read).
struct FirstPassLearnerTests {
    static let chunk = StreamPartition.chunkPages

    final class ScriptedDirtyLog: @unchecked Sendable {
        var answers: [[Int]]
        var reads = 0
        let pageCount: Int
        init(pageCount: Int, answers: [[Int]]) { self.pageCount = pageCount; self.answers = answers }
        func read() -> PageSet {
            reads += 1
            var set = PageSet(pageCount: pageCount)
            if !answers.isEmpty { for page in answers.removeFirst() { set.insert(page) } }
            return set
        }
    }

    private func learner(_ log: ScriptedDirtyLog, deferring: Bool) -> FirstPassLearner {
        FirstPassLearner(initiallyHeld: PageSet(pageCount: log.pageCount), frequency: DirtyFrequency(pageCount: log.pageCount),
                         interval: Self.chunk, deferringHotChunks: deferring) { log.read() }
    }

    @Test func withOrderingTheRestOfAChunkTheGuestWritesInWaitsForTheEnd() throws {
        let log = ScriptedDirtyLog(pageCount: 4 * Self.chunk, answers: [[2 * Self.chunk + 88], [5]])
        let pass = learner(log, deferring: true)
        #expect(try pass.claim(first: 0, count: Self.chunk).map { $0.count } == [Self.chunk])
        #expect(try pass.claim(first: Self.chunk, count: Self.chunk).map { $0.count } == [Self.chunk])
        #expect(try pass.claim(first: 2 * Self.chunk, count: Self.chunk).isEmpty, "the chunk the guest wrote in is deferred whole")
        #expect(try pass.claim(first: 3 * Self.chunk, count: Self.chunk).map { $0.first } == [3 * Self.chunk])
        let learnt = pass.finish()
        #expect(learnt.held.count == Self.chunk && learnt.held.contains(2 * Self.chunk) && learnt.held.contains(3 * Self.chunk - 1))
        #expect(learnt.dirtyAfterSending.count == 1 && learnt.dirtyAfterSending.contains(5), "written after it was sent: next round")
        #expect(log.reads == 3, "a deferred chunk takes no time, so it does not trigger a read of the log")
        #expect(learnt.samples.count == 3)
    }

    @Test func withoutOrderingOnlyTheWrittenPageWaits() throws {
        let written = 2 * Self.chunk + 88
        let log = ScriptedDirtyLog(pageCount: 4 * Self.chunk, answers: [[written]])
        let pass = learner(log, deferring: false)
        for chunk in 0..<2 { _ = try pass.claim(first: chunk * Self.chunk, count: Self.chunk) }
        let ranges = try pass.claim(first: 2 * Self.chunk, count: Self.chunk)
        #expect(ranges.map { $0.first } == [2 * Self.chunk, written + 1])
        #expect(ranges.map { $0.count } == [88, Self.chunk - 89])
        let learnt = pass.finish()
        #expect(learnt.held.count == 1 && learnt.held.contains(written))
    }

    /// Two streams: one stages a hole's zero marker, the guest writes a page of the hole, the other stream's
    /// claim reads the log (resetting the page's bit) and holds the page, then the first calls `claimHole`.
    /// The marker went, so the page counts as sent; a pass cut short now must still owe it.
    @Test func aHolePageWrittenBeforeItsClaimIsOwedIfThePassIsCutShort() throws {
        let written = 2 * Self.chunk + 7
        let log = ScriptedDirtyLog(pageCount: 4 * Self.chunk, answers: [[written]])
        let pass = learner(log, deferring: false)
        _ = try pass.claim(first: 0, count: Self.chunk)
        pass.claimHole(first: 2 * Self.chunk, count: Self.chunk)
        #expect(log.reads == 1)
        let owed = pass.owedIfCutShort
        #expect(owed.contains(written), "its zero marker went before the write; only the log knew, and the pass read it")
        #expect(owed.count == 1)
    }

    @Test func aPassCutShortOwesWhatWasWrittenAfterItWasSent() throws {
        let log = ScriptedDirtyLog(pageCount: 4 * Self.chunk, answers: [[5]])
        let pass = learner(log, deferring: false)
        _ = try pass.claim(first: 0, count: Self.chunk)
        #expect(pass.owedIfCutShort.contains(5) && pass.owedIfCutShort.count == 1)
    }

    @Test func splitsAroundHeldPages() {
        #expect(FirstPassLearner.split(first: 10, count: 6) { $0 == 10 || $0 == 13 }.map { [$0.first, $0.count] } == [[11, 2], [14, 2]])
        #expect(FirstPassLearner.split(first: 0, count: 4) { _ in true }.isEmpty)
        #expect(FirstPassLearner.split(first: 0, count: 4) { _ in false }.map { [$0.first, $0.count] } == [[0, 4]])
    }
}
