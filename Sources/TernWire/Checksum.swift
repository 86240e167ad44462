import CChecksum

/// CRC32C over byte ranges, chainable: `crc32c(b, seed: crc32c(a)) == crc32c(a + b)`.
public enum Checksum {
    public static func crc32c(_ bytes: UnsafeRawBufferPointer, seed: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress else { return seed }
        return tern_crc32c(seed, base, bytes.count)
    }

    public static func crc32c(_ bytes: [UInt8], seed: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { crc32c($0, seed: seed) }
    }

    public static func crc32c(_ bytes: ArraySlice<UInt8>, seed: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { crc32c($0, seed: seed) }
    }

    /// A 64-bit hash for telling whether a page changed (not a wire checksum: frames keep CRC32C).
    public static func fingerprint(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        guard let base = bytes.baseAddress else { return 0 }
        return tern_fingerprint(base, bytes.count)
    }

    public static func isZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        return tern_is_zero(base, bytes.count) != 0
    }
}
