/// Where devices live in guest-physical space: the virtio-mmio window of QEMU's
/// `microvm` machine, 24 transports of 0x200 bytes from 0xfeb00000, so one
/// guest finds its devices the same way under Tern and under QEMU. Every slot
/// answers the virtio magic; empty ones read DeviceID 0, as QEMU's do.
public enum MmioWindow {
    public static let base: UInt64 = 0xFEB0_0000
    public static let slotSize: UInt64 = 0x200
    public static let slotCount = 24
    public static var end: UInt64 { base + slotSize * UInt64(slotCount) }
    /// The first interrupt line (GSI) for device slots: 0-4 belong to the PIT, keyboard and UARTs.
    public static let firstInterrupt: UInt32 = 5
    /// Devices a VM may have: one IOAPIC line each, from `firstInterrupt` to 20.
    public static let deviceLimit = 16

    public static func address(ofSlot slot: Int) -> UInt64 { base + slotSize * UInt64(slot) }
    public static func interrupt(ofSlot slot: Int) -> UInt32 { firstInterrupt + UInt32(slot) }

    /// The slot holding `address`, and the offset inside it.
    public static func locate(_ address: UInt64) -> (slot: Int, offset: UInt64)? {
        guard address >= base, address < end else { return nil }
        return (Int((address - base) / slotSize), (address - base) % slotSize)
    }

    /// What an empty slot answers: the magic, version 2, and zeros (DeviceID 0: no device).
    public static func readEmptySlot(offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        let value: UInt32 = switch offset {
        case VirtioMmioRegister.magic: VirtioMmioRegister.magicValue
        case VirtioMmioRegister.version: 2
        default: 0
        }
        storeRegister(value, into: data)
    }

    /// The kernel command-line word by which Linux finds a device at `slot` (as Firecracker passes them).
    public static func linuxCommandLineWord(slot: Int) -> String {
        "virtio_mmio.device=512@0x\(String(address(ofSlot: slot), radix: 16)):\(interrupt(ofSlot: slot))"
    }
}

/// Register offsets of the virtio-mmio transport, version 2 (virtio 1.x, 4.2.2).
enum VirtioMmioRegister {
    static let magicValue: UInt32 = 0x7472_6976 // "virt"
    static let vendorTern: UInt32 = 0x4E52_4554 // "TERN"

    static let magic: UInt64 = 0x000
    static let version: UInt64 = 0x004
    static let deviceID: UInt64 = 0x008
    static let vendorID: UInt64 = 0x00C
    static let deviceFeatures: UInt64 = 0x010
    static let deviceFeaturesSelect: UInt64 = 0x014
    static let driverFeatures: UInt64 = 0x020
    static let driverFeaturesSelect: UInt64 = 0x024
    static let queueSelect: UInt64 = 0x030
    static let queueSizeMaximum: UInt64 = 0x034
    static let queueSize: UInt64 = 0x038
    static let queueReady: UInt64 = 0x044
    static let queueNotify: UInt64 = 0x050
    static let interruptStatus: UInt64 = 0x060
    static let interruptAcknowledge: UInt64 = 0x064
    static let status: UInt64 = 0x070
    static let queueDescriptorLow: UInt64 = 0x080
    static let queueDescriptorHigh: UInt64 = 0x084
    static let queueDriverLow: UInt64 = 0x090
    static let queueDriverHigh: UInt64 = 0x094
    static let queueDeviceLow: UInt64 = 0x0A0
    static let queueDeviceHigh: UInt64 = 0x0A4
    static let configGeneration: UInt64 = 0x0FC
    static let configuration: UInt64 = 0x100
}

/// Device status bits (virtio 1.x, 2.1).
enum VirtioStatus {
    static let acknowledge: UInt32 = 1
    static let driver: UInt32 = 2
    static let driverOK: UInt32 = 4
    static let featuresOK: UInt32 = 8
    static let needsReset: UInt32 = 64
    static let failed: UInt32 = 128
    static let all: UInt32 = acknowledge | driver | driverOK | featuresOK | needsReset | failed
}

/// Interrupt status bits: a used buffer, or a configuration change (also how DEVICE_NEEDS_RESET is announced).
enum VirtioInterrupt {
    static let usedBuffer: UInt32 = 1
    static let configurationChange: UInt32 = 2
}

func storeRegister(_ value: UInt32, into data: UnsafeMutableRawBufferPointer) {
    withUnsafeBytes(of: value.littleEndian) { bytes in
        for i in data.indices { data[i] = i < 4 ? bytes[i] : 0 }
    }
}

func loadRegister(_ data: UnsafeRawBufferPointer) -> UInt32 {
    var value: UInt32 = 0
    for i in 0..<min(4, data.count) { value |= UInt32(data[i]) << (8 * UInt32(i)) }
    return value
}
