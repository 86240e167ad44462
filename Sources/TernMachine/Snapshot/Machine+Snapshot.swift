import TernDevices
/// Snapshots of a running VM (cold migration: suspend to a file, resume
/// elsewhere with `tern run --restore`).
extension Machine {
    /// Pauses the VM if it runs, writes its state and memory to `path`, and
    /// resumes it only when asked (and only if it was running before).
    public func snapshot(to path: String, resume: Bool) throws -> SnapshotStatistics {
        guard !memoryIncomplete else { throw ConfigurationError("the VM's memory is still arriving (post-copy): no snapshot until it is complete") }
        let wasRunning = currentState == .running
        if wasRunning { try pause() }
        let statistics: SnapshotStatistics
        do {
            let state = try captureState()
            statistics = try SnapshotWriter.write(state: state, memory: memory, to: path)
        } catch {
            // A failed snapshot must not leave a running VM paused behind the user's back.
            if wasRunning && resume { try? self.resume() }
            throw error
        }
        if wasRunning && resume { try self.resume() }
        return statistics
    }

    /// Builds a VM from a snapshot file: memory and state loaded, vCPUs not
    /// yet started. `expectedMemory`/`expectedVcpus` are what the user asked
    /// for on the command line, if anything; a disagreement is an error.
    /// `devices`: the disks and NICs to attach instead of those the snapshot names (same ids).
    public static func restoring(from path: String, expectedMemory: UInt64?, expectedVcpus: Int?,
                                 serial: SerialTarget, kvmPath: String = "/dev/kvm", preallocate: Bool = false,
                                 hugePages: HugePages = .auto, devices: [DeviceSpec]? = nil) throws -> (Machine, SnapshotStatistics) {
        let reader = try SnapshotReader(path: path)
        let description = reader.state.description
        if let expectedMemory, expectedMemory != description.memorySize {
            throw ConfigurationError("snapshot \(path) is of a \(ByteSize(bytes: description.memorySize)) VM, but --memory says \(ByteSize(bytes: expectedMemory))")
        }
        if let expectedVcpus, expectedVcpus != Int(description.vcpuCount) {
            throw ConfigurationError("snapshot \(path) has \(description.vcpuCount) vCPUs, but --cpus says \(expectedVcpus)")
        }
        var configuration = MachineConfiguration(kernelPath: nil, commandLine: description.commandLine,
                                                 memorySize: description.memorySize, vcpuCount: Int(description.vcpuCount),
                                                 serial: serial, kvmPath: kvmPath, preallocate: preallocate, hugePages: hugePages)
        configuration.bootedKernel = description.kernelPath.isEmpty ? nil : description.kernelPath
        if !description.name.isEmpty { configuration.name = description.name }
        // The snapshot's own devices (the same image paths and TAPs), unless the user names others.
        configuration.devices = devices ?? description.devices
        let machine = try Machine(configuration: configuration)
        let statistics = try reader.loadMemory(into: machine.memory)
        try machine.restoreState(reader.state)
        return (machine, statistics)
    }
}
