import Glibc

/// A host virtual-memory mapping (mmap), unmapped when the last owner lets go.
///
/// KVM keeps using a memory slot's host address after KVM_SET_USER_MEMORY_REGION
/// returns, so `VirtualMachine` retains every mapping it registers: the memory
/// cannot be unmapped while the guest may still touch it.
public final class HostMapping: @unchecked Sendable {
    // Sendable: base and length are immutable; the bytes themselves are guest
    // memory, shared with vCPUs by design and synchronised by the VM's own rules.
    public let base: UnsafeMutableRawPointer
    public let length: Int

    /// mmap(2) of `length` bytes of `fd` from offset 0 (or anonymous when fd is nil).
    public init(length: Int, fd: Int32? = nil, offset: Int = 0, protection: Int32 = PROT_READ | PROT_WRITE,
                flags: Int32 = MAP_SHARED) throws(SystemError) {
        var mapFlags = flags
        if fd == nil { mapFlags |= MAP_ANONYMOUS }
        let address = mmap(nil, length, protection, mapFlags, fd ?? -1, off_t(offset))
        guard let address, address != MAP_FAILED else {
            throw SystemError("mmap \(length) bytes", errno: errno)
        }
        self.base = address
        self.length = length
    }

    /// madvise(2) over a sub-range, e.g. MADV_DONTDUMP or MADV_HUGEPAGE.
    public func advise(_ advice: Int32, offset: Int = 0, length: Int? = nil) throws(SystemError) {
        _ = try check("madvise") { madvise(base + offset, length ?? self.length - offset, advice) }
    }

    deinit {
        munmap(base, length)
    }
}
