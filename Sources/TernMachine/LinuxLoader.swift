/// Where Tern puts what a Linux kernel receives under the 64-bit boot
/// protocol, as Firecracker and Cloud Hypervisor lay it out: all below 1 MiB,
/// where the protected-mode kernel loads.
public enum LinuxLayout {
    public static let gdtAddress: UInt64 = 0x500
    public static let bootParamsAddress: UInt64 = 0x7000
    public static let stackPointer: UInt64 = 0x8FF0
    /// PML4, PDPT, then four page directories of 2 MiB pages: an identity map of the first 4 GiB.
    public static let pml4Address: UInt64 = 0x9000
    public static let pdptAddress: UInt64 = 0xA000
    public static let pageDirectoryAddress: UInt64 = 0xB000
    public static let identityMappedGiB = 4
    public static let commandLineAddress: UInt64 = 0x20000
    public static let commandLineCapacity = 0x10000
    public static let kernelAddress: UInt64 = 0x100000
    /// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
    public static let entryOffset: UInt64 = 0x200
    /// __BOOT_CS and __BOOT_DS, the selectors the protocol requires.
    public static let codeSelector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    public static let gdt: [UInt64] = [0, 0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF]
}

/// What the vCPU needs to enter a loaded Linux kernel in long mode.
public struct LinuxEntry: Equatable, Sendable {
    public var entry: UInt64
    public var bootParams: UInt64
}

public enum LinuxLoader {
    /// struct boot_params offsets (Documentation/arch/x86/zero-page.rst).
    enum BootParams {
        static let size = 4096
        static let e820Count = 0x1E8
        static let e820Table = 0x2D0
        static let e820Maximum = 128
        static let videoMode = 0x1FA
        static let typeOfLoader = 0x210
        static let loadFlags = 0x211
        static let ramdiskImage = 0x218
        static let ramdiskSize = 0x21C
        static let heapEndPointer = 0x224
        static let commandLinePointer = 0x228
    }

    static let loadedHigh: UInt8 = 0x01
    static let canUseHeap: UInt8 = 0x80

    /// The e820 map: low memory up to the EBDA, then each RAM region from 1 MiB.
    static func e820(for memory: GuestMemory) -> [MemoryMapEntry] {
        MultibootLoader.memoryMap(for: memory).filter { $0.kind == .available }
    }

    /// Copies the kernel to 1 MiB and the initrd as high as the kernel allows, writes
    /// boot_params (setup header, e820 map, command line, initrd), a GDT with the
    /// protocol's selectors and page tables that identity-map the first 4 GiB.
    public static func load(_ image: LinuxImage, commandLine: String, initrd: [UInt8]?, into memory: GuestMemory) throws -> LinuxEntry {
        let low = memory.regions[0]
        // The kernel decompresses at the larger of its preferred address and where it was loaded (aligned),
        // and needs init_size from there: nothing else may lie below that end.
        let aligned = (LinuxLayout.kernelAddress + image.alignment - 1) / image.alignment * image.alignment
        let decompressAt = max(aligned, image.preferredAddress)
        let kernelEnd = max(LinuxLayout.kernelAddress + UInt64(image.kernel.count), decompressAt + UInt64(image.initSize))
        guard kernelEnd <= low.end.rawValue else {
            throw LinuxBootError.doesNotFit("the kernel (\(image.initSize) bytes from 0x\(String(decompressAt, radix: 16)) as it decompresses)")
        }
        let commandLineBytes = Array(commandLine.utf8)
        let limit = min(image.commandLineSize, UInt32(LinuxLayout.commandLineCapacity - 1))
        guard commandLineBytes.count <= Int(limit) else { throw LinuxBootError.commandLineTooLong(commandLineBytes.count, limit: limit) }

        try image.kernel.withUnsafeBytes { try memory.write($0, at: GuestAddress(LinuxLayout.kernelAddress)) }
        try memory.write(commandLineBytes + [0], at: GuestAddress(LinuxLayout.commandLineAddress))

        var params = [UInt8](repeating: 0, count: BootParams.size)
        params.replaceSubrange(0x1F1..<0x1F1 + image.setupHeader.count, with: image.setupHeader)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
            params.replaceSubrange(offset..<offset + MemoryLayout<T>.size, with: le(value))
        }
        put(UInt16(0xFFFF), at: BootParams.videoMode)
        params[BootParams.typeOfLoader] = 0xFF
        params[BootParams.loadFlags] |= loadedHigh | canUseHeap
        put(UInt16(0xFE00), at: BootParams.heapEndPointer)
        put(UInt32(LinuxLayout.commandLineAddress), at: BootParams.commandLinePointer)

        if let initrd, !initrd.isEmpty {
            // As high as possible below both the kernel's limit and the end of low RAM, page-aligned.
            let ceiling = min(UInt64(image.initrdAddressMaximum) + 1, low.end.rawValue)
            guard ceiling >= UInt64(initrd.count), (ceiling - UInt64(initrd.count)) & ~0xFFF >= kernelEnd else {
                throw LinuxBootError.doesNotFit("the initrd (\(initrd.count) bytes, above the kernel and below 0x\(String(ceiling, radix: 16)))")
            }
            let address = (ceiling - UInt64(initrd.count)) & ~0xFFF
            try memory.write(initrd, at: GuestAddress(address))
            put(UInt32(address), at: BootParams.ramdiskImage)
            put(UInt32(initrd.count), at: BootParams.ramdiskSize)
        }

        let map = e820(for: memory).prefix(BootParams.e820Maximum)
        params[BootParams.e820Count] = UInt8(map.count)
        for (i, entry) in map.enumerated() {
            let offset = BootParams.e820Table + 20 * i
            put(entry.base, at: offset)
            put(entry.length, at: offset + 8)
            put(entry.kind.rawValue, at: offset + 16)
        }
        try memory.write(params, at: GuestAddress(LinuxLayout.bootParamsAddress))

        for (i, descriptor) in LinuxLayout.gdt.enumerated() {
            try memory.store(descriptor, at: GuestAddress(LinuxLayout.gdtAddress + UInt64(i * 8)))
        }
        try writeIdentityMap(into: memory)
        return LinuxEntry(entry: LinuxLayout.kernelAddress + LinuxLayout.entryOffset, bootParams: LinuxLayout.bootParamsAddress)
    }

    /// Present | writable page-table entries; the directories' entries map 2 MiB pages (PS).
    static func writeIdentityMap(into memory: GuestMemory) throws {
        let present: UInt64 = 0x3, largePage: UInt64 = 0x80
        try memory.store(LinuxLayout.pdptAddress | present, at: GuestAddress(LinuxLayout.pml4Address))
        for gib in 0..<LinuxLayout.identityMappedGiB {
            let directory = LinuxLayout.pageDirectoryAddress + UInt64(gib) * 0x1000
            try memory.store(directory | present, at: GuestAddress(LinuxLayout.pdptAddress + UInt64(gib) * 8))
            var entries = [UInt8]()
            entries.reserveCapacity(4096)
            for index in 0..<512 {
                entries += le((UInt64(gib) << 30 | UInt64(index) << 21) | present | largePage)
            }
            try memory.write(entries, at: GuestAddress(directory))
        }
    }
}
