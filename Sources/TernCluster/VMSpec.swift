import Foundation

/// What a host needs to start a VM, and to start the empty VM a migration fills: the
/// same kernel, command line, memory and vCPUs on every host it visits.
public struct VMSpec: Codable, Sendable, Equatable {
    public var name: String
    public var kernel: String
    public var cmdline: String
    public var memoryMib: UInt64
    public var cpus: Int

    public init(name: String, kernel: String, cmdline: String = "", memoryMib: UInt64, cpus: Int = 1) {
        self.name = name
        self.kernel = kernel
        self.cmdline = cmdline
        self.memoryMib = memoryMib
        self.cpus = cpus
    }

    public static let memoryRange: ClosedRange<UInt64> = 2...(1 << 20)
    public static let cpuRange: ClosedRange<Int> = 1...64

    /// Names are what `tern run --name` accepts: they become file and socket names on every host.
    public static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count <= 64 && name.first != "." && name.first != "-"
            && name.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "." || $0 == "_" || $0 == "-") }
    }

    /// Why this spec cannot be started, or nil.
    public var problem: String? {
        if !Self.isValidName(name) { return "VM name '\(name)' must be 1-64 letters, digits, '.', '_' or '-' (not starting with '.' or '-')" }
        if !kernel.hasPrefix("/") { return "kernel '\(kernel)' must be an absolute path (it is opened on every host the VM visits)" }
        if !Self.memoryRange.contains(memoryMib) { return "memory_mib \(memoryMib) is outside \(Self.memoryRange.lowerBound)-\(Self.memoryRange.upperBound)" }
        if !Self.cpuRange.contains(cpus) { return "cpus \(cpus) is outside \(Self.cpuRange.lowerBound)-\(Self.cpuRange.upperBound)" }
        if cmdline.utf8.count > 4096 { return "cmdline is longer than 4096 bytes" }
        return nil
    }
}
