import CKVM

/// Where a split virtqueue is and how far the device has got in it: the
/// state a snapshot or migration carries (virtio 1.x, 2.6 "Split Virtqueues").
public struct VirtqueueState: Equatable, Sendable {
    public var size: UInt16 = 0
    public var ready = false
    public var descriptorTable: UInt64 = 0
    public var availableRing: UInt64 = 0
    public var usedRing: UInt64 = 0
    /// The next entry of the available ring the device will take (`last_avail_idx`).
    public var nextAvailable: UInt16 = 0
    /// The index the device publishes next in the used ring.
    public var nextUsed: UInt16 = 0

    public init() {}

    /// Checks what a guest (or a snapshot, or a peer) claims: a size the device supports and, for a
    /// ready queue, three rings wholly inside guest RAM at their required alignment.
    public func validate(maximumSize: UInt16, in ram: any GuestRAM) throws(VirtqueueError) {
        guard ready else { return }
        guard size > 0, size <= maximumSize, size & (size - 1) == 0 else { throw .badSize(size) }
        let count = Int(size)
        let rings: [(String, UInt64, Int, UInt64)] = [
            ("descriptor table", descriptorTable, 16 * count, 16),
            ("available ring", availableRing, 6 + 2 * count, 2),
            ("used ring", usedRing, 6 + 8 * count, 4),
        ]
        for (name, address, length, alignment) in rings {
            guard address % alignment == 0, ram.bytes(at: address, count: length) != nil else {
                throw .ringOutsideRAM(name, address)
            }
        }
    }
}

/// A guest mistake in a virtqueue's structure. The device stops using the
/// queue and asks for a reset (DEVICE_NEEDS_RESET); it never acts on it.
public enum VirtqueueError: Error, Equatable, CustomStringConvertible {
    case badSize(UInt16)
    case ringOutsideRAM(String, UInt64)
    case availableIndexJump(from: UInt16, to: UInt16)
    case headOutOfRange(UInt16)
    case descriptorOutsideRAM(index: UInt16, address: UInt64, length: UInt32)
    case chainTooLong
    case indirectNotNegotiated
    case writableBeforeReadable

    public var description: String {
        switch self {
        case .badSize(let size): "queue size \(size) is not a power of two within the maximum"
        case .ringOutsideRAM(let name, let address): "\(name) at 0x\(String(address, radix: 16)) is not in guest RAM (or misaligned)"
        case .availableIndexJump(let from, let to): "available index moved from \(from) to \(to), more than the queue holds"
        case .headOutOfRange(let head): "descriptor index \(head) is beyond the queue"
        case .descriptorOutsideRAM(let index, let address, let length):
            "descriptor \(index) points at 0x\(String(address, radix: 16))+\(length), outside guest RAM"
        case .chainTooLong: "a descriptor chain is longer than the queue (a loop)"
        case .indirectNotNegotiated: "an indirect descriptor, which this device does not offer"
        case .writableBeforeReadable: "a device-readable descriptor follows a device-writable one"
        }
    }
}

/// One buffer of a descriptor chain, already checked to lie inside guest RAM.
public struct ChainSegment: Equatable, Sendable {
    public var address: UInt64
    public var length: UInt32
    /// Device-writable (VIRTQ_DESC_F_WRITE): the device fills it; otherwise the device reads it.
    public var writable: Bool
}

/// A request the driver made available: the head's index and its buffers in order.
public struct DescriptorChain: Equatable, Sendable {
    public var head: UInt16
    public var segments: [ChainSegment]

    public var readable: [ChainSegment] { segments.filter { !$0.writable } }
    public var writable: [ChainSegment] { segments.filter(\.writable) }
}

/// A split virtqueue being served: takes chains from the available ring and
/// returns them through the used ring. Every index, address and length comes
/// from the guest and is checked before use; a chain is at most `size`
/// descriptors long, so a loop ends.
public struct SplitVirtqueue {
    public private(set) var state: VirtqueueState
    let ram: any GuestRAM

    static let descriptorNext: UInt16 = 1
    static let descriptorWrite: UInt16 = 2
    static let descriptorIndirect: UInt16 = 4

    /// `state` must have passed `validate` (the transport checks it when the driver sets the queue ready).
    public init(state: VirtqueueState, ram: any GuestRAM) {
        self.state = state
        self.ram = ram
    }

    private var size: UInt16 { state.size }

    /// The driver's available index, read with acquire order so the ring entries it covers are current.
    private func availableIndex() throws(VirtqueueError) -> UInt16 {
        guard let pointer = ram.bytes(at: state.availableRing + 2, count: 2) else {
            throw .ringOutsideRAM("available ring", state.availableRing)
        }
        return UInt16(littleEndian: ckvm_load_acquire_u16(pointer))
    }

    /// Whether the driver has made chains available that the device has not taken.
    public func hasAvailable() throws(VirtqueueError) -> Bool { try availableIndex() != state.nextAvailable }

    /// Takes the next available chain, or nil when the driver has made none available.
    public mutating func next() throws(VirtqueueError) -> DescriptorChain? {
        let published = try availableIndex()
        guard published != state.nextAvailable else { return nil }
        guard published &- state.nextAvailable <= size else {
            throw .availableIndexJump(from: state.nextAvailable, to: published)
        }
        let slot = state.availableRing + 4 + 2 * UInt64(state.nextAvailable % size)
        guard let head = ram.load(UInt16.self, at: slot) else { throw .ringOutsideRAM("available ring", state.availableRing) }
        guard head < size else { throw .headOutOfRange(head) }
        state.nextAvailable &+= 1

        var segments: [ChainSegment] = []
        var index = head
        while true {
            guard segments.count < Int(size) else { throw .chainTooLong }
            let entry = state.descriptorTable + 16 * UInt64(index)
            guard let address = ram.load(UInt64.self, at: entry), let length = ram.load(UInt32.self, at: entry + 8),
                  let flags = ram.load(UInt16.self, at: entry + 12), let nextIndex = ram.load(UInt16.self, at: entry + 14) else {
                throw .ringOutsideRAM("descriptor table", state.descriptorTable)
            }
            guard flags & Self.descriptorIndirect == 0 else { throw .indirectNotNegotiated }
            guard length == 0 || ram.bytes(at: address, count: Int(length)) != nil else {
                throw .descriptorOutsideRAM(index: index, address: address, length: length)
            }
            let writable = flags & Self.descriptorWrite != 0
            if !writable, segments.last?.writable == true { throw .writableBeforeReadable }
            segments.append(ChainSegment(address: address, length: length, writable: writable))
            guard flags & Self.descriptorNext != 0 else { break }
            guard nextIndex < size else { throw .headOutOfRange(nextIndex) }
            index = nextIndex
        }
        return DescriptorChain(head: head, segments: segments)
    }

    /// Tells the driver whether to notify when it makes buffers available (VIRTQ_USED_F_NO_NOTIFY, a
    /// hint it may ignore). Turning notifications back on is followed by a full fence, so that a caller
    /// that then looks at the available ring again sees every buffer made available before the driver
    /// could have read the flag.
    public func suppressNotifications(_ suppressed: Bool) throws(VirtqueueError) {
        guard ram.store(UInt16(suppressed ? 1 : 0), at: state.usedRing) else { throw .ringOutsideRAM("used ring", state.usedRing) }
        if !suppressed { ckvm_fence_seq_cst() }
    }

    /// Puts back the chain `next` just took, unused (a receive queue's buffer with no frame to fill it).
    public mutating func giveBack() { state.nextAvailable &-= 1 }

    /// Returns a chain to the driver with `written` bytes filled in: the used element, then the
    /// used index with release order, so a driver that sees the index sees the element.
    public mutating func complete(_ head: UInt16, written: UInt32) throws(VirtqueueError) {
        let element = state.usedRing + 4 + 8 * UInt64(state.nextUsed % size)
        guard ram.store(UInt32(head), at: element), ram.store(written, at: element + 4),
              let indexPointer = ram.bytes(at: state.usedRing + 2, count: 2) else {
            throw .ringOutsideRAM("used ring", state.usedRing)
        }
        state.nextUsed &+= 1
        ckvm_store_release_u16(indexPointer, state.nextUsed.littleEndian)
        ram.noteDeviceWrite(at: state.usedRing + 2, count: 2)
    }
}
