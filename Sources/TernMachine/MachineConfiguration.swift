/// Everything needed to build a VM, as given on `tern run`'s command line.
public struct MachineConfiguration: Sendable, Equatable {
    /// The kernel to boot; nil when the VM's state and memory will be restored instead.
    public var kernelPath: String?
    public var commandLine: String
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var serial: SerialTarget
    public var kvmPath: String
    /// Allocate and touch all guest RAM before the VM starts (`--prealloc`).
    public var preallocate: Bool

    public static let maximumVcpus = 64

    public init(kernelPath: String?, commandLine: String = "", memorySize: UInt64, vcpuCount: Int = 1,
                serial: SerialTarget = .stdout, kvmPath: String = "/dev/kvm", preallocate: Bool = false) {
        self.preallocate = preallocate
        self.kernelPath = kernelPath
        self.commandLine = commandLine
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.serial = serial
        self.kvmPath = kvmPath
    }
}

/// Where a VM is in its life.
public enum MachineState: String, Codable, Sendable {
    case created, running, paused, exited
}

/// What `tern info` reports.
public struct MachineInfo: Codable, Equatable, Sendable {
    public var state: MachineState
    public var memoryBytes: UInt64
    public var vcpus: Int
    public var uptimeMs: UInt64
    public var kernel: String
    public var cmdline: String
    public var pid: Int32
    public var exit: MachineExit?
}
