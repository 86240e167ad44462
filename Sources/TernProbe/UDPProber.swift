import Foundation
import Glibc
import Synchronization
import TernKVM

/// Sends numbered UDP echo requests at a fixed interval and records when each went and when its
/// echo came back: the raw material of `ProbeAnalysis`. One thread sends on an absolute schedule,
/// another receives, so a slow reply never delays the next probe.
public struct UDPProber: Sendable {
    public struct Options: Sendable {
        public var host: String
        public var port: UInt16 = 7
        public var intervalNs: UInt64 = 1_000_000
        public var count: Int
        /// Bytes of UDP payload per probe (at least the 24-byte header).
        public var size: Int = 64
        /// How long to wait for echoes after the last probe.
        public var graceNs: UInt64 = 1_000_000_000

        public init(host: String, count: Int) {
            self.host = host
            self.count = count
        }
    }

    public struct Invalid: Error, CustomStringConvertible {
        public let description: String
    }

    public struct Run: Sendable {
        public var sentNs: [UInt64]
        public var replies: [ProbeAnalysis.Reply]
        /// When the last probe's reply was due: its send plus one interval.
        public var endNs: UInt64
        /// Sends the kernel refused (an ICMP error already back for the address, no route).
        public var sendErrors: Int
        public func analysis(switchover: ClosedRange<UInt64>? = nil) -> ProbeAnalysis {
            ProbeAnalysis(sentNs: sentNs, replies: replies, endNs: endNs, switchover: switchover)
        }
    }

    static let magic: UInt64 = 0x4542_4F52_504E_5254 // "TRNPROBE"
    static let headerSize = 24
    public static let maxCount = 10_000_000

    public let options: Options
    private let address: sockaddr_in

    public init(_ options: Options) throws {
        guard options.count > 0 && options.count <= Self.maxCount else {
            throw Invalid(description: "the probe count must be 1-\(Self.maxCount), not \(options.count)")
        }
        guard options.intervalNs >= 10_000 && options.intervalNs <= 60_000_000_000 else {
            throw Invalid(description: "the interval must be 10 µs to 60 s")
        }
        guard options.size >= Self.headerSize && options.size <= 65_507 else {
            throw Invalid(description: "the probe size must be \(Self.headerSize)-65507 bytes, not \(options.size)")
        }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = options.port.bigEndian
        guard inet_pton(AF_INET, options.host, &address.sin_addr) == 1 else {
            throw Invalid(description: "'\(options.host)' is not an IPv4 address")
        }
        self.options = options
        self.address = address
    }

    /// Probes until the count is sent and the grace time has passed; blocks the calling thread.
    public func run() throws -> Run {
        let socket = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard socket >= 0 else { throw SystemError("socket", errno: errno) }
        defer { close(socket) }
        var target = address
        let connected = withUnsafePointer(to: &target) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(socket, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { throw SystemError("connect to \(options.host):\(options.port)", errno: errno) }
        var timeout = timeval(tv_sec: 0, tv_usec: 50_000)
        setsockopt(socket, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var buffer: Int32 = 4 << 20
        setsockopt(socket, SOL_SOCKET, SO_RCVBUF, &buffer, socklen_t(MemoryLayout<Int32>.size))

        // A run id in every probe: echoes of an earlier run still in flight are not this run's replies.
        let runID = UInt64.random(in: 1...UInt64.max)
        let replies = Mutex<[ProbeAnalysis.Reply]>([])
        let stopAtNs = Atomic<UInt64>(UInt64.max)
        let received = DispatchSemaphore(value: 0)
        let size = options.size, count = options.count
        spawnThread(named: "probe-recv") {
            makeCurrentThreadLatencyCritical()
            var bytes = [UInt8](repeating: 0, count: max(size, 2048))
            while Self.realtimeNs() < stopAtNs.load(ordering: .acquiring) {
                let got = bytes.withUnsafeMutableBytes { recv(socket, $0.baseAddress, $0.count, 0) }
                guard got >= Self.headerSize else { continue }
                let arrived = Self.realtimeNs()
                let (magic, run, sequence) = bytes.withUnsafeBytes {
                    ($0.loadUnaligned(fromByteOffset: 0, as: UInt64.self), $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self),
                     $0.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
                }
                guard magic == Self.magic, run == runID, sequence < UInt64(count) else { continue }
                replies.withLock { $0.append(.init(sequence: Int(sequence), arrivedNs: arrived)) }
            }
            received.signal()
        }

        makeCurrentThreadLatencyCritical()
        var sentNs = [UInt64](repeating: 0, count: count)
        var sendErrors = 0
        var probe = [UInt8](repeating: 0, count: size)
        var next = timespec()
        clock_gettime(CLOCK_MONOTONIC, &next)
        for sequence in 0..<count {
            probe.withUnsafeMutableBytes {
                $0.storeBytes(of: Self.magic, toByteOffset: 0, as: UInt64.self)
                $0.storeBytes(of: runID, toByteOffset: 8, as: UInt64.self)
                $0.storeBytes(of: UInt64(sequence), toByteOffset: 16, as: UInt64.self)
            }
            sentNs[sequence] = Self.realtimeNs()
            if probe.withUnsafeBytes({ send(socket, $0.baseAddress, $0.count, 0) }) < 0 { sendErrors += 1 }
            // An absolute schedule: a late wake-up sends the next probe at once rather than shifting the rest.
            let ns = UInt64(next.tv_nsec) + options.intervalNs
            next.tv_sec += Int(ns / 1_000_000_000)
            next.tv_nsec = Int(ns % 1_000_000_000)
            while clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, nil) == EINTR {}
        }
        let endNs = sentNs[count - 1] + options.intervalNs
        stopAtNs.store(sentNs[count - 1] + options.graceNs, ordering: .releasing)
        received.wait()
        return Run(sentNs: sentNs, replies: replies.withLock { $0 }, endNs: endNs, sendErrors: sendErrors)
    }

    static func realtimeNs() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}
