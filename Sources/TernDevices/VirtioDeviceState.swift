import TernWire

/// A virtio-mmio device's state as data (after Firecracker's
/// devices/virtio/persist.rs): the transport's registers, each queue, and the
/// identity of the backend. Captured while the device is quiesced; checked as
/// untrusted input on restore (`VirtioMmioDevice.restore`).
public struct VirtioDeviceState: Equatable, Sendable {
    public static let tag = "VDEV"
    public static let version: UInt32 = 1
    static let maximumQueues = 16

    public var id: String
    public var slot: Int
    public var deviceType: UInt32
    public var offeredFeatures: UInt64 = 0
    public var driverFeatures: UInt64 = 0
    public var deviceFeaturesSelect: UInt32 = 0
    public var driverFeaturesSelect: UInt32 = 0
    public var status: UInt32 = 0
    public var queueSelect: UInt32 = 0
    public var interruptStatus: UInt32 = 0
    public var configGeneration: UInt32 = 0
    public var queues: [VirtqueueState]
    public var backend: BackendIdentity

    public var section: StateSection {
        var w = WireWriter(capacity: 256)
        w.writeString(id)
        w.write(UInt32(slot))
        w.write(deviceType)
        w.write(offeredFeatures)
        w.write(driverFeatures)
        for value in [deviceFeaturesSelect, driverFeaturesSelect, status, queueSelect, interruptStatus, configGeneration] { w.write(value) }
        w.write(UInt16(queues.count))
        for queue in queues {
            w.write(queue.size)
            w.write(UInt8(queue.ready ? 1 : 0))
            w.write(queue.descriptorTable)
            w.write(queue.availableRing)
            w.write(queue.usedRing)
            w.write(queue.nextAvailable)
            w.write(queue.nextUsed)
        }
        switch backend {
        case .disk(let path, let size, let readOnly):
            w.write(UInt8(1))
            w.writeString(path)
            w.write(size)
            w.write(UInt8(readOnly ? 1 : 0))
        case .network(let tap, let mac):
            w.write(UInt8(2))
            w.writeString(tap)
            w.write(mac.bytes)
        }
        return StateSection(tag: Self.tag, version: Self.version, body: w.bytes)
    }

    public init(id: String, slot: Int, deviceType: UInt32, queues: [VirtqueueState], backend: BackendIdentity) {
        self.id = id
        self.slot = slot
        self.deviceType = deviceType
        self.queues = queues
        self.backend = backend
    }

    public init(section: StateSection) throws(WireError) {
        guard section.version == Self.version else {
            throw .unsupportedVersion("device state version \(section.version) (this tern reads \(Self.version))")
        }
        var r = WireReader(section.body, context: "device state")
        id = try r.readString(maximum: 64)
        let slot = try r.read(UInt32.self)
        guard slot < MmioWindow.slotCount else { throw .malformed("device state: slot \(slot)") }
        self.slot = Int(slot)
        deviceType = try r.read()
        offeredFeatures = try r.read()
        driverFeatures = try r.read()
        deviceFeaturesSelect = try r.read()
        driverFeaturesSelect = try r.read()
        status = try r.read()
        queueSelect = try r.read()
        interruptStatus = try r.read()
        configGeneration = try r.read()
        let count = Int(try r.read(UInt16.self))
        guard count <= Self.maximumQueues else { throw .malformed("device state: \(count) queues") }
        queues = []
        for _ in 0..<count {
            var queue = VirtqueueState()
            queue.size = try r.read()
            queue.ready = try r.read(UInt8.self) != 0
            queue.descriptorTable = try r.read()
            queue.availableRing = try r.read()
            queue.usedRing = try r.read()
            queue.nextAvailable = try r.read()
            queue.nextUsed = try r.read()
            queues.append(queue)
        }
        switch try r.read(UInt8.self) {
        case 1:
            let path = try r.readString(maximum: 4096)
            let size = try r.read(UInt64.self)
            backend = .disk(path: path, size: size, readOnly: try r.read(UInt8.self) != 0)
        case 2:
            let tap = try r.readString(maximum: 16)
            backend = .network(tap: tap, mac: MACAddress(bytes: try r.readBytes(6)))
        case let kind:
            throw .malformed("device state: backend kind \(kind)")
        }
        try r.expectEnd()
    }
}
