import CKVM
import Foundation
import Glibc
import Logging
import TernDevices
import TernKVM

/// A virtual machine: KVM VM, guest memory, vCPUs on their threads, and devices.
///
/// Lifecycle: `init` builds everything and loads the kernel (nothing runs);
/// `start` launches the vCPUs; `pause`/`resume` park and release them; the VM
/// ends when the guest dies or resets, or on `requestExit`, and `waitForExit`
/// returns why.
public final class Machine: @unchecked Sendable {
    // @unchecked Sendable: mutable fields are guarded by `lifecycle`.
    public let configuration: MachineConfiguration
    public let kvm: Kvm
    public let vm: VirtualMachine
    public let memory: GuestMemory
    public let serial: Serial16550
    /// Disks and NICs on the virtio-mmio window: the one device list state, snapshots and migrations read.
    public let devices: MmioBus
    let bus: PortIOBus
    let runners: [VcpuRunner]
    private let logger: Logger
    /// KVM's list of MSRs to save, read once.
    private let msrIndices: [UInt32]
    /// The CPUID each vCPU was given (KVM has no cheap way to read it back).
    private var cpuids: [[CPUIDEntry]]

    private let lifecycle = NSCondition()
    private var state = MachineState.created
    /// Objects that must live as long as the VM (e.g. the userfaultfd serving post-copy faults).
    private var keptAlive: [AnyObject] = []
    private var memoryIsIncomplete = false
    private var exit: MachineExit?
    private var exitActions: [@Sendable () -> Void] = []
    private var startTime: ContinuousClock.Instant?

    /// `memory`: guest RAM made (and perhaps preallocated) beforehand, e.g. while a destination waits for its migration.
    public init(configuration: MachineConfiguration, memory preparedMemory: GuestMemory? = nil,
                logger: Logger = Logger(label: "tern.machine")) throws {
        self.configuration = configuration
        self.logger = logger
        guard (1...MachineConfiguration.maximumVcpus).contains(configuration.vcpuCount) else {
            throw ConfigurationError("--cpus must be between 1 and \(MachineConfiguration.maximumVcpus)")
        }

        // Read and check the kernel before touching KVM: a bad file is the most common mistake.
        let image = try configuration.kernelPath.map { try KernelImage(parsing: Self.readKernel($0)) }
        let initrd = try configuration.initrdPath.map { path in
            guard case .linux = image else { throw LinuxBootError.initrdWithoutKernel }
            return try Self.readInitrd(path)
        }

        do {
            kvm = try Kvm(path: configuration.kvmPath)
        } catch {
            throw ConfigurationError("cannot use KVM (\(configuration.kvmPath)): \(String(cString: strerror(error.errno)))")
        }
        vm = try kvm.createVM()
        if let preparedMemory {
            guard preparedMemory.size == configuration.memorySize else {
                throw ConfigurationError("prepared guest RAM is \(ByteSize(bytes: preparedMemory.size)), the VM needs \(ByteSize(bytes: configuration.memorySize))")
            }
            memory = preparedMemory
        } else {
            memory = try GuestMemory(size: configuration.memorySize, hugePages: configuration.hugePages)
            if configuration.preallocate { try memory.preallocate() }
        }
        logger.debug("guest RAM: \(ByteSize(bytes: memory.size)) in \(memory.usesHugePages ? "transparent huge pages" : "4 KiB pages")")
        // Intel needs these three pages (for real-mode emulation) somewhere outside RAM.
        try vm.setTSSAddress(0xFFFB_D000)
        try memory.register(with: vm)
        try vm.createIRQChip()
        try vm.createPIT2()
        do {
            devices = try MmioBus(specs: configuration.devices, ram: memory, diskLocking: configuration.diskLocking, logger: logger)
        } catch {
            throw ConfigurationError("\(error)")
        }
        try devices.connect(to: vm)

        let supportedCPUID = try kvm.supportedCPUID()
        msrIndices = try kvm.msrIndexList()
        var runners: [VcpuRunner] = []
        var cpuids: [[CPUIDEntry]] = []
        for id in 0..<UInt32(configuration.vcpuCount) {
            let vcpu = try vm.createVcpu(id: id)
            let cpuid = CPUSetup.cpuid(supportedCPUID, vcpuID: id, vcpuCount: UInt32(configuration.vcpuCount))
            try vcpu.setCPUID(cpuid)
            cpuids.append(cpuid)
            try vcpu.setFPU(CPUSetup.initialFPU())
            if id == 0 { try CPUSetup.configureLocalInterrupts(vcpu) }
            runners.append(VcpuRunner(vcpu: vcpu))
        }
        self.runners = runners
        self.cpuids = cpuids

        let connection: any SerialConnection
        switch configuration.serial {
        case .stdout: connection = FileSerialConnection.standardOutput()
        case .file(let path): connection = try FileSerialConnection.file(path)
        case .socket(let path): connection = try SocketSerialConnection(path: path)
        case .off: connection = NullSerialConnection()
        }
        let vm = self.vm
        serial = Serial16550(connection: connection) { level in
            try? vm.setIRQLine(Serial16550.com1IRQ, level: level)
        }

        var bus = PortIOBus.Builder()
        try bus.attach(serial, at: Serial16550.com1Base, count: 8)
        // The i8042 calls back into the machine; `self` is not complete yet, so go through a box.
        let resetTarget = WeakMachine()
        try bus.attach(I8042 { resetTarget.machine?.requestExit(MachineExit(kind: .reset, message: "guest requested a reset")) },
                       at: I8042.dataPort, count: 5)
        try bus.attach(IgnoredPorts(), at: 0x80, count: 1) // POST codes
        self.bus = bus.build()
        resetTarget.machine = self

        switch image {
        case .multiboot(let multiboot):
            let entry = try MultibootLoader.load(multiboot, commandLine: configuration.commandLine, into: memory)
            try CPUSetup.enterMultiboot(runners[0].vcpu, entry)
            logger.debug("loaded a Multiboot kernel", metadata: ["entry": "0x\(String(entry.entry, radix: 16))"])
        case .linux(let linux):
            // Linux has no way to discover virtio-mmio devices: they are named on its command line, as Firecracker does.
            let words = devices.devices.map { MmioWindow.linuxCommandLineWord(slot: $0.slot) }
            let commandLine = ([configuration.commandLine] + words).filter { !$0.isEmpty }.joined(separator: " ")
            let entry = try LinuxLoader.load(linux, commandLine: commandLine, initrd: initrd, into: memory)
            try CPUSetup.enterLinux64(runners[0].vcpu, entry)
            logger.debug("loaded a Linux kernel (boot protocol \(linux.protocolVersion >> 8).\(linux.protocolVersion & 0xFF))")
        case nil:
            break
        }
    }

    static func readInitrd(_ path: String) throws -> [UInt8] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw LinuxBootError.cannotReadInitrd(path, String(cString: strerror(errno)))
        }
        return [UInt8](data)
    }

    static func readKernel(_ path: String) throws -> [UInt8] {
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw ConfigurationError("cannot read kernel \(path): \(String(cString: strerror(errno)))")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw ConfigurationError("kernel \(path) is not a regular file") }
        guard info.st_size <= 512 << 20 else { throw ConfigurationError("kernel \(path) is larger than 512 MiB") }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigurationError("cannot read kernel \(path): \(String(cString: strerror(errno)))")
        }
        return [UInt8](data)
    }

    // MARK: Lifecycle

    /// Starts the vCPUs; false if the VM is not in the created state (already started, or ended).
    @discardableResult
    public func start(paused: Bool = false) -> Bool {
        lifecycle.lock()
        guard state == .created else { lifecycle.unlock(); return false }
        state = paused ? .paused : .running
        startTime = .now
        lifecycle.unlock()
        serial.start()
        devices.start(held: paused)
        spawnThread(named: "halt-watchdog") { [weak self] in self?.watchForDeadHalt() }
        for runner in runners {
            runner.start(paused: paused, handle: { [unowned self] exit in handle(exit, on: runner.vcpu) },
                         onExit: { [unowned self] exit in requestExit(exit) })
        }
        return true
    }

    static let haltCheckInterval: TimeInterval = 1

    /// Ends the VM when every vCPU sits in HLT with interrupts disabled: no
    /// interrupt can wake it, so it would otherwise hang silently.
    private func watchForDeadHalt() {
        while true {
            Thread.sleep(forTimeInterval: Self.haltCheckInterval)
            guard currentState != .exited else { return }
            // While post-copy memory is missing, a check's kick could set a vCPU waiting for a page
            // spinning in the kernel (see `pauseForGood`); a dead halt can wait until memory is here.
            guard currentState == .running, !memoryIncomplete else { continue }
            runners.forEach { $0.requestHaltCheck() }
            let answers = runners.map { $0.haltCheckAnswer(timeout: 0.5) }
            guard !answers.isEmpty, answers.allSatisfy({ $0 != nil && $0! != nil }), currentState == .running else { continue }
            requestExit(MachineExit(kind: .halted, message: "guest halted with interrupts disabled (HLT that nothing can wake)",
                                    vcpu: 0, registers: answers[0]!))
            return
        }
    }

    public enum LifecycleError: Error, CustomStringConvertible, Equatable {
        case notRunning(MachineState)
        case notPaused(MachineState)
        case timeout
        case devicesNotQuiesced(String)

        public var description: String {
            switch self {
            case .notRunning(let state): "the VM is \(state.rawValue), not running"
            case .notPaused(let state): "the VM is \(state.rawValue), not paused"
            case .timeout: "vCPUs did not stop in time"
            case .devicesNotQuiesced(let why): "the VM keeps running: \(why)"
            }
        }
    }

    /// Parks every vCPU outside KVM_RUN; returns once all are parked.
    /// `flushingDisks: false` leaves what the guest wrote without flushing in the page cache (a migration
    /// that copies the disks: flushing there put whatever the host had not written back into the downtime).
    public func pause(flushingDisks: Bool = true) throws {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        guard state == .running else { throw LifecycleError.notRunning(state) }
        for runner in runners { runner.requestPause() }
        for runner in runners where !runner.waitUntilParked() {
            // Not all parked: let every vCPU go again rather than leave the VM half paused.
            for other in runners { other.resume() }
            throw LifecycleError.timeout
        }
        // As QEMU's vm_stop drains and flushes block I/O: a paused VM does no I/O, and what it
        // wrote is on stable storage, so its state can be captured or handed over. A flush that
        // fails makes the pause fail: nothing may be handed over on data that is not there.
        if let failure = devices.quiesce(flushing: flushingDisks) {
            devices.release()
            for runner in runners { runner.resume() }
            throw LifecycleError.devicesNotQuiesced(failure)
        }
        state = .paused
    }

    /// Stops the guest for good after a failure that leaves its memory incomplete (post-copy):
    /// unlike `pause()`, no vCPU is ever let go, and the VM counts as paused even if some
    /// vCPU has not parked.
    ///
    /// The vCPUs in `waitingForMemory` (kernel thread ids) sit inside KVM_RUN waiting on a
    /// userfaultfd for a page that will not come: they cannot run guest code, and they are
    /// not signalled, because a pending signal turns some of those waits (a fault taken
    /// while KVM reads guest memory itself, e.g. to emulate an instruction) into a busy loop
    /// in the kernel. They park if they ever leave KVM_RUN.
    /// Returns how many vCPUs did not park within `timeout`.
    @discardableResult
    public func pauseForGood(waitingForMemory: Set<Int32>, timeout: TimeInterval = 2) -> Int {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        guard state == .running || state == .paused else { return 0 }
        let waits = runners.map { runner in runner.threadID.map { waitingForMemory.contains($0) } ?? false }
        for (runner, waiting) in zip(runners, waits) { runner.requestPause(kicking: !waiting) }
        let unparked = zip(runners, waits).filter { runner, waiting in !runner.waitUntilParked(timeout: waiting ? 0 : timeout) }.count
        state = .paused
        return unparked
    }

    /// Runs `action` once the VM is asked to end (after every vCPU has been told to stop).
    /// For whoever holds vCPUs in a wait only it can end, such as post-copy's userfaultfd.
    public func onExit(_ action: @escaping @Sendable () -> Void) {
        lifecycle.lock()
        let ended = exit != nil
        if !ended { exitActions.append(action) }
        lifecycle.unlock()
        if ended { action() }
    }

    /// The kernel thread ids of the vCPUs' threads (those started so far), in vCPU order.
    public var vcpuThreadIDs: [Int32] { runners.compactMap(\.threadID) }

    public func resume() throws {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        guard state == .paused else { throw LifecycleError.notPaused(state) }
        devices.release()
        for runner in runners { runner.resume() }
        state = .running
    }

    /// Ends the VM (idempotent: the first reason wins). Safe from any thread, including a vCPU's.
    public func requestExit(_ reason: MachineExit) {
        lifecycle.lock()
        if exit == nil {
            exit = reason
            state = .exited
            if reason.isFailure {
                logger.error("guest stopped: \(reason)")
            } else {
                logger.info("guest stopped: \(reason.message)")
            }
        }
        let actions = exitActions
        exitActions = []
        lifecycle.broadcast()
        lifecycle.unlock()
        for runner in runners { runner.requestStop() }
        for action in actions { action() }
    }

    /// Blocks until the VM has ended and every vCPU thread has left KVM_RUN.
    public func waitForExit() -> MachineExit {
        lifecycle.lock()
        while exit == nil { lifecycle.wait() }
        let reason = exit!
        lifecycle.unlock()
        for runner in runners { runner.waitUntilStopped() }
        devices.stop()
        serial.close()
        return reason
    }

    // MARK: State capture and restore

    /// The complete VM state (memory aside). The VM must be paused (or not yet
    /// started), so vCPUs are parked outside KVM_RUN and devices are quiet.
    public func captureState() throws -> MachineStateSnapshot {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        guard state == .paused || state == .created else { throw LifecycleError.notPaused(state) }
        // vCPUs before the platform: reading a LAPIC can still move an interrupt into the IOAPIC/PIC view.
        let vcpus = try runners.enumerated().map { index, runner in
            try VcpuState.capture(runner.vcpu, cpuid: cpuids[index], msrIndices: msrIndices)
        }
        return MachineStateSnapshot(description: description, platform: try PlatformState.capture(vm), vcpus: vcpus,
                                    serial: serial.snapshot(), devices: devices.captureStates())
    }

    /// Loads a captured state into this machine before it first runs (its
    /// memory must already hold the captured memory). Platform state first,
    /// so the interrupt controllers exist in their final shape before the
    /// LAPICs and pending events of the vCPUs refer to them.
    public func restoreState(_ snapshot: MachineStateSnapshot) throws {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        guard state == .created else { throw ConfigurationError("state can only be restored into a VM that has not run") }
        guard snapshot.description.memorySize == memory.size, snapshot.vcpus.count == runners.count else {
            throw ConfigurationError("the state is for \(ByteSize(bytes: snapshot.description.memorySize)) and \(snapshot.vcpus.count) vCPUs, this VM has \(ByteSize(bytes: memory.size)) and \(runners.count)")
        }
        let recorded = snapshot.description.devices.map(\.id), present = devices.specs.map(\.id)
        guard recorded == present else {
            throw ConfigurationError("the VM has devices [\(recorded.joined(separator: ", "))], this one is configured with [\(present.joined(separator: ", "))]")
        }
        do {
            try devices.restore(snapshot.devices)
        } catch {
            throw ConfigurationError("\(error)")
        }
        try snapshot.platform.restore(into: vm)
        for (runner, vcpuState) in zip(runners, snapshot.vcpus) {
            try vcpuState.restore(into: runner.vcpu)
        }
        cpuids = snapshot.vcpus.map(\.cpuid)
        serial.restore(snapshot.serial)
    }

    /// What this VM is (sizes, boot configuration, devices), as snapshots and migrations announce it.
    public var description: MachineDescription {
        MachineDescription(memorySize: memory.size, vcpuCount: UInt32(runners.count), kernelPath: configuration.kernelName,
                           commandLine: configuration.commandLine, devices: devices.specs, name: configuration.name)
    }

    /// Keeps `object` alive as long as the machine.
    public func keepAlive(_ object: AnyObject) {
        lifecycle.lock()
        keptAlive.append(object)
        lifecycle.unlock()
    }

    /// True while some guest memory has not arrived yet (post-copy): the memfd then has
    /// holes where pages belong, so snapshots and migrations of this VM are refused.
    public var memoryIncomplete: Bool {
        get { lifecycle.lock(); defer { lifecycle.unlock() }; return memoryIsIncomplete }
        set { lifecycle.lock(); memoryIsIncomplete = newValue; lifecycle.unlock() }
    }

    /// The CPUID vCPU 0 runs with (what a migration destination must be able to offer).
    public var guestCPUID: [CPUIDEntry] {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        return cpuids[0]
    }

    public var currentState: MachineState {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        return state
    }

    public var info: MachineInfo {
        lifecycle.lock()
        defer { lifecycle.unlock() }
        let uptime = startTime.map { ContinuousClock.now - $0 } ?? .zero
        return MachineInfo(name: configuration.name, state: state, memoryBytes: memory.size, memoryHugePages: memory.usesHugePages, vcpus: runners.count,
                           uptimeMs: UInt64(uptime.components.seconds * 1000 + uptime.components.attoseconds / 1_000_000_000_000_000),
                           kernel: configuration.kernelName, cmdline: configuration.commandLine,
                           pid: getpid(), exit: exit, devices: devices.info)
    }

    // MARK: Exits

    /// Handles one vCPU exit on that vCPU's thread. Returns non-nil when the VM must end.
    private func handle(_ exit: VcpuExit, on vcpu: Vcpu) -> MachineExit? {
        switch exit {
        case .ioIn(let port, let size, let count, let data):
            for i in 0..<count {
                bus.read(port: port, into: UnsafeMutableRawBufferPointer(rebasing: data[i * size..<(i + 1) * size]))
            }
            return nil
        case .ioOut(let port, let size, let count, let data):
            for i in 0..<count {
                bus.write(port: port, from: UnsafeRawBufferPointer(rebasing: data[i * size..<(i + 1) * size]))
            }
            return nil
        case .mmioRead(let address, let data):
            if MmioBus.claims(address) {
                devices.read(address: address, into: data)
            } else {
                // Reads of unclaimed addresses float high, as on real hardware.
                for i in data.indices { data[i] = 0xFF }
            }
            return nil
        case .mmioWrite(let address, let data):
            devices.write(address: address, from: data)
            return nil
        case .interrupted:
            return nil
        case .halt:
            return MachineExit(kind: .halted, message: "guest halted (HLT with nothing to wake it)", vcpu: vcpu.id,
                               registers: RegisterDump.capture(vcpu))
        case .shutdown:
            return MachineExit(kind: .tripleFault, message: "guest triple-faulted (shutdown)", vcpu: vcpu.id,
                               registers: RegisterDump.capture(vcpu))
        case .systemEvent(let type):
            switch Int32(type) {
            case KVM_SYSTEM_EVENT_RESET: return MachineExit(kind: .reset, message: "guest requested a reset")
            case KVM_SYSTEM_EVENT_SHUTDOWN: return MachineExit(kind: .poweroff, message: "guest powered off")
            default:
                return MachineExit(kind: .error, message: "guest system event \(type)", vcpu: vcpu.id, registers: RegisterDump.capture(vcpu))
            }
        case .internalError, .failEntry, .unknown, .exception, .debug:
            return MachineExit(kind: .error, message: "vCPU stopped: \(exit.name)", vcpu: vcpu.id,
                               registers: RegisterDump.capture(vcpu))
        }
    }
}

/// Breaks the init-time cycle between the machine and a device that calls back into it.
final class WeakMachine: @unchecked Sendable {
    // @unchecked: written once during Machine.init, before any vCPU runs.
    weak var machine: Machine?
}

/// Ports guests write to for timing or diagnostics (POST codes on 0x80): accepted and dropped.
final class IgnoredPorts: PortIODevice {
    func read(offset: UInt16, into data: UnsafeMutableRawBufferPointer) { for i in data.indices { data[i] = 0xFF } }
    func write(offset: UInt16, from data: UnsafeRawBufferPointer) {}
}
