import CKVM
import Glibc
import TernKVM

/// Whether guest RAM is backed by transparent huge pages (`tern run --thp`,
/// as Cloud Hypervisor's `thp=on`; QEMU's anonymous guest RAM takes them by default).
public enum HugePages: String, Sendable, CaseIterable {
    /// Huge pages where the kernel allows them, 4 KiB pages otherwise.
    case auto
    /// Huge pages, or an error.
    case on
    /// 4 KiB pages.
    case off
}

/// The file behind guest RAM.
///
/// 4 KiB pages: a memfd. This kernel gives memfds no huge pages
/// (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `never`), and
/// every 4 KiB page a migration writes costs an allocation, a memory-cgroup
/// charge and a page-cache insertion, among a migration destination's largest
/// costs (docs/MIGRATION.md, "Huge pages").
///
/// Huge pages: an unlinked file in a tmpfs of its own, mounted with
/// `huge=within_size` through the mount API without being attached anywhere
/// in the file tree, so nothing outside this process sees it and it goes when
/// the file's last descriptor closes. It behaves as a memfd does (holes,
/// SEEK_DATA, hole punching, sharing) with 2 MiB pages where the kernel can
/// find them. Mounting needs CAP_SYS_ADMIN; without it, `auto` falls back to
/// a memfd.
enum GuestMemoryBacking {
    struct Unavailable: Error, CustomStringConvertible {
        let step: String
        let errno: Int32
        var description: String { "\(step): \(String(cString: strerror(errno)))" }
    }

    /// A file of `size` bytes, and whether it takes huge pages.
    static func makeFile(size: UInt64, hugePages: HugePages) throws -> (FileDescriptor, huge: Bool) {
        if hugePages != .off {
            do {
                return (try hugePageFile(size: size), true)
            } catch {
                if hugePages == .on { throw ConfigurationError("--thp on: no huge-page tmpfs for guest RAM (\(error))") }
            }
        }
        let fd = ckvm_memfd_create("tern-guest-ram", CKVM_MFD_CLOEXEC)
        guard fd >= 0 else { throw SystemError("memfd_create", errno: errno) }
        return (FileDescriptor(adopting: fd), false)
    }

    private static func hugePageFile(size: UInt64) throws(Unavailable) -> FileDescriptor {
        let context = ckvm_fsopen("tmpfs", 1 /* FSOPEN_CLOEXEC */)
        guard context >= 0 else { throw Unavailable(step: "fsopen tmpfs", errno: errno) }
        defer { close(context) }
        // The file is the mount's only content: a size limit of exactly the guest's RAM.
        for (key, value) in [("huge", "within_size"), ("size", "\(size)"), ("mode", "0700")] {
            guard ckvm_fsconfig_string(context, key, value) == 0 else { throw Unavailable(step: "tmpfs option \(key)=\(value)", errno: errno) }
        }
        guard ckvm_fsconfig_create(context) == 0 else { throw Unavailable(step: "creating the tmpfs", errno: errno) }
        let mount = ckvm_fsmount(context, 1 /* FSMOUNT_CLOEXEC */, 0)
        guard mount >= 0 else { throw Unavailable(step: "fsmount", errno: errno) }
        defer { close(mount) }
        // O_TMPFILE: a file with no name, freed with its last descriptor (and the mount with it).
        let oTmpfile: Int32 = 0o20200000
        let fd = openat(mount, ".", oTmpfile | O_RDWR | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw Unavailable(step: "creating the guest RAM file", errno: errno) }
        return FileDescriptor(adopting: fd)
    }
}
