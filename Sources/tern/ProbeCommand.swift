import ArgumentParser
import Foundation
import TernAPI
import TernMachine
import TernProbe

/// `tern probe`: downtime as a client of the VM sees it (docs/NETWORK.md, "Measuring from outside").
struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Send UDP echo probes to a VM at a fixed interval and report the longest gap in its replies.",
        discussion: """
            Run it where a client of the VM sits (ip netns exec NS tern probe ...) while the VM moves. \
            The VM must echo UDP (the test guest does on port 7 with ip=). Give --migration-report, the \
            JSON `tern migrate --json` printed, to set the gap beside Tern's own switch-over, and \
            --api-socket, the VM's API socket after the move, to add the guest's own longest stall.
            """)

    @Argument(help: "The VM's IPv4 address, optionally with :PORT (default port 7).")
    var target: String

    @Option(help: "Milliseconds between probes (default 1).")
    var intervalMs: Double = 1

    @Option(help: "How many probes to send (default: 10000, or --duration's worth).")
    var count: Int?

    @Option(help: "Seconds to probe for, instead of --count.")
    var duration: Double?

    @Option(help: "UDP payload bytes per probe (24-65507, default 64).")
    var size: Int = 64

    @Option(help: "Milliseconds to wait for echoes after the last probe (default 1000).")
    var graceMs: Double = 1000

    @Option(help: ArgumentHelp("A migration report (`tern migrate --json` output), read when probing ends.",
                               discussion: "Any JSON object with paused_at_unix_ms and resumed_at_unix_ms (and downtime_ms) will do."))
    var migrationReport: String?

    @Option(help: "The VM's API socket, read when probing ends for the test guest's own longest stall.")
    var apiSocket: String?

    @Flag(help: "Print JSON instead of text.")
    var json = false

    func validate() throws {
        guard intervalMs >= 0.01 && intervalMs <= 60_000 else { throw ValidationError("--interval-ms must be 0.01-60000") }
        guard count == nil || duration == nil else { throw ValidationError("give --count or --duration, not both") }
        if let duration, !(duration > 0 && duration <= 86_400) { throw ValidationError("--duration must be 0-86400 seconds") }
        guard graceMs >= 0 && graceMs <= 600_000 else { throw ValidationError("--grace-ms must be 0-600000") }
        _ = try options()
    }

    func options() throws -> UDPProber.Options {
        let parts = target.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count <= 2, let host = parts.first, !host.isEmpty else { throw ValidationError("'\(target)' is not ADDRESS or ADDRESS:PORT") }
        let probes = count ?? duration.map { Int(($0 * 1000 / intervalMs).rounded()) } ?? 10_000
        var options = UDPProber.Options(host: String(host), count: probes)
        if parts.count == 2 {
            guard let port = UInt16(parts[1]), port > 0 else { throw ValidationError("'\(parts[1])' is not a port") }
            options.port = port
        }
        options.intervalNs = UInt64(intervalMs * 1e6)
        options.size = size
        options.graceNs = UInt64(graceMs * 1e6)
        do { _ = try UDPProber(options) } catch { throw ValidationError("\(error)") }
        return options
    }

    func run() throws {
        let probe: UDPProber.Run
        do { probe = try UDPProber(try options()).run() } catch { fail("\(error)") }
        let migration = switchoverTimes()
        let analysis = probe.analysis(switchover: migration.map { UInt64($0.paused * 1e6)...UInt64($0.resumed * 1e6) })
        var comparison: SwitchoverComparison?
        if let migration, let outage = analysis.switchoverOutage {
            comparison = SwitchoverComparison(outage: outage, downtimeMs: migration.downtime, pausedAtUnixMs: migration.paused,
                                              resumedAtUnixMs: migration.resumed, guestMaxStallMs: guestMaxStall())
        } else if migration != nil {
            warn("the migration's switch-over fell outside the probing")
        }
        let report = ProbeReport(target: target, intervalMs: intervalMs, sendErrors: probe.sendErrors, analysis: analysis,
                                 switchover: comparison)
        if json {
            FileHandle.standardOutput.write(try APIJSON.encoder.encode(report))
            print()
        } else {
            print(report.rendered)
        }
    }

    /// When the VM in --migration-report paused and resumed (Unix ms), and its downtime figure.
    private func switchoverTimes() -> (paused: Double, resumed: Double, downtime: Double?)? {
        guard let path = migrationReport else { return nil }
        guard let data = FileManager.default.contents(atPath: path),
              let times = try? APIJSON.decoder.decode(SwitchoverTimes.self, from: data) else {
            warn("\(path) holds no JSON object (`tern migrate --json` output); the gaps stand alone")
            return nil
        }
        guard let paused = times.pausedAtUnixMs, let resumed = times.resumedAtUnixMs else {
            warn("the migration in \(path) never switched over (status \(times.status ?? "unknown"))")
            return nil
        }
        // Unix milliseconds after 1970 and before the year 33658, the resume not before the pause.
        guard (1...1e15).contains(paused), (paused...1e15).contains(resumed) else {
            warn("\(path): paused_at_unix_ms \(paused) and resumed_at_unix_ms \(resumed) are not a switch-over in Unix milliseconds")
            return nil
        }
        return (paused, resumed, times.downtimeMs)
    }

    /// What the probe reads of a migration report: Tern's (`tern migrate --json`), or the same keys
    /// written for another VMM (bench/network.py does, from QEMU's STOP and RESUME events).
    private struct SwitchoverTimes: Decodable {
        var pausedAtUnixMs: Double?
        var resumedAtUnixMs: Double?
        var downtimeMs: Double?
        var status: String?
    }

    private func guestMaxStall() -> Double? {
        guard let apiSocket else { return nil }
        let uri = "/v1/vm/memory?address=\(TestGuestStatus.address.rawValue)&length=\(TestGuestStatus.size)"
        guard let response = try? APIClient(socketPath: apiSocket).request(.GET, uri), response.status == 200,
              let status = TestGuestStatus(bytes: [UInt8](response.body)) else {
            warn("no test guest status through \(apiSocket); the guest's own stall is left out")
            return nil
        }
        return status.version >= 3 ? status.maxStallMs : nil
    }

    private func warn(_ message: String) { FileHandle.standardError.write(Data("tern probe: \(message)\n".utf8)) }
}

/// What `tern probe` prints.
struct ProbeReport: Encodable {
    var target: String
    var intervalMs: Double
    var sendErrors: Int
    var analysis: ProbeAnalysis
    var switchover: SwitchoverComparison?

    var rendered: String {
        let a = analysis
        var lines = ["probe \(target): every \(Self.ms(intervalMs)), \(a.sent) sent, \(a.received) answered, \(a.lost) lost, "
            + "\(a.duplicates) duplicated, \(a.reordered) reordered" + (sendErrors > 0 ? ", \(sendErrors) sends refused" : "")]
        func describe(_ gap: ProbeAnalysis.Gap) -> String {
            "\(Self.ms(gap.durationMs)) with \(gap.lost) probes lost in it"
                + (gap.recovered ? "" : "; no reply after it: still unreachable when probing ended")
        }
        if let outage = a.switchoverOutage {
            lines.append(outage.lost == 0 ? "no probe lost at the switch-over"
                : "switch-over outage \(Self.ms(outage.durationMs)): probes \(outage.firstLost ?? 0)-\(outage.lastLost ?? 0) went unanswered "
                + "(\(outage.lost) lost), \(a.lostOutsideGap) lost elsewhere"
                + (outage.recovered ? "" : "; none answered after it: still unreachable when probing ended"))
            if let gap = a.longestGap { lines.append("longest gap between replies \(describe(gap))") }
        } else if let gap = a.longestGap {
            lines.append("longest gap between replies \(describe(gap)), \(a.lostOutsideGap) lost outside it")
        }
        if let median = a.roundTripMedianMs, let p99 = a.roundTripP99Ms, let max = a.roundTripMaxMs {
            lines.append("round trip median \(Self.ms(median)), p99 \(Self.ms(p99)), max \(Self.ms(max))")
        }
        if let s = switchover {
            let downtime = s.downtimeMs.map { "Tern's downtime \(Self.ms($0))" } ?? "no downtime figure"
            let stall = s.guestMaxStallMs.map { ", the guest's own longest stall \(Self.ms($0))" } ?? ""
            func relative(_ ms: Double, to event: String) -> String { ms >= 0 ? "\(Self.ms(ms)) after \(event)" : "\(Self.ms(-ms)) before \(event)" }
            lines.append("switch-over: \(downtime)\(stall); the first lost probe went \(relative(-s.outageStartBeforePauseMs, to: "the pause")), "
                + "the first answered again \(relative(s.outageEndAfterResumeMs, to: "the resume"))")
        }
        return lines.joined(separator: "\n")
    }

    static func ms(_ value: Double) -> String { String(format: value < 10 ? "%.2f ms" : "%.1f ms", value) }
}
