import Synchronization

/// virtio-net (virtio 1.x, 5.1 "Network Device") on a TAP: queue 0 receives,
/// queue 1 transmits, frames carry the 12-byte virtio_net_hdr_v1 in front,
/// and no offloads are offered, so every frame crosses whole and checksummed.
/// The MAC is the VM's (it travels with it through snapshots and migrations).
/// Queue 2 is the control queue, for VIRTIO_NET_F_GUEST_ANNOUNCE alone: after a
/// migration the device sets the ANNOUNCE status bit and the guest sends its
/// own gratuitous ARP, then acknowledges.
public final class VirtioNet: VirtioBackend {
    public let tap: TapDevice
    public let mac: MACAddress
    public let statistics = DeviceCounters<NetworkFrameKind>()
    /// Set when a frame waits on the TAP but the driver has no receive buffer posted: the TAP is
    /// then left out of the worker's wait (it would wake it forever) until the driver adds buffers.
    private let starved = Atomic<Bool>(false)
    /// VIRTIO_NET_S_ANNOUNCE: set after a migration, until the guest acknowledges it.
    private let announcing = Atomic<Bool>(false)
    /// RARP announcements the host sent on the TAP, and those the TAP refused.
    public let announcementsSent = Atomic<Int>(0)
    public let announcementsFailed = Atomic<Int>(0)
    /// Announcements the guest acknowledged (VIRTIO_NET_CTRL_ANNOUNCE_ACK).
    public let guestAnnouncements = Atomic<Int>(0)

    enum Feature {
        static let mac: UInt64 = 1 << 5
        static let status: UInt64 = 1 << 16
        static let controlQueue: UInt64 = 1 << 17
        static let guestAnnounce: UInt64 = 1 << 21
    }

    static let receiveQueue = 0, transmitQueue = 1, controlQueue = 2
    static let controlQueueSize: UInt16 = 64
    static let queueSize: UInt16 = 256
    /// The largest frame with its header: 1514 bytes of Ethernet and the header (no offloads, so no GSO).
    static let maximumFrame = 1514 + TapDevice.headerSize

    public init(tap: TapDevice, mac: MACAddress) {
        self.tap = tap
        self.mac = mac
    }

    public var deviceType: VirtioDeviceType { .network }
    public var queueMaximumSizes: [UInt16] { [Self.queueSize, Self.queueSize, Self.controlQueueSize] }
    public var offeredFeatures: UInt64 {
        VirtioFeature.version1 | Feature.mac | Feature.status | Feature.controlQueue | Feature.guestAnnounce
    }
    public var identity: BackendIdentity { .network(tap: tap.name, mac: mac) }

    /// struct virtio_net_config: mac[6], status (VIRTIO_NET_S_LINK_UP, and VIRTIO_NET_S_ANNOUNCE while asked).
    public var configuration: [UInt8] { mac.bytes + [announcing.load(ordering: .acquiring) ? 3 : 1, 0] }

    /// Asks the guest to announce itself; the caller signals the configuration change.
    public func requestGuestAnnouncement() { announcing.store(true, ordering: .releasing) }

    /// The host's announcement on the TAP, as QEMU's announce-self sends it: a broadcast RARP
    /// (ethertype 0x8035, reverse request) from the VM's MAC, which teaches every learning
    /// switch on the way where the MAC now is.
    public func sendRARP() -> Bool {
        var frame = [UInt8](repeating: 0xFF, count: 6) + mac.bytes + [0x80, 0x35]
        frame += [0, 1, 0x08, 0x00, 6, 4, 0, 3] + mac.bytes + [0, 0, 0, 0] + mac.bytes + [0, 0, 0, 0]
        frame += [UInt8](repeating: 0, count: 60 - frame.count)
        let sent = tap.send(frame: frame)
        if sent { announcementsSent.add(1, ordering: .relaxed) } else { announcementsFailed.add(1, ordering: .relaxed) }
        return sent
    }

    /// The TAP, while the receive queue is set up and has buffers: otherwise a frame waiting there
    /// would wake the worker over and over with nothing to put it in.
    public func readinessSources(queues: [VirtqueueState]) -> [Int32] {
        guard queues.indices.contains(Self.receiveQueue), queues[Self.receiveQueue].ready, !starved.load(ordering: .acquiring) else { return [] }
        return [tap.fd.rawValue]
    }

    public func flush() -> Int32? { nil }

    public func serve(queue: Int, _ virtqueue: inout SplitVirtqueue, features: UInt64) throws(VirtqueueError) -> Bool {
        switch queue {
        case Self.transmitQueue: return try transmit(&virtqueue)
        case Self.receiveQueue: return try receive(&virtqueue)
        case Self.controlQueue: return try control(&virtqueue)
        default: return false
        }
    }

    /// Control commands {u8 class, u8 command, data} with a one-byte ack: only the announcement's
    /// acknowledgement (class 3, command 0) is known; anything else is answered VIRTIO_NET_ERR.
    private func control(_ queue: inout SplitVirtqueue) throws(VirtqueueError) -> Bool {
        var used = false
        while let chain = try queue.next() {
            let command = GuestBuffers(chain.readable, ram: queue.ram).read(limit: 2)
            let ack = GuestBuffers(chain.writable, ram: queue.ram)
            var status: UInt8 = 1
            if command == [3, 0] {
                announcing.store(false, ordering: .releasing)
                guestAnnouncements.add(1, ordering: .relaxed)
                status = 0
            }
            let written = ack.count >= 1 ? ack.write([status], ram: queue.ram) : 0
            try queue.complete(chain.head, written: UInt32(written))
            used = true
        }
        return used
    }

    private func transmit(_ queue: inout SplitVirtqueue) throws(VirtqueueError) -> Bool {
        var used = false
        while let chain = try queue.next() {
            let frame = GuestBuffers(chain.readable, ram: queue.ram)
            if frame.count <= TapDevice.headerSize || frame.count > Self.maximumFrame || !chain.writable.isEmpty
                || frame.read(limit: 2) != [0, 0] {
                // No offloads were offered: a header asking for checksum or segmentation offload is not passed to the host.
                statistics.count(.dropped)
            } else if tap.send(frame) {
                statistics.count(.sent, bytesOut: frame.count - TapDevice.headerSize)
            } else {
                statistics.count(.dropped)
            }
            try queue.complete(chain.head, written: 0)
            used = true
        }
        return used
    }

    private func receive(_ queue: inout SplitVirtqueue) throws(VirtqueueError) -> Bool {
        starved.store(false, ordering: .releasing)
        var used = false
        // While buffers are posted the worker waits on the TAP and looks at the ring whenever a frame
        // comes, so the driver need not notify as it reposts them: one exit fewer per frame received.
        try queue.suppressNotifications(true)
        while true {
            if try !queue.hasAvailable() {
                // Buffers ran out: ask for the driver's notification again, then look once more, since
                // a buffer posted before it saw the flag comes without one.
                try queue.suppressNotifications(false)
                guard try queue.hasAvailable() else {
                    starved.store(true, ordering: .releasing)
                    return used
                }
                try queue.suppressNotifications(true)
            }
            guard let chain = try queue.next() else { return used }
            let buffers = GuestBuffers(chain.writable, ram: queue.ram)
            guard buffers.count >= Self.maximumFrame, chain.readable.isEmpty else {
                // A buffer too small for any frame (no mergeable buffers are offered): returned empty.
                statistics.count(.dropped)
                try queue.complete(chain.head, written: 0)
                used = true
                continue
            }
            switch tap.receive(into: buffers) {
            case nil:
                queue.giveBack()
                return used
            case let count? where count > buffers.count:
                // Truncated to the buffer by the TAP (a frame beyond the MTU offered): dropped, not passed on cut.
                statistics.count(.dropped)
                try queue.complete(chain.head, written: 0)
                used = true
            case let count? where count > TapDevice.headerSize:
                // num_buffers (the header's last field) is 1: one buffer per frame.
                buffers.write([1, 0], at: TapDevice.headerSize - 2, ram: queue.ram)
                buffers.noteWritten(count, ram: queue.ram)
                statistics.count(.received, bytesIn: count - TapDevice.headerSize)
                try queue.complete(chain.head, written: UInt32(count))
                used = true
            default:
                queue.giveBack()
                statistics.count(.dropped)
                return used
            }
        }
    }
}
