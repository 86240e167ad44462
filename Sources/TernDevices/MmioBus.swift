import Glibc
import Logging
import Synchronization
import TernKVM

/// The VM's MMIO devices: the one list of devices that the machine, its
/// snapshots and migrations read. Built from the user's `DeviceSpec`s (slot n
/// holds the n-th), it routes vCPUs' accesses to the window's slots, wires the
/// devices into KVM, and quiesces, captures and restores them together.
public final class MmioBus: Sendable {
    public let devices: [VirtioMmioDevice]
    public let specs: [DeviceSpec]

    /// Opens every backend (an image that cannot be opened is one clear error, before anything runs).
    /// `diskLocking`: `.deferred` for a migration's destination on shared storage, which locks its images
    /// only once the source has let go of them (`lockDisks`).
    public init(specs: [DeviceSpec], ram: any GuestRAM, diskLocking: DiskImage.Locking = .atOpen, logger: Logger) throws(DeviceSetupError) {
        do { try specs.validate() } catch { throw .invalid("\(error)") }
        var devices: [VirtioMmioDevice] = []
        for (slot, spec) in specs.enumerated() {
            let backend: any VirtioBackend
            switch spec {
            case .disk(let disk):
                do {
                    backend = VirtioBlock(image: try DiskImage(path: disk.path, readOnly: disk.readOnly, locking: diskLocking), serial: disk.id)
                } catch {
                    throw .backend(disk.id, "\(error)")
                }
            case .network(let network):
                do {
                    backend = VirtioNet(tap: try TapDevice(name: network.tap), mac: network.mac)
                } catch {
                    throw .backend(network.id, "\(error)")
                }
            }
            do {
                devices.append(try VirtioMmioDevice(id: spec.id, slot: slot, backend: backend, ram: ram, logger: logger))
            } catch {
                throw .backend(spec.id, "\(error)")
            }
        }
        self.devices = devices
        self.specs = specs
    }

    /// Whether `address` is in the device window (otherwise the access is not the bus's).
    public static func claims(_ address: UInt64) -> Bool { MmioWindow.locate(address) != nil }

    public func read(address: UInt64, into data: UnsafeMutableRawBufferPointer) {
        guard let (slot, offset) = MmioWindow.locate(address) else { return }
        if slot < devices.count {
            devices[slot].read(offset: offset, into: data)
        } else {
            MmioWindow.readEmptySlot(offset: offset, into: data)
        }
    }

    public func write(address: UInt64, from data: UnsafeRawBufferPointer) {
        guard let (slot, offset) = MmioWindow.locate(address), slot < devices.count else { return }
        devices[slot].write(offset: offset, from: data)
    }

    /// Registers each device's notifications and interrupt with KVM (before any vCPU runs).
    public func connect(to vm: VirtualMachine) throws(SystemError) {
        for device in devices { try device.connect(to: vm) }
    }

    /// Starts the devices' workers; `held`: serving nothing until `release` (a VM started paused).
    public func start(held: Bool) {
        for device in devices { device.startWorker(held: held) }
    }

    /// Finishes in-flight requests, flushes, and serves nothing more until `release` (vCPUs stopped first).
    /// Returns what failed to reach stable storage, if anything did.
    @discardableResult
    /// `flushing: false` when nothing reads the images from stable storage next (a migration that copies
    /// the disks reads them through the page cache, and the destination flushes its copy).
    public func quiesce(flushing: Bool = true) -> String? {
        let failures = devices.compactMap { device in device.quiesce(flushing: flushing).map { "device '\(device.id)': flush failed: \(String(cString: strerror($0)))" } }
        return failures.isEmpty ? nil : failures.joined(separator: "; ")
    }
    public func release() { for device in devices { device.release() } }
    /// Ends the workers (the VM is gone); flushes what was written first.
    public func stop() {
        quiesce()
        for device in devices { device.stop() }
    }

    /// The devices' states in slot order; quiesced (or never started), so nothing is in flight.
    public func captureStates() -> [VirtioDeviceState] { devices.map { $0.captureState() } }

    /// Loads captured states, one per device, matched by id (the machine description lists the same devices).
    public func restore(_ states: [VirtioDeviceState]) throws(DeviceRestoreError) {
        for state in states where !devices.contains(where: { $0.id == state.id }) { throw .missing(state.id) }
        for device in devices {
            guard let state = states.first(where: { $0.id == device.id }) else { throw .unexpected(device.id) }
            try device.restore(state)
        }
    }

    /// After a migration: asks every NIC's guest driver that negotiated VIRTIO_NET_F_GUEST_ANNOUNCE to
    /// announce itself. Returns how many were asked.
    @discardableResult
    public func requestGuestAnnouncements() -> Int {
        var asked = 0
        for device in devices {
            guard let network = device.backend as? VirtioNet, device.driverFeatures & VirtioNet.Feature.guestAnnounce != 0 else { continue }
            network.requestGuestAnnouncement()
            device.signalConfigurationChange()
            asked += 1
        }
        return asked
    }

    /// The NICs, in slot order.
    public var networks: [VirtioNet] { devices.compactMap { $0.backend as? VirtioNet } }

    /// The disks, in slot order.
    public var disks: [VirtioBlock] { devices.compactMap { $0.backend as? VirtioBlock } }

    /// Takes every disk image's lock (a destination on shared storage, after the source let go).
    public func lockDisks() throws(DeviceSetupError) {
        for (id, disk) in zip(devices.filter { $0.backend is VirtioBlock }.map(\.id), disks) {
            do { try disk.image.acquireLock() } catch { throw .backend(id, "\(error)") }
        }
    }

    /// Lets go of every disk image's lock (a source on shared storage, at the hand-over).
    public func unlockDisks() { for disk in disks { disk.image.releaseLock() } }

    /// Device kinds for a migration's handshake ("virtio-blk", "virtio-net").
    public var kinds: [String] { devices.map { $0.backend.deviceType.kindName } }
}

extension VirtioDeviceType {
    public var kindName: String {
        switch self {
        case .block: "virtio-blk"
        case .network: "virtio-net"
        }
    }
}

public enum DeviceSetupError: Error, Equatable, CustomStringConvertible {
    case invalid(String)
    case backend(String, String)

    public var description: String {
        switch self {
        case .invalid(let why): why
        case .backend(let id, let why): "device '\(id)': \(why)"
        }
    }
}

/// One device as `tern info` and `GET /v1/vm` show it: where it is, what backs it, what it has done.
public struct DeviceInfo: Codable, Equatable, Sendable {
    public var id: String
    public var kind: String
    public var slot: Int
    /// Guest-physical base of its virtio-mmio transport.
    public var address: UInt64
    public var interrupt: UInt32
    public var path: String?
    public var readOnly: Bool?
    public var sizeBytes: UInt64?
    public var tap: String?
    public var mac: String?
    /// virtio-blk: requests served by kind (reads, writes, flushes, discards, write_zeroes, failed,
    /// malformed) and bytes; virtio-net: frames received, sent and dropped, and bytes.
    public var counters: [String: Int]
}

extension MmioBus {
    public var info: [DeviceInfo] {
        devices.map { device in
            var info = DeviceInfo(id: device.id, kind: device.backend.deviceType.kindName, slot: device.slot, address: device.baseAddress,
                                  interrupt: device.interruptLine, counters: [:])
            switch device.backend {
            case let block as VirtioBlock:
                info.path = block.image.path
                info.readOnly = block.image.readOnly
                info.sizeBytes = block.image.size
                for kind in BlockRequestKind.allCases { info.counters[kind.counterName] = block.statistics.count(of: kind) }
                info.counters["bytes_read"] = block.statistics.bytesIn
                info.counters["bytes_written"] = block.statistics.bytesOut
            case let network as VirtioNet:
                info.tap = network.tap.name
                info.mac = network.mac.description
                for kind in NetworkFrameKind.allCases { info.counters["frames_\(kind)"] = network.statistics.count(of: kind) }
                info.counters["bytes_received"] = network.statistics.bytesIn
                info.counters["bytes_sent"] = network.statistics.bytesOut
                info.counters["announcements_sent"] = network.announcementsSent.load(ordering: .relaxed)
                info.counters["announcements_failed"] = network.announcementsFailed.load(ordering: .relaxed)
                info.counters["guest_announcements"] = network.guestAnnouncements.load(ordering: .relaxed)
            default:
                break
            }
            return info
        }
    }
}

extension BlockRequestKind {
    /// The counter's name in `DeviceInfo.counters`.
    var counterName: String {
        switch self {
        case .read: "reads"
        case .write: "writes"
        case .flush: "flushes"
        case .discard: "discards"
        case .writeZeroes: "write_zeroes"
        case .failed: "failed"
        case .malformed: "malformed"
        }
    }
}
