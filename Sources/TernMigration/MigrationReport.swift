/// What a migration did, measured: the report `tern migrate` prints and
/// `--json` emits (snake_case through the API's encoder).
import TernMachine

public struct MigrationReport: Codable, Equatable, Sendable {
    public enum Status: String, Codable, Sendable {
        case setup, precopy, stopAndCopy = "stop-and-copy", postcopy, completing, completed, failed, cancelled
        /// Post-copy's connection dropped: the VM runs at the destination, its missing pages are here; `--resume` goes on.
        case postcopyPaused = "postcopy-paused"
        public var isTerminal: Bool { self == .completed || self == .failed || self == .cancelled || self == .postcopyPaused }
    }

    public struct Round: Codable, Equatable, Sendable {
        public var round: Int
        public var pages: UInt64
        public var zeroPages: UInt64
        public var bytes: UInt64
        /// Pages the dirty log reported after this round (what the next round must send).
        public var dirtyPages: UInt64
        public var durationMs: Double
        public var throughputMBps: Double
        /// The guest's dirty rate during the round, pages written per second.
        public var dirtyRatePagesPerSecond: Double
        /// Predicted stop-and-copy time if the switch happened after this round.
        public var predictedDowntimeMs: Double
    }

    public struct Verification: Codable, Equatable, Sendable {
        public var sourceMemoryDigest: String
        public var destinationMemoryDigest: String
        public var sourceStateDigest: String
        public var destinationStateDigest: String
        public var match: Bool
    }

    public var status: Status
    public var mode: String = "precopy"
    public var destination: String
    /// How the connections were protected (TLS version, cipher, the peer's certificate name), once connected.
    public var channel: ChannelReport?
    public var reason: String?
    public var switchoverReason: String?
    public var totalMs: Double = 0
    public var setupMs: Double = 0
    /// Round-trip time to the destination, measured before the first page.
    public var roundTripMs: Double?
    public var downtimeMs: Double?
    /// How downtime was measured: "shared-monotonic" (one host), "realtime" (two hosts, NTP-bound accuracy).
    public var downtimeClock: String?
    /// Source pause to the destination's "resumed" arriving: an upper bound on any host.
    public var downtimeUpperBoundMs: Double?
    /// The switch-over on the realtime clock, in Unix milliseconds: when the source paused the VM and when
    /// the destination resumed it. Outside measures (`tern probe`) set their gaps beside these.
    public var pausedAtUnixMs: Double?
    public var resumedAtUnixMs: Double?
    public var transferredBytes: UInt64 = 0
    public var ramBytes: UInt64
    public var dataPages: UInt64 = 0
    public var zeroPages: UInt64 = 0
    public var throughputMBps: Double = 0
    public var maxDowntimeMs: Double
    public var bandwidthLimit: UInt64?
    public var rounds: [Round] = []
    /// "none", "xbzrle", "zstd" or "xbzrle,zstd".
    public var compression: String = "none"
    /// zstd: payload bytes of the frames it shrank, before and after.
    public var zstdInputBytes: UInt64?
    public var zstdOutputBytes: UInt64?
    /// zstd: frames sent raw without trying, while frames before them did not compress.
    public var zstdSkippedFrames: UInt64?
    /// "sequential" or "dirty-frequency".
    public var order: String = PageOrder.dirtyFrequency.rawValue
    /// Parallel page streams used during pre-copy.
    public var streams: Int = 1
    /// Pages sent again after the first pass (what ordering and convergence try to keep small).
    public var resentPages: UInt64 = 0
    /// Pages the first pass sent again at its end to measure what a re-sent page costs: in `resentPages`, and in round 0's bytes but not its pages.
    public var resendProbePages: UInt64?
    /// Dirty-frequency ordering: hot pages held back from the last pre-copy round for the stop-and-copy.
    public var heldBackPages: UInt64?
    /// Pages sent as XBZRLE deltas, and the cache's account (hits, misses, overflows, bytes saved).
    public var deltaPages: UInt64?
    public var xbzrle: XBZRLECache.Statistics?
    /// Pages the dirty log named that still held what was sent: not sent again (docs/MIGRATION.md, "Pages that did not change").
    public var unchangedPages: UInt64?
    /// Post-copy and hybrid: when execution moved to the destination, and when it held all memory (ms from the start).
    public var executionMovedAtMs: Double?
    public var memoryCompleteAtMs: Double?
    /// Pages sent after execution moved (pushed or on demand), each counted once.
    public var postcopyPagesSent: UInt64?
    /// Of those, pages sent a second time: asked for while their pushed copy was on its way.
    public var postcopyPagesResent: UInt64?
    /// Pages each connection carried after execution moved: the control connection (pushed, and demand
    /// replies when there is no demand channel), then each extra page stream's push (`--streams`).
    public var postcopyPagesByStream: [UInt64]?
    /// The destination's account of post-copy: faults, fault latency, pushed vs pulled pages.
    public var postcopy: PostcopyStatistics?
    public var verification: Verification?
    /// The VM's disks: shared, or copied with their account (bytes, blocks, zero blocks, dirty blocks per round).
    public var storage: StorageReport?
    /// Live progress while running: the round being sent and how far it got.
    public var currentRound: Int?
    public var roundPercent: Double?
}

/// How a migration moves the VM (docs/MIGRATION.md).
public enum MigrationMode: String, Codable, Sendable, CaseIterable {
    /// Copy memory while the guest runs, then a short stop-and-copy.
    case precopy
    /// Move execution first, then memory (on demand and pushed).
    case postcopy
    /// Some pre-copy rounds, then post-copy.
    case hybrid
    /// Pre-copy, switching to post-copy by itself when it cannot meet the downtime target.
    case auto
}

/// In which order pre-copy sends pages.
public enum PageOrder: String, Codable, Sendable, CaseIterable {
    case sequential
    /// Least-often dirtied pages first, hot pages last (Svärd et al., CloudCom 2011).
    case dirtyFrequency = "dirty-frequency"
}

/// `--compress`: none, or any of xbzrle and zstd, comma-separated ("xbzrle,zstd").
public struct CompressionChoice: Equatable, Sendable, CustomStringConvertible {
    public var xbzrle = false
    public var zstd = false

    public init(xbzrle: Bool = false, zstd: Bool = false) {
        self.xbzrle = xbzrle
        self.zstd = zstd
    }

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public init(parsing text: String) throws {
        guard text != "none" else { return }
        for name in text.split(separator: ",", omittingEmptySubsequences: false) {
            switch name {
            case "xbzrle": xbzrle = true
            case "zstd": zstd = true
            default: throw Invalid(description: "unknown compression '\(name)' (none, xbzrle, zstd, or xbzrle,zstd)")
            }
        }
    }

    public var description: String {
        let names = (xbzrle ? ["xbzrle"] : []) + (zstd ? ["zstd"] : [])
        return names.isEmpty ? "none" : names.joined(separator: ",")
    }
}
