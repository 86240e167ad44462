import CKVM
import TernKVM
import TernWire

/// Everything KVM knows about one vCPU, as plain values: what snapshots
/// store and migrations send. Captured only from a paused vCPU.
public struct VcpuState: Sendable {
    public static let version: UInt32 = 1
    public static let tag = "VCPU"

    public var id: UInt32
    public var cpuid: [CPUIDEntry]
    public var tscKHz: UInt32
    public var mpState: kvm_mp_state
    public var regs: kvm_regs
    public var sregs: kvm_sregs
    public var xsave: kvm_xsave
    public var xcrs: kvm_xcrs
    public var debugRegs: kvm_debugregs
    public var lapic: kvm_lapic_state
    public var msrs: [MSR]
    public var events: kvm_vcpu_events

    public struct MSR: Equatable, Sendable {
        public var index: UInt32
        public var value: UInt64
    }

    static let tscMSR: UInt32 = 0x10

    /// Reads the state in the order Firecracker documents as safe: MP state
    /// first (KVM_GET_MP_STATE may still deliver pending APIC events, which
    /// changes the rest), vCPU events last (the other getters can move
    /// pending-event state around).
    static func capture(_ vcpu: Vcpu, cpuid: [CPUIDEntry], msrIndices: [UInt32]) throws -> VcpuState {
        let mpState = try vcpu.mpState()
        let regs = try vcpu.registers()
        let sregs = try vcpu.specialRegisters()
        let xsave = try vcpu.xsave()
        let xcrs = try vcpu.xcrs()
        let debugRegs = try vcpu.debugRegisters()
        let lapic = try vcpu.lapic()
        let tscKHz = try vcpu.tscKHz()
        let msrs = try readableMSRs(vcpu, msrIndices)
        let events = try vcpu.events()
        return VcpuState(id: vcpu.id, cpuid: cpuid, tscKHz: tscKHz, mpState: mpState, regs: regs, sregs: sregs,
                         xsave: xsave, xcrs: xcrs, debugRegs: debugRegs, lapic: lapic, msrs: msrs, events: events)
    }

    /// KVM_GET_MSRS stops at the first MSR it cannot read; skip that one and go on,
    /// so one unreadable MSR in KVM's list does not lose the rest.
    private static func readableMSRs(_ vcpu: Vcpu, _ indices: [UInt32]) throws -> [MSR] {
        var result: [MSR] = []
        var remaining = indices[...]
        while !remaining.isEmpty {
            let read = try vcpu.msrs(Array(remaining))
            result += read.map { MSR(index: $0.index, value: $0.value) }
            remaining = remaining.dropFirst(read.count + 1)
        }
        // The TSC goes first so that MSRs relative to it (TSC_DEADLINE) are set after it on restore.
        return result.sorted { ($0.index == tscMSR ? 0 : 1) < ($1.index == tscMSR ? 0 : 1) }
    }

    /// Writes the state back into a fresh vCPU (one that has not run), in the
    /// reverse dependency order: CPUID before anything, MP state before the
    /// registers, the LAPIC before MSRs (TSC_DEADLINE lives in the LAPIC
    /// timer), events last.
    func restore(into vcpu: Vcpu) throws {
        try vcpu.setCPUID(cpuid)
        if let current = try? vcpu.tscKHz(), current != tscKHz, tscKHz != 0 {
            try vcpu.setTSCKHz(tscKHz)
        }
        try vcpu.setMPState(mpState)
        try vcpu.setRegisters(regs)
        try vcpu.setSpecialRegisters(sregs)
        try vcpu.setXSave(xsave)
        try vcpu.setXCRs(xcrs)
        try vcpu.setDebugRegisters(debugRegs)
        try vcpu.setLAPIC(lapic)
        try vcpu.setMSRs(msrs.map { ($0.index, $0.value) })
        try vcpu.setEvents(events)
    }

    // MARK: Encoding (Linux UAPI structs travel byte for byte; they are fixed-layout ABI)

    var section: StateSection {
        var w = WireWriter(capacity: 8192)
        w.write(id)
        w.write(tscKHz)
        w.write(UInt32(cpuid.count))
        for entry in cpuid {
            for field in [entry.function, entry.index, entry.flags, entry.eax, entry.ebx, entry.ecx, entry.edx] { w.write(field) }
        }
        w.writeRaw(mpState)
        w.writeRaw(regs)
        w.writeRaw(sregs)
        w.writeRaw(xsave)
        w.writeRaw(xcrs)
        w.writeRaw(debugRegs)
        w.writeRaw(lapic)
        w.write(UInt32(msrs.count))
        for msr in msrs { w.write(msr.index); w.write(msr.value) }
        w.writeRaw(events)
        return StateSection(tag: Self.tag, version: Self.version, body: w.bytes)
    }

    init(section: StateSection) throws(WireError) {
        guard section.version == Self.version else {
            throw .unsupportedVersion("vCPU state version \(section.version) (this tern reads \(Self.version))")
        }
        var r = WireReader(section.body, context: "vCPU state")
        id = try r.read()
        tscKHz = try r.read()
        let cpuidCount = Int(try r.read(UInt32.self))
        guard cpuidCount <= 1024 else { throw .tooLarge("vCPU state: \(cpuidCount) CPUID entries") }
        var entries: [CPUIDEntry] = []
        for _ in 0..<cpuidCount {
            entries.append(CPUIDEntry(function: try r.read(), index: try r.read(), flags: try r.read(),
                                      eax: try r.read(), ebx: try r.read(), ecx: try r.read(), edx: try r.read()))
        }
        cpuid = entries
        mpState = try r.readRaw(kvm_mp_state.self, initial: kvm_mp_state())
        regs = try r.readRaw(kvm_regs.self, initial: kvm_regs())
        sregs = try r.readRaw(kvm_sregs.self, initial: kvm_sregs())
        xsave = try r.readRaw(kvm_xsave.self, initial: kvm_xsave())
        xcrs = try r.readRaw(kvm_xcrs.self, initial: kvm_xcrs())
        debugRegs = try r.readRaw(kvm_debugregs.self, initial: kvm_debugregs())
        lapic = try r.readRaw(kvm_lapic_state.self, initial: kvm_lapic_state())
        let msrCount = Int(try r.read(UInt32.self))
        guard msrCount <= 4096 else { throw .tooLarge("vCPU state: \(msrCount) MSRs") }
        var msrs: [MSR] = []
        for _ in 0..<msrCount { msrs.append(MSR(index: try r.read(), value: try r.read())) }
        self.msrs = msrs
        events = try r.readRaw(kvm_vcpu_events.self, initial: kvm_vcpu_events())
        try r.expectEnd()
    }

    init(id: UInt32, cpuid: [CPUIDEntry], tscKHz: UInt32, mpState: kvm_mp_state, regs: kvm_regs, sregs: kvm_sregs,
         xsave: kvm_xsave, xcrs: kvm_xcrs, debugRegs: kvm_debugregs, lapic: kvm_lapic_state, msrs: [MSR],
         events: kvm_vcpu_events) {
        self.id = id; self.cpuid = cpuid; self.tscKHz = tscKHz; self.mpState = mpState; self.regs = regs
        self.sregs = sregs; self.xsave = xsave; self.xcrs = xcrs; self.debugRegs = debugRegs; self.lapic = lapic
        self.msrs = msrs; self.events = events
    }
}
