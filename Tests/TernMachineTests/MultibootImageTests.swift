import Testing
@testable import TernMachine

struct MultibootImageTests {
    @Test func parsesELF32Kernel() throws {
        let image = try MultibootImage(parsing: ImageBuilder.goodELF())
        #expect(!image.usesAddressFields)
        #expect(image.entry == 0x10000C)
        #expect(image.segments.count == 1)
        #expect(image.segments[0].address == 0x100000)
        #expect(image.segments[0].memorySize == 0x3000)
        #expect(image.segments[0].bytes.count == 15)
    }

    @Test func parsesELF32WithSeveralSegmentsIgnoringEmptyOnes() throws {
        let head = ImageBuilder.header(flags: 0)
        let bytes = ImageBuilder.elf32(entry: 0x100000, segments: [
            .init(paddr: 0x100000, data: head, memsz: 12),
            .init(paddr: 0x200000, data: [1, 2, 3], memsz: 0x1000),
            .init(paddr: 0x300000, data: [], memsz: 0),
        ])
        let image = try MultibootImage(parsing: bytes)
        #expect(image.segments.map(\.address) == [0x100000, 0x200000])
    }

    @Test func parsesELF64KernelWithA32BitEntry() throws {
        let data = ImageBuilder.header(flags: 2) + [0xF4]
        let image = try MultibootImage(parsing: ImageBuilder.elf64(entry: 0x10000C, paddr: 0x100000, data: data, memsz: 0x1000))
        #expect(image.entry == 0x10000C)
        #expect(image.segments[0].address == 0x100000)
    }

    @Test func parsesAoutKludgeAtItsOwnAddresses() throws {
        let bytes = ImageBuilder.aout(load: 0x200000, headerOffset: 64, payload: [0xF4, 0xF4], bssEnd: 0x210000)
        let image = try MultibootImage(parsing: bytes)
        #expect(image.usesAddressFields)
        #expect(image.segments.count == 1)
        #expect(image.segments[0].address == 0x200000)
        #expect(image.segments[0].bytes.count == bytes.count)
        #expect(image.segments[0].memorySize == 0x10000)
        #expect(image.entry == 0x200000 + 64 + 32)
    }

    @Test func addressFieldsWinOverELFHeaders() throws {
        // An ELF file whose Multiboot header also carries addresses: GRUB and QEMU use the addresses.
        let fileOffsetOfHeader = 52 + 32
        let load: UInt32 = 0x400000
        let headerAddress = load + UInt32(fileOffsetOfHeader)
        let head = ImageBuilder.header(flags: 0x10000, addresses: [headerAddress, load, 0, 0, headerAddress + 32]) + [0xF4]
        let bytes = ImageBuilder.elf32(entry: 0x100000, segments: [.init(paddr: 0x100000, data: head, memsz: 0x1000)])
        let image = try MultibootImage(parsing: bytes)
        #expect(image.segments[0].address == UInt64(load))
        #expect(image.entry == headerAddress + 32)
    }

    @Test func findsHeaderAnywhereInFirst8KiBButNotBeyond() throws {
        let within = ImageBuilder.aout(headerOffset: 8192 - 48)
        #expect(throws: Never.self) { try MultibootImage(parsing: within) }
        let beyond = ImageBuilder.aout(headerOffset: 8192)
        #expect(throws: MultibootError.notMultiboot) { try MultibootImage(parsing: beyond) }
    }

    @Test func rejectsFilesWithoutHeader() {
        #expect(throws: MultibootError.notMultiboot) { try MultibootImage(parsing: []) }
        #expect(throws: MultibootError.notMultiboot) { try MultibootImage(parsing: [UInt8](repeating: 0, count: 10000)) }
        #expect(throws: MultibootError.notMultiboot) { try MultibootImage(parsing: Array("#!/bin/sh\necho hi\n".utf8)) }
    }

    @Test func rejectsBadChecksum() {
        let bytes = ImageBuilder.header(flags: 0x10000, checksum: 1234) + [UInt8](repeating: 0, count: 64)
        #expect(throws: MultibootError.badChecksum) { try MultibootImage(parsing: bytes) }
    }

    @Test func rejectsRequirementsTernCannotMeet() {
        let bytes = ImageBuilder.header(flags: 0x0000_0008) + [UInt8](repeating: 0, count: 64)
        #expect(throws: MultibootError.unsupportedFlags(8)) { try MultibootImage(parsing: bytes) }
    }

    @Test func acceptsVideoModeRequestLikeQEMU() throws {
        let code = ImageBuilder.header(flags: 0x00000007) + [0xF4]
        let bytes = ImageBuilder.elf32(entry: 0x100000, segments: [.init(paddr: 0x100000, data: code, memsz: 0x1000)])
        #expect(throws: Never.self) { try MultibootImage(parsing: bytes) }
    }

    @Test func rejectsNonELFWithoutAddressFields() {
        let bytes = ImageBuilder.header(flags: 0) + [UInt8](repeating: 0x90, count: 100)
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: bytes) }
    }

    @Test func rejectsInconsistentAddressFields() {
        // entry outside the image
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: ImageBuilder.aout(entry: 0x900000)) }
        // load_end past the end of the file
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: ImageBuilder.aout(loadEnd: 0x200000 + 100_000)) }
        // bss_end before load_end
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: ImageBuilder.aout(bssEnd: 0x200004)) }
        // header_addr below load_addr
        let bad = ImageBuilder.header(flags: 0x10000, addresses: [0x1000, 0x2000, 0, 0, 0x2000]) + [0xF4]
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: bad) }
        // truncated address fields
        let truncated = ImageBuilder.header(flags: 0x10000) + ImageBuilder.le32(0x1000)
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: truncated) }
    }

    @Test func rejectsBrokenELF() {
        let good = ImageBuilder.goodELF()
        var wrongMachine = good; wrongMachine[18] = 40  // ARM
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: wrongMachine) }
        var relocatable = good; relocatable[16] = 1
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: relocatable) }
        var bigEndian = good; bigEndian[5] = 2
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: bigEndian) }
        // A segment whose file bytes run past the end of the file.
        var pastEnd = good; pastEnd[52 + 16] = 0xFF; pastEnd[52 + 17] = 0xFF
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: pastEnd) }
        // Program headers beyond the file.
        var phOutside = good; phOutside[28] = 0xF0; phOutside[29] = 0xFF
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: phOutside) }
        // filesz > memsz
        var fileBigger = good; fileBigger[52 + 20] = 1; fileBigger[52 + 21] = 0; fileBigger[52 + 22] = 0
        #expect(throws: MultibootError.self) { try MultibootImage(parsing: fileBigger) }
    }

    @Test func truncationAtEveryLengthIsAnErrorNotACrash() {
        let good = ImageBuilder.goodELF()
        for length in 0..<good.count {
            _ = try? MultibootImage(parsing: Array(good.prefix(length)))
        }
        let aout = ImageBuilder.aout(headerOffset: 16, payload: [UInt8](repeating: 0xF4, count: 32))
        for length in 0..<aout.count {
            _ = try? MultibootImage(parsing: Array(aout.prefix(length)))
        }
    }
}
