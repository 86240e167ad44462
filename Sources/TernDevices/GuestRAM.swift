/// What a device may do with guest memory: reach a guest-physical range that
/// lies wholly inside RAM, and say which pages it wrote.
///
/// Devices write guest memory from their own threads, through the VMM's
/// mapping, which KVM's dirty log does not see: every write a device makes is
/// reported through `noteDeviceWrite`, so that a migration re-sends the pages.
/// Addresses come from the guest and are never trusted: `bytes` answers nil
/// for anything outside RAM (or straddling a hole), and the device then fails
/// the request instead of touching memory.
public protocol GuestRAM: AnyObject, Sendable {
    /// Host pointer to `[address, address + count)`, or nil unless all of it is guest RAM in one piece.
    func bytes(at address: UInt64, count: Int) -> UnsafeMutableRawPointer?
    /// Records that a device wrote `[address, address + count)` (after the write, so a reader that
    /// sees the mark also sees the bytes).
    func noteDeviceWrite(at address: UInt64, count: Int)
}

extension GuestRAM {
    func load<T: FixedWidthInteger>(_ type: T.Type, at address: UInt64) -> T? {
        guard let pointer = bytes(at: address, count: MemoryLayout<T>.size) else { return nil }
        return T(littleEndian: pointer.loadUnaligned(as: T.self))
    }

    /// Stores and records the write; false when the address is outside RAM.
    @discardableResult
    func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) -> Bool {
        guard let pointer = bytes(at: address, count: MemoryLayout<T>.size) else { return false }
        pointer.storeBytes(of: value.littleEndian, as: T.self)
        noteDeviceWrite(at: address, count: MemoryLayout<T>.size)
        return true
    }
}
