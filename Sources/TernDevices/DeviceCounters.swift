import Synchronization

/// Counts of what a device did, by kind, with the bytes moved: for `tern info`, tests and metrics.
public final class DeviceCounters<Kind: CaseIterable & RawRepresentable & Sendable>: Sendable where Kind.RawValue == Int {
    private let counts = Mutex<[Int]>([Int](repeating: 0, count: Kind.allCases.count))
    private let moved = Mutex<(in: Int, out: Int)>((0, 0))

    public init() {}

    /// One more `kind`; `bytesIn` into guest memory, `bytesOut` out of it.
    func count(_ kind: Kind, bytesIn: Int = 0, bytesOut: Int = 0) {
        counts.withLock { $0[kind.rawValue] += 1 }
        if bytesIn != 0 || bytesOut != 0 { moved.withLock { $0.in += bytesIn; $0.out += bytesOut } }
    }

    public func count(of kind: Kind) -> Int { counts.withLock { $0[kind.rawValue] } }
    /// Bytes the device put into guest memory (a disk's reads, a NIC's received frames).
    public var bytesIn: Int { moved.withLock { $0.in } }
    /// Bytes the device took from guest memory (a disk's writes, a NIC's sent frames).
    public var bytesOut: Int { moved.withLock { $0.out } }
}

/// What a block device's requests were.
public enum BlockRequestKind: Int, CaseIterable, Sendable {
    case read, write, flush, discard, writeZeroes, failed, malformed
}

/// What a network device did with a frame.
public enum NetworkFrameKind: Int, CaseIterable, Sendable {
    case received, sent, dropped
}
