import CKVM
import Glibc

/// KVM's dirty log: which pages of a slot the guest wrote.
///
/// By default KVM_GET_DIRTY_LOG reads the bitmap and write-protects the pages
/// it returns in one call, so a page the guest writes after that read but
/// before userspace copies it is reported again at the next read, although
/// the copy already held the write (the false positives the kernel commit
/// that added manual protection describes). With manual protection
/// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), reading leaves the bits and the
/// protection alone and KVM_CLEAR_DIRTY_LOG clears chosen bits, re-protecting
/// those pages: cleared just before a page is copied, its bit afterwards
/// means a write after the copy. `dirtyLog(slot:)` keeps its read-and-reset
/// meaning either way.
extension VirtualMachine {
    /// KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) with the manual-protect flag only (pages are
    /// write-protected when logging starts, as without it). False when this KVM lacks it.
    @discardableResult
    public func enableManualDirtyLogProtection() throws(SystemError) -> Bool {
        if manualDirtyLogProtection.load(ordering: .acquiring) { return true }
        // The extension answers with the flags it supports; bit 0 is KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE.
        guard kvm.checkExtension(.manualDirtyLogProtect2) & 1 != 0 else { return false }
        var cap = kvm_enable_cap()
        cap.cap = UInt32(Capability.manualDirtyLogProtect2.rawValue)
        cap.args.0 = 1
        _ = try check("KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)") { ckvm_ioctl_ptr(fd.rawValue, CKVM_ENABLE_CAP, &cap) }
        manualDirtyLogProtection.store(true, ordering: .releasing)
        return true
    }

    public var hasManualDirtyLogProtection: Bool { manualDirtyLogProtection.load(ordering: .acquiring) }

    /// KVM_GET_DIRTY_LOG: one bit per page of the slot, set when the guest
    /// wrote it since the previous call (which also resets the log; with
    /// manual protection, by clearing the bits it returned).
    public func dirtyLog(slot: UInt32) throws(SystemError) -> [UInt64] {
        guard let entry = memorySlot(slot) else {
            throw SystemError("KVM_GET_DIRTY_LOG: no memory slot \(slot)", errno: ENOENT)
        }
        let words = (entry.size / 4096 + 63) / 64
        let buffer = UnsafeMutablePointer<UInt64>.allocate(capacity: words)
        defer { buffer.deallocate() }
        buffer.initialize(repeating: 0, count: words)
        var log = kvm_dirty_log()
        log.slot = slot
        log.dirty_bitmap = UnsafeMutableRawPointer(buffer)
        _ = try check("KVM_GET_DIRTY_LOG slot \(slot)") { ckvm_ioctl_ptr(fd.rawValue, CKVM_GET_DIRTY_LOG, &log) }
        let bitmap = Array(UnsafeBufferPointer(start: buffer, count: words))
        if hasManualDirtyLogProtection && bitmap.contains(where: { $0 != 0 }) {
            try clear(slot: slot, firstPage: 0, pageCount: entry.size / 4096, bitmap: buffer)
        }
        return bitmap
    }

    /// KVM_CLEAR_DIRTY_LOG (manual protection only): clears the bits set in `bitmap`, whose bit 0 is
    /// slot page `firstPage` (a multiple of 64), and write-protects those pages again, so that the next
    /// write to one of them is logged. Bits past the end of the slot are ignored.
    public func clearDirtyLog(slot: UInt32, firstPage: Int, bitmap: [UInt64]) throws(SystemError) {
        guard let entry = memorySlot(slot) else {
            throw SystemError("KVM_CLEAR_DIRTY_LOG: no memory slot \(slot)", errno: ENOENT)
        }
        let slotPages = entry.size / 4096
        guard firstPage % 64 == 0, firstPage >= 0, firstPage < slotPages else {
            throw SystemError("KVM_CLEAR_DIRTY_LOG: first page \(firstPage) of slot \(slot) is not a multiple of 64 inside it", errno: EINVAL)
        }
        // A multiple of 64 pages, or up to the slot's end: what KVM accepts.
        let pageCount = min(bitmap.count * 64, slotPages - firstPage)
        let buffer = UnsafeMutablePointer<UInt64>.allocate(capacity: max(bitmap.count, 1))
        defer { buffer.deallocate() }
        buffer.initialize(from: bitmap, count: bitmap.count)
        try clear(slot: slot, firstPage: firstPage, pageCount: pageCount, bitmap: buffer)
    }

    /// The ioctl itself, on a bitmap already in memory (the read's own buffer, or a copy of the caller's).
    private func clear(slot: UInt32, firstPage: Int, pageCount: Int, bitmap: UnsafeMutablePointer<UInt64>) throws(SystemError) {
        var clear = kvm_clear_dirty_log()
        clear.slot = slot
        clear.first_page = UInt64(firstPage)
        clear.num_pages = UInt32(pageCount)
        clear.dirty_bitmap = UnsafeMutableRawPointer(bitmap)
        _ = try check("KVM_CLEAR_DIRTY_LOG slot \(slot)") { ckvm_ioctl_ptr(fd.rawValue, CKVM_CLEAR_DIRTY_LOG, &clear) }
    }
}
