import Foundation
import Glibc
import Testing
@testable import TernMachine

/// Whether this process may mount a private tmpfs for huge pages (it needs CAP_SYS_ADMIN).
let hugePagesAvailable = (try? GuestMemory(size: 16 << 20, hugePages: .on)) != nil

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

    @Test func offTakesAMemfdOfSmallPages() throws {
        let memory = try GuestMemory(size: 16 << 20, hugePages: .off)
        #expect(!memory.usesHugePages)
        let target = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(memory.file.rawValue)")
        #expect(target.hasPrefix("/memfd:tern-guest-ram"), "\(target)")
    }

    @Test func autoTakesHugePagesWhereTheyAreAvailable() throws {
        #expect(try GuestMemory(size: 16 << 20, hugePages: .auto).usesHugePages == hugePagesAvailable)
    }

    /// The file really gets 2 MiB pages (mapped as such), and keeps what makes a memfd useful:
    /// holes stay holes, and the data extent is found.
    @Test(.enabled(if: hugePagesAvailable, "mounting a private tmpfs needs CAP_SYS_ADMIN"))
    func hugePagesBackTheMemoryInTwoMegabytePieces() throws {
        let memory = try GuestMemory(size: 64 << 20, hugePages: .on)
        #expect(memory.usesHugePages)
        try memory.write([UInt8](repeating: 0xA5, count: 4096), at: GuestAddress(32 << 20))
        #expect(madvise(memory.mapping.base, 4 << 20, 23 /* MADV_POPULATE_WRITE */) == 0)
        #expect(try pmdMappedKilobytes(memory.mapping.base) >= 2048)
        var extents: [(Int, Int, Bool)] = []
        try memory.forEachExtent { extents.append(($0, $1, $2)) }
        let data = extents.filter { !$0.2 }
        #expect(data.contains { $0.0 <= (32 << 20) / 4096 && $0.0 + $0.1 > (32 << 20) / 4096 }, "the written page is in a data extent")
        #expect(extents.contains { $0.2 && $0.0 > (32 << 20) / 4096 }, "memory past it is a hole: \(extents)")
        #expect(try memory.load(UInt8.self, at: GuestAddress((32 << 20) + 4095)) == 0xA5)
        #expect(try memory.load(UInt8.self, at: GuestAddress((32 << 20) + 4096)) == 0)
    }

    /// ShmemPmdMapped of the mapping that starts at `base`, from /proc/self/smaps.
    func pmdMappedKilobytes(_ base: UnsafeMutableRawPointer) throws -> Int {
        // Read to the end: /proc files have no size for a reader that trusts st_size.
        let smaps = String(decoding: try FileHandle(forReadingFrom: URL(fileURLWithPath: "/proc/self/smaps")).readToEnd() ?? Data(), as: UTF8.self)
        let start = String(UInt(bitPattern: base), radix: 16)
        var inMapping = false
        for line in smaps.split(separator: "\n") {
            // A mapping's header starts with its range, "start-end"; its fields are "Name: value kB".
            let range = line.prefix { $0 != " " }.split(separator: "-")
            if range.count == 2, range.allSatisfy({ $0.allSatisfy(\.isHexDigit) }) {
                inMapping = range[0] == start
            } else if inMapping, line.hasPrefix("ShmemPmdMapped:") {
                return Int(line.split(separator: " ")[1]) ?? 0
            }
        }
        throw ConfigurationError("no ShmemPmdMapped line for the mapping at \(start)")
    }
}
