/*
 * tern.h - shared definitions of the Tern test guest.
 *
 * The guest runs its set-up in ring 0 (kernel.c, config.c) and its workload
 * in ring 3 (workload.c). Under PVM ring 0 is emulated one instruction at a
 * time, so ring 0 only prepares; everything that loops over memory is ring 3.
 * Page tables map everything with U/S set, so ring 3 can read the config and
 * write the status block directly.
 */
#ifndef TERN_GUEST_H
#define TERN_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
#define NULL ((void *)0)

#define MiB (1ULL << 20)
#define GiB (1ULL << 30)
#define PAGE_SIZE 4096ULL

/* The working set starts above the kernel image and the Multiboot data. */
#define WORK_BASE 0x1000000ULL

/* ---- status block: the guest's only interface to the VMM and tests ---- */
#define STATUS_GPA 0x102000ULL
#define STATUS_MAGIC 0x544154534E524554ULL /* "TERNSTAT" as a little-endian u64 */
#define STATUS_VERSION 3

enum phase {
	PHASE_BOOT = 0,
	PHASE_FILL = 1,
	PHASE_DIRTY = 2,
	PHASE_IDLE = 3,
	PHASE_ERROR = 0xE,
	PHASE_CRASHED = 0xF,
};

enum pattern { PATTERN_SEQ = 0, PATTERN_RANDOM = 1, PATTERN_HOTSPOT = 2 };
enum crash { CRASH_NONE = 0, CRASH_TRIPLE = 1, CRASH_UD = 2, CRASH_PF = 3 };
enum disk_mode { DISK_OFF = 0, DISK_WRITE = 1, DISK_READ = 2 };
enum disk_pattern { DISK_SEQ = 0, DISK_RAND = 1 };

struct status {
	u64 magic;	    /* 0x00 written last at boot */
	u32 version;	    /* 0x08 */
	u32 phase;	    /* 0x0C enum phase */
	u64 iterations;	    /* 0x10 pages touched (dirty) or heartbeats (idle) */
	u64 tsc;	    /* 0x18 rdtsc at the last update */
	u64 tsc_khz;	    /* 0x20 */
	u64 checksum;	    /* 0x28 sum of all u64 words of the working set */
	u64 passes;	    /* 0x30 */
	u64 verified;	    /* 0x38 */
	u64 errors;	    /* 0x40 */
	u64 work_base;	    /* 0x48 */
	u64 work_bytes;	    /* 0x50 */
	u64 fill_bytes;	    /* 0x58 filled so far */
	u64 ram_bytes;	    /* 0x60 */
	u32 pattern;	    /* 0x68 enum pattern */
	u32 bytes_per_page; /* 0x6C */
	u64 rate_mbps;	    /* 0x70 0 = flat out */
	u64 boot_tsc;	    /* 0x78 */
	u64 exception;	    /* 0x80 vector (phase CRASHED) */
	u64 exception_rip;  /* 0x88 */
	u64 exception_err;  /* 0x90 */
	u64 exception_cr2;  /* 0x98 */
	/* version 2: devices */
	u64 disk_ops;	    /* 0xA0 requests completed, all kinds */
	u64 disk_errors;    /* 0xA8 content mismatches + error statuses */
	u64 disk_verified;  /* 0xB0 blocks read back that matched */
	u64 net_rx;	    /* 0xB8 packets received */
	u64 net_tx;	    /* 0xC0 packets sent */
	u64 disk_writes;    /* 0xC8 */
	u64 disk_reads;	    /* 0xD0 */
	u64 disk_flushes;   /* 0xD8 */
	u64 disk_bytes;	    /* 0xE0 data bytes moved */
	u64 disk_capacity;  /* 0xE8 bytes */
	u32 disk_state;	    /* 0xF0 enum dev_state */
	u32 net_state;	    /* 0xF4 enum dev_state */
	u64 net_announces;  /* 0xF8 gratuitous ARPs sent */
	u64 notifies;	    /* 0x100 QueueNotify writes, all devices */
	u64 notify_ticks;   /* 0x108 TSC ticks the vCPU spent in them */
	/* version 3: the guest's own stall measure, TCP echo */
	u64 max_stall_ticks;   /* 0x110 largest TSC gap between two turns of the main loops */
	u64 max_stall_end_tsc; /* 0x118 rdtsc at the end of that gap */
	u64 tcp_rx;	       /* 0x120 TCP segments received (checksum valid) */
	u64 tcp_tx;	       /* 0x128 TCP segments sent, RSTs included */
	u64 tcp_retransmits;   /* 0x130 segments sent again (timeout, duplicate ACKs) */
	u64 tcp_accepted;      /* 0x138 connections that completed the handshake */
	u64 tcp_resets;	       /* 0x140 RSTs sent */
	u64 tcp_dropped;       /* 0x148 segments whose data was not all taken (out of order, full buffer) */
};

#define STATUS_CHECK(field, off) _Static_assert(__builtin_offsetof(struct status, field) == (off), #field)
STATUS_CHECK(exception_cr2, 0x98);
STATUS_CHECK(disk_ops, 0xA0);
STATUS_CHECK(net_rx, 0xB8);
STATUS_CHECK(disk_capacity, 0xE8);
STATUS_CHECK(disk_state, 0xF0);
STATUS_CHECK(net_state, 0xF4);
STATUS_CHECK(net_announces, 0xF8);
STATUS_CHECK(notify_ticks, 0x108);
STATUS_CHECK(max_stall_ticks, 0x110);
STATUS_CHECK(max_stall_end_tsc, 0x118);
STATUS_CHECK(tcp_rx, 0x120);
STATUS_CHECK(tcp_tx, 0x128);
STATUS_CHECK(tcp_retransmits, 0x130);
STATUS_CHECK(tcp_accepted, 0x138);
STATUS_CHECK(tcp_resets, 0x140);
STATUS_CHECK(tcp_dropped, 0x148);
_Static_assert(sizeof(struct status) == 0x150, "status block size");

enum dev_state { DEV_OFF = 0, DEV_RUNNING = 1, DEV_FAILED = 2 };

#define STATUS ((volatile struct status *)STATUS_GPA)

/* ---- workload configuration, parsed from the command line in ring 0 ---- */
struct config {
	u64 fill_mib;
	u64 dirty_mib;
	u64 rate_mbps;	/* 0 = flat out */
	u64 verify;	/* passes between self-checks, 0 = never */
	u64 progress_s; /* seconds between progress lines, 0 = never */
	u32 pattern;
	u32 bytes;	/* bytes written per touched page */
	u32 crash;
	/* disk workload (disk.c) */
	u32 disk;	  /* enum disk_mode */
	u32 disk_pattern; /* enum disk_pattern */
	u64 disk_rate;	  /* MB/s, 0 = flat out */
	u64 disk_block;	  /* bytes per request, a multiple of 512 */
	u64 disk_flush;	  /* a flush every N writes, 0 = never */
	u64 disk_verify;  /* a read-back every N requests, 0 = never */
	u64 disk_blocks;  /* blocks of the disk used, 0 = all */
	/* network responder (net.c) */
	u32 ip;		  /* host byte order, 0 = off */
	u32 ip_prefix;
};

/* kernel.c: the usable RAM region holding WORK_BASE, for ring 3's checks */
extern u64 work_region_start, work_limit;

extern struct config cfg;

/* config.c */
int config_parse(const char *cmdline, struct config *c, char *err, u32 errcap);
void config_describe(const struct config *c, char *out, u32 cap);

/* workload.c: ring-3 entry point, reached by iretq */
void user_main(void) __attribute__((noreturn));

/* entry.S */
extern u64 boot_tsc;
extern u32 mb_info;
void enter_user(u64 rip, u64 rsp) __attribute__((noreturn));

/* ---- small text builder, usable in both rings (no I/O) ---- */
struct line {
	char *s;
	u32 n, cap;
};
void line_init(struct line *l, char *buf, u32 cap);
void line_str(struct line *l, const char *s);
void line_strn(struct line *l, const char *s, u32 n);
void line_dec(struct line *l, u64 v);
void line_hex(struct line *l, u64 v);

void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void) { __asm__ volatile("pause"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }

/* splitmix64 finaliser: cheap, and distinct inputs give distinct outputs */
static inline u64 mix64(u64 z)
{
	z += 0x9E3779B97F4A7C15ULL;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static inline u64 xorshift64(u64 *s)
{
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* uniform in [0, n) from the high bits of r, without a division */
static inline u64 scale(u64 r, u64 n) { return (u64)(((unsigned __int128)r * n) >> 64); }

/*
 * The "system call": ring 3 cannot do port I/O under PVM (IOPL from iretq is
 * dropped) and syscall/int 0x80 do not reach the guest, but exceptions do.
 * So a call is ud2 followed by the tag 'T' and a function byte; the #UD
 * handler recognises it, does the work and resumes after the 4 bytes.
 */
#define SYS_TAG 'T'
#define SYS_PRINT 'P' /* print the NUL-terminated string at RDI */
#define SYS_HALT 'H'  /* print RDI (if not NULL), then stop the vCPU for good */

static inline void sys_print(const char *s)
{
	__asm__ volatile("ud2; .byte 0x54, 0x50" : : "D"(s) : "memory");
}

static inline void __attribute__((noreturn)) sys_halt(const char *s)
{
	__asm__ volatile("ud2; .byte 0x54, 0x48" : : "D"(s) : "memory");
	__builtin_unreachable();
}

#endif
