import Testing
@testable import TernMachine

struct MultibootLoaderTests {
    @Test func loadsSegmentsZeroesBSSAndFillsInfo() throws {
        let memory = try GuestMemory(size: 64 << 20)
        // Dirty the .bss area first: the loader must zero it.
        try memory.write([UInt8](repeating: 0xEE, count: 0x3000), at: GuestAddress(0x100000))
        let image = try MultibootImage(parsing: ImageBuilder.goodELF())
        let entry = try MultibootLoader.load(image, commandLine: "fill=16 dirty=8", into: memory)

        #expect(entry.entry == 0x10000C)
        #expect(entry.infoAddress == 0x7000)
        #expect(try memory.load(UInt32.self, at: GuestAddress(0x100000)) == MultibootImage.headerMagic)
        #expect(try memory.read(GuestAddress(0x100000 + 15), count: 0x3000 - 15).allSatisfy { $0 == 0 })

        let info = GuestAddress(UInt64(entry.infoAddress))
        let flags = try memory.load(UInt32.self, at: info)
        #expect(flags & 0x1 != 0 && flags & 0x4 != 0 && flags & 0x40 != 0)
        #expect(try memory.load(UInt32.self, at: info + 4) == 639)
        #expect(try memory.load(UInt32.self, at: info + 8) == (64 << 10) - 1024)
        let cmdline = try memory.load(UInt32.self, at: info + 16)
        #expect(try memory.read(GuestAddress(UInt64(cmdline)), count: 16) == Array("fill=16 dirty=8\0".utf8))

        let mapLength = try memory.load(UInt32.self, at: info + 44)
        let mapAddress = try memory.load(UInt32.self, at: info + 48)
        #expect(mapLength == 3 * 24)
        // Third entry: RAM from 1 MiB to the end, type 1.
        let third = GuestAddress(UInt64(mapAddress) + 48)
        #expect(try memory.load(UInt32.self, at: third) == 20)
        #expect(try memory.load(UInt64.self, at: third + 4) == 0x100000)
        #expect(try memory.load(UInt64.self, at: third + 12) == (64 << 20) - 0x100000)
        #expect(try memory.load(UInt32.self, at: third + 20) == 1)
    }

    @Test func memoryMapCoversHighMemory() throws {
        let memory = try GuestMemory(size: 6 << 30)
        let map = MultibootLoader.memoryMap(for: memory)
        #expect(map.last == MemoryMapEntry(base: 4 << 30, length: 3 << 30, kind: .available))
        #expect(map.filter { $0.kind == .available }.reduce(0) { $0 + $1.length } == (6 << 30) - 0x100000 + 0x9FC00)
    }

    @Test func refusesKernelThatDoesNotFit() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let bytes = ImageBuilder.aout(load: 0x200000, bssEnd: 0x2000000)  // 30 MiB of bss
        let image = try MultibootImage(parsing: bytes)
        #expect(throws: MultibootError.self) { try MultibootLoader.load(image, commandLine: "", into: memory) }
        do { _ = try MultibootLoader.load(image, commandLine: "", into: memory) } catch {
            #expect("\(error)".contains("does not fit in 16M"))
        }
    }

    @Test func refusesKernelOverlappingBootInfo() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let image = try MultibootImage(parsing: ImageBuilder.aout(load: 0x7000))
        #expect(throws: MultibootError.overlapsBootInfo(start: 0x7000, end: 0x7000 + 33)) {
            try MultibootLoader.load(image, commandLine: "", into: memory)
        }
    }

    @Test func refusesOverlongCommandLine() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let image = try MultibootImage(parsing: ImageBuilder.goodELF())
        let long = String(repeating: "x", count: 5000)
        #expect(throws: MultibootError.commandLineTooLong(5000)) { try MultibootLoader.load(image, commandLine: long, into: memory) }
    }
}
