import Foundation
import Glibc
import Logging
import Synchronization
import TernKVM

/// A virtio device on the MMIO transport (version 2 registers) in one slot of
/// `MmioWindow`: the registers the guest's vCPUs read and write, its queues,
/// and the worker thread that serves them, so no request runs on a vCPU.
///
/// Notifications: a guest's write to QueueNotify signals `notify` in the
/// kernel (an ioeventfd per queue) and wakes the worker; interrupts go back
/// through an irqfd. Without KVM (`connect` not called) a QueueNotify write
/// that reaches the device signals `notify` itself.
///
/// Locks: `registers` guards the transport's registers and is held only
/// briefly (vCPUs take it). `serving` serialises the worker's passes over the
/// queues with a reset, a quiesce and a restore, which must not overlap one.
public final class VirtioMmioDevice: @unchecked Sendable {
    // @unchecked: `held` and `worker` are guarded by `serving`; everything else is immutable or a Mutex/Atomic.
    public let id: String
    public let slot: Int
    public let backend: any VirtioBackend
    private let ram: any GuestRAM
    private let logger: Logger
    private let registers: Mutex<VirtioDeviceState>
    private let notify: EventFD
    private let interrupt: EventFD
    private let control: EventFD
    private let serving = NSLock()
    private var held = false
    private var worker: Thread?
    private let stopping = Atomic<Bool>(false)

    public var baseAddress: UInt64 { MmioWindow.address(ofSlot: slot) }
    public var interruptLine: UInt32 { MmioWindow.interrupt(ofSlot: slot) }

    public init(id: String, slot: Int, backend: any VirtioBackend, ram: any GuestRAM,
                logger: Logger = Logger(label: "tern.device")) throws(SystemError) {
        self.id = id
        self.slot = slot
        self.backend = backend
        self.ram = ram
        self.logger = logger
        var state = VirtioDeviceState(id: id, slot: slot, deviceType: backend.deviceType.rawValue,
                                      queues: backend.queueMaximumSizes.map { _ in VirtqueueState() }, backend: backend.identity)
        state.offeredFeatures = backend.offeredFeatures
        registers = Mutex(state)
        notify = try EventFD()
        interrupt = try EventFD()
        control = try EventFD()
    }

    // MARK: Running

    /// Wires the device into a VM: an ioeventfd per queue on QueueNotify, an irqfd on its line.
    /// Called once, before any vCPU runs.
    public func connect(to vm: VirtualMachine) throws(SystemError) {
        for queue in backend.queueMaximumSizes.indices {
            try vm.registerIoEventFD(notify, mmioAddress: baseAddress + VirtioMmioRegister.queueNotify, length: 4, match: UInt64(queue))
        }
        try vm.registerIrqFD(interrupt, gsi: interruptLine)
    }

    /// Starts the worker. `held`: it serves nothing until `release` (a VM that starts paused).
    public func startWorker(held startHeld: Bool = false) {
        serving.lock()
        defer { serving.unlock() }
        guard worker == nil else { return }
        held = startHeld
        worker = spawnThread(named: "virtio-\(id)") { [self] in runWorker() }
        // A restored device may hold requests the driver notified before the capture: look once.
        notify.signal()
    }

    private func runWorker() {
        var backendFailed = false
        while !stopping.load(ordering: .acquiring) {
            // The backend's own sources (a TAP with packets waiting) wake the worker too, while it serves.
            let serves = serving.withLock { !held }
            let queues = registers.withLock { state in
                state.status & VirtioStatus.driverOK != 0 && state.status & VirtioStatus.needsReset == 0 ? state.queues : nil
            }
            let own = serves && !backendFailed ? queues.map { backend.readinessSources(queues: $0) } ?? [] : []
            var fds = ([notify.fd.rawValue, control.fd.rawValue] + own).map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            let ready = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, nfds_t($0.count), -1) }
            if ready < 0 && errno != EINTR {
                logger.error("virtio device \(id): poll failed (errno \(errno)); the device stops serving")
                return
            }
            if fds.dropFirst(2).contains(where: { $0.revents & Int16(POLLERR | POLLHUP | POLLNVAL) != 0 }) {
                // A TAP deleted under the VM: stop waiting on it (it would wake the worker forever), serve the rest.
                logger.error("virtio device \(id): its backend failed (the TAP was removed?); it receives nothing more")
                backendFailed = true
            }
            notify.consume()
            control.consume()
            guard !stopping.load(ordering: .acquiring) else { return }
            serving.lock()
            if !held { serveQueues() }
            serving.unlock()
        }
    }

    /// Ends the worker (the VM is going away). Requests already taken finish first.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        control.signal()
    }

    /// Finishes every request the driver has made available, puts written data on stable storage,
    /// and serves nothing more until `release`: after it, the device's state and the guest memory
    /// it wrote are final, for a snapshot or a switch-over. The vCPUs must be stopped first, or
    /// the guest could make more requests available.
    /// Returns the errno of a flush that failed (the device is held all the same).
    @discardableResult
    public func quiesce(flushing: Bool = true) -> Int32? {
        serving.lock()
        defer { serving.unlock() }
        guard !held else { return nil }
        serveQueues()
        held = true
        return flushing ? backend.flush() : nil
    }

    /// Serves requests again after `quiesce` (the VM resumed).
    public func release() {
        serving.lock()
        held = false
        serving.unlock()
        notify.signal()
    }

    /// One pass over the ready queues; with `serving` held.
    private func serveQueues() {
        let (state, active) = registers.withLock { state in
            (state, state.status & VirtioStatus.driverOK != 0 && state.status & VirtioStatus.needsReset == 0)
        }
        guard active else { return }
        for (index, queueState) in state.queues.enumerated() where queueState.ready {
            var queue = SplitVirtqueue(state: queueState, ram: ram)
            var failure: VirtqueueError?
            var used = false
            do {
                used = try backend.serve(queue: index, &queue, features: state.driverFeatures)
            } catch {
                failure = error
            }
            let progressed = queue.state
            let raise = registers.withLock { registers -> Bool in
                registers.queues[index].nextAvailable = progressed.nextAvailable
                registers.queues[index].nextUsed = progressed.nextUsed
                if failure != nil {
                    registers.status |= VirtioStatus.needsReset
                    registers.interruptStatus |= VirtioInterrupt.configurationChange
                    registers.configGeneration &+= 1
                }
                if used || progressed.nextUsed != queueState.nextUsed { registers.interruptStatus |= VirtioInterrupt.usedBuffer }
                return failure != nil || progressed.nextUsed != queueState.nextUsed
            }
            if let failure {
                logger.error("virtio device \(id), queue \(index): \(failure); the device needs a reset")
            }
            if raise { interrupt.signal() }
            if failure != nil { return }
        }
    }

    /// The features the driver accepted.
    public var driverFeatures: UInt64 { registers.withLock { $0.driverFeatures } }

    /// Tells the driver its configuration changed (a configuration-change interrupt, a new generation).
    public func signalConfigurationChange() {
        registers.withLock { registers in
            registers.interruptStatus |= VirtioInterrupt.configurationChange
            registers.configGeneration &+= 1
        }
        interrupt.signal()
    }

    // MARK: Registers (vCPU threads)

    public func read(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        if offset >= VirtioMmioRegister.configuration {
            let configuration = backend.configuration
            let start = Int(offset - VirtioMmioRegister.configuration)
            for i in data.indices { data[i] = start + i < configuration.count ? configuration[start + i] : 0 }
            return
        }
        let value: UInt32 = registers.withLock { state in
            let queue = Int(state.queueSelect) < state.queues.count ? Int(state.queueSelect) : nil
            switch offset {
            case VirtioMmioRegister.magic: return VirtioMmioRegister.magicValue
            case VirtioMmioRegister.version: return 2
            case VirtioMmioRegister.deviceID: return state.deviceType
            case VirtioMmioRegister.vendorID: return VirtioMmioRegister.vendorTern
            case VirtioMmioRegister.deviceFeatures:
                return state.deviceFeaturesSelect < 2 ? UInt32(truncatingIfNeeded: state.offeredFeatures >> (32 * UInt64(state.deviceFeaturesSelect))) : 0
            case VirtioMmioRegister.queueSizeMaximum:
                return queue.map { UInt32(backend.queueMaximumSizes[$0]) } ?? 0
            case VirtioMmioRegister.queueReady: return queue.map { state.queues[$0].ready ? 1 : 0 } ?? 0
            case VirtioMmioRegister.interruptStatus: return state.interruptStatus
            case VirtioMmioRegister.status: return state.status
            case VirtioMmioRegister.configGeneration: return state.configGeneration
            default: return 0
            }
        }
        storeRegister(value, into: data)
    }

    public func write(offset: UInt64, from data: UnsafeRawBufferPointer) {
        guard offset < VirtioMmioRegister.configuration else { return } // configuration space is read-only here
        let value = loadRegister(data)
        switch offset {
        case VirtioMmioRegister.queueNotify:
            // Only without an ioeventfd (tests, or a write of another width than the ioeventfd's).
            notify.signal()
        case VirtioMmioRegister.status where value == 0:
            reset()
        default:
            let kick = registers.withLock { state in writeRegister(offset, value, &state) }
            if kick { notify.signal() }
        }
    }

    /// Applies a register write; true when the device just became ready to serve (DRIVER_OK).
    private func writeRegister(_ offset: UInt64, _ value: UInt32, _ state: inout VirtioDeviceState) -> Bool {
        let queue = Int(state.queueSelect) < state.queues.count ? Int(state.queueSelect) : nil
        // Queue registers change only while the queue is not ready (virtio 1.x, 4.2.3.2).
        let settable = queue.map { !state.queues[$0].ready } ?? false
        func setAddress(_ keyPath: WritableKeyPath<VirtqueueState, UInt64>, high: Bool) {
            guard let queue, settable else { return }
            let old = state.queues[queue][keyPath: keyPath]
            state.queues[queue][keyPath: keyPath] = high ? (old & 0xFFFF_FFFF) | UInt64(value) << 32 : (old & ~0xFFFF_FFFF) | UInt64(value)
        }
        switch offset {
        case VirtioMmioRegister.deviceFeaturesSelect: state.deviceFeaturesSelect = value
        case VirtioMmioRegister.driverFeaturesSelect: state.driverFeaturesSelect = value
        case VirtioMmioRegister.driverFeatures:
            // Only during negotiation: between DRIVER and FEATURES_OK.
            guard state.status & VirtioStatus.driver != 0, state.status & VirtioStatus.featuresOK == 0, state.driverFeaturesSelect < 2 else { break }
            let shift = 32 * UInt64(state.driverFeaturesSelect)
            state.driverFeatures = (state.driverFeatures & ~(0xFFFF_FFFF << shift)) | UInt64(value) << shift
        case VirtioMmioRegister.queueSelect: state.queueSelect = value
        case VirtioMmioRegister.queueSize:
            if let queue, settable { state.queues[queue].size = UInt16(truncatingIfNeeded: value) }
        case VirtioMmioRegister.queueReady:
            guard let queue else { break }
            if value == 0 {
                state.queues[queue].ready = false
                break
            }
            var candidate = state.queues[queue]
            candidate.ready = true
            do {
                try candidate.validate(maximumSize: backend.queueMaximumSizes[queue], in: ram)
                state.queues[queue] = candidate
            } catch {
                logger.error("virtio device \(id), queue \(queue): \(error); the device needs a reset")
                state.status |= VirtioStatus.needsReset
                state.interruptStatus |= VirtioInterrupt.configurationChange
            }
        case VirtioMmioRegister.interruptAcknowledge: state.interruptStatus &= ~value
        case VirtioMmioRegister.status:
            // The driver only adds bits; FEATURES_OK sticks only for features this device offered,
            // including VERSION_1 (the driver reads it back to learn that).
            var next = state.status | (value & VirtioStatus.all & ~VirtioStatus.needsReset)
            if value & VirtioStatus.featuresOK != 0, state.status & VirtioStatus.featuresOK == 0 {
                let acceptable = state.driverFeatures & ~state.offeredFeatures == 0 && state.driverFeatures & VirtioFeature.version1 != 0
                if !acceptable { next &= ~VirtioStatus.featuresOK }
            }
            if next & VirtioStatus.driverOK != 0, next & VirtioStatus.featuresOK == 0 { next &= ~VirtioStatus.driverOK }
            let becameReady = next & VirtioStatus.driverOK != 0 && state.status & VirtioStatus.driverOK == 0
            state.status = next
            return becameReady
        case VirtioMmioRegister.queueDescriptorLow: setAddress(\.descriptorTable, high: false)
        case VirtioMmioRegister.queueDescriptorHigh: setAddress(\.descriptorTable, high: true)
        case VirtioMmioRegister.queueDriverLow: setAddress(\.availableRing, high: false)
        case VirtioMmioRegister.queueDriverHigh: setAddress(\.availableRing, high: true)
        case VirtioMmioRegister.queueDeviceLow: setAddress(\.usedRing, high: false)
        case VirtioMmioRegister.queueDeviceHigh: setAddress(\.usedRing, high: true)
        default: break
        }
        return false
    }

    /// Status 0: back to the state at power-on, after the worker's current pass.
    private func reset() {
        serving.lock()
        defer { serving.unlock() }
        registers.withLock { state in
            let generation = state.configGeneration
            state = VirtioDeviceState(id: id, slot: slot, deviceType: backend.deviceType.rawValue,
                                      queues: backend.queueMaximumSizes.map { _ in VirtqueueState() }, backend: backend.identity)
            state.offeredFeatures = backend.offeredFeatures
            state.configGeneration = generation &+ 1
        }
    }

    // MARK: State

    /// The device's state; call it quiesced (or before the worker starts), so nothing is in flight.
    public func captureState() -> VirtioDeviceState {
        serving.lock()
        defer { serving.unlock() }
        return registers.withLock { $0 }
    }

    /// Loads a captured state, treating it as untrusted: it must be this device (id, slot, type),
    /// on an equivalent backend (same disk size and mode, same MAC), and every ready queue valid
    /// in this guest's RAM. Before the worker starts.
    public func restore(_ state: VirtioDeviceState) throws(DeviceRestoreError) {
        guard state.id == id, state.slot == slot, state.deviceType == backend.deviceType.rawValue else {
            throw .mismatch(id, "the state is of device '\(state.id)' (type \(state.deviceType), slot \(state.slot))")
        }
        try Self.checkBackend(recorded: state.backend, present: backend.identity, id: id)
        guard state.offeredFeatures == backend.offeredFeatures else {
            throw .mismatch(id, "features offered differ (0x\(String(state.offeredFeatures, radix: 16)) recorded, 0x\(String(backend.offeredFeatures, radix: 16)) here)")
        }
        guard state.driverFeatures & ~state.offeredFeatures == 0 else { throw .invalid(id, "the driver acked features the device never offered") }
        guard state.status & ~VirtioStatus.all == 0 else { throw .invalid(id, "unknown status bits 0x\(String(state.status, radix: 16))") }
        guard state.queues.count == backend.queueMaximumSizes.count else { throw .invalid(id, "\(state.queues.count) queues, the device has \(backend.queueMaximumSizes.count)") }
        for (index, queue) in state.queues.enumerated() {
            do {
                try queue.validate(maximumSize: backend.queueMaximumSizes[index], in: ram)
            } catch {
                throw .invalid(id, "queue \(index): \(error)")
            }
        }
        serving.lock()
        defer { serving.unlock() }
        var restored = state
        restored.backend = backend.identity
        registers.withLock { $0 = restored }
    }

    static func checkBackend(recorded: BackendIdentity, present: BackendIdentity, id: String) throws(DeviceRestoreError) {
        switch (recorded, present) {
        case let (.disk(_, recordedSize, recordedReadOnly), .disk(path, size, readOnly)):
            guard recordedSize == size else { throw .mismatch(id, "disk \(path) is \(size) bytes, the VM's disk was \(recordedSize)") }
            guard recordedReadOnly == readOnly else { throw .mismatch(id, "the VM's disk was \(recordedReadOnly ? "read-only" : "writable"), \(path) is opened \(readOnly ? "read-only" : "writable")") }
        case let (.network(_, recordedMAC), .network(tap, mac)):
            guard recordedMAC == mac else { throw .mismatch(id, "the VM's NIC has MAC \(recordedMAC), \(tap) was given \(mac)") }
        default:
            throw .mismatch(id, "the VM's device is a \(recorded.kindName), this one a \(present.kindName)")
        }
    }
}

extension BackendIdentity {
    var kindName: String {
        switch self {
        case .disk: "disk"
        case .network: "network device"
        }
    }
}

public enum DeviceRestoreError: Error, Equatable, CustomStringConvertible {
    case mismatch(String, String)
    case invalid(String, String)
    case missing(String)
    case unexpected(String)

    public var description: String {
        switch self {
        case .mismatch(let id, let why): "device '\(id)' does not match the VM's: \(why)"
        case .invalid(let id, let why): "device '\(id)': invalid state: \(why)"
        case .missing(let id): "the VM has a device '\(id)' that is not configured here"
        case .unexpected(let id): "device '\(id)' is configured here but the VM has no such device"
        }
    }
}
