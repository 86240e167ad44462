import TernWire

/// What a VM is, independent of where it runs: sizes and the boot
/// configuration. A receiver checks it before it accepts anything else.
public struct MachineDescription: Equatable, Sendable {
    public static let version: UInt32 = 1
    public static let tag = "MACH"

    public var memorySize: UInt64
    public var vcpuCount: UInt32
    public var kernelPath: String
    public var commandLine: String

    public init(memorySize: UInt64, vcpuCount: UInt32, kernelPath: String, commandLine: String) {
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.kernelPath = kernelPath
        self.commandLine = commandLine
    }

    public var section: StateSection {
        var w = WireWriter()
        w.write(memorySize)
        w.write(vcpuCount)
        w.writeString(kernelPath)
        w.writeString(commandLine)
        return StateSection(tag: Self.tag, version: Self.version, body: w.bytes)
    }

    public init(section: StateSection) throws(WireError) {
        guard section.version == Self.version else {
            throw .unsupportedVersion("machine description version \(section.version) (this tern reads \(Self.version))")
        }
        var r = WireReader(section.body, context: "machine description")
        memorySize = try r.read()
        vcpuCount = try r.read()
        kernelPath = try r.readString()
        commandLine = try r.readString()
        try r.expectEnd()
        guard memorySize >= GuestMemory.minimumSize, memorySize <= GuestMemory.maximumSize, memorySize % (1 << 20) == 0 else {
            throw .malformed("machine description: memory size \(memorySize)")
        }
        guard (1...UInt32(MachineConfiguration.maximumVcpus)).contains(vcpuCount) else {
            throw .malformed("machine description: \(vcpuCount) vCPUs")
        }
    }
}

/// The complete state of a VM except its memory: one value that snapshots
/// write and migrations send, as a list of tagged, versioned sections.
public struct MachineStateSnapshot: Sendable {
    public var description: MachineDescription
    public var platform: PlatformState
    public var vcpus: [VcpuState]
    public var serial: Serial16550.State

    public var sections: [StateSection] {
        [description.section, platform.section] + vcpus.map(\.section) + [serial.section]
    }

    /// Decodes sections, insisting on exactly the set a VM needs: an unknown
    /// tag, a missing or repeated component, or vCPUs that do not match the
    /// description are errors rather than guesses.
    public init(sections: [StateSection]) throws(WireError) {
        var description: MachineDescription?
        var platform: PlatformState?
        var serial: Serial16550.State?
        var vcpus: [VcpuState] = []
        for section in sections {
            switch section.tag {
            case MachineDescription.tag:
                guard description == nil else { throw .malformed("state: two machine descriptions") }
                description = try MachineDescription(section: section)
            case PlatformState.tag:
                guard platform == nil else { throw .malformed("state: two platform sections") }
                platform = try PlatformState(section: section)
            case VcpuState.tag:
                vcpus.append(try VcpuState(section: section))
            case Serial16550.State.tag:
                guard serial == nil else { throw .malformed("state: two UART sections") }
                serial = try Serial16550.State(section: section)
            default:
                throw .malformed("state: unknown section '\(section.tag)' (written by a newer tern?)")
            }
        }
        guard let description else { throw .malformed("state: no machine description") }
        guard let platform else { throw .malformed("state: no platform section") }
        guard let serial else { throw .malformed("state: no UART section") }
        guard vcpus.map(\.id) == Array(0..<description.vcpuCount) else {
            throw .malformed("state: vCPU sections \(vcpus.map(\.id)) do not match \(description.vcpuCount) vCPUs")
        }
        self.init(description: description, platform: platform, vcpus: vcpus, serial: serial)
    }

    public init(description: MachineDescription, platform: PlatformState, vcpus: [VcpuState], serial: Serial16550.State) {
        self.description = description
        self.platform = platform
        self.vcpus = vcpus
        self.serial = serial
    }
}
