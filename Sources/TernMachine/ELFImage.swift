/// The loadable parts of an ELF executable (32- or 64-bit, little-endian x86):
/// just what a boot loader needs, checked against the file's real size.
struct ELFImage {
    struct Segment: Equatable {
        var physicalAddress: UInt64
        var fileOffset: Int
        var fileSize: Int
        var memorySize: UInt64
    }

    var is64Bit: Bool
    var entry: UInt64
    var segments: [Segment]

    static let magic: [UInt8] = [0x7F, 0x45, 0x4C, 0x46]

    static func isELF(_ bytes: [UInt8]) -> Bool { bytes.starts(with: magic) }

    init(parsing bytes: [UInt8]) throws(MultibootError) {
        let r = ByteReader(bytes: bytes)
        guard ELFImage.isELF(bytes), let elfClass = r.u8(at: 4), let encoding = r.u8(at: 5) else {
            throw .badELF("not an ELF file")
        }
        guard encoding == 1 else { throw .badELF("not little-endian") }
        guard elfClass == 1 || elfClass == 2 else { throw .badELF("unknown ELF class \(elfClass)") }
        is64Bit = elfClass == 2
        guard let type = r.u16(at: 16), let machine = r.u16(at: 18) else { throw .badELF("truncated ELF header") }
        guard type == 2 else { throw .badELF("not an executable (e_type \(type))") }
        guard machine == 3 || machine == 62 else { throw .badELF("not an x86 image (e_machine \(machine))") }

        let phOffset: Int, phEntrySize: Int, phCount: Int
        if is64Bit {
            guard let e = r.u64(at: 24), let off = r.u64(at: 32), let size = r.u16(at: 54), let count = r.u16(at: 56) else {
                throw .badELF("truncated ELF header")
            }
            entry = e; phOffset = Int(clamping: off); phEntrySize = Int(size); phCount = Int(count)
        } else {
            guard let e = r.u32(at: 24), let off = r.u32(at: 28), let size = r.u16(at: 42), let count = r.u16(at: 44) else {
                throw .badELF("truncated ELF header")
            }
            entry = UInt64(e); phOffset = Int(off); phEntrySize = Int(size); phCount = Int(count)
        }
        guard phEntrySize >= (is64Bit ? 56 : 32) else { throw .badELF("program header entries too small") }

        var segments: [Segment] = []
        for i in 0..<phCount {
            let base = phOffset + i * phEntrySize
            guard let pType = r.u32(at: base) else { throw .badELF("program header \(i) is past the end of the file") }
            guard pType == 1 else { continue } // PT_LOAD only
            let segment: Segment
            if is64Bit {
                guard let off = r.u64(at: base + 8), let paddr = r.u64(at: base + 24),
                      let filesz = r.u64(at: base + 32), let memsz = r.u64(at: base + 40) else {
                    throw .badELF("program header \(i) is truncated")
                }
                segment = Segment(physicalAddress: paddr, fileOffset: Int(clamping: off), fileSize: Int(clamping: filesz), memorySize: memsz)
            } else {
                guard let off = r.u32(at: base + 4), let paddr = r.u32(at: base + 12),
                      let filesz = r.u32(at: base + 16), let memsz = r.u32(at: base + 20) else {
                    throw .badELF("program header \(i) is truncated")
                }
                segment = Segment(physicalAddress: UInt64(paddr), fileOffset: Int(off), fileSize: Int(filesz), memorySize: UInt64(memsz))
            }
            guard segment.fileOffset <= bytes.count, segment.fileSize <= bytes.count - segment.fileOffset else {
                throw .badELF("segment \(i) extends past the end of the file")
            }
            guard UInt64(segment.fileSize) <= segment.memorySize else {
                throw .badELF("segment \(i) has a file size larger than its memory size")
            }
            if segment.memorySize > 0 { segments.append(segment) }
        }
        guard !segments.isEmpty else { throw .badELF("no loadable segments") }
        self.segments = segments
    }
}
