// C shim for Tern: the parts of <linux/kvm.h> and <linux/userfaultfd.h> that
// Swift cannot import by itself. The request numbers are built with the _IO*
// macros, which Swift does not import, so they are re-exported here as typed
// constants; ioctl(2) is variadic, so it is wrapped in fixed-argument inline
// functions. Nothing else lives here: all logic is in Swift.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <linux/memfd.h>
#include <linux/falloc.h>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <string.h>
#include <stdint.h>
#include <stddef.h>

// System ioctls (on the /dev/kvm fd).
static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;

// VM ioctls.
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long CKVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long CKVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long CKVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
static const unsigned long CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long CKVM_CLEAR_DIRTY_LOG = KVM_CLEAR_DIRTY_LOG;
static const unsigned long CKVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long CKVM_IOEVENTFD = KVM_IOEVENTFD;
static const unsigned long CKVM_IRQFD = KVM_IRQFD;

// vCPU ioctls.
static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long CKVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;
static const unsigned long CKVM_KVMCLOCK_CTRL = KVM_KVMCLOCK_CTRL;

// userfaultfd ioctls.
static const unsigned long CKVM_UFFDIO_API = UFFDIO_API;
static const unsigned long CKVM_UFFDIO_REGISTER = UFFDIO_REGISTER;
static const unsigned long CKVM_UFFDIO_UNREGISTER = UFFDIO_UNREGISTER;
static const unsigned long CKVM_UFFDIO_COPY = UFFDIO_COPY;
static const unsigned long CKVM_UFFDIO_ZEROPAGE = UFFDIO_ZEROPAGE;
static const unsigned long CKVM_UFFDIO_WAKE = UFFDIO_WAKE;
static const unsigned long CKVM_UFFDIO_CONTINUE = UFFDIO_CONTINUE;

/// ioctl with a pointer argument (most KVM requests).
static inline int ckvm_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}

/// ioctl with an integer argument (KVM_CREATE_VCPU, KVM_CHECK_EXTENSION, ...).
static inline int ckvm_ioctl_val(int fd, unsigned long request, unsigned long arg) {
    return ioctl(fd, request, arg);
}

/// memfd_create has no Glibc overlay in every toolchain; call it by number.
static inline int ckvm_memfd_create(const char *name, unsigned int flags) {
    return (int)syscall(SYS_memfd_create, name, flags);
}

/// The new mount API (Linux 5.2) has no libc wrappers in glibc 2.36: fsopen,
/// fsconfig (string values and the create command only) and fsmount.
static inline int ckvm_fsopen(const char *filesystem, unsigned int flags) {
    return (int)syscall(SYS_fsopen, filesystem, flags);
}

static inline int ckvm_fsconfig_string(int fd, const char *key, const char *value) {
    return (int)syscall(SYS_fsconfig, fd, 1 /* FSCONFIG_SET_STRING */, key, value, 0);
}

static inline int ckvm_fsconfig_create(int fd) {
    return (int)syscall(SYS_fsconfig, fd, 6 /* FSCONFIG_CMD_CREATE */, (void *)0, (void *)0, 0);
}

static inline int ckvm_fsmount(int fd, unsigned int flags, unsigned int attributes) {
    return (int)syscall(SYS_fsmount, fd, flags, attributes);
}

/// userfaultfd(2) has no libc wrapper in older glibc.
static inline int ckvm_userfaultfd(int flags) {
    return (int)syscall(SYS_userfaultfd, flags);
}

static const unsigned int CKVM_MFD_CLOEXEC = MFD_CLOEXEC;
static const int CKVM_EFD_CLOEXEC = EFD_CLOEXEC;
static const int CKVM_EFD_NONBLOCK = EFD_NONBLOCK;
static const unsigned int CKVM_IOEVENTFD_FLAG_DATAMATCH = KVM_IOEVENTFD_FLAG_DATAMATCH;
static const unsigned int CKVM_IOEVENTFD_FLAG_DEASSIGN = KVM_IOEVENTFD_FLAG_DEASSIGN;
static const unsigned int CKVM_IRQFD_FLAG_DEASSIGN = KVM_IRQFD_FLAG_DEASSIGN;

/// fallocate(0): allocates (zeroed) pages for a range of a memfd, so later writes find them present.
static inline int ckvm_allocate(int fd, int64_t offset, int64_t length) {
    return (int)syscall(SYS_fallocate, fd, 0, offset, length);
}

/// fallocate(PUNCH_HOLE | KEEP_SIZE): frees a range of a memfd, which then reads as zeros.
static inline int ckvm_punch_hole(int fd, int64_t offset, int64_t length) {
    return (int)syscall(SYS_fallocate, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

/// fallocate(ZERO_RANGE | KEEP_SIZE): a range reads as zeros, its blocks kept allocated.
static inline int ckvm_zero_range(int fd, int64_t offset, int64_t length) {
    return (int)syscall(SYS_fallocate, fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

/// Allocates a range of a file where it has holes (zero pages); what it holds already stays.
static inline int ckvm_allocate_range(int fd, int64_t offset, int64_t length) {
    return (int)syscall(SYS_fallocate, fd, FALLOC_FL_KEEP_SIZE, offset, length);
}

/// sync_file_range(SYNC_FILE_RANGE_WRITE): starts writeback of a range without waiting (a GNU extension
/// Swift does not import). 0x2 is SYNC_FILE_RANGE_WRITE in <fcntl.h>.
static inline int ckvm_start_writeback(int fd, int64_t offset, int64_t length) {
    return (int)syscall(SYS_sync_file_range, fd, offset, length, 0x2);
}

/// Names the calling thread for the kernel (comm; top -H): the first 15 bytes of `name`.
static inline int ckvm_set_thread_name(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0, 0, 0);
}

static inline int ckvm_gettid(void) {
    return (int)syscall(SYS_gettid);
}

/// Ordered accesses to rings a guest shares with a device thread (virtqueues): the
/// index a guest publishes is read with acquire order, so the entries it guards are
/// read after it; a device publishes its index with release order, after its entries.
static inline uint16_t ckvm_load_acquire_u16(const void *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}
static inline void ckvm_store_release_u16(void *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}
static inline void ckvm_fence_seq_cst(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/// Attaches `fd` (an open /dev/net/tun) to the existing TAP interface `name`, with a
/// virtio-net header of `header_size` bytes in front of every frame (IFF_VNET_HDR) and no
/// packet-information prefix. Returns 0, or -1 with errno (EBUSY: another process has it).
static inline int ckvm_tap_attach(int fd, const char *name, int header_size) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    strncpy(request.ifr_name, name, IFNAMSIZ - 1);
    request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (ioctl(fd, TUNSETIFF, &request) != 0) return -1;
    if (ioctl(fd, TUNSETVNETHDRSZ, &header_size) != 0) return -1;
    /* No offloads: the guest is offered none, so every frame is whole and checksummed. */
    if (ioctl(fd, TUNSETOFFLOAD, 0UL) != 0) return -1;
    return 0;
}

/// KVM's flexible-array structs: sizes for a given entry count, so Swift can
/// allocate them without guessing at padding.
/* Where an MMIO exit's data bytes sit inside kvm_run: the field is in an anonymous
   union, which Swift imports without a stored-property offset. */
static inline size_t ckvm_run_mmio_data_offset(void) {
    return offsetof(struct kvm_run, mmio.data);
}

static inline size_t ckvm_cpuid2_size(unsigned n) {
    return sizeof(struct kvm_cpuid2) + n * sizeof(struct kvm_cpuid_entry2);
}
static inline size_t ckvm_msrs_size(unsigned n) {
    return sizeof(struct kvm_msrs) + n * sizeof(struct kvm_msr_entry);
}
static inline size_t ckvm_msr_list_size(unsigned n) {
    return sizeof(struct kvm_msr_list) + n * sizeof(uint32_t);
}
static inline struct kvm_cpuid_entry2 *ckvm_cpuid2_entries(struct kvm_cpuid2 *c) {
    return c->entries;
}
static inline struct kvm_msr_entry *ckvm_msrs_entries(struct kvm_msrs *m) {
    return m->entries;
}
static inline uint32_t *ckvm_msr_list_indices(struct kvm_msr_list *l) {
    return l->indices;
}

#endif
