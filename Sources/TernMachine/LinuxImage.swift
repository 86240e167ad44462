/// A parsed Linux bzImage (Documentation/arch/x86/boot.rst): its setup header
/// and the protected-mode kernel that follows the real-mode setup code. Pure
/// parsing, so it is unit-tested on crafted images.
public struct LinuxImage: Equatable, Sendable {
    /// "HdrS" at offset 0x202.
    static let headerMagic: UInt32 = 0x5372_6448
    static let setupHeaderOffset = 0x1F1
    /// 2.12: xloadflags and the 64-bit entry point.
    static let minimumProtocol: UInt16 = 0x020C
    static let kernel64Flag: UInt16 = 1 << 0

    /// The setup header as the file holds it (0x1F1 up to its end), copied into boot_params.
    public var setupHeader: [UInt8]
    public var protocolVersion: UInt16
    /// The protected-mode kernel (loaded at 1 MiB; its 64-bit entry is at +0x200).
    public var kernel: ArraySlice<UInt8>
    /// Bytes the kernel needs from its load address while it decompresses (init_size).
    public var initSize: UInt32
    /// The highest address an initrd may end at (initrd_addr_max).
    public var initrdAddressMaximum: UInt32
    /// The longest command line the kernel takes, without its NUL (cmdline_size).
    public var commandLineSize: UInt32
    /// Where the kernel decompresses itself: at least its preferred address (pref_address,
    /// LOAD_PHYSICAL_ADDR, usually 16 MiB), aligned to kernel_alignment.
    public var preferredAddress: UInt64
    public var alignment: UInt64

    /// Whether `bytes` look like a bzImage (so the loader knows which protocol to use).
    public static func matches(_ bytes: [UInt8]) -> Bool {
        ByteReader(bytes: bytes).u32(at: 0x202) == headerMagic
    }

    public init(parsing bytes: [UInt8]) throws(LinuxBootError) {
        let r = ByteReader(bytes: bytes)
        guard r.u32(at: 0x202) == Self.headerMagic, let version = r.u16(at: 0x206) else { throw .notLinux }
        guard version >= Self.minimumProtocol else { throw .protocolTooOld(version) }
        guard let xloadflags = r.u16(at: 0x236), xloadflags & Self.kernel64Flag != 0 else { throw .no64BitEntry }
        guard let headerLength = r.u8(at: 0x201) else { throw .truncated }
        let headerEnd = 0x202 + Int(headerLength)
        var setupSectors = Int(r.u8(at: Self.setupHeaderOffset) ?? 0)
        if setupSectors == 0 { setupSectors = 4 }
        let kernelStart = (setupSectors + 1) * 512
        guard headerEnd <= kernelStart, kernelStart < bytes.count else { throw .truncated }
        guard let initSize = r.u32(at: 0x260), let initrdMaximum = r.u32(at: 0x22C), let commandLineSize = r.u32(at: 0x238),
              let preferred = r.u64(at: 0x258), let alignment = r.u32(at: 0x230) else {
            throw .truncated
        }
        preferredAddress = preferred
        self.alignment = alignment.nonzeroBitCount == 1 ? UInt64(alignment) : 0x20_0000
        setupHeader = Array(bytes[Self.setupHeaderOffset..<headerEnd])
        protocolVersion = version
        kernel = bytes[kernelStart...]
        self.initSize = max(initSize, UInt32(bytes.count - kernelStart))
        initrdAddressMaximum = initrdMaximum
        self.commandLineSize = commandLineSize
    }
}

public enum LinuxBootError: Error, Equatable, CustomStringConvertible {
    case notLinux
    case protocolTooOld(UInt16)
    case no64BitEntry
    case truncated
    case doesNotFit(String)
    case commandLineTooLong(Int, limit: UInt32)
    case cannotReadInitrd(String, String)
    case initrdWithoutKernel

    public var description: String {
        switch self {
        case .notLinux: "not a Linux bzImage (no 'HdrS' setup header)"
        case .protocolTooOld(let version): "Linux boot protocol \(version >> 8).\(String(format: "%02d", version & 0xFF)) is too old (the 64-bit entry needs 2.12)"
        case .no64BitEntry: "this bzImage has no 64-bit entry point (xloadflags bit 0)"
        case .truncated: "the bzImage is truncated"
        case .doesNotFit(let what): "\(what) does not fit in guest RAM"
        case .commandLineTooLong(let length, let limit): "the kernel command line is \(length) bytes; this kernel takes at most \(limit)"
        case .cannotReadInitrd(let path, let why): "cannot read initrd \(path): \(why)"
        case .initrdWithoutKernel: "--initrd needs a Linux --kernel"
        }
    }
}

/// The kernels `tern run --kernel` boots, told apart by their headers.
public enum KernelImage: Equatable {
    case multiboot(MultibootImage)
    case linux(LinuxImage)

    /// A bzImage by its "HdrS" header, otherwise a Multiboot kernel (whose errors name what is missing).
    public init(parsing bytes: [UInt8]) throws {
        self = LinuxImage.matches(bytes) ? .linux(try LinuxImage(parsing: bytes)) : .multiboot(try MultibootImage(parsing: bytes))
    }
}
