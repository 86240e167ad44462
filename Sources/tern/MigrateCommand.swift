import ArgumentParser
import Foundation
import Glibc
import Synchronization
import TernAPI
import TernMachine
import TernMigration

struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Live-migrate a running VM to a `tern run --incoming` process.",
        discussion: "Progress goes to stderr while it runs; the report to stdout at the end. Ctrl-C cancels (the VM keeps running here).")
    @OptionGroup var api: APIOptions

    @Option(help: "Destination: tcp:HOST:PORT or unix:PATH (with --resume: where the destination waits, if not where it was).")
    var to: String?

    @Flag(help: "Reconnect a post-copy migration whose connection dropped, and finish it.")
    var resume = false

    @Option(help: "precopy, postcopy, hybrid (pre-copy rounds then post-copy) or auto (post-copy only if pre-copy cannot meet the downtime target).")
    var mode: String = "precopy"

    @Option(help: "Hybrid mode: pre-copy rounds before switching to post-copy.")
    var precopyRounds: Int = 2

    @Option(help: "Downtime target in milliseconds: switch over once the rest fits in it.")
    var maxDowntime: Double = 300

    @Option(help: "Switch over after this many pre-copy rounds even if not converged.")
    var maxRounds: Int = 30

    @Option(help: "Switch over after this many seconds even if not converged.")
    var timeout: Double = 600

    @Option(help: "Cap on bytes per second, at least 1M; K, M, G are decimal (100M = 100,000,000 B/s). Lifted for the stop-and-copy; in post-copy it paces the background push.")
    var bandwidth: String?

    @Option(help: "none, xbzrle (re-sent pages as deltas against a cache of what was sent), zstd (each page frame compressed; for slow links), or xbzrle,zstd. Pre-copy rounds.")
    var compress: String = "none"

    @Option(help: "zstd level, 1 (fastest) to 19.")
    var zstdLevel: Int = 1

    @Option(help: "Parallel page streams (connections) for pre-copy's pages and post-copy's push, 1 to 16 (default: 2 with --mode postcopy, else 1).")
    var streams: Int?

    @Option(help: "dirty-frequency: rarely-dirtied pages first, hot pages last; or sequential: in address order (pre-copy).")
    var order: String = "dirty-frequency"

    @Flag(inversion: .prefixedNo,
          help: "With dirty-frequency ordering: hold the hottest pages back for the stop-and-copy instead of re-sending them every round (default: on without XBZRLE, off with it).")
    var holdBack: Bool?

    @Option(help: "XBZRLE cache size, e.g. 256M (binary units).")
    var xbzrleCache: String = "256M"

    @Option(help: "The disks: shared (both hosts open the same images; the default) or copy (they move with the VM; the destination names where with --disk id=NAME,path=FILE).")
    var storage: String = "shared"

    @Option(help: "With --storage copy: rounds (writes made during the copy are re-sent by the next round; the default) or sync (each write reaches both sides before it completes, so a write-heavy guest cannot keep the copy from converging).")
    var storageMirror: String?

    @Option(help: "Announcement rounds the destination sends for the VM's NICs once it runs there (a RARP per NIC each round, and the guest's own announcement in the first); 0: none (QEMU announce-self's default, 5).")
    var announceRounds: Int?

    @Option(help: "Also write the final report, as JSON, to FILE (for `tern probe --migration-report`).")
    var saveReport: String?

    @Option(help: "Milliseconds before the second announcement round (default 50).")
    var announceInitial: Int?

    @Option(help: "Each later gap between rounds is this many milliseconds longer (default 100).")
    var announceStep: Int?

    @Option(help: "The longest gap between rounds in milliseconds (default 550).")
    var announceMax: Int?

    @Flag(help: "Compare digests of memory, device state and (with --storage copy) the disks on both sides before handing over.")
    var verify = false

    @Option(help: "Mutual TLS 1.3 on every connection, with the certificates in DIR (ca.pem, cert.pem, key.pem; `tern certs init`). A resume uses the first attempt's.")
    var tlsDir: String?

    @Option(help: "With --tls-dir: the destination's certificate must name NAME (repeatable).")
    var tlsAllow: [String] = []

    @Flag(help: "Migrate over tcp: in clear, without TLS (anyone on the path can read the VM's memory). unix: sockets need neither.")
    var insecure = false

    @Option(help: "The migration token a destination started with --require-token asks for (`tern token issue`).")
    var token: String?

    @Option(help: "Read the migration token from FILE (keeps it out of the process list).")
    var tokenFile: String?

    func validate() throws {
        if token != nil && tokenFile != nil { throw ValidationError("--token and --token-file exclude each other") }
        if resume && (token != nil || tokenFile != nil) {
            throw ValidationError("--resume joins the migration the token already authorized: no --token")
        }
        if let to { _ = try Endpoint(parsing: to) } else if !resume { throw ValidationError("--to is required (tcp:HOST:PORT or unix:PATH)") }
        guard MigrationMode(rawValue: mode) != nil else { throw ValidationError("--mode must be precopy, postcopy, hybrid or auto") }
        guard precopyRounds >= 1 else { throw ValidationError("--precopy-rounds must be at least 1") }
        do { _ = try CompressionChoice(parsing: compress) } catch { throw ValidationError("--compress: \(error)") }
        guard (1...19).contains(zstdLevel) else { throw ValidationError("--zstd-level must be between 1 and 19") }
        if let streams, !(1...Hello.maximumStreams).contains(streams) { throw ValidationError("--streams must be between 1 and \(Hello.maximumStreams)") }
        guard StorageMode(rawValue: storage) != nil else {
            throw ValidationError("--storage must be shared or copy")
        }
        let defaults = AnnounceSchedule()
        if let problem = AnnounceSchedule(rounds: announceRounds ?? defaults.rounds, initialMs: announceInitial ?? defaults.initialMs,
                                          maxMs: announceMax ?? defaults.maxMs, stepMs: announceStep ?? defaults.stepMs).problem {
            throw ValidationError("--" + problem.replacingOccurrences(of: "announce ", with: "announce-"))
        }
        if let storageMirror {
            guard StorageMirror(rawValue: storageMirror) != nil else { throw ValidationError("--storage-mirror must be rounds or sync") }
            guard storage == StorageMode.copy.rawValue else { throw ValidationError("--storage-mirror needs --storage copy") }
        }
        guard PageOrder(rawValue: order) != nil else { throw ValidationError("--order must be sequential or dirty-frequency") }
        if holdBack != nil && order != PageOrder.dirtyFrequency.rawValue {
            throw ValidationError("--hold-back and --no-hold-back need --order dirty-frequency")
        }
        do { _ = try ByteSize(parsing: xbzrleCache) } catch { throw ValidationError("--xbzrle-cache: \(error)") }
        guard maxDowntime > 0 else { throw ValidationError("--max-downtime must be positive") }
        guard maxRounds >= 1 else { throw ValidationError("--max-rounds must be at least 1") }
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
        if let bandwidth, try Self.parseRate(bandwidth) < MigrateRequest.minimumBandwidth {
            throw ValidationError("--bandwidth must be at least 1M (1,000,000 bytes per second)")
        }
        if !resume, let to, case .failure(let refusal) = ChannelSecurity.choose(tlsDirectory: nil, allowedPeers: [], insecure: insecure || tlsDir != nil,
                                                                                 for: try Endpoint(parsing: to), role: .client) {
            throw ValidationError(refusal.description)
        }
        if tlsDir != nil && insecure { throw ValidationError("--insecure and --tls-dir exclude each other") }
        if !tlsAllow.isEmpty && tlsDir == nil { throw ValidationError("--tls-allow needs --tls-dir") }
        if resume && (tlsDir != nil || insecure || !tlsAllow.isEmpty) {
            throw ValidationError("--resume secures its connection as the migration it resumes did: no --tls-dir, --tls-allow or --insecure")
        }
    }

    static func parseRate(_ text: String) throws -> UInt64 {
        guard let rate = ByteRate.parse(text) else { throw ValidationError("--bandwidth '\(text)' is not a rate (e.g. 100000000 or 100M)") }
        return rate
    }

    /// The token as given, or read from --token-file (surrounding whitespace dropped).
    func migrationToken() throws -> String? {
        guard let tokenFile else { return token }
        do {
            return try String(contentsOfFile: tokenFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        } catch {
            fail("--token-file \(tokenFile): \(error.localizedDescription)")
        }
    }

    func run() throws {
        let request = MigrateRequest(destination: to, resume: resume ? true : nil, mode: mode, maxDowntimeMs: maxDowntime, maxRounds: maxRounds,
                                     timeoutS: timeout, bandwidth: try bandwidth.map(Self.parseRate), verify: verify,
                                     precopyRounds: precopyRounds, compress: compress,
                                     xbzrleCacheBytes: try CompressionChoice(parsing: compress).xbzrle ? try ByteSize(parsing: xbzrleCache).bytes : nil,
                                     order: order, holdBack: holdBack, zstdLevel: zstdLevel, streams: streams,
                                     // The VM's tern process reads the directory: give it an absolute path.
                                     tlsDir: tlsDir.map { URL(fileURLWithPath: $0).standardizedFileURL.path },
                                     tlsAllow: tlsAllow.isEmpty ? nil : tlsAllow, insecure: insecure ? true : nil,
                                     token: try migrationToken(), storage: storage, storageMirror: storageMirror,
                                     announceRounds: announceRounds, announceInitialMs: announceInitial, announceMaxMs: announceMax,
                                     announceStepMs: announceStep)
        let body = try APIJSON.encoder.encode(request)
        let client = api.client
        let outcome = Mutex<Result<APIClient.Response, any Error>?>(nil)

        // Ctrl-C asks the source to cancel; the report still arrives. Set up before the request goes, so
        // that an early Ctrl-C cannot end this process while the migration it started goes on.
        signal(SIGINT, SIG_IGN)
        let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        interrupt.setEventHandler {
            FileHandle.standardError.write(Data("\ntern: cancelling the migration...\n".utf8))
            // The API has no migration to cancel until the request has reached it: ask again for a while.
            for _ in 0..<50 where outcome.withLock({ $0 }) == nil {
                let answer = try? client.request(.PUT, "/v1/vm/migration/cancel", timeout: .seconds(5))
                if answer?.status == 409 {
                    FileHandle.standardError.write(Data("tern: \(answer?.errorMessage ?? "too late to cancel")\n".utf8))
                }
                if answer?.status != 404 { break }
                usleep(100_000)
            }
        }
        interrupt.resume()

        let worker = Thread {
            let result = Result { try client.request(.PUT, "/v1/vm/migrate", body: body, timeout: .seconds(Int64(timeout) + 600)) }
            outcome.withLock { $0 = result }
        }
        worker.start()

        let progress = ProgressPrinter(enabled: !api.json)
        while outcome.withLock({ $0 }) == nil {
            usleep(200_000)
            if let response = try? client.request(.GET, "/v1/vm/migration", timeout: .seconds(5)), response.status == 200,
               let report = try? APIJSON.decoder.decode(MigrationReport.self, from: response.body) {
                progress.show(report)
            }
        }
        progress.finish()
        let response: APIClient.Response
        switch outcome.withLock({ $0 })! {
        case .success(let value): response = value
        case .failure(let error): fail("\(error)")
        }
        guard response.status == 200 else { fail(response.errorMessage ?? "the API answered \(response.status)") }
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: response.body)
        if let saveReport {
            // Whole or not at all: `tern probe --migration-report` may be waiting to read it.
            do { try response.body.write(to: URL(fileURLWithPath: saveReport), options: .atomic) } catch {
                FileHandle.standardError.write(Data("tern: cannot save the report to \(saveReport): \(error.localizedDescription)\n".utf8))
            }
        }
        printAnswer(response.body, json: api.json) { MigrationTable.render(report) }
        if report.status != .completed { throw ExitCode.failure }
    }
}

struct MigrateStatus: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate-status",
        abstract: "Show the running (or last) migration's report, as it stands (QEMU's info migrate).")
    @OptionGroup var api: APIOptions
    func run() throws {
        let response = try call(api.client, .GET, "/v1/vm/migration", expecting: 200)
        try printAnswer(response.body, json: api.json) { MigrationTable.render(try APIJSON.decoder.decode(MigrationReport.self, from: response.body)) }
    }
}

struct MigrateSet: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate-set",
        abstract: "Change the running migration's downtime target or bandwidth cap (QEMU's migrate-set-parameters).",
        discussion: "The target counts from the next round's decision, the cap from the next frame; the stop-and-copy always goes uncapped.")
    @OptionGroup var api: APIOptions

    @Option(help: "New downtime target in milliseconds.")
    var maxDowntime: Double?

    @Option(help: "New cap on bytes per second (K, M, G decimal; at least 1M), or 'unlimited'.")
    var bandwidth: String?

    func validate() throws {
        guard maxDowntime != nil || bandwidth != nil else { throw ValidationError("give --max-downtime, --bandwidth or both") }
        if let maxDowntime, !(maxDowntime > 0) { throw ValidationError("--max-downtime must be positive") }
        if let bandwidth, bandwidth != "unlimited", try Migrate.parseRate(bandwidth) < MigrateRequest.minimumBandwidth {
            throw ValidationError("--bandwidth must be at least 1M (1,000,000 bytes per second), or 'unlimited'")
        }
    }

    func run() throws {
        let request = MigrationLimitsRequest(maxDowntimeMs: maxDowntime,
                                             bandwidth: try bandwidth.map { $0 == "unlimited" ? 0 : try Migrate.parseRate($0) })
        let response = try call(api.client, .PUT, "/v1/vm/migration/parameters", body: try APIJSON.encoder.encode(request), expecting: 200)
        let report = try APIJSON.decoder.decode(MigrationReport.self, from: response.body)
        printAnswer(response.body, json: api.json) {
            let cap = report.bandwidthLimit.map { String(format: "%.1f MB/s", Double($0) / 1e6) } ?? "none"
            return "max downtime \(String(format: "%.1f", report.maxDowntimeMs)) ms, bandwidth cap \(cap)"
        }
    }
}

struct MigratePostcopy: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate-postcopy",
        abstract: "Switch a migration started with --mode hybrid or auto to post-copy now (QEMU's migrate-start-postcopy).",
        discussion: "The pre-copy round under way stops after the frame it is writing; the VM moves to the destination, which pulls what is left.")
    @OptionGroup var api: APIOptions
    func run() throws { _ = try call(api.client, .PUT, "/v1/vm/migration/postcopy", expecting: 202) }
}

struct MigrateCancel: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "migrate-cancel", abstract: "Cancel a VM's migration; it keeps running here.")
    @OptionGroup var api: APIOptions
    func run() throws { _ = try call(api.client, .PUT, "/v1/vm/migration/cancel", expecting: 202) }
}

/// One line of progress on stderr, rewritten in place on a terminal.
final class ProgressPrinter: @unchecked Sendable {
    let enabled: Bool
    let terminal = isatty(2) != 0
    var lastLine = ""
    var lastPrint = Date.distantPast

    init(enabled: Bool) { self.enabled = enabled }

    func show(_ report: MigrationReport) {
        guard enabled else { return }
        var line = "\(report.status.rawValue)"
        if let round = report.currentRound { line += " round \(round)" }
        if let percent = report.roundPercent { line += String(format: " %3.0f%%", percent) }
        line += String(format: "  %.1f MB sent", Double(report.transferredBytes) / 1e6)
        if let disks = report.storage?.disks, !disks.isEmpty {
            line += String(format: " (disks %.1f MB)", Double(disks.reduce(0) { $0 + $1.bytes }) / 1e6)
        }
        if report.status == .postcopy {
            line += "  pushing the pages still owed; the VM runs at the destination"
        } else if let last = report.rounds.last {
            line += String(format: "  %.0f MB/s  dirty %llu pages  predicted downtime %.0f ms", last.throughputMBps, last.dirtyPages, last.predictedDowntimeMs)
        }
        if terminal {
            FileHandle.standardError.write(Data(("\r\u{1B}[K" + line).utf8))
        } else if line != lastLine && Date().timeIntervalSince(lastPrint) >= 1 {
            FileHandle.standardError.write(Data((line + "\n").utf8))
            lastPrint = Date()
        }
        lastLine = line
    }

    func finish() {
        if enabled && terminal { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}

enum MigrationTable {
    static func render(_ r: MigrationReport) -> String {
        func ms(_ value: Double?) -> String { value.map { String(format: "%.1f ms", $0) } ?? "-" }
        var rows: [(String, String)] = [
            ("status", r.status.rawValue + (r.reason.map { " (\($0))" } ?? "")),
            ("mode", r.mode),
            ("destination", r.destination),
            ("channel", r.channel.map { channel in
                channel.transport == "tls"
                    ? "\(channel.tlsVersion ?? "TLS") \(channel.cipher ?? ""), peer '\(channel.peer ?? "")'\(channel.tokenID.map { ", token \($0)" } ?? "")"
                    : r.destination.hasPrefix("tcp:") ? "plaintext (unencrypted, --insecure)" : "plaintext (unix socket)"
            } ?? "-"),
            ("total", ms(r.totalMs)),
            ("setup", ms(r.setupMs)),
            ("downtime", ms(r.downtimeMs) + (r.downtimeClock.map { " (\($0) clock; upper bound \(ms(r.downtimeUpperBoundMs)))" } ?? "")),
            ("switch-over", r.switchoverReason ?? "-"),
            ("transferred", String(format: "%.1f MB", Double(r.transferredBytes) / 1e6)),
            ("ram", String(format: "%.1f MB", Double(r.ramBytes) / 1e6)),
            ("pages", "\(r.dataPages) data, \(r.zeroPages) zero"),
            ("throughput", String(format: "%.0f MB/s", r.throughputMBps)),
            ("max downtime", ms(r.maxDowntimeMs)),
        ]
        rows.append(("compression", r.compression))
        if let input = r.zstdInputBytes, let output = r.zstdOutputBytes {
            rows.append(("zstd", String(format: "%.1f MB compressed to %.1f MB; %llu frames sent raw untried (they did not compress)",
                                        Double(input) / 1e6, Double(output) / 1e6, r.zstdSkippedFrames ?? 0)))
        }
        rows.append(("order", r.order))
        rows.append(("re-sent pages", "\(r.resentPages) after the first pass"))
        if let held = r.heldBackPages { rows.append(("held back", "\(held) hot pages, sent once in the stop-and-copy")) }
        if let unchanged = r.unchangedPages, unchanged > 0 {
            rows.append(("unchanged", "\(unchanged) pages the dirty log named held what was sent: not sent again"))
        }
        if let x = r.xbzrle {
            rows.append(("xbzrle", String(format: "%llu delta pages; cache %.0f MB: %llu hits, %llu misses, %llu overflows; %.1f MB saved",
                                          r.deltaPages ?? 0, Double(x.cacheBytes) / 1e6, x.hits, x.misses, x.overflows, Double(x.bytesSaved) / 1e6)))
        }
        if let moved = r.executionMovedAtMs { rows.append(("execution moved", "at " + ms(moved))) }
        if let complete = r.memoryCompleteAtMs { rows.append(("memory complete", "at " + ms(complete))) }
        if let p = r.postcopy {
            rows.append(("post-copy pages", "\(r.postcopyPagesSent ?? 0) sent: \(p.pagesPushed) pushed, \(p.pagesPulled) pulled on demand, \(p.pagesZeroFilledLocally) zero-filled at the destination"))
            if let byStream = r.postcopyPagesByStream, byStream.count > 1 {
                rows.append(("post-copy streams", byStream.map(String.init).joined(separator: " + ") + " pages"))
            }
            if let resent = r.postcopyPagesResent, resent > 0 {
                rows.append(("sent twice", "\(resent) pages asked for while their pushed copy was on its way (the first to land was kept)"))
            }
            rows.append(("faults", String(format: "%llu (%llu requests); latency p50 %.3f ms, p99 %.3f ms, max %.3f ms",
                                         p.faults, p.requests, p.faultLatencyP50Ms, p.faultLatencyP99Ms, p.faultLatencyMaxMs)))
        }
        if let limit = r.bandwidthLimit { rows.append(("bandwidth cap", String(format: "%.1f MB/s", Double(limit) / 1e6))) }
        if let storage = r.storage {
            rows.append(("storage", storage.mode.rawValue + (storage.mirror.map {
                $0 == .sync ? ", writes during the copy mirrored synchronously" : ", writes during the copy re-sent by rounds" } ?? "")))
            for disk in storage.disks {
                rows.append(("disk \(disk.id)", String(format: "%.1f MB sent for %.1f MB: %llu blocks, %llu zero blocks; changed after each round: ",
                                                    Double(disk.bytes) / 1e6, Double(disk.sizeBytes) / 1e6, disk.blocks, disk.zeroBlocks)
                                             + disk.dirtyBlocksPerRound.map(String.init).joined(separator: ", ")
                                             + (disk.mirroredWrites.map { "; \($0) writes mirrored" } ?? "")))
            }
        }
        if let v = r.verification {
            let disks = r.storage?.sourceDigests.map { ", disks " + $0.joined(separator: ", ") } ?? ""
            rows.append(("verify", v.match ? "memory \(v.sourceMemoryDigest)\(disks) and state \(v.sourceStateDigest) match on both sides"
                                           : "MISMATCH: memory \(v.sourceMemoryDigest) vs \(v.destinationMemoryDigest), state \(v.sourceStateDigest) vs \(v.destinationStateDigest)"))
        }
        let width = rows.map(\.0.count).max() ?? 0
        var text = rows.map { $0.0.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + $0.1 }.joined(separator: "\n")
        if !r.rounds.isEmpty {
            text += "\n\nround      pages       zero        MB   dirty after   ms      MB/s   dirty pages/s   predicted ms\n"
            for round in r.rounds {
                text += String(format: "%5d %10llu %10llu %9.1f %13llu %6.0f %9.0f %15.0f %14.1f\n", round.round, round.pages, round.zeroPages,
                               Double(round.bytes) / 1e6, round.dirtyPages, round.durationMs, round.throughputMBps,
                               round.dirtyRatePagesPerSecond, round.predictedDowntimeMs)
            }
        }
        return text
    }
}
