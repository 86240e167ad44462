import Foundation
import TernKVM
import TernMachine
import TernWire

/// The opening message: who is talking, what protocol, and what machine is
/// about to arrive, so the destination can refuse before a byte of memory moves.
public struct Hello: Equatable, Sendable {
    public static let magic = Array("TERNMIG\u{0}".utf8)
    public static let protocolVersion: UInt32 = 7
    /// Feature bit: pages frames may be zstd-compressed (`--compress zstd`).
    public static let zstdFeature: UInt64 = 1 << 0
    /// Feature bit: post-copy from the start (`--mode postcopy`): no pre-copy pages will come.
    public static let postcopyFirstFeature: UInt64 = 1 << 1
    /// Feature bit: the source may switch to post-copy and opens a connection for demand replies alone.
    /// On it, a request for a page already pushed is answered with a second copy (the first to land wins).
    public static let postcopyUrgentFeature: UInt64 = 1 << 2
    /// Feature bit: the end will ask for digests (`--verify`): keep each page's CRC as it arrives.
    public static let verifyFeature: UInt64 = 1 << 3
    /// Feature bit: `--storage-mirror sync`: the disks' blocks come on a connection of their own, and guest writes are acknowledged.
    public static let syncMirrorFeature: UInt64 = 1 << 4
    /// At most this many parallel page streams.
    public static let maximumStreams = 16

    public var protocolVersion: UInt32
    public var features: UInt64
    public var bootID: String
    public var machine: MachineDescription
    /// The CPUID the guest was given; the destination's KVM must support every feature in it.
    public var cpuid: [CPUIDEntry]
    /// Tags of the device state sections that will follow.
    public var devices: [String]
    /// Page streams: the control connection plus `streams - 1` extra connections.
    public var streams: UInt32
    /// The migration token (`tern migrate --token`), a signed JWT; empty: none.
    public var authorization: String = ""
    public static let maximumAuthorizationBytes = 4096
    /// How the disks move, and their sizes.
    public var storage = StorageAnnouncement()
    /// How the destination announces the VM's NICs once it runs there.
    public var announce = AnnounceSchedule()

    public init(features: UInt64 = 0, bootID: String, machine: MachineDescription, cpuid: [CPUIDEntry], devices: [String], streams: UInt32 = 1,
                authorization: String = "") {
        self.authorization = authorization
        self.protocolVersion = Self.protocolVersion
        self.features = features
        self.bootID = bootID
        self.machine = machine
        self.cpuid = cpuid
        self.devices = devices
        self.streams = streams
    }

    public var encoded: [UInt8] {
        var w = WireWriter()
        w.write(Self.magic)
        w.write(protocolVersion)
        w.write(features)
        w.writeString(bootID)
        w.writeBlob(machine.section.encoded)
        w.write(UInt32(cpuid.count))
        for e in cpuid { for field in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] { w.write(field) } }
        w.write(UInt32(devices.count))
        for device in devices { w.writeString(device) }
        w.write(streams)
        w.writeString(authorization)
        storage.encode(into: &w)
        announce.encode(into: &w)
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "hello")
        guard bytes.count >= 8, try r.readBytes(8) == Self.magic else { throw .badMagic("the peer is not a Tern migration source") }
        protocolVersion = try r.read()
        guard protocolVersion == Self.protocolVersion else {
            throw .unsupportedVersion("migration protocol \(protocolVersion); this tern speaks \(Self.protocolVersion)")
        }
        features = try r.read()
        bootID = try r.readString(maximum: 64)
        machine = try MachineDescription(section: StateSection(decoding: r.readBlob(maximum: 1 << 16)))
        let count = Int(try r.read(UInt32.self))
        guard count <= 1024 else { throw .tooLarge("hello: \(count) CPUID entries") }
        var cpuid: [CPUIDEntry] = []
        for _ in 0..<count {
            cpuid.append(CPUIDEntry(function: try r.read(), index: try r.read(), flags: try r.read(),
                                    eax: try r.read(), ebx: try r.read(), ecx: try r.read(), edx: try r.read()))
        }
        self.cpuid = cpuid
        let deviceCount = Int(try r.read(UInt32.self))
        guard deviceCount <= 256 else { throw .tooLarge("hello: \(deviceCount) devices") }
        var devices: [String] = []
        for _ in 0..<deviceCount { devices.append(try r.readString(maximum: 16)) }
        self.devices = devices
        streams = try r.read()
        guard streams >= 1, streams <= Self.maximumStreams else { throw .malformed("hello: \(streams) page streams (1 to \(Self.maximumStreams) allowed)") }
        authorization = try r.readString(maximum: Self.maximumAuthorizationBytes)
        storage = try StorageAnnouncement(reading: &r)
        announce = try AnnounceSchedule(reading: &r)
        try r.expectEnd()
    }
}

/// A yes/no answer with a reason (hello reply, ready).
public struct Verdict: Equatable, Sendable {
    public var accepted: Bool
    public var reason: String
    /// Ready carries the destination's own digests when --verify asked for them.
    public var memoryDigest: UInt64?
    public var stateDigest: UInt64?
    public var bootID: String
    /// Hello reply: the token extra page streams present to join this migration.
    public var token: UInt64 = 0
    /// Hello reply: the id of the migration token the destination accepted ("" if it asks for none).
    public var tokenID: String = ""
    /// Ready, with --verify and `--storage copy`: the digest of each disk as received, in the hello's order.
    public var diskDigests: [UInt64] = []

    public init(accepted: Bool, reason: String = "", memoryDigest: UInt64? = nil, stateDigest: UInt64? = nil, bootID: String = "", token: UInt64 = 0,
                tokenID: String = "") {
        self.tokenID = tokenID
        self.token = token
        self.accepted = accepted
        self.reason = reason
        self.memoryDigest = memoryDigest
        self.stateDigest = stateDigest
        self.bootID = bootID
    }

    public var encoded: [UInt8] {
        var w = WireWriter()
        w.write(UInt8(accepted ? 1 : 0))
        w.writeString(reason)
        w.write(UInt8(memoryDigest == nil ? 0 : 1)); w.write(memoryDigest ?? 0)
        w.write(UInt8(stateDigest == nil ? 0 : 1)); w.write(stateDigest ?? 0)
        w.writeString(bootID)
        w.write(token)
        w.writeString(tokenID)
        w.write(UInt32(diskDigests.count))
        for digest in diskDigests { w.write(digest) }
        return w.bytes
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "verdict")
        accepted = try r.read(UInt8.self) == 1
        reason = try r.readString(maximum: 4096)
        let hasMemory = try r.read(UInt8.self) == 1, memory = try r.read(UInt64.self)
        let hasState = try r.read(UInt8.self) == 1, state = try r.read(UInt64.self)
        memoryDigest = hasMemory ? memory : nil
        stateDigest = hasState ? state : nil
        bootID = try r.readString(maximum: 64)
        token = try r.read()
        tokenID = try r.readString(maximum: 256)
        let disks = Int(try r.read(UInt32.self))
        guard disks <= 16 else { throw .tooLarge("verdict: \(disks) disk digests") }
        diskDigests = try (0..<disks).map { _ throws(WireError) in try r.read(UInt64.self) }
        try r.expectEnd()
    }
}

/// The end of the stop-and-copy: when the source paused and what it sent.
public struct Completion: Equatable, Sendable {
    public var pausedMonotonicNs: UInt64
    public var pausedRealtimeNs: UInt64
    public var memoryDigest: UInt64?
    public var stateDigest: UInt64?

    public var encoded: [UInt8] {
        var w = WireWriter()
        w.write(pausedMonotonicNs)
        w.write(pausedRealtimeNs)
        w.write(UInt8(memoryDigest == nil ? 0 : 1)); w.write(memoryDigest ?? 0)
        w.write(UInt8(stateDigest == nil ? 0 : 1)); w.write(stateDigest ?? 0)
        return w.bytes
    }

    public init(pausedMonotonicNs: UInt64, pausedRealtimeNs: UInt64, memoryDigest: UInt64?, stateDigest: UInt64?) {
        self.pausedMonotonicNs = pausedMonotonicNs
        self.pausedRealtimeNs = pausedRealtimeNs
        self.memoryDigest = memoryDigest
        self.stateDigest = stateDigest
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "end of migration")
        pausedMonotonicNs = try r.read()
        pausedRealtimeNs = try r.read()
        let hasMemory = try r.read(UInt8.self) == 1, memory = try r.read(UInt64.self)
        let hasState = try r.read(UInt8.self) == 1, state = try r.read(UInt64.self)
        memoryDigest = hasMemory ? memory : nil
        stateDigest = hasState ? state : nil
        try r.expectEnd()
    }
}

/// When the destination's vCPUs started.
public struct Resumed: Equatable, Sendable {
    public var monotonicNs: UInt64
    public var realtimeNs: UInt64

    public var encoded: [UInt8] {
        var w = WireWriter()
        w.write(monotonicNs)
        w.write(realtimeNs)
        return w.bytes
    }

    public init(monotonicNs: UInt64, realtimeNs: UInt64) {
        self.monotonicNs = monotonicNs
        self.realtimeNs = realtimeNs
    }

    public init(decoding bytes: [UInt8]) throws(WireError) {
        var r = WireReader(bytes, context: "resumed")
        monotonicNs = try r.read()
        realtimeNs = try r.read()
        try r.expectEnd()
    }
}

/// Clocks both ends of a migration on one host share (docs/MIGRATION.md, "downtime").
public enum Clocks {
    public static func monotonicNs() -> UInt64 { now(CLOCK_MONOTONIC) }
    public static func realtimeNs() -> UInt64 { now(CLOCK_REALTIME) }

    private static func now(_ clock: clockid_t) -> UInt64 {
        var ts = timespec()
        clock_gettime(clock, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// A signed interval in milliseconds between two clock readings (one of which a peer sent: no trap on odd values).
    public static func milliseconds(from start: UInt64, to end: UInt64) -> Double {
        end >= start ? Double(end - start) / 1e6 : -Double(start - end) / 1e6
    }

    /// Identifies this boot of this kernel: equal on both sides means one host, one monotonic clock.
    public static let bootID: String = {
        (try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8))?
            .trimmingCharacters(in: .whitespacesAndNewlines) ?? "unknown"
    }()
}

/// The `go` frame's payload: the source's commit, and the VM's run state at the switch. A VM someone
/// paused (before or during the migration) stays paused at the destination, as QEMU's global state
/// keeps a stopped VM stopped, until it is resumed there. An empty payload means run.
public struct Go: Equatable, Sendable {
    public var keepPaused: Bool
    public init(keepPaused: Bool) { self.keepPaused = keepPaused }
    public var encoded: [UInt8] { [keepPaused ? 1 : 0] }
    public init(decoding bytes: [UInt8]) throws {
        guard bytes.count <= 1, (bytes.first ?? 0) <= 1 else { throw WireError.malformed("a go frame of \(bytes.count) bytes") }
        keepPaused = bytes.first == 1
    }
}
