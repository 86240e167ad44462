import CKVM
import Glibc

/// The KVM system handle (/dev/kvm). Creates virtual machines and answers
/// questions about what this host's KVM supports.
public final class Kvm: Sendable {
    public static let expectedAPIVersion: Int32 = 12
    public let fd: FileDescriptor

    /// Opens /dev/kvm and checks the API version every KVM since 2.6.22 reports.
    public init(path: String = "/dev/kvm") throws(SystemError) {
        fd = try FileDescriptor.open(path, flags: O_RDWR)
        let version = try TernKVM.check("KVM_GET_API_VERSION") { ckvm_ioctl_val(fd.rawValue, CKVM_GET_API_VERSION, 0) }
        guard version == Kvm.expectedAPIVersion else {
            throw SystemError("KVM_GET_API_VERSION returned \(version), expected \(Kvm.expectedAPIVersion)", errno: EINVAL)
        }
    }

    /// KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: Capability) -> Int32 {
        let result = ckvm_ioctl_val(fd.rawValue, CKVM_CHECK_EXTENSION, UInt(capability.rawValue))
        return result < 0 ? 0 : result
    }

    /// The size of the shared kvm_run area every vCPU maps.
    public func vcpuMmapSize() throws(SystemError) -> Int {
        Int(try TernKVM.check("KVM_GET_VCPU_MMAP_SIZE") { ckvm_ioctl_val(fd.rawValue, CKVM_GET_VCPU_MMAP_SIZE, 0) })
    }

    public func createVM() throws(SystemError) -> VirtualMachine {
        let vmfd = try TernKVM.check("KVM_CREATE_VM") { ckvm_ioctl_val(fd.rawValue, CKVM_CREATE_VM, 0) }
        return VirtualMachine(fd: FileDescriptor(adopting: vmfd), kvm: self)
    }

    /// KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present to a guest.
    public func supportedCPUID() throws(SystemError) -> [CPUIDEntry] {
        var capacity: UInt32 = 128
        while true {
            let size = ckvm_cpuid2_size(capacity)
            let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            defer { raw.deallocate() }
            raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
            let cpuid = raw.assumingMemoryBound(to: kvm_cpuid2.self)
            cpuid.pointee.nent = capacity
            let result = ckvm_ioctl_ptr(fd.rawValue, CKVM_GET_SUPPORTED_CPUID, raw)
            if result == -1 {
                // E2BIG means "more entries than you gave room for": grow and retry.
                if errno == E2BIG && capacity < 4096 { capacity *= 2; continue }
                throw SystemError("KVM_GET_SUPPORTED_CPUID", errno: errno)
            }
            let entries = ckvm_cpuid2_entries(cpuid)!
            return (0..<Int(cpuid.pointee.nent)).map { CPUIDEntry(entries[$0]) }
        }
    }

    /// KVM_GET_MSR_INDEX_LIST: the MSRs that must be saved and restored to
    /// move a vCPU (the same list QEMU and Firecracker save).
    public func msrIndexList() throws(SystemError) -> [UInt32] {
        var capacity: UInt32 = 256
        while true {
            let size = ckvm_msr_list_size(capacity)
            let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            defer { raw.deallocate() }
            let list = raw.bindMemory(to: kvm_msr_list.self, capacity: 1)
            list.pointee.nmsrs = capacity
            let result = ckvm_ioctl_ptr(fd.rawValue, CKVM_GET_MSR_INDEX_LIST, raw)
            if result == -1 {
                if errno == E2BIG && capacity < 16384 { capacity = max(capacity * 2, list.pointee.nmsrs); continue }
                throw SystemError("KVM_GET_MSR_INDEX_LIST", errno: errno)
            }
            let indices = ckvm_msr_list_indices(list)!
            return (0..<Int(list.pointee.nmsrs)).map { indices[$0] }
        }
    }
}

/// One CPUID leaf/subleaf as KVM describes it (kvm_cpuid_entry2).
public struct CPUIDEntry: Equatable, Hashable, Sendable, Codable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    init(_ raw: kvm_cpuid_entry2) {
        self.init(function: raw.function, index: raw.index, flags: raw.flags,
                  eax: raw.eax, ebx: raw.ebx, ecx: raw.ecx, edx: raw.edx)
    }

    var raw: kvm_cpuid_entry2 {
        var entry = kvm_cpuid_entry2()
        entry.function = function; entry.index = index; entry.flags = flags
        entry.eax = eax; entry.ebx = ebx; entry.ecx = ecx; entry.edx = edx
        return entry
    }
}
