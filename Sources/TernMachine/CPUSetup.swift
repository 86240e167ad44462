import CKVM
import TernKVM

/// What each vCPU is told about itself before it first runs.
enum CPUSetup {
    /// The host's supported CPUID, personalised per vCPU: its APIC ID, and
    /// the "running under a hypervisor" bit guests use to pick paravirtual paths.
    static func cpuid(_ supported: [CPUIDEntry], vcpuID: UInt32, vcpuCount: UInt32) -> [CPUIDEntry] {
        supported.map { entry in
            var entry = entry
            switch entry.function {
            case 1:
                entry.ebx = (entry.ebx & 0x0000_FFFF) | (min(vcpuCount, 255) << 16) | (vcpuID << 24)
                entry.ecx |= 1 << 31 // hypervisor present
            case 0xB, 0x1F:
                entry.edx = vcpuID   // x2APIC ID
            default:
                break
            }
            return entry
        }
    }

    /// Wires the BSP's local interrupt pins as a PC does: LINT0 takes the
    /// 8259's ExtINT, LINT1 takes NMI (Firecracker and QEMU do the same).
    static func configureLocalInterrupts(_ vcpu: Vcpu) throws {
        var lapic = try vcpu.lapic()
        withUnsafeMutableBytes(of: &lapic.regs) { regs in
            func set(_ offset: Int, mode: UInt32) {
                let old = regs.load(fromByteOffset: offset, as: UInt32.self)
                regs.storeBytes(of: (old & ~0x700) | mode, toByteOffset: offset, as: UInt32.self)
            }
            set(0x350, mode: 0x700) // LVT LINT0: ExtINT
            set(0x360, mode: 0x400) // LVT LINT1: NMI
        }
        try vcpu.setLAPIC(lapic)
    }

    /// A sane x87/SSE state (what a CPU has after FNINIT and reset).
    static func initialFPU() -> kvm_fpu {
        var fpu = kvm_fpu()
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        return fpu
    }

    /// Execute/read, accessed; read/write, accessed.
    static let codeType: UInt8 = 0xB, dataType: UInt8 = 0x3

    /// A ring-0 segment over all 4 GiB (base 0, page granularity): 32-bit, or a 64-bit code segment.
    static func flatSegment(_ selector: UInt16, type: UInt8, long: Bool) -> kvm_segment {
        var segment = kvm_segment()
        segment.base = 0
        segment.limit = 0xFFFF_FFFF
        segment.selector = selector
        segment.type = type
        segment.present = 1
        segment.dpl = 0
        segment.s = 1
        segment.g = 1
        segment.l = long ? 1 : 0
        segment.db = long ? 0 : 1
        return segment
    }

    /// The 32-bit protected-mode state the Multiboot specification defines:
    /// flat 4 GiB code and data segments, paging off, interrupts off,
    /// EAX = 0x2BADB002, EBX = the information structure.
    static func enterMultiboot(_ vcpu: Vcpu, _ boot: MultibootEntry) throws {
        var sregs = try vcpu.specialRegisters()
        sregs.cs = flatSegment(MultibootLayout.codeSelector, type: codeType, long: false)
        let data = flatSegment(MultibootLayout.dataSelector, type: dataType, long: false)
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.gdt.base = UInt64(boot.gdtAddress)
        sregs.gdt.limit = boot.gdtLimit
        sregs.cr0 = 0x11     // PE | ET
        sregs.cr4 = 0
        sregs.efer = 0
        try vcpu.setSpecialRegisters(sregs)

        var regs = kvm_regs()
        regs.rax = UInt64(MultibootLayout.bootloaderMagic)
        regs.rbx = UInt64(boot.infoAddress)
        regs.rip = UInt64(boot.entry)
        regs.rsp = MultibootLayout.gdtAddress // undefined by the spec; a small usable stack
        regs.rflags = 0x2
        try vcpu.setRegisters(regs)
        try vcpu.setFPU(initialFPU())
    }

    /// The state the Linux 64-bit boot protocol defines: long mode with the identity map
    /// LinuxLoader wrote, __BOOT_CS/__BOOT_DS flat segments, interrupts off, RSI = boot_params.
    static func enterLinux64(_ vcpu: Vcpu, _ boot: LinuxEntry) throws {
        var sregs = try vcpu.specialRegisters()
        sregs.cs = flatSegment(LinuxLayout.codeSelector, type: codeType, long: true)
        let data = flatSegment(LinuxLayout.dataSelector, type: dataType, long: false)
        sregs.ds = data; sregs.es = data; sregs.fs = data; sregs.gs = data; sregs.ss = data
        sregs.gdt.base = LinuxLayout.gdtAddress
        sregs.gdt.limit = UInt16(LinuxLayout.gdt.count * 8 - 1)
        sregs.cr3 = LinuxLayout.pml4Address
        sregs.cr4 = 0x20                 // PAE
        sregs.cr0 = 0x8000_0011          // PG | ET | PE
        sregs.efer = 0x500               // LMA | LME
        try vcpu.setSpecialRegisters(sregs)

        var regs = kvm_regs()
        regs.rip = boot.entry
        regs.rsi = boot.bootParams
        regs.rsp = LinuxLayout.stackPointer
        regs.rbp = LinuxLayout.stackPointer
        regs.rflags = 0x2
        try vcpu.setRegisters(regs)
        try vcpu.setFPU(initialFPU())
    }
}
