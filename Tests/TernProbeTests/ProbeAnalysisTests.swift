import Testing
@testable import TernProbe

/// Probes every millisecond from t = 1 s, each answered `rtt` later unless `lost` holds for it.
private func run(_ count: Int, rttNs: UInt64 = 100_000, lost: (Int) -> Bool = { _ in false },
                 arrival: (Int, UInt64) -> UInt64 = { $1 }, switchover: ClosedRange<UInt64>? = nil) -> ProbeAnalysis {
    let sent = (0..<count).map { 1_000_000_000 + UInt64($0) * 1_000_000 }
    let replies = (0..<count).filter { !lost($0) }
        .map { ProbeAnalysis.Reply(sequence: $0, arrivedNs: arrival($0, sent[$0] + rttNs)) }
        .sorted { $0.arrivedNs < $1.arrivedNs }
    return ProbeAnalysis(sentNs: sent, replies: replies, endNs: sent[count - 1] + 1_000_000, switchover: switchover)
}

@Suite struct ProbeAnalysisTests {
    @Test func anOutageIsTheLongestGapAndItsProbesAreCountedInIt() throws {
        let a = run(1000, lost: { (400..<420).contains($0) || $0 == 900 })
        #expect(a.sent == 1000 && a.received == 979 && a.lost == 21)
        let gap = try #require(a.longestGap)
        // Replies to 399 and 420 bound it: 21 ms apart.
        #expect(abs(gap.durationMs - 21) < 0.001)
        #expect(gap.lost == 20 && a.lostOutsideGap == 1)
        #expect(gap.recovered)
        #expect(abs(gap.startUnixMs - (1000 + 399 + 0.1)) < 0.001)
        #expect(a.reordered == 0 && a.duplicates == 0)
    }

    @Test func withNoLossTheGapIsOneInterval() throws {
        let a = run(100)
        #expect(abs(try #require(a.longestGap).durationMs - 1) < 0.001)
        #expect(a.lost == 0 && a.lostOutsideGap == 0)
        #expect(abs(try #require(a.roundTripMedianMs) - 0.1) < 0.001)
    }

    @Test func aTargetThatNeverCameBackLeavesAnOpenGap() throws {
        let a = run(500, lost: { $0 >= 300 })
        let gap = try #require(a.longestGap)
        #expect(!gap.recovered)
        #expect(gap.lost == 200 && a.lostOutsideGap == 0)
        // From the reply to probe 299 to when the last probe's reply was due.
        #expect(abs(gap.durationMs - (500 - 299 - 0.1)) < 0.001)
    }

    @Test func aTargetNeverReachedIsOneGapOverTheWholeRun() throws {
        let a = run(50, lost: { _ in true })
        let gap = try #require(a.longestGap)
        #expect(!gap.recovered && gap.lost == 50 && a.received == 0)
        #expect(a.roundTripMedianMs == nil)
    }

    @Test func lateRepliesCountAsReorderedAndRepeatsAsDuplicates() throws {
        // Probe 10's reply comes 5 ms late, after those of 11-14.
        var a = run(30, arrival: { $0 == 10 ? $1 + 5_000_000 : $1 })
        #expect(a.reordered == 1 && a.lost == 0)
        let sent = (0..<3).map { UInt64($0) * 1_000_000 }
        a = ProbeAnalysis(sentNs: sent, replies: [.init(sequence: 0, arrivedNs: 10), .init(sequence: 0, arrivedNs: 20),
                                                  .init(sequence: 1, arrivedNs: 1_000_010), .init(sequence: 7, arrivedNs: 1_000_020),
                                                  .init(sequence: 2, arrivedNs: 2_000_010)], endNs: 3_000_000)
        #expect(a.duplicates == 1 && a.received == 3 && a.lost == 0, "a reply naming a probe never sent is ignored")
    }

    @Test func theSwitchoverGapIsTheOneOverlappingThePauseNotTheLongest() throws {
        // A 6 ms outage at the switch-over (paused at 1.3 s, resumed 3 ms later), and a 10 ms hiccup later
        // in which replies came late (all at once with 709's) but none was lost.
        let a = run(1000, lost: { (300..<305).contains($0) }, arrival: { (700..<709).contains($0) ? 1_000_000_000 + 709_100_000 : $1 },
                    switchover: 1_300_000_000...1_303_000_000)
        let longest = try #require(a.longestGap), outage = try #require(a.switchoverOutage)
        #expect(abs(longest.durationMs - 10) < 0.001 && longest.lost == 0)
        // Probes 300-304 unanswered: sent from 1.300 s until 305 went at 1.305 s.
        #expect(abs(outage.durationMs - 5) < 0.001 && outage.lost == 5 && outage.firstLost == 300 && outage.lastLost == 304)
        #expect(a.lostOutsideGap == 0, "counted against the switch-over's outage")
        #expect(run(1000, lost: { (300..<305).contains($0) }).switchoverOutage == nil)
        #expect(run(1000, switchover: 9_000_000_000...9_001_000_000).switchoverOutage == nil, "a switch-over after the probing")
    }

    /// Replies the old host sent just before the pause, arriving inside the window, do not split the outage.
    @Test func repliesStillInFlightAtThePauseDoNotSplitTheOutage() throws {
        // Replies to probes 290-297 held back by a stall and all arriving at 1.2993 s, inside the window,
        // then probes 298-301 are lost and 302's reply comes at 1.3021 s.
        let a = run(1000, lost: { (298..<302).contains($0) }, arrival: { (290..<298).contains($0) ? 1_299_300_000 : $1 },
                    switchover: 1_298_500_000...1_300_000_000)
        let outage = try #require(a.switchoverOutage)
        #expect(abs(outage.startUnixMs - 1298) < 0.001 && abs(outage.endUnixMs - 1302) < 0.001, "\(outage)")
        #expect(outage.lost == 4 && a.lostOutsideGap == 0)
    }

    /// A probe already in the VM's queue when it paused is answered by the destination, after the next
    /// probe, which the old host dropped: that drop still belongs to the switch-over's gap.
    @Test func aProbeAnsweredLateAcrossTheMoveDoesNotHideTheLossBesideIt() throws {
        let a = run(1000, lost: { $0 == 538 }, arrival: { $0 == 537 ? 1_000_000_000 + 539_300_000 : $1 },
                    switchover: 1_537_100_000...1_538_600_000)
        let outage = try #require(a.switchoverOutage)
        #expect(outage.lost == 1 && a.lostOutsideGap == 0, "\(outage)")
    }

    /// Two runs of lost probes split by one answered (a probe caught in the VM's queue) are one outage;
    /// a target that never answers again leaves it open.
    @Test func theOutageJoinsRunsAcrossTheWindowAndCanStayOpen() throws {
        var a = run(1000, lost: { (400..<403).contains($0) || (404..<410).contains($0) }, switchover: 1_401_000_000...1_405_000_000)
        var outage = try #require(a.switchoverOutage)
        #expect(outage.firstLost == 400 && outage.lastLost == 409 && outage.lost == 9 && abs(outage.durationMs - 10) < 0.001)
        a = run(1000, lost: { $0 >= 600 }, switchover: 1_600_500_000...1_601_000_000)
        outage = try #require(a.switchoverOutage)
        #expect(!outage.recovered && outage.lost == 400 && abs(outage.durationMs - 400) < 0.001)
    }

    @Test func theOutageSitsBesideTheSwitchover() throws {
        let a = run(1000, lost: { (400..<420).contains($0) }, switchover: 1_401_000_000...1_410_000_000)
        let outage = try #require(a.switchoverOutage)
        // The first lost probe went 1 ms before the pause; probes were answered again from 10 ms after the resume.
        let s = SwitchoverComparison(outage: outage, downtimeMs: 9, pausedAtUnixMs: 1401, resumedAtUnixMs: 1410, guestMaxStallMs: 15)
        #expect(abs(s.outageStartBeforePauseMs - 1) < 0.001 && abs(s.outageEndAfterResumeMs - 10) < 0.001)
    }
}
