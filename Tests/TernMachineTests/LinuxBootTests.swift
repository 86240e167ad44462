import Foundation
import Glibc
import Testing
@testable import TernMachine

/// A crafted bzImage: 4 setup sectors (setup_sects = 0 means 4), the header
/// fields the loader reads, then `kernelBytes` of protected-mode kernel.
func craftedBzImage(version: UInt16 = 0x020F, xloadflags: UInt16 = 1, kernelBytes: Int = 8192, initSize: UInt32 = 0x40000,
                    commandLineSize: UInt32 = 2048) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: 5 * 512 + kernelBytes)
    func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeBytes(of: value.littleEndian) { bytes.replaceSubrange(offset..<offset + MemoryLayout<T>.size, with: $0) }
    }
    bytes[0x201] = 0x6A // header ends at 0x26C
    put(UInt32(0x5372_6448), at: 0x202)
    put(version, at: 0x206)
    put(UInt32(0x37FF_FFFF), at: 0x22C)
    put(xloadflags, at: 0x236)
    put(commandLineSize, at: 0x238)
    put(initSize, at: 0x260)
    put(UInt32(0x20_0000), at: 0x230)          // kernel_alignment
    put(UInt64(0x100_0000), at: 0x258)         // pref_address: 16 MiB
    for i in 0..<kernelBytes { bytes[5 * 512 + i] = UInt8(truncatingIfNeeded: i * 13 + 1) }
    return bytes
}

struct LinuxImageTests {
    @Test func parsesTheSetupHeader() throws {
        let image = try LinuxImage(parsing: craftedBzImage())
        #expect(image.protocolVersion == 0x020F)
        #expect(image.kernel.count == 8192 && image.kernel.first == 1)
        #expect(image.setupHeader.count == 0x26C - 0x1F1)
        #expect(image.initSize == 0x40000 && image.commandLineSize == 2048)
        guard case .linux = try KernelImage(parsing: craftedBzImage()) else { Issue.record("a bzImage is taken for Linux"); return }
        guard case .multiboot = try KernelImage(parsing: ImageBuilder.goodELF()) else { Issue.record("a Multiboot ELF stays Multiboot"); return }
    }

    @Test func refusesWhatTheLoaderCannotBoot() throws {
        #expect(throws: LinuxBootError.protocolTooOld(0x0206)) { try LinuxImage(parsing: craftedBzImage(version: 0x0206)) }
        #expect(throws: LinuxBootError.no64BitEntry) { try LinuxImage(parsing: craftedBzImage(xloadflags: 0)) }
        #expect(throws: LinuxBootError.truncated) { try LinuxImage(parsing: Array(craftedBzImage().prefix(5 * 512))) }
        #expect(throws: LinuxBootError.notLinux) { try LinuxImage(parsing: [UInt8](repeating: 0, count: 4096)) }
    }
}

@Suite(.enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
struct LinuxLoaderTests {
    @Test func writesBootParamsTheKernelAndTheInitrd() throws {
        let memory = try GuestMemory(size: 64 << 20)
        let image = try LinuxImage(parsing: craftedBzImage())
        let initrd = [UInt8](repeating: 0x5A, count: 10000)
        let entry = try LinuxLoader.load(image, commandLine: "console=ttyS0 quiet", initrd: initrd, into: memory)
        #expect(entry.entry == 0x100200 && entry.bootParams == 0x7000)
        #expect(try memory.read(GuestAddress(0x100000), count: 16) == Array(image.kernel.prefix(16)))
        let params = try memory.read(GuestAddress(0x7000), count: 4096)
        let r = ByteReader(bytes: params)
        #expect(r.u32(at: 0x202) == 0x5372_6448, "the setup header is copied")
        #expect(params[0x210] == 0xFF && params[0x211] & 1 == 1, "loader type and LOADED_HIGH")
        #expect(r.u32(at: 0x228) == 0x20000)
        #expect(try memory.read(GuestAddress(0x20000), count: 20) == Array("console=ttyS0 quiet".utf8) + [0])
        let initrdAddress = try #require(r.u32(at: 0x218))
        #expect(r.u32(at: 0x21C) == 10000 && initrdAddress % 4096 == 0)
        #expect(UInt64(initrdAddress) + 10000 <= 64 << 20 && UInt64(initrdAddress) >= 0x100_0000 + 0x40000,
                "above where the kernel decompresses (16 MiB + init_size)")
        #expect(try memory.read(GuestAddress(UInt64(initrdAddress)), count: 10000) == initrd)
        // e820: low memory and RAM from 1 MiB.
        #expect(params[0x1E8] == 2)
        #expect(r.u64(at: 0x2D0) == 0 && r.u64(at: 0x2D8) == 0x9FC00 && r.u32(at: 0x2E0) == 1)
        #expect(r.u64(at: 0x2E4) == 0x100000 && r.u64(at: 0x2EC) == (64 << 20) - 0x100000)
        // The identity map: PML4 -> PDPT -> a directory of 2 MiB pages.
        #expect(try memory.load(UInt64.self, at: GuestAddress(0x9000)) == 0xA003)
        #expect(try memory.load(UInt64.self, at: GuestAddress(0xB008)) == 0x200083)
        #expect(try memory.load(UInt64.self, at: GuestAddress(0xA018)) == 0xE003, "the fourth GiB")
    }

    @Test func refusesALongCommandLineAndAKernelThatDoesNotFit() throws {
        let memory = try GuestMemory(size: 32 << 20)
        let image = try LinuxImage(parsing: craftedBzImage(commandLineSize: 16))
        #expect(throws: LinuxBootError.commandLineTooLong(20, limit: 16)) {
            try LinuxLoader.load(image, commandLine: String(repeating: "x", count: 20), initrd: nil, into: memory)
        }
        let huge = try LinuxImage(parsing: craftedBzImage(initSize: 17 << 20))
        // 17 MiB decompressed from 16 MiB does not fit in 32 MiB, though 1 MiB + 17 MiB would.
        #expect(throws: LinuxBootError.self) { try LinuxLoader.load(huge, commandLine: "", initrd: nil, into: memory) }
        let fits = try LinuxImage(parsing: craftedBzImage())
        #expect(throws: LinuxBootError.self) {
            try LinuxLoader.load(fits, commandLine: "", initrd: [UInt8](repeating: 1, count: 16 << 20), into: memory)
        }
        #expect(throws: Never.self, "an initrd that fits above the decompressed kernel") {
            try LinuxLoader.load(fits, commandLine: "", initrd: [UInt8](repeating: 1, count: 12 << 20), into: memory)
        }
    }
}
