import CKVM
import TernKVM
import TernWire

/// The VM-wide state KVM keeps in the kernel: both 8259 PICs, the IOAPIC,
/// the PIT and the KVM clock.
public struct PlatformState: Sendable {
    public static let version: UInt32 = 1
    public static let tag = "PLAT"

    public var picMaster: kvm_irqchip
    public var picSlave: kvm_irqchip
    public var ioapic: kvm_irqchip
    public var pit: kvm_pit_state2
    public var clock: kvm_clock_data

    static func capture(_ vm: VirtualMachine) throws -> PlatformState {
        PlatformState(picMaster: try vm.irqchip(UInt32(KVM_IRQCHIP_PIC_MASTER)),
                      picSlave: try vm.irqchip(UInt32(KVM_IRQCHIP_PIC_SLAVE)),
                      ioapic: try vm.irqchip(UInt32(KVM_IRQCHIP_IOAPIC)),
                      pit: try vm.pit2(),
                      clock: try vm.clock())
    }

    /// Guest time: the KVM clock is set to the value it had when captured, so
    /// the guest's clock does not jump by the time the VM spent in a file or
    /// on the wire (the choice Firecracker makes for snapshots; QEMU does the
    /// same for migration). Only the clock value is restored (flags cleared):
    /// KVM_CLOCK_REALTIME would instead advance it by the elapsed host time.
    func restore(into vm: VirtualMachine) throws {
        try vm.setPIT2(pit)
        var clockValue = kvm_clock_data()
        clockValue.clock = clock.clock
        try vm.setClock(clockValue)
        try vm.setIRQChip(picMaster)
        try vm.setIRQChip(picSlave)
        try vm.setIRQChip(ioapic)
    }

    var section: StateSection {
        var w = WireWriter(capacity: 2048)
        w.writeRaw(picMaster)
        w.writeRaw(picSlave)
        w.writeRaw(ioapic)
        w.writeRaw(pit)
        w.writeRaw(clock)
        return StateSection(tag: Self.tag, version: Self.version, body: w.bytes)
    }

    init(section: StateSection) throws(WireError) {
        guard section.version == Self.version else {
            throw .unsupportedVersion("platform state version \(section.version) (this tern reads \(Self.version))")
        }
        var r = WireReader(section.body, context: "platform state")
        picMaster = try r.readRaw(kvm_irqchip.self, initial: kvm_irqchip())
        picSlave = try r.readRaw(kvm_irqchip.self, initial: kvm_irqchip())
        ioapic = try r.readRaw(kvm_irqchip.self, initial: kvm_irqchip())
        pit = try r.readRaw(kvm_pit_state2.self, initial: kvm_pit_state2())
        clock = try r.readRaw(kvm_clock_data.self, initial: kvm_clock_data())
        try r.expectEnd()
        for (chip, expected) in [(picMaster, KVM_IRQCHIP_PIC_MASTER), (picSlave, KVM_IRQCHIP_PIC_SLAVE), (ioapic, KVM_IRQCHIP_IOAPIC)]
        where chip.chip_id != UInt32(expected) {
            throw .malformed("platform state: irqchip id \(chip.chip_id) where \(expected) belongs")
        }
    }

    init(picMaster: kvm_irqchip, picSlave: kvm_irqchip, ioapic: kvm_irqchip, pit: kvm_pit_state2, clock: kvm_clock_data) {
        self.picMaster = picMaster; self.picSlave = picSlave; self.ioapic = ioapic; self.pit = pit; self.clock = clock
    }
}
