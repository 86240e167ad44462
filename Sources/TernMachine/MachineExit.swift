/// Why a VM stopped running, as reported by `tern info` and on the console.
public struct MachineExit: Codable, Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Codable, Sendable {
        /// Stopped on request (API quit, signal).
        case quit
        /// The VM now runs elsewhere: a migration completed.
        case migrated
        /// The guest asked for a reset (i8042 0xFE, or a KVM reset event).
        case reset
        /// The guest powered off (KVM shutdown event).
        case poweroff
        /// Triple fault: the guest cannot continue.
        case tripleFault = "triple-fault"
        /// HLT reached the VMM with nothing to wake the vCPU.
        case halted
        /// KVM could not run the guest (internal error, failed entry, unknown exit).
        case error
    }

    public var kind: Kind
    public var message: String
    public var vcpu: UInt32?
    public var registers: RegisterDump?

    public init(kind: Kind, message: String, vcpu: UInt32? = nil, registers: RegisterDump? = nil) {
        self.kind = kind
        self.message = message
        self.vcpu = vcpu
        self.registers = registers
    }

    /// Whether the process should exit with failure.
    public var isFailure: Bool {
        switch kind {
        case .quit, .reset, .poweroff, .migrated: false
        case .tripleFault, .halted, .error: true
        }
    }

    public var description: String {
        var text = message
        if let vcpu { text += " (vcpu \(vcpu))" }
        if let registers { text += "\n  registers: \(registers)" }
        return text
    }
}
