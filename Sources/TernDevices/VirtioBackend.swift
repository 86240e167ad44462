/// Device types of the virtio spec (5 "Device Types") that Tern implements.
public enum VirtioDeviceType: UInt32, Sendable {
    case network = 1
    case block = 2
}

/// Feature bits common to every device (virtio 1.x, 6 "Reserved Feature Bits").
public enum VirtioFeature {
    /// A virtio 1.x device (the MMIO transport's version 2); a driver that does not accept it is refused.
    public static let version1: UInt64 = 1 << 32
}

/// What makes a virtio device a block or a network device: its ID, features,
/// configuration space, and how it serves its queues. The transport
/// (`VirtioMmioDevice`) does the rest: registers, feature negotiation, queue
/// set-up, interrupts, the worker thread and the device's state as data.
public protocol VirtioBackend: AnyObject, Sendable {
    var deviceType: VirtioDeviceType { get }
    /// Features offered to the driver (including `VirtioFeature.version1`).
    var offeredFeatures: UInt64 { get }
    /// One entry per queue: the largest size the driver may choose.
    var queueMaximumSizes: [UInt16] { get }
    /// The device-specific configuration space (read-only here: writes are ignored).
    var configuration: [UInt8] { get }
    /// Serves what the driver has made available on `queue`; returns whether any chain was used
    /// (then the transport interrupts the driver). Runs on the device's worker thread only.
    func serve(queue: Int, _ virtqueue: inout SplitVirtqueue, features: UInt64) throws(VirtqueueError) -> Bool
    /// File descriptors whose readability should wake the worker (a TAP with packets waiting) as
    /// things stand now, given the queues; asked before each wait, and only while the device serves.
    func readinessSources(queues: [VirtqueueState]) -> [Int32]
    /// Finishes every write it has accepted onto stable storage (before a snapshot or a hand-over).
    /// Returns the errno of a failed flush, nil when everything written is on stable storage.
    func flush() -> Int32?
    /// Which backend this is, as a snapshot or migration records it and a restore checks it.
    var identity: BackendIdentity { get }
}

/// The backend a device state was captured with: a restore refuses a different
/// disk size or MAC, since the guest already knows them.
public enum BackendIdentity: Equatable, Sendable {
    case disk(path: String, size: UInt64, readOnly: Bool)
    case network(tap: String, mac: MACAddress)
}
