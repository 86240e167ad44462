import Foundation
import Synchronization
@testable import TernDevices

/// Guest RAM for unit tests: one zeroed block at guest-physical 0, which
/// records every write a device reports.
final class TestRAM: GuestRAM, @unchecked Sendable {
    // @unchecked: the buffer is shared with the device's thread exactly as guest RAM is.
    let size: Int
    let base: UnsafeMutableRawPointer
    private let written = Mutex<[(UInt64, Int)]>([])

    init(size: Int = 1 << 20) {
        self.size = size
        base = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
        base.initializeMemory(as: UInt8.self, repeating: 0, count: size)
    }

    deinit { base.deallocate() }

    func bytes(at address: UInt64, count: Int) -> UnsafeMutableRawPointer? {
        guard count >= 0, address <= UInt64(size), UInt64(count) <= UInt64(size) - address else { return nil }
        return base + Int(address)
    }

    func noteDeviceWrite(at address: UInt64, count: Int) { written.withLock { $0.append((address, count)) } }

    /// Whether a device reported writing every byte of `[address, address + count)`.
    func deviceWrote(_ address: UInt64, count: Int) -> Bool {
        let ranges = written.withLock { $0 }
        return (address..<address + UInt64(count)).allSatisfy { byte in ranges.contains { byte >= $0.0 && byte < $0.0 + UInt64($0.1) } }
    }

    func put<T: FixedWidthInteger>(_ value: T, at address: UInt64) {
        (base + Int(address)).storeBytes(of: value.littleEndian, as: T.self)
    }

    func get<T: FixedWidthInteger>(_ type: T.Type, at address: UInt64) -> T {
        T(littleEndian: (base + Int(address)).loadUnaligned(as: T.self))
    }

    func put(_ bytes: [UInt8], at address: UInt64) {
        bytes.withUnsafeBytes { (base + Int(address)).copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    }

    func get(_ count: Int, at address: UInt64) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: base + Int(address), count: count))
    }
}

/// A driver's side of one split virtqueue in `TestRAM`, laid out at fixed
/// addresses: what a guest's virtio driver would write.
struct TestDriverQueue {
    let ram: TestRAM
    let size: UInt16
    let descriptors: UInt64
    let available: UInt64
    let used: UInt64
    private(set) var nextDescriptor: UInt16 = 0
    private(set) var availableIndex: UInt16 = 0
    private(set) var usedSeen: UInt16 = 0

    init(ram: TestRAM, size: UInt16 = 16, at base: UInt64 = 0x1000) {
        self.ram = ram
        self.size = size
        descriptors = base
        available = base + 16 * UInt64(size)
        used = (available + 6 + 2 * UInt64(size) + 3) & ~3
    }

    var state: VirtqueueState {
        var state = VirtqueueState()
        state.size = size
        state.ready = true
        state.descriptorTable = descriptors
        state.availableRing = available
        state.usedRing = used
        return state
    }

    /// Writes one descriptor; returns its index.
    @discardableResult
    mutating func descriptor(address: UInt64, length: UInt32, writable: Bool, next: UInt16? = nil, flags extra: UInt16 = 0) -> UInt16 {
        let index = nextDescriptor
        nextDescriptor = (nextDescriptor + 1) % size
        let entry = descriptors + 16 * UInt64(index)
        ram.put(address, at: entry)
        ram.put(length, at: entry + 8)
        ram.put(UInt16((writable ? 2 : 0) | (next != nil ? 1 : 0)) | extra, at: entry + 12)
        ram.put(next ?? 0, at: entry + 14)
        return index
    }

    /// A chain of buffers, linked in order; returns its head.
    mutating func chain(_ buffers: [(address: UInt64, length: UInt32, writable: Bool)]) -> UInt16 {
        let first = nextDescriptor
        for (i, buffer) in buffers.enumerated() {
            let next = i + 1 < buffers.count ? (first + UInt16(i) + 1) % size : nil
            descriptor(address: buffer.address, length: buffer.length, writable: buffer.writable, next: next)
        }
        return first
    }

    /// Makes `head` available (entry, then the index).
    mutating func publish(_ head: UInt16) {
        ram.put(head, at: available + 4 + 2 * UInt64(availableIndex % size))
        availableIndex &+= 1
        ram.put(availableIndex, at: available + 2)
    }

    var usedIndex: UInt16 { ram.get(UInt16.self, at: used + 2) }

    /// The used elements the device returned since the last call: (head, bytes written).
    mutating func takeUsed() -> [(head: UInt16, written: UInt32)] {
        var elements: [(UInt16, UInt32)] = []
        while usedSeen != usedIndex {
            let element = used + 4 + 8 * UInt64(usedSeen % size)
            elements.append((UInt16(ram.get(UInt32.self, at: element)), ram.get(UInt32.self, at: element + 4)))
            usedSeen &+= 1
        }
        return elements
    }
}
