/// The status block Tern's bundled test guest publishes in its memory
/// (docs/GUEST.md): how far its workload got and a checksum of its working
/// set. Tests, benchmarks and migration checks read it through guest memory.
public struct TestGuestStatus: Equatable, Sendable, Codable {
    public static let address = GuestAddress(0x102000)
    public static let magic: UInt64 = 0x5441_5453_4E52_4554 // "TERNSTAT"
    /// Version 3 (the guest's own stall, TCP) ends at 0x150; older blocks read zeros past their end
    /// (version 2 ends at 0x110, version 1 at 0xA0).
    public static let size = 0x150

    public enum Phase: UInt32, Codable, Sendable {
        case boot = 0, fill = 1, dirty = 2, idle = 3, error = 0xE, crashed = 0xF
    }

    public var version: UInt32
    public var phase: Phase?
    public var iterations: UInt64
    public var tsc: UInt64
    public var tscKHz: UInt64
    public var checksum: UInt64
    public var passes: UInt64
    public var verified: UInt64
    public var errors: UInt64
    public var workBase: UInt64
    public var workBytes: UInt64
    public var fillBytes: UInt64
    public var ramBytes: UInt64
    public var exceptionVector: UInt64
    public var exceptionRIP: UInt64
    /// Version 2: the disk and network workloads (docs/GUEST.md).
    public var diskOps: UInt64
    /// Blocks whose contents did not match the tag the guest kept, plus requests the device failed.
    public var diskErrors: UInt64
    public var diskVerified: UInt64
    public var netReceived: UInt64
    public var netSent: UInt64
    public var diskWrites: UInt64
    public var diskReads: UInt64
    public var diskFlushes: UInt64
    public var diskBytes: UInt64
    public var diskCapacity: UInt64
    public var diskState: DeviceState?
    public var netState: DeviceState?
    public var netAnnouncements: UInt64
    /// Version 3: the largest TSC gap between two turns of the guest's loops, and the TSC at its end.
    public var maxStallTicks: UInt64
    public var maxStallEndTSC: UInt64
    /// Version 3: the TCP echo service (port 7).
    public var tcpReceived: UInt64
    public var tcpSent: UInt64
    public var tcpRetransmits: UInt64
    public var tcpAccepted: UInt64
    public var tcpResets: UInt64
    public var tcpDropped: UInt64

    /// The guest's own longest stall in milliseconds, on its TSC.
    public var maxStallMs: Double { tscKHz > 0 ? Double(maxStallTicks) / Double(tscKHz) : 0 }

    public enum DeviceState: UInt32, Codable, Sendable {
        case off = 0, running = 1, failed = 2
    }

    /// Decodes a status block; nil until the guest has published one (magic written last).
    public init?(bytes: [UInt8]) {
        let r = ByteReader(bytes: bytes)
        guard r.u64(at: 0) == Self.magic, let version = r.u32(at: 8), let phase = r.u32(at: 0x0C),
              let exceptionRIP = r.u64(at: 0x88) else { return nil }
        self.version = version
        self.phase = Phase(rawValue: phase)
        iterations = r.u64(at: 0x10)!
        tsc = r.u64(at: 0x18)!
        tscKHz = r.u64(at: 0x20)!
        checksum = r.u64(at: 0x28)!
        passes = r.u64(at: 0x30)!
        verified = r.u64(at: 0x38)!
        errors = r.u64(at: 0x40)!
        workBase = r.u64(at: 0x48)!
        workBytes = r.u64(at: 0x50)!
        fillBytes = r.u64(at: 0x58)!
        ramBytes = r.u64(at: 0x60)!
        exceptionVector = r.u64(at: 0x80)!
        self.exceptionRIP = exceptionRIP
        let word = { (offset: Int) in r.u64(at: offset) ?? 0 }
        diskOps = word(0xA0)
        diskErrors = word(0xA8)
        diskVerified = word(0xB0)
        netReceived = word(0xB8)
        netSent = word(0xC0)
        diskWrites = word(0xC8)
        diskReads = word(0xD0)
        diskFlushes = word(0xD8)
        diskBytes = word(0xE0)
        diskCapacity = word(0xE8)
        diskState = DeviceState(rawValue: r.u32(at: 0xF0) ?? 0)
        netState = DeviceState(rawValue: r.u32(at: 0xF4) ?? 0)
        netAnnouncements = word(0xF8)
        maxStallTicks = word(0x110)
        maxStallEndTSC = word(0x118)
        tcpReceived = word(0x120)
        tcpSent = word(0x128)
        tcpRetransmits = word(0x130)
        tcpAccepted = word(0x138)
        tcpResets = word(0x140)
        tcpDropped = word(0x148)
    }
}
