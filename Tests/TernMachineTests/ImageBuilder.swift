@testable import TernMachine

/// Crafts Multiboot kernel images byte by byte, good and deliberately bad.
enum ImageBuilder {
    static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func le16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func le64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// A Multiboot header: magic, flags, checksum, then optional address fields.
    static func header(flags: UInt32, checksum: UInt32? = nil, addresses: [UInt32] = []) -> [UInt8] {
        let sum = checksum ?? (0 &- (MultibootImage.headerMagic &+ flags))
        return le32(MultibootImage.headerMagic) + le32(flags) + le32(sum) + addresses.flatMap(le32)
    }

    /// A flat image using the address fields: header at file offset `headerOffset`.
    static func aout(load: UInt32 = 0x200000, headerOffset: Int = 0, payload: [UInt8] = [0xF4],
                     loadEnd: UInt32? = nil, bssEnd: UInt32 = 0, entry: UInt32? = nil) -> [UInt8] {
        let headerAddress = load + UInt32(headerOffset)
        let body = [UInt8](repeating: 0x90, count: headerOffset)
            + header(flags: 0x10002, addresses: [headerAddress, load, 0, bssEnd, 0])
            + payload
        let end = loadEnd ?? load + UInt32(body.count)
        let entryAddress = entry ?? load + UInt32(headerOffset + 32)
        // Re-encode the header with the final load_end and entry.
        return [UInt8](repeating: 0x90, count: headerOffset)
            + header(flags: 0x10002, addresses: [headerAddress, load, end, bssEnd, entryAddress])
            + payload
    }

    struct Segment {
        var paddr: UInt32
        var data: [UInt8]
        var memsz: UInt32
    }

    /// An ELF32 i386 executable with the given PT_LOAD segments; the first
    /// segment's data should contain the Multiboot header.
    static func elf32(entry: UInt32, segments: [Segment], type: UInt16 = 2, machine: UInt16 = 3) -> [UInt8] {
        let ehsize = 52, phentsize = 32
        var dataOffset = ehsize + phentsize * segments.count
        var programHeaders: [UInt8] = []
        var payload: [UInt8] = []
        for segment in segments {
            programHeaders += le32(1) + le32(UInt32(dataOffset)) + le32(segment.paddr) + le32(segment.paddr)
                + le32(UInt32(segment.data.count)) + le32(segment.memsz) + le32(5) + le32(0x1000)
            payload += segment.data
            dataOffset += segment.data.count
        }
        let ident: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 1, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        let header = ident + le16(type) + le16(machine) + le32(1) + le32(entry) + le32(UInt32(ehsize)) + le32(0)
            + le32(0) + le16(UInt16(ehsize)) + le16(UInt16(phentsize)) + le16(UInt16(segments.count)) + le16(40) + le16(0) + le16(0)
        return header + programHeaders + payload
    }

    /// An ELF64 x86-64 executable with one segment.
    static func elf64(entry: UInt64, paddr: UInt64, data: [UInt8], memsz: UInt64) -> [UInt8] {
        let ehsize = 64, phentsize = 56
        let ident: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        let header = ident + le16(2) + le16(62) + le32(1) + le64(entry) + le64(UInt64(ehsize)) + le64(0)
            + le32(0) + le16(UInt16(ehsize)) + le16(UInt16(phentsize)) + le16(1) + le16(64) + le16(0) + le16(0)
        let ph = le32(1) + le32(5) + le64(UInt64(ehsize + phentsize)) + le64(paddr) + le64(paddr)
            + le64(UInt64(data.count)) + le64(memsz) + le64(0x1000)
        return header + ph + data
    }

    /// The usual good ELF kernel: header + code at 1 MiB, with a .bss.
    static func goodELF() -> [UInt8] {
        let code = header(flags: 0x00000003) + [0xF4, 0xEB, 0xFD]
        return elf32(entry: 0x100000 + 12, segments: [Segment(paddr: 0x100000, data: code, memsz: 0x3000)])
    }
}
