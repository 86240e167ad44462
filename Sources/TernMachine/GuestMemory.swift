import CKVM
import Glibc
import TernKVM

/// Guest RAM: one memfd (or, with huge pages, a tmpfs file that behaves as
/// one: `GuestMemoryBacking`), mapped once into the VMM and exposed to the
/// guest as one or two KVM memory slots.
///
/// The memfd (rather than anonymous memory) lets later work share the same
/// pages with another process, snapshot them and register them with
/// userfaultfd. Pages are allocated lazily: a 8 GiB guest that touches 100 MiB
/// costs 100 MiB.
///
/// Layout, as on a PC: RAM below 3 GiB starts at address 0; the rest starts at
/// 4 GiB, leaving [3 GiB, 4 GiB) for the LAPIC, IOAPIC and future MMIO.
public final class GuestMemory: @unchecked Sendable {
    // Sendable: every stored property is immutable; the bytes are guest RAM,
    // shared with vCPU threads by design.
    public static let minimumSize: UInt64 = 16 << 20
    public static let maximumSize: UInt64 = 1 << 40
    public static let lowMemoryLimit: UInt64 = 3 << 30
    public static let highMemoryStart: UInt64 = 4 << 30
    public static let pageSize: UInt64 = 4096

    /// A contiguous run of guest-physical RAM and where it lives in the memfd.
    public struct Region: Equatable, Sendable {
        public let start: GuestAddress
        public let size: UInt64
        public let fileOffset: UInt64
        public var end: GuestAddress { start + size }
    }

    public let size: UInt64
    public let regions: [Region]
    public let file: FileDescriptor
    public let mapping: HostMapping
    /// Pages devices wrote (`GuestRAM.noteDeviceWrite`), for migrations to merge with KVM's dirty log.
    public let deviceWrites: DeviceWriteLog

    public enum Error: Swift.Error, Equatable, CustomStringConvertible {
        case badSize(UInt64)
        case outOfRange(GuestAddress, length: UInt64)

        public var description: String {
            switch self {
            case .badSize(let size):
                "memory size \(ByteSize(bytes: size)) is not supported (from 16M to 1T, a multiple of 1M)"
            case .outOfRange(let address, let length):
                "guest-physical range \(address)+\(length) is outside guest RAM"
            }
        }
    }

    /// Whether the memory is backed by huge pages (`GuestMemoryBacking`); pages still move 4 KiB at a time.
    public let usesHugePages: Bool

    public init(size: UInt64, hugePages: HugePages = .off) throws {
        guard size >= Self.minimumSize, size <= Self.maximumSize, size % (1 << 20) == 0 else {
            throw Error.badSize(size)
        }
        self.size = size
        let low = min(size, Self.lowMemoryLimit)
        var regions = [Region(start: GuestAddress(0), size: low, fileOffset: 0)]
        if size > low {
            regions.append(Region(start: GuestAddress(Self.highMemoryStart), size: size - low, fileOffset: low))
        }
        self.regions = regions

        (file, usesHugePages) = try GuestMemoryBacking.makeFile(size: size, hugePages: hugePages)
        let fd = file.rawValue
        guard ftruncate(fd, off_t(size)) == 0 else { throw SystemError("ftruncate guest RAM to \(size) bytes", errno: errno) }
        mapping = try HostMapping(length: Int(size), fd: fd, flags: MAP_SHARED | MAP_NORESERVE)
        deviceWrites = DeviceWriteLog(pageCount: Int(size / Self.pageSize))
    }

    /// Allocates and touches every page now (`--prealloc`, like QEMU's
    /// -mem-prealloc): the first write to memory the host never used costs
    /// about 10 µs a page on these machines (docs/MIGRATION.md, "Preallocated
    /// destinations"), which would otherwise be paid while pages stream in.
    /// The pages are mapped here too, so incoming pages land in place.
    public func preallocate() throws {
        try populate(fileOffset: 0, count: mapping.length, purpose: "preallocating \(ByteSize(bytes: size)) of guest RAM")
        isPreallocated = true
    }

    /// Allocates and maps a range of the memfd now, in one call (MADV_POPULATE_WRITE).
    public func populate(fileOffset: Int, count: Int, purpose: @autoclosure () -> String = "allocating guest RAM") throws {
        guard madvise(mapping.base + fileOffset, count, 23 /* MADV_POPULATE_WRITE */) == 0 else {
            throw SystemError(purpose(), errno: errno)
        }
    }

    /// Whether incoming pages are written through the mapping (and zero pages zeroed there)
    /// rather than pwritten into the file (and punched out): preallocated memory is mapped
    /// already, and huge pages are populated 2 MiB at a time, for about what a pwrite costs,
    /// where punching 4 KiB out of one would split it.
    public var takesPagesInPlace: Bool { isPreallocated || usesHugePages }

    /// Every page is allocated (`preallocate`) and stays so (zeroed pages are
    /// written, not punched out): writing through the mapping costs a copy
    /// and nothing more, so incoming pages land in place.
    public private(set) var isPreallocated = false

    /// Unmaps every page here, keeping them in the memfd (preallocated memory about to
    /// receive a post-copy: its pages must fault until their contents arrive).
    public func unmapAll() throws {
        guard madvise(mapping.base, mapping.length, MADV_DONTNEED) == 0 else {
            throw SystemError("unmapping guest RAM", errno: errno)
        }
    }

    /// Registers every region as a KVM memory slot (slot numbers from 0).
    public func register(with vm: VirtualMachine, logDirtyPages: Bool = false) throws {
        for (slot, region) in regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.start.rawValue, mapping: mapping,
                                   mappingOffset: Int(region.fileOffset), size: Int(region.size),
                                   logDirtyPages: logDirtyPages)
        }
    }

    /// The region holding all of [address, address + length), if any.
    public func region(containing address: GuestAddress, length: UInt64 = 1) -> Region? {
        regions.first { region in
            address >= region.start && address.rawValue - region.start.rawValue <= region.size
                && length <= region.size - (address.rawValue - region.start.rawValue)
        }
    }

    /// Offset in the memfd (and in `mapping`) of a guest-physical range that
    /// lies inside one region.
    public func fileOffset(of address: GuestAddress, length: UInt64 = 1) throws(Error) -> UInt64 {
        guard length > 0, let region = region(containing: address, length: length) else {
            throw .outOfRange(address, length: length)
        }
        return region.fileOffset + (address.rawValue - region.start.rawValue)
    }

    /// Host pointer to a guest-physical range that lies inside one region.
    public func hostPointer(_ address: GuestAddress, length: UInt64) throws(Error) -> UnsafeMutableRawPointer {
        mapping.base + Int(try fileOffset(of: address, length: length))
    }

    public func read(_ address: GuestAddress, count: Int) throws(Error) -> [UInt8] {
        let source = try hostPointer(address, length: UInt64(count))
        return [UInt8](UnsafeRawBufferPointer(start: source, count: count))
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws(Error) {
        guard let source = bytes.baseAddress, bytes.count > 0 else { return }
        let destination = try hostPointer(address, length: UInt64(bytes.count))
        destination.copyMemory(from: source, byteCount: bytes.count)
    }

    public func write(_ bytes: [UInt8], at address: GuestAddress) throws(Error) {
        guard !bytes.isEmpty else { return }
        let destination = try hostPointer(address, length: UInt64(bytes.count))
        destination.copyMemory(from: bytes, byteCount: bytes.count)
    }

    public func load<T: FixedWidthInteger>(_ type: T.Type, at address: GuestAddress) throws(Error) -> T {
        let pointer = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: pointer.loadUnaligned(as: T.self))
    }

    public func store<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(Error) {
        let pointer = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        pointer.storeBytes(of: value.littleEndian, as: T.self)
    }

    /// Zeroes a range (the .bss of a loaded kernel).
    public func zero(_ address: GuestAddress, length: UInt64) throws(Error) {
        guard length > 0 else { return }
        memset(try hostPointer(address, length: length), 0, Int(length))
    }
}
