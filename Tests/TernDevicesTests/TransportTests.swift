import Foundation
import Glibc
import Testing
import TernWire
@testable import TernDevices

/// The virtio-mmio transport driven through its registers, as a guest's vCPU
/// would, with the worker thread serving the queue.
struct TransportTests {
    let ram = TestRAM()
    let path: String

    init() throws {
        path = FileManager.default.temporaryDirectory.appendingPathComponent("mmio-\(UUID().uuidString).img").path
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        #expect(truncate(path, 1 << 20) == 0)
    }

    func makeDevice(slot: Int = 3) throws -> VirtioMmioDevice {
        // Several devices on one image at once: unlocked, as a migration's destination on shared storage opens it.
        let backend = VirtioBlock(image: try DiskImage(path: path, readOnly: false, locking: .deferred), serial: "vda")
        return try VirtioMmioDevice(id: "vda", slot: slot, backend: backend, ram: ram)
    }

    func read(_ device: VirtioMmioDevice, _ offset: UInt64) -> UInt32 {
        var value: UInt32 = 0
        withUnsafeMutableBytes(of: &value) { device.read(offset: offset, into: $0) }
        return value
    }

    func write(_ device: VirtioMmioDevice, _ offset: UInt64, _ value: UInt32) {
        withUnsafeBytes(of: value.littleEndian) { device.write(offset: offset, from: $0) }
    }

    /// The driver's side of initialisation (virtio 1.x, 3.1.1), acking `features`; returns the status read back.
    func negotiate(_ device: VirtioMmioDevice, features: UInt64) -> UInt32 {
        write(device, VirtioMmioRegister.status, 0)
        write(device, VirtioMmioRegister.status, VirtioStatus.acknowledge)
        write(device, VirtioMmioRegister.status, VirtioStatus.acknowledge | VirtioStatus.driver)
        for select in 0..<2 {
            write(device, VirtioMmioRegister.driverFeaturesSelect, UInt32(select))
            write(device, VirtioMmioRegister.driverFeatures, UInt32(truncatingIfNeeded: features >> (32 * UInt64(select))))
        }
        write(device, VirtioMmioRegister.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK)
        return read(device, VirtioMmioRegister.status)
    }

    func setUpQueue(_ device: VirtioMmioDevice, _ driver: TestDriverQueue) {
        write(device, VirtioMmioRegister.queueSelect, 0)
        write(device, VirtioMmioRegister.queueSize, UInt32(driver.size))
        for (low, address) in [(VirtioMmioRegister.queueDescriptorLow, driver.descriptors),
                               (VirtioMmioRegister.queueDriverLow, driver.available),
                               (VirtioMmioRegister.queueDeviceLow, driver.used)] {
            write(device, low, UInt32(truncatingIfNeeded: address))
            write(device, low + 4, UInt32(truncatingIfNeeded: address >> 32))
        }
        write(device, VirtioMmioRegister.queueReady, 1)
    }

    /// Polls (as the test guest does) until `condition` holds or a few seconds pass.
    func eventually(_ condition: () -> Bool) -> Bool {
        let deadline = Date(timeIntervalSinceNow: 5)
        while !condition() {
            if Date() > deadline { return false }
            usleep(1000)
        }
        return true
    }

    @Test func identifiesItselfAsQEMUsMicrovmSlotsDo() throws {
        let device = try makeDevice()
        #expect(read(device, VirtioMmioRegister.magic) == 0x7472_6976)
        #expect(read(device, VirtioMmioRegister.version) == 2)
        #expect(read(device, VirtioMmioRegister.deviceID) == 2)
        #expect(device.baseAddress == 0xFEB0_0600)
        write(device, VirtioMmioRegister.deviceFeaturesSelect, 1)
        #expect(read(device, VirtioMmioRegister.deviceFeatures) & 1 == 1, "VERSION_1 in the high word")
        write(device, VirtioMmioRegister.queueSelect, 0)
        #expect(read(device, VirtioMmioRegister.queueSizeMaximum) == 256)
        // The capacity in the configuration space: 2048 sectors.
        var capacity: UInt64 = 0
        withUnsafeMutableBytes(of: &capacity) { device.read(offset: VirtioMmioRegister.configuration, into: $0) }
        #expect(capacity == 2048)
        var empty: UInt32 = 0
        withUnsafeMutableBytes(of: &empty) { MmioWindow.readEmptySlot(offset: VirtioMmioRegister.deviceID, into: $0) }
        #expect(empty == 0)
        #expect(MmioWindow.linuxCommandLineWord(slot: 3) == "virtio_mmio.device=512@0xfeb00600:8")
    }

    @Test func featuresNotOfferedOrWithoutVersion1AreRefused() throws {
        let device = try makeDevice()
        #expect(negotiate(device, features: VirtioFeature.version1 | (1 << 40)) & VirtioStatus.featuresOK == 0)
        #expect(negotiate(device, features: VirtioBlock.Feature.flush) & VirtioStatus.featuresOK == 0, "a legacy driver")
        #expect(negotiate(device, features: VirtioFeature.version1 | VirtioBlock.Feature.flush) & VirtioStatus.featuresOK != 0)
    }

    @Test func servesRequestsOnItsWorkerAndInterrupts() throws {
        let device = try makeDevice()
        device.startWorker()
        defer { device.stop() }
        var driver = TestDriverQueue(ram: ram)
        #expect(negotiate(device, features: VirtioFeature.version1 | VirtioBlock.Feature.flush) & VirtioStatus.featuresOK != 0)
        setUpQueue(device, driver)
        write(device, VirtioMmioRegister.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        for round in 0..<3 {
            ram.put(UInt32(1), at: 0x20000)
            ram.put(UInt64(round), at: 0x20008)
            ram.put([UInt8](repeating: UInt8(round + 1), count: 512), at: 0x30000)
            driver.publish(driver.chain([(0x20000, 16, false), (0x30000, 512, false), (0x40000, 1, true)]))
            write(device, VirtioMmioRegister.queueNotify, 0)
            #expect(eventually { driver.usedIndex == UInt16(round + 1) })
            #expect(ram.get(UInt8.self, at: 0x40000) == 0)
        }
        #expect(read(device, VirtioMmioRegister.interruptStatus) & VirtioInterrupt.usedBuffer != 0)
        write(device, VirtioMmioRegister.interruptAcknowledge, VirtioInterrupt.usedBuffer)
        #expect(read(device, VirtioMmioRegister.interruptStatus) == 0)
        let state = device.captureState()
        #expect(state.queues[0].nextAvailable == 3 && state.queues[0].nextUsed == 3)
    }

    @Test func aQueueOutsideRAMSetsNeedsResetAndAResetClearsIt() throws {
        let device = try makeDevice()
        _ = negotiate(device, features: VirtioFeature.version1)
        var driver = TestDriverQueue(ram: ram)
        driver = TestDriverQueue(ram: ram, size: 16, at: UInt64(ram.size) - 64)
        setUpQueue(device, driver)
        #expect(read(device, VirtioMmioRegister.status) & VirtioStatus.needsReset != 0)
        #expect(read(device, VirtioMmioRegister.queueReady) == 0)
        write(device, VirtioMmioRegister.status, 0)
        #expect(read(device, VirtioMmioRegister.status) == 0)
    }

    @Test func aHostileChainAtRunTimeStopsTheQueueNotTheHost() throws {
        let device = try makeDevice()
        device.startWorker()
        defer { device.stop() }
        var driver = TestDriverQueue(ram: ram, size: 8)
        _ = negotiate(device, features: VirtioFeature.version1)
        setUpQueue(device, driver)
        write(device, VirtioMmioRegister.status, VirtioStatus.acknowledge | VirtioStatus.driver | VirtioStatus.featuresOK | VirtioStatus.driverOK)
        driver.descriptor(address: 0x20000, length: 16, writable: false, next: 0) // a chain that loops on itself
        driver.publish(0)
        write(device, VirtioMmioRegister.queueNotify, 0)
        #expect(eventually { read(device, VirtioMmioRegister.status) & VirtioStatus.needsReset != 0 })
        #expect(read(device, VirtioMmioRegister.interruptStatus) & VirtioInterrupt.configurationChange != 0)
        #expect(driver.usedIndex == 0)
    }

    @Test func stateRoundTripsAndRestoreDistrustsIt() throws {
        let device = try makeDevice()
        _ = negotiate(device, features: VirtioFeature.version1 | VirtioBlock.Feature.flush)
        setUpQueue(device, TestDriverQueue(ram: ram))
        let state = device.captureState()
        let decoded = try VirtioDeviceState(section: StateSection(decoding: state.section.encoded))
        #expect(decoded == state)

        let fresh = try makeDevice()
        try fresh.restore(decoded)
        #expect(fresh.captureState() == state)

        var acked = state
        acked.driverFeatures |= 1 << 50
        #expect(throws: DeviceRestoreError.self) { try makeDevice().restore(acked) }
        var outside = state
        outside.queues[0].usedRing = UInt64(ram.size)
        #expect(throws: DeviceRestoreError.self) { try makeDevice().restore(outside) }
        var resized = state
        resized.backend = .disk(path: path, size: 2 << 20, readOnly: false)
        #expect(throws: DeviceRestoreError.self) { try makeDevice().restore(resized) }
        #expect(throws: DeviceRestoreError.self) { try makeDevice(slot: 4).restore(state) }
        #expect(throws: WireError.self) { try VirtioDeviceState(section: StateSection(tag: "VDEV", version: 1, body: Array(state.section.body.dropLast()))) }
    }
}

struct DeviceSpecTests {
    @Test func parsesDiskAndNetworkOptions() throws {
        #expect(try DiskSpec(parsing: "path=/a.img", index: 0) == DiskSpec(id: "disk0", path: "/a.img"))
        #expect(try DiskSpec(parsing: "path=/a.img,readonly=on,id=root", index: 1) == DiskSpec(id: "root", path: "/a.img", readOnly: true))
        #expect(throws: DeviceSpecError.missing("--disk", "path")) { try DiskSpec(parsing: "readonly=on", index: 0) }
        #expect(throws: DeviceSpecError.unknownKey("--disk", "size")) { try DiskSpec(parsing: "path=/a,size=3", index: 0) }
        #expect(throws: DeviceSpecError.malformed("--disk", "/a.img")) { try DiskSpec(parsing: "/a.img", index: 0) }
        #expect(throws: DeviceSpecError.self) { try DiskSpec(parsing: "path=/a,readonly=maybe", index: 0) }
        #expect(throws: DeviceSpecError.self) { try DiskSpec(parsing: "path=/a,id=bad id", index: 0) }

        let net = try NetworkSpec(parsing: "tap=tap0,mac=52:54:00:12:34:56", index: 0)
        #expect(net.mac.description == "52:54:00:12:34:56" && net.id == "net0")
        #expect(try NetworkSpec(parsing: "tap=tap0", index: 0).mac == NetworkSpec(parsing: "tap=tap0", index: 0).mac, "derived MACs are stable")
        #expect(throws: DeviceSpecError.self) { try NetworkSpec(parsing: "tap=tap0,mac=01:00:00:00:00:01", index: 0) }
        #expect(throws: DeviceSpecError.self) { try NetworkSpec(parsing: "tap=tap0,mac=zz", index: 0) }
        #expect(throws: DeviceSpecError.self) { try NetworkSpec(parsing: "tap=averyveryverylongname", index: 0) }
        #expect(throws: DeviceSpecError.duplicateID("x")) {
            try [DeviceSpec.disk(DiskSpec(id: "x", path: "/a")), .network(NetworkSpec(id: "x", tap: "t", mac: net.mac))].validate()
        }
    }
}
