/*
 * kernel.c - ring-0 part of the Tern test guest: read the Multiboot info,
 * finish the page tables, set up GDT/TSS/IDT, calibrate the TSC, parse the
 * command line, publish the status block, and drop to ring 3.
 *
 * Under PVM every ring-0 instruction is emulated (~1M/s), so this file does
 * a fixed, small amount of work and leaves all loops over memory to ring 3.
 */
#include "virtio.h"

struct config cfg;

/* ---- port I/O and the serial console (COM1, polled) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

#define COM1 0x3f8

static void serial_puts(const char *s)
{
	for (; *s; s++) {
		while (!(inb(COM1 + 5) & 0x20)) /* LSR: transmit holding register empty */
			;
		outb(COM1, (u8)*s);
	}
}

static void __attribute__((noreturn)) halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ---- descriptor tables ---- */
extern u64 gdt[];
extern u64 pdpt[512];
extern u64 pd[16][512];
extern u64 isr_table[32];
extern u8 boot_stack_top[];

static struct __attribute__((packed)) {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} tss;

static struct __attribute__((packed)) {
	u16 off_lo, sel;
	u8 ist, type;
	u16 off_mid;
	u32 off_hi, reserved;
} idt[32] __attribute__((aligned(16)));

static u8 user_stack[65536] __attribute__((aligned(16)));

static void setup_cpu_tables(void)
{
	u64 base = (u64)&tss;
	tss.rsp[0] = (u64)boot_stack_top; /* exceptions from ring 3 land here */
	tss.iomap_base = sizeof tss;	  /* no I/O bitmap */
	gdt[5] = (sizeof tss - 1) | ((base & 0xFFFFFF) << 16) | (0x89ULL << 40) |
		 (((base >> 24) & 0xFF) << 56);
	gdt[6] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"(0x28));

	for (int v = 0; v < 32; v++) {
		u64 h = isr_table[v];
		idt[v].off_lo = (u16)h;
		idt[v].sel = 0x08;
		idt[v].ist = 0;
		idt[v].type = 0x8E; /* present, DPL 0, 64-bit interrupt gate */
		idt[v].off_mid = (u16)(h >> 16);
		idt[v].off_hi = (u32)(h >> 32);
		idt[v].reserved = 0;
	}
	struct __attribute__((packed)) {
		u16 limit;
		u64 base;
	} idtr = {sizeof idt - 1, (u64)idt};
	__asm__ volatile("lidt %0" : : "m"(idtr));
}

/* ---- memory ---- */
static u64 ram_bytes;  /* sum of usable regions */
static u64 ram_top;    /* end of the highest usable region */
u64 work_region_start; /* the usable region holding WORK_BASE */
u64 work_limit;
static u64 mapped_end;
static char cmdline[512];

static void read_multiboot(const u8 *mbi)
{
	u32 flags = *(const u32 *)mbi;
	/* do not trust .bss to be zero: a loader may skip that */
	ram_bytes = ram_top = work_limit = work_region_start = 0;
	cmdline[0] = 0;
	if (flags & (1u << 0)) {
		u64 upper_end = 0x100000 + (u64) * (const u32 *)(mbi + 8) * 1024;
		ram_bytes = (u64) * (const u32 *)(mbi + 4) * 1024 + upper_end - 0x100000;
		ram_top = work_limit = upper_end;
		work_region_start = 0x100000;
	}
	if (flags & (1u << 6)) {
		/* each entry: u32 size (not counting itself), u64 addr, u64 len, u32 type */
		const u8 *p = (const u8 *)(u64) * (const u32 *)(mbi + 48);
		const u8 *end = p + *(const u32 *)(mbi + 44);
		ram_bytes = ram_top = work_limit = work_region_start = 0;
		for (; p < end; p += *(const u32 *)p + 4) {
			u64 addr = *(const u64 *)(p + 4), len = *(const u64 *)(p + 12);
			if (*(const u32 *)(p + 20) != 1)
				continue;
			ram_bytes += len;
			if (addr + len > ram_top)
				ram_top = addr + len;
			if (addr <= WORK_BASE && WORK_BASE < addr + len) {
				work_region_start = addr;
				work_limit = addr + len;
			}
		}
	}
	if (flags & (1u << 2)) {
		const char *c = (const char *)(u64) * (const u32 *)(mbi + 16);
		u32 i = 0;
		for (; c[i] && i < sizeof cmdline - 1; i++)
			cmdline[i] = c[i];
		cmdline[i] = 0;
	}
}

/* entry.S mapped 4 GiB; map RAM above that, in whole GiB, up to 16 GiB.
   The new PDPT entries were not present before, so no TLB flush is needed. */
static void map_high_ram(void)
{
	u64 gib = (ram_top + GiB - 1) / GiB;
	if (gib < 4)
		gib = 4;
	if (gib > 16)
		gib = 16;
	for (u64 g = 4; g < gib; g++) {
		for (u64 i = 0; i < 512; i++)
			pd[g][i] = (g * GiB + i * 2 * MiB) | 0x87;
		pdpt[g] = (u64)pd[g] | 0x07;
	}
	mapped_end = gib * GiB;
	if (work_limit > mapped_end)
		work_limit = mapped_end;
}

/* ---- TSC calibration against PIT channel 2 ---- */
#define PIT_HZ 1193182ULL

static u64 calibrate_tsc(void)
{
	const u64 latch = PIT_HZ / 100; /* 10 ms */
	u8 saved = inb(0x61);
	if (saved == 0xFF) /* nothing decodes port 0x61 (QEMU microvm): try channel 0 */
		goto channel0;
	outb(0x61, (saved & ~0x02) | 0x01); /* gate channel 2 on, speaker off */
	outb(0x43, 0xB0);		    /* channel 2, lo/hi byte, mode 0, binary */
	outb(0x42, latch & 0xFF);
	outb(0x42, (u8)(latch >> 8));
	u64 t0 = rdtsc();
	/* OUT2 (port 0x61 bit 5) rises when the count reaches 0. The bound is
	   in loop turns since the TSC rate is what we do not know yet. */
	u32 spins = 0;
	while (!(inb(0x61) & 0x20))
		if (++spins > 200000) /* each turn is an I/O exit: >= 1 us */
			break;
	u64 t1 = rdtsc();
	outb(0x61, saved);
	if (spins <= 200000)
		return (t1 - t0) * PIT_HZ / (latch * 1000);
	goto no_pit;

channel0:
	/* No gate port, but maybe a PIT: let channel 0 count down from 0xFFFF
	   (mode 2; IF is 0, so its IRQ 0 goes nowhere) and read it back with
	   latch commands until 10 ms of counts have passed. */
	outb(0x43, 0x34); /* channel 0, lo/hi byte, mode 2, binary */
	outb(0x40, 0xFF);
	outb(0x40, 0xFF);
	{
		u32 c0 = 0, c = 0;
		u64 t0 = 0, t1 = 0;
		for (u32 turn = 0; turn < 20000; turn++) {
			outb(0x43, 0x00); /* latch channel 0 */
			u64 t = rdtsc();
			u32 v = inb(0x40);
			v |= (u32)inb(0x40) << 8;
			if (turn == 0) {
				c0 = v;
				t0 = t;
				if (c0 < 2 * latch) /* not counting from where we set it */
					break;
				continue;
			}
			c = v;
			t1 = t;
			if (c < c0 && c0 - c >= latch)
				return (t1 - t0) * PIT_HZ / ((u64)(c0 - c) * 1000);
		}
	}
no_pit:
	serial_puts("tern-guest: warning: the PIT did not answer (channel 2 nor 0), assuming a 1 GHz TSC\n");
	return 1000000;
}

/* ---- exceptions and the system call ---- */
struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rdi, rsi, rbp, rbx, rdx, rcx, rax;
	u64 vec, err, rip, cs, rflags, rsp, ss;
};

void exception_handler(struct frame *f);
void exception_handler(struct frame *f)
{
	if (f->vec == 6 && (f->cs & 3) == 3) {
		const u8 *ip = (const u8 *)f->rip;
		if (ip[0] == 0x0F && ip[1] == 0x0B && ip[2] == SYS_TAG) {
			if (ip[3] == SYS_PRINT) {
				serial_puts((const char *)f->rdi);
				f->rip += 4;
				return;
			}
			if (ip[3] == SYS_HALT) {
				if (f->rdi)
					serial_puts((const char *)f->rdi);
				halt_forever();
			}
		}
	}

	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	volatile struct status *st = STATUS;
	st->exception = f->vec;
	st->exception_rip = f->rip;
	st->exception_err = f->err;
	st->exception_cr2 = cr2;
	st->phase = PHASE_CRASHED;
	compiler_barrier();
	if (st->magic != STATUS_MAGIC) { /* crashed during boot: still publish */
		st->version = STATUS_VERSION;
		compiler_barrier();
		st->magic = STATUS_MAGIC;
	}

	char buf[160];
	struct line l;
	line_init(&l, buf, sizeof buf);
	line_str(&l, "tern-guest: exception ");
	line_dec(&l, f->vec);
	line_str(&l, " at rip=");
	line_hex(&l, f->rip);
	line_str(&l, " err=");
	line_hex(&l, f->err);
	line_str(&l, " cr2=");
	line_hex(&l, cr2);
	line_str(&l, (f->cs & 3) ? " (ring 3)\n" : " (ring 0)\n");
	serial_puts(buf);
	halt_forever();
}

/* ---- boot ---- */
static void __attribute__((noreturn)) boot_error(const char *msg)
{
	serial_puts("tern-guest: error: ");
	serial_puts(msg);
	serial_puts("\n");
	STATUS->phase = PHASE_ERROR;
	compiler_barrier();
	STATUS->magic = STATUS_MAGIC;
	halt_forever();
}

void kmain(void);
void kmain(void)
{
	volatile struct status *st = STATUS;
	volatile u64 *page = (volatile u64 *)STATUS_GPA;
	for (int i = 0; i < 512; i++)
		page[i] = 0;
	st->version = STATUS_VERSION;
	st->phase = PHASE_BOOT;
	st->boot_tsc = boot_tsc;
	st->work_base = WORK_BASE;

	read_multiboot((const u8 *)(u64)mb_info);
	map_high_ram();
	setup_cpu_tables();
	u64 khz = calibrate_tsc();
	st->tsc_khz = khz;
	st->ram_bytes = ram_bytes;

	char buf[700];
	struct line l;
	line_init(&l, buf, sizeof buf);
	line_str(&l, "tern-guest: mem=");
	line_dec(&l, (ram_bytes + MiB - 1) / MiB);
	line_str(&l, "MiB tsc_khz=");
	line_dec(&l, khz);
	line_str(&l, " cmdline=");
	line_str(&l, cmdline);
	line_str(&l, "\n");
	serial_puts(buf);

	char err[160];
	if (config_parse(cmdline, &cfg, err, sizeof err))
		boot_error(err);
	config_describe(&cfg, buf, sizeof buf);
	serial_puts(buf);

	u64 need = WORK_BASE + (cfg.fill_mib > cfg.dirty_mib ? cfg.fill_mib : cfg.dirty_mib) * MiB;
	st->work_bytes = cfg.dirty_mib * MiB;
	st->pattern = cfg.pattern;
	st->bytes_per_page = cfg.bytes;
	st->rate_mbps = cfg.rate_mbps;
	if (need > work_limit) {
		line_init(&l, buf, sizeof buf);
		line_str(&l, "fill/dirty need RAM up to ");
		line_hex(&l, need);
		line_str(&l, " but usable RAM from ");
		line_hex(&l, WORK_BASE);
		line_str(&l, " ends at ");
		line_hex(&l, work_limit);
		boot_error(buf);
	}
	if ((cfg.disk || cfg.ip) && work_region_start > DRIVER_BASE) {
		line_init(&l, buf, sizeof buf);
		line_str(&l, "the virtio drivers need RAM at 0x200000..0xffffff but the usable region holding ");
		line_hex(&l, WORK_BASE);
		line_str(&l, " starts at ");
		line_hex(&l, work_region_start);
		boot_error(buf);
	}
	compiler_barrier();
	st->magic = STATUS_MAGIC; /* last: a reader that sees it sees the rest */

	if (cfg.crash == CRASH_TRIPLE) {
		/* #UD finds no gate, nor do the #GP and #DF that follow: shutdown
		   (QEMU -no-reboot exits). Not int3: PVM's ring-0 emulator cannot
		   do a software interrupt in long mode and stops the VM with an
		   emulation failure instead of a triple fault. */
		serial_puts("tern-guest: crash=triple: ud2 with an empty IDT\n");
		struct __attribute__((packed)) {
			u16 limit;
			u64 base;
		} none = {0, 0};
		__asm__ volatile("lidt %0; ud2" : : "m"(none));
	}
	if (cfg.crash == CRASH_UD) {
		serial_puts("tern-guest: crash=ud: ud2 in ring 0\n");
		__asm__ volatile("ud2");
	}

	/* the ABI wants RSP+8 16-byte aligned at a function's first instruction */
	enter_user((u64)user_main, (u64)(user_stack + sizeof user_stack - 8));
}
