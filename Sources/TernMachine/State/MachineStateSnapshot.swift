import TernDevices
import TernWire

/// What a VM is, independent of where it runs: sizes, the boot configuration
/// and its devices. A receiver checks it before it accepts anything else, and
/// it is the one list of devices that snapshots, restores and migrations read.
public struct MachineDescription: Equatable, Sendable {
    /// Version 2 added the devices, version 3 the VM's name; versions 1 and 2 are still read (with no name).
    public static let version: UInt32 = 3
    public static let tag = "MACH"

    public var memorySize: UInt64
    public var vcpuCount: UInt32
    public var kernelPath: String
    public var commandLine: String
    public var devices: [DeviceSpec]
    /// The VM's name (`tern run --name`), which it keeps wherever it moves; migration tokens name it.
    /// Empty in descriptions of older versions.
    public var name: String

    public init(memorySize: UInt64, vcpuCount: UInt32, kernelPath: String, commandLine: String, devices: [DeviceSpec] = [],
                name: String = "") {
        self.name = name
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.kernelPath = kernelPath
        self.commandLine = commandLine
        self.devices = devices
    }

    public var section: StateSection {
        var w = WireWriter()
        w.write(memorySize)
        w.write(vcpuCount)
        w.writeString(kernelPath)
        w.writeString(commandLine)
        w.write(UInt16(devices.count))
        for device in devices {
            switch device {
            case .disk(let disk):
                w.write(UInt8(1))
                w.writeString(disk.id)
                w.writeString(disk.path)
                w.write(UInt8(disk.readOnly ? 1 : 0))
            case .network(let network):
                w.write(UInt8(2))
                w.writeString(network.id)
                w.writeString(network.tap)
                w.write(network.mac.bytes)
            }
        }
        w.writeString(name)
        return StateSection(tag: Self.tag, version: Self.version, body: w.bytes)
    }

    public init(section: StateSection) throws(WireError) {
        guard (1...Self.version).contains(section.version) else {
            throw .unsupportedVersion("machine description version \(section.version) (this tern reads 1 to \(Self.version))")
        }
        var r = WireReader(section.body, context: "machine description")
        memorySize = try r.read()
        vcpuCount = try r.read()
        kernelPath = try r.readString()
        commandLine = try r.readString()
        devices = []
        if section.version >= 2 {
            let count = Int(try r.read(UInt16.self))
            guard count <= MmioWindow.deviceLimit else { throw .malformed("machine description: \(count) devices") }
            for _ in 0..<count {
                switch try r.read(UInt8.self) {
                case 1:
                    let id = try r.readString(maximum: 64), path = try r.readString(maximum: 4096)
                    devices.append(.disk(DiskSpec(id: id, path: path, readOnly: try r.read(UInt8.self) != 0)))
                case 2:
                    let id = try r.readString(maximum: 64), tap = try r.readString(maximum: 16)
                    devices.append(.network(NetworkSpec(id: id, tap: tap, mac: MACAddress(bytes: try r.readBytes(6)))))
                case let kind:
                    throw .malformed("machine description: device kind \(kind)")
                }
            }
            do { try devices.validate() } catch { throw .malformed("machine description: \(error)") }
        }
        name = section.version >= 3 ? try r.readString(maximum: MachineConfiguration.maximumNameLength) : ""
        if !name.isEmpty, let problem = MachineConfiguration.problem(withName: name) { throw .malformed("machine description: \(problem)") }
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
    /// One per device of `description.devices`, in the same order.
    public var devices: [VirtioDeviceState]

    public var sections: [StateSection] {
        [description.section, platform.section] + vcpus.map(\.section) + [serial.section] + devices.map(\.section)
    }

    /// Decodes sections, insisting on exactly the set a VM needs: an unknown
    /// tag, a missing or repeated component, or vCPUs that do not match the
    /// description are errors rather than guesses.
    public init(sections: [StateSection]) throws(WireError) {
        var description: MachineDescription?
        var platform: PlatformState?
        var serial: Serial16550.State?
        var vcpus: [VcpuState] = []
        var devices: [VirtioDeviceState] = []
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
            case VirtioDeviceState.tag:
                devices.append(try VirtioDeviceState(section: section))
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
        guard devices.map(\.id) == description.devices.map(\.id) else {
            throw .malformed("state: device sections \(devices.map(\.id)) do not match the devices \(description.devices.map(\.id))")
        }
        self.init(description: description, platform: platform, vcpus: vcpus, serial: serial, devices: devices)
    }

    public init(description: MachineDescription, platform: PlatformState, vcpus: [VcpuState], serial: Serial16550.State,
                devices: [VirtioDeviceState] = []) {
        self.description = description
        self.platform = platform
        self.vcpus = vcpus
        self.serial = serial
        self.devices = devices
    }
}
