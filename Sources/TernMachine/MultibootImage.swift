/// A parsed Multiboot v1 kernel: where its bytes go and where it starts.
/// Pure parsing, no guest memory involved, so it is unit-tested on crafted images.
///
/// Spec: https://www.gnu.org/software/grub/manual/multiboot/multiboot.html (v0.6.96).
public struct MultibootImage: Equatable {
    public static let headerMagic: UInt32 = 0x1BAD_B002
    public static let searchLimit = 8192

    /// Header flags. Bits 0-15 are requirements a loader must meet or refuse.
    public struct Flags: OptionSet, Equatable, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let pageAlignModules = Flags(rawValue: 1 << 0)
        public static let memoryInfo = Flags(rawValue: 1 << 1)
        public static let videoMode = Flags(rawValue: 1 << 2)
        public static let addressFields = Flags(rawValue: 1 << 16) // the "a.out kludge"
        /// Requirements Tern meets. Video mode is accepted and left unanswered,
        /// as QEMU does, so kernels that merely ask for it still boot.
        static let supportedRequirements: Flags = [.pageAlignModules, .memoryInfo, .videoMode]
    }

    /// A chunk of the image to copy into guest memory, followed by zeroes up to `memorySize`.
    public struct Segment: Equatable {
        public var address: UInt64
        public var bytes: ArraySlice<UInt8>
        public var memorySize: UInt64
        public var end: UInt64 { address + memorySize }
    }

    public var headerOffset: Int
    public var flags: Flags
    public var segments: [Segment]
    public var entry: UInt32
    public var usesAddressFields: Bool { flags.contains(.addressFields) }

    public init(parsing bytes: [UInt8]) throws(MultibootError) {
        let r = ByteReader(bytes: bytes)
        guard let offset = stride(from: 0, to: min(bytes.count, Self.searchLimit) - 11, by: 4)
            .first(where: { r.u32(at: $0) == Self.headerMagic }) else {
            throw .notMultiboot
        }
        let flagBits = r.u32(at: offset + 4)!, checksum = r.u32(at: offset + 8)!
        guard Self.headerMagic &+ flagBits &+ checksum == 0 else { throw .badChecksum }
        headerOffset = offset
        flags = Flags(rawValue: flagBits)
        let required = flagBits & 0xFFFF
        guard required & ~Flags.supportedRequirements.rawValue == 0 else { throw .unsupportedFlags(flagBits) }

        // As GRUB and QEMU do: the address fields win over ELF headers when present.
        if flags.contains(.addressFields) {
            (segments, entry) = try Self.loadAddressFields(bytes, headerOffset: offset)
        } else if ELFImage.isELF(bytes) {
            let elf = try ELFImage(parsing: bytes)
            guard elf.entry <= UInt64(UInt32.max) else { throw .entryOutsideImage(elf.entry) }
            entry = UInt32(elf.entry)
            segments = elf.segments.map {
                Segment(address: $0.physicalAddress, bytes: bytes[$0.fileOffset..<$0.fileOffset + $0.fileSize],
                        memorySize: $0.memorySize)
            }
        } else {
            throw .badAoutKludge("the image is not ELF and its header has no address fields (flag bit 16)")
        }
    }

    private static func loadAddressFields(_ bytes: [UInt8], headerOffset offset: Int) throws(MultibootError) -> ([Segment], UInt32) {
        let r = ByteReader(bytes: bytes)
        guard let headerAddress = r.u32(at: offset + 12), let loadAddress = r.u32(at: offset + 16),
              let loadEnd = r.u32(at: offset + 20), let bssEnd = r.u32(at: offset + 24),
              let entry = r.u32(at: offset + 28) else {
            throw .badAoutKludge("header is truncated")
        }
        guard headerAddress >= loadAddress else { throw .badAoutKludge("header_addr is below load_addr") }
        let delta = Int(headerAddress - loadAddress)
        guard delta <= offset else { throw .badAoutKludge("load_addr would start before the beginning of the file") }
        let fileStart = offset - delta
        let loadSize: Int
        if loadEnd == 0 {
            loadSize = bytes.count - fileStart
        } else {
            guard loadEnd >= loadAddress else { throw .badAoutKludge("load_end_addr is below load_addr") }
            loadSize = Int(loadEnd - loadAddress)
            guard loadSize <= bytes.count - fileStart else { throw .badAoutKludge("load_end_addr is past the end of the file") }
        }
        var memorySize = UInt64(loadSize)
        if bssEnd != 0 {
            guard UInt64(bssEnd) >= UInt64(loadAddress) + UInt64(loadSize) else {
                throw .badAoutKludge("bss_end_addr is below the end of the loaded image")
            }
            memorySize = UInt64(bssEnd - loadAddress)
        }
        guard entry >= loadAddress, UInt64(entry) < UInt64(loadAddress) + memorySize else {
            throw .badAoutKludge("entry_addr 0x\(String(entry, radix: 16)) is outside the loaded image")
        }
        let segment = Segment(address: UInt64(loadAddress), bytes: bytes[fileStart..<fileStart + loadSize], memorySize: memorySize)
        return ([segment], entry)
    }
}
