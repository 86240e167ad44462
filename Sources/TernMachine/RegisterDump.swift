import CKVM
import TernKVM

/// A vCPU's registers as printed when a guest dies, so the message alone is
/// enough to start debugging (where it was, in which mode, with what stack).
public struct RegisterDump: Codable, Equatable, Sendable, CustomStringConvertible {
    public var rip, rsp, rbp, rflags: UInt64
    public var rax, rbx, rcx, rdx, rsi, rdi: UInt64
    public var r8, r9, r10, r11, r12, r13, r14, r15: UInt64
    public var cr0, cr2, cr3, cr4, efer: UInt64
    public var cs, ss: UInt16
    public var csBase: UInt64

    init(_ r: kvm_regs, _ s: kvm_sregs) {
        rip = r.rip; rsp = r.rsp; rbp = r.rbp; rflags = r.rflags
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx; rsi = r.rsi; rdi = r.rdi
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11; r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        cr0 = s.cr0; cr2 = s.cr2; cr3 = s.cr3; cr4 = s.cr4; efer = s.efer
        cs = s.cs.selector; ss = s.ss.selector; csBase = s.cs.base
    }

    /// Reads the registers of a vCPU that is not running (its own thread, after an exit).
    static func capture(_ vcpu: Vcpu) -> RegisterDump? {
        guard let regs = try? vcpu.registers(), let sregs = try? vcpu.specialRegisters() else { return nil }
        return RegisterDump(regs, sregs)
    }

    public var description: String {
        func h(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
        return "rip=\(h(rip)) rsp=\(h(rsp)) rbp=\(h(rbp)) rflags=\(h(rflags)) "
            + "rax=\(h(rax)) rbx=\(h(rbx)) rcx=\(h(rcx)) rdx=\(h(rdx)) rsi=\(h(rsi)) rdi=\(h(rdi)) "
            + "r8=\(h(r8)) r9=\(h(r9)) r10=\(h(r10)) r11=\(h(r11)) r12=\(h(r12)) r13=\(h(r13)) r14=\(h(r14)) r15=\(h(r15)) "
            + "cr0=\(h(cr0)) cr2=\(h(cr2)) cr3=\(h(cr3)) cr4=\(h(cr4)) efer=\(h(efer)) "
            + "cs=\(h(UInt64(cs))) ss=\(h(UInt64(ss)))"
    }
}
