/// Where Tern puts the structures a Multiboot kernel receives. They sit in
/// low memory, below the 1 MiB line where kernels load, and a kernel that
/// wants that space is refused rather than silently overwritten.
public enum MultibootLayout {
    public static let gdtAddress: UInt64 = 0x6000
    public static let infoAddress: UInt64 = 0x7000
    public static let memoryMapAddress: UInt64 = 0x7100
    public static let loaderNameAddress: UInt64 = 0x7800
    public static let commandLineAddress: UInt64 = 0x8000
    public static let commandLineCapacity = 0x1000
    public static let areaStart: UInt64 = gdtAddress
    public static let areaEnd: UInt64 = commandLineAddress + UInt64(commandLineCapacity)
    /// The conventional end of usable low memory (the EBDA starts here on a PC).
    public static let lowMemoryEnd: UInt64 = 0x9FC00
    public static let bootloaderMagic: UInt32 = 0x2BAD_B002
    public static let codeSelector: UInt16 = 0x08
    public static let dataSelector: UInt16 = 0x10
}

/// What the vCPU needs to start a loaded Multiboot kernel.
public struct MultibootEntry: Equatable, Sendable {
    public var entry: UInt32
    public var infoAddress: UInt32
    public var gdtAddress: UInt32
    public var gdtLimit: UInt16
}

/// A physical memory range as the Multiboot (e820-style) map describes it.
public struct MemoryMapEntry: Equatable, Sendable {
    public enum Kind: UInt32, Sendable { case available = 1, reserved = 2 }
    public var base: UInt64
    public var length: UInt64
    public var kind: Kind
}

public enum MultibootLoader {
    /// The memory map a guest of this RAM layout is told about.
    public static func memoryMap(for memory: GuestMemory) -> [MemoryMapEntry] {
        var map = [
            MemoryMapEntry(base: 0, length: MultibootLayout.lowMemoryEnd, kind: .available),
            MemoryMapEntry(base: MultibootLayout.lowMemoryEnd, length: 0x100000 - MultibootLayout.lowMemoryEnd, kind: .reserved),
        ]
        for region in memory.regions {
            let start = max(region.start.rawValue, 0x100000)
            if region.end.rawValue > start {
                map.append(MemoryMapEntry(base: start, length: region.end.rawValue - start, kind: .available))
            }
        }
        return map
    }

    /// Copies the kernel into guest memory and writes the Multiboot
    /// information structure, command line, memory map and a flat GDT.
    public static func load(_ image: MultibootImage, commandLine: String, into memory: GuestMemory) throws -> MultibootEntry {
        for segment in image.segments {
            guard memory.region(containing: GuestAddress(segment.address), length: segment.memorySize) != nil else {
                throw MultibootError.doesNotFit(start: segment.address, end: segment.end, memory: memory.size)
            }
            if segment.address < MultibootLayout.areaEnd && segment.end > MultibootLayout.areaStart {
                throw MultibootError.overlapsBootInfo(start: segment.address, end: segment.end)
            }
        }
        let commandLineBytes = Array(commandLine.utf8) + [0]
        guard commandLineBytes.count <= MultibootLayout.commandLineCapacity else {
            throw MultibootError.commandLineTooLong(commandLineBytes.count - 1)
        }

        for segment in image.segments {
            let address = GuestAddress(segment.address)
            try segment.bytes.withUnsafeBytes { try memory.write($0, at: address) }
            try memory.zero(address + UInt64(segment.bytes.count), length: segment.memorySize - UInt64(segment.bytes.count))
        }

        // A flat GDT the entry state's selectors refer to, so a kernel that
        // reloads a segment register before installing its own GDT still works.
        let gdt: [UInt64] = [0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF]
        for (i, descriptor) in gdt.enumerated() {
            try memory.store(descriptor, at: GuestAddress(MultibootLayout.gdtAddress + UInt64(i * 8)))
        }

        try memory.write(commandLineBytes, at: GuestAddress(MultibootLayout.commandLineAddress))
        let loaderName = Array("Tern".utf8) + [0]
        try memory.write(loaderName, at: GuestAddress(MultibootLayout.loaderNameAddress))

        let map = memoryMap(for: memory)
        var mapBytes: [UInt8] = []
        for entry in map {
            mapBytes += le(UInt32(20)) + le(entry.base) + le(entry.length) + le(entry.kind.rawValue)
        }
        try memory.write(mapBytes, at: GuestAddress(MultibootLayout.memoryMapAddress))

        // mem_upper: KiB of contiguous RAM from 1 MiB up to the first hole.
        let upperEnd = memory.regions[0].end.rawValue
        let info = MultibootInfo(
            flags: MultibootInfo.hasMemory | MultibootInfo.hasCommandLine | MultibootInfo.hasModules
                | MultibootInfo.hasMemoryMap | MultibootInfo.hasLoaderName,
            memLowerKiB: UInt32(MultibootLayout.lowMemoryEnd / 1024),
            memUpperKiB: UInt32((upperEnd - 0x100000) / 1024),
            commandLine: UInt32(MultibootLayout.commandLineAddress),
            memoryMapLength: UInt32(mapBytes.count),
            memoryMap: UInt32(MultibootLayout.memoryMapAddress),
            loaderName: UInt32(MultibootLayout.loaderNameAddress))
        try memory.write(info.encoded, at: GuestAddress(MultibootLayout.infoAddress))

        return MultibootEntry(entry: image.entry, infoAddress: UInt32(MultibootLayout.infoAddress),
                              gdtAddress: UInt32(MultibootLayout.gdtAddress), gdtLimit: UInt16(gdt.count * 8 - 1))
    }
}

/// The Multiboot information structure (the part Tern fills in).
struct MultibootInfo {
    static let hasMemory: UInt32 = 1 << 0
    static let hasCommandLine: UInt32 = 1 << 2
    static let hasModules: UInt32 = 1 << 3
    static let hasMemoryMap: UInt32 = 1 << 6
    static let hasLoaderName: UInt32 = 1 << 9
    static let size = 116

    var flags: UInt32
    var memLowerKiB: UInt32
    var memUpperKiB: UInt32
    var commandLine: UInt32
    var memoryMapLength: UInt32
    var memoryMap: UInt32
    var loaderName: UInt32

    var encoded: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.size)
        func put(_ value: UInt32, _ offset: Int) { bytes.replaceSubrange(offset..<offset + 4, with: le(value)) }
        put(flags, 0)
        put(memLowerKiB, 4)
        put(memUpperKiB, 8)
        put(0xFFFF_FFFF, 12) // boot_device: none
        put(commandLine, 16)
        put(0, 20)           // mods_count
        put(0, 24)           // mods_addr
        put(memoryMapLength, 44)
        put(memoryMap, 48)
        put(loaderName, 64)
        return bytes
    }
}

func le<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.littleEndian) { Array($0) }
}
