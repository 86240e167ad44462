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
#define STATUS_VERSION 1

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
};

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
};

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
