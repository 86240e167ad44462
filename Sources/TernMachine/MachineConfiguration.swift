import Foundation
import TernDevices

/// Everything needed to build a VM, as given on `tern run`'s command line.
public struct MachineConfiguration: Sendable, Equatable {
    /// The kernel to boot; nil when the VM's state and memory will be restored instead.
    public var kernelPath: String?
    public var commandLine: String
    /// An initial RAM disk for a Linux kernel (`--initrd`).
    public var initrdPath: String?
    public var memorySize: UInt64
    public var vcpuCount: Int
    public var serial: SerialTarget
    public var kvmPath: String
    /// Allocate and touch all guest RAM before the VM starts (`--prealloc`).
    public var preallocate: Bool
    /// Whether guest RAM takes transparent huge pages (`--thp`).
    public var hugePages: HugePages
    /// A VM restored from a snapshot or received by migration: the kernel it was first booted with,
    /// as that host named it (for `tern info`, and passed on with the VM; nothing reads the file).
    public var bootedKernel: String?
    /// Disks and NICs (`--disk`, `--net`), in the order of their MMIO slots.
    public var devices: [DeviceSpec] = []
    /// When disk images are locked: on open, or (a migration's destination on shared storage) once the source let go.
    public var diskLocking: DiskImage.Locking = .atOpen
    /// The VM's name (`--name`; default a new UUID), kept across snapshots and migrations.
    public var name: String = MachineConfiguration.newName()

    /// The kernel this VM runs, as whoever booted it named it.
    public var kernelName: String { kernelPath ?? bootedKernel ?? "" }

    public static let maximumVcpus = 64
    public static let maximumNameLength = 128

    /// A fresh name for a VM that was given none.
    public static func newName() -> String { UUID().uuidString.lowercased() }

    /// Why `name` cannot name a VM (nil if it can): letters, digits, '.', '_' and '-', as host names and JWT claims carry them plainly.
    public static func problem(withName name: String) -> String? {
        guard !name.isEmpty, name.utf8.count <= maximumNameLength else { return "a VM name has 1 to \(maximumNameLength) characters" }
        guard name.unicodeScalars.allSatisfy({ $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || ".-_".unicodeScalars.contains($0)) }) else {
            return "a VM name has only letters, digits, '.', '_' and '-' (not '\(name)')"
        }
        return nil
    }

    public init(kernelPath: String?, commandLine: String = "", memorySize: UInt64, vcpuCount: Int = 1,
                serial: SerialTarget = .stdout, kvmPath: String = "/dev/kvm", preallocate: Bool = false,
                hugePages: HugePages = .auto) {
        self.preallocate = preallocate
        self.hugePages = hugePages
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
    /// The VM's name (absent from older tern).
    public var name: String?
    public var state: MachineState
    public var memoryBytes: UInt64
    /// Whether guest RAM is backed by transparent huge pages (absent from older tern: false).
    public var memoryHugePages: Bool?
    public var vcpus: Int
    public var uptimeMs: UInt64
    public var kernel: String
    public var cmdline: String
    public var pid: Int32
    public var exit: MachineExit?
    /// Disks and NICs (absent from older tern: none).
    public var devices: [DeviceInfo]?
}
