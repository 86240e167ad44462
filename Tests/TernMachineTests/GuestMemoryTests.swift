import Testing
@testable import TernMachine

struct GuestMemoryTests {
    @Test func smallGuestHasOneRegionAtZero() throws {
        let memory = try GuestMemory(size: 64 << 20)
        #expect(memory.regions == [GuestMemory.Region(start: GuestAddress(0), size: 64 << 20, fileOffset: 0)])
    }

    @Test func largeGuestSplitsAroundTheMMIOHole() throws {
        let memory = try GuestMemory(size: 8 << 30)  // lazily allocated: costs nothing until touched
        #expect(memory.regions.count == 2)
        #expect(memory.regions[0].end.rawValue == 3 << 30)
        #expect(memory.regions[1].start.rawValue == 4 << 30)
        #expect(memory.regions[1].size == 5 << 30)
        #expect(memory.regions[1].fileOffset == 3 << 30)
        // The last byte of RAM is reachable, the hole is not.
        try memory.store(UInt8(7), at: GuestAddress((9 << 30) - 1))
        #expect(try memory.load(UInt8.self, at: GuestAddress((9 << 30) - 1)) == 7)
        #expect(throws: GuestMemory.Error.self) { try memory.load(UInt8.self, at: GuestAddress(3 << 30)) }
    }

    @Test(arguments: [UInt64(0), UInt64(1 << 20), UInt64(16 << 20) + 4096, UInt64(2) << 40])
    func rejectsUnsupportedSizes(size: UInt64) {
        #expect(throws: GuestMemory.Error.self) { try GuestMemory(size: size) }
    }

    @Test func accessesAreBoundsChecked() throws {
        let memory = try GuestMemory(size: 16 << 20)
        try memory.write([1, 2, 3], at: GuestAddress((16 << 20) - 3))
        #expect(try memory.read(GuestAddress((16 << 20) - 3), count: 3) == [1, 2, 3])
        #expect(throws: GuestMemory.Error.self) { try memory.write([1, 2, 3, 4], at: GuestAddress((16 << 20) - 3)) }
        #expect(throws: GuestMemory.Error.self) { try memory.read(GuestAddress(UInt64.max - 1), count: 4) }
        #expect(throws: GuestMemory.Error.self) { try memory.read(GuestAddress(0), count: 0) }
    }
}
