import CKVM

/// The KVM capabilities Tern asks about (KVM_CHECK_EXTENSION).
public enum Capability: Int32, CaseIterable, Sendable {
    case irqchip = 0            // KVM_CAP_IRQCHIP
    case userMemory = 3         // KVM_CAP_USER_MEMORY
    case setTSSAddress = 4      // KVM_CAP_SET_TSS_ADDR
    case extendedCPUID = 7      // KVM_CAP_EXT_CPUID
    case nrMemslots = 10        // KVM_CAP_NR_MEMSLOTS
    case pit2 = 33              // KVM_CAP_PIT2
    case immediateExit = 136    // KVM_CAP_IMMEDIATE_EXIT
    case xsave = 55             // KVM_CAP_XSAVE
    case xcrs = 56              // KVM_CAP_XCRS
    case vcpuEvents = 41        // KVM_CAP_VCPU_EVENTS
    case debugregs = 50         // KVM_CAP_DEBUGREGS
    case adjustClock = 39       // KVM_CAP_ADJUST_CLOCK
    case getTSCkHz = 61         // KVM_CAP_GET_TSC_KHZ
    case tscControl = 60        // KVM_CAP_TSC_CONTROL
    case manualDirtyLogProtect2 = 168 // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    case dirtyLogRing = 192     // KVM_CAP_DIRTY_LOG_RING
    case nrVcpus = 9            // KVM_CAP_NR_VCPUS
    case maxVcpus = 66          // KVM_CAP_MAX_VCPUS
}
