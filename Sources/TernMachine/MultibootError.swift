/// Why a kernel image cannot be booted with the Multiboot v1 protocol.
public enum MultibootError: Error, Equatable, CustomStringConvertible {
    case notMultiboot
    case badChecksum
    case unsupportedFlags(UInt32)
    case badAoutKludge(String)
    case badELF(String)
    case doesNotFit(start: UInt64, end: UInt64, memory: UInt64)
    case overlapsBootInfo(start: UInt64, end: UInt64)
    case commandLineTooLong(Int)
    case entryOutsideImage(UInt64)

    public var description: String {
        switch self {
        case .notMultiboot:
            "not a Multiboot kernel (no header with magic 0x1BADB002 in the first 8192 bytes)"
        case .badChecksum:
            "Multiboot header checksum is wrong"
        case .unsupportedFlags(let flags):
            "Multiboot header requires features Tern does not provide (flags 0x\(String(flags, radix: 16)))"
        case .badAoutKludge(let why):
            "bad Multiboot address fields (a.out kludge): \(why)"
        case .badELF(let why):
            "bad ELF kernel: \(why)"
        case .doesNotFit(let start, let end, let memory):
            "kernel occupies 0x\(String(start, radix: 16))-0x\(String(end, radix: 16)), which does not fit in \(ByteSize(bytes: memory)) of guest RAM"
        case .overlapsBootInfo(let start, let end):
            "kernel occupies 0x\(String(start, radix: 16))-0x\(String(end, radix: 16)), overlapping the boot information area"
        case .commandLineTooLong(let length):
            "kernel command line is \(length) bytes; at most \(MultibootLayout.commandLineCapacity - 1) fit"
        case .entryOutsideImage(let entry):
            "entry point 0x\(String(entry, radix: 16)) is not a 32-bit address"
        }
    }
}
