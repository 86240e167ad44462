/// Bounds-checked little-endian reads from a byte array. Returns nil rather
/// than trapping, so parsers of untrusted files (kernels, snapshots) can turn
/// a short read into a clear error.
struct ByteReader {
    let bytes: [UInt8]

    func u8(at offset: Int) -> UInt8? {
        offset >= 0 && offset < bytes.count ? bytes[offset] : nil
    }

    func u16(at offset: Int) -> UInt16? { integer(at: offset) }
    func u32(at offset: Int) -> UInt32? { integer(at: offset) }
    func u64(at offset: Int) -> UInt64? { integer(at: offset) }

    private func integer<T: FixedWidthInteger>(at offset: Int) -> T? {
        let size = MemoryLayout<T>.size
        guard offset >= 0, offset <= bytes.count - size else { return nil }
        var value: T = 0
        for i in (0..<size).reversed() { value = value << 8 | T(bytes[offset + i]) }
        return value
    }
}
