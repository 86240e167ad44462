/*
 * workload.c - ring-3 part of the Tern test guest: fill, then dirty the
 * working set (or idle), publishing progress in the status block.
 *
 * Ring 3 runs natively under PVM, so all loops over memory live here. Output
 * goes through the ud2 system call (tern.h); the hot loop never prints.
 */
#include "virtio.h"

static u64 ticks_per_s;
/* a device workload runs: poll it from every loop (set in user_main: .bss
   may not be zeroed by the loader) */
static int io_active, disk_on, net_on;

/* One look at each running device: completions, the next request, packets. */
static void io_service(u64 now)
{
	if (disk_on)
		disk_service(now);
	if (net_on)
		net_service(now);
}

/* The guest's own stall measure: every loop calls turn() at least every few
   microseconds (wherever it polls the devices), so the largest gap between
   two calls is the longest time the guest did not run, or ran elsewhere
   (a progress line, the VMM handling an exit), on its own TSC. */
static u64 last_turn, max_stall;
static inline void turn(u64 now)
{
	/* A caller's time read before the last turn's (a loop that reads the TSC once and polls twice):
	   no gap, and no wrap-around to a huge one. */
	if (now <= last_turn)
		return;
	u64 gap = now - last_turn;
	last_turn = now;
	if (gap > max_stall) {
		max_stall = gap;
		STATUS->max_stall_end_tsc = now;
		STATUS->max_stall_ticks = gap;
	}
}

/* a turn, and a look at the devices if any run */
static inline void poll_turn(u64 now)
{
	turn(now);
	if (io_active)
		io_service(now);
}
static u64 next_progress; /* TSC deadline of the next progress line, 0 = never */

static const char *phase_name(u32 p)
{
	switch (p) {
	case PHASE_FILL: return "fill";
	case PHASE_DIRTY: return "dirty";
	case PHASE_IDLE: return "idle";
	default: return "?";
	}
}

static void print_progress(void)
{
	volatile struct status *st = STATUS;
	char buf[300];
	struct line l;
	line_init(&l, buf, sizeof buf);
	line_str(&l, "tern-guest: phase=");
	line_str(&l, phase_name(st->phase));
	line_str(&l, " iter=");
	line_dec(&l, st->iterations);
	line_str(&l, " passes=");
	line_dec(&l, st->passes);
	line_str(&l, " verified=");
	line_dec(&l, st->verified);
	line_str(&l, " errors=");
	line_dec(&l, st->errors);
	if (cfg.disk)
		disk_progress(&l);
	if (cfg.ip) {
		line_str(&l, " net_rx=");
		line_dec(&l, st->net_rx);
		line_str(&l, " net_tx=");
		line_dec(&l, st->net_tx);
		line_str(&l, " net_announces=");
		line_dec(&l, st->net_announces);
	}
	if (st->phase == PHASE_FILL) {
		line_str(&l, " filled=");
		line_dec(&l, st->fill_bytes / MiB);
		line_str(&l, "MiB");
	}
	line_str(&l, "\n");
	sys_print(buf);
}

static inline void maybe_progress(u64 now)
{
	if (next_progress && (i64)(now - next_progress) >= 0) {
		print_progress();
		next_progress += cfg.progress_s * ticks_per_s;
		/* after a long stall (VM paused), do not print a burst of lines */
		if ((i64)(now - next_progress) >= 0)
			next_progress = now + cfg.progress_s * ticks_per_s;
	}
}

/* Sum of all u64 words; four accumulators so the adds do not serialise. A
   turn every 64 KiB: a self-check of a large working set takes tens of ms,
   which must neither count as a stall nor leave the network unanswered. */
static u64 sum_words(u64 base, u64 bytes)
{
	const u64 *p = (const u64 *)base, *end = (const u64 *)(base + bytes);
	u64 a = 0, b = 0, c = 0, d = 0;
	for (; p < end; p += 4) {
		a += p[0];
		b += p[1];
		c += p[2];
		d += p[3];
		if (((u64)p & 0xFFE0) == 0)
			poll_turn(rdtsc());
	}
	return a + b + c + d;
}

/* Every word gets mix64(its address) | 1: never zero, no two pages alike,
   and incompressible, so migration cannot take shortcuts on filled memory. */
static void fill(void)
{
	volatile struct status *st = STATUS;
	const u64 bytes = cfg.fill_mib * MiB;
	u64 t0 = rdtsc();
	for (u64 off = 0; off < bytes; off += PAGE_SIZE) {
		u64 *p = (u64 *)(WORK_BASE + off);
		for (u64 j = 0; j < PAGE_SIZE / 8; j++)
			p[j] = mix64((u64)&p[j]) | 1;
		st->fill_bytes = off + PAGE_SIZE;
		if ((off & (8 * PAGE_SIZE - 1)) == 0)
			poll_turn(rdtsc());
		if ((off & (MiB - 1)) == 0) {
			u64 now = rdtsc();
			st->tsc = now;
			maybe_progress(now);
		}
	}
	u64 us = (rdtsc() - t0) * 1000 / st->tsc_khz;
	if (bytes) {
		char buf[160];
		struct line l;
		line_init(&l, buf, sizeof buf);
		line_str(&l, "tern-guest: fill done: ");
		line_dec(&l, cfg.fill_mib);
		line_str(&l, " MiB in ");
		line_dec(&l, us / 1000);
		line_str(&l, " ms (");
		line_dec(&l, us ? bytes * 1000000 / MiB / us : 0);
		line_str(&l, " MiB/s)\n");
		sys_print(buf);
	}
}

static void __attribute__((noreturn)) idle(void)
{
	volatile struct status *st = STATUS;
	const u64 ms = st->tsc_khz;
	u64 beats = 0, next = rdtsc() + ms;
	st->phase = PHASE_IDLE;
	for (;;) {
		u64 now = rdtsc();
		poll_turn(now);
		if ((i64)(now - next) < 0) {
			cpu_relax();
			continue;
		}
		st->iterations = ++beats;
		st->tsc = now;
		next += ms;
		if ((i64)(now - next) >= 0) /* fell behind (paused): no catch-up burst */
			next = now + ms;
		maybe_progress(now);
	}
}

static void self_check(u64 *sum)
{
	volatile struct status *st = STATUS;
	u64 actual = sum_words(WORK_BASE, st->work_bytes);
	if (actual == *sum) {
		st->verified++;
		return;
	}
	st->errors++;
	char buf[200];
	struct line l;
	line_init(&l, buf, sizeof buf);
	line_str(&l, "tern-guest: CHECKSUM MISMATCH after pass ");
	line_dec(&l, st->passes);
	line_str(&l, ": expected ");
	line_hex(&l, *sum);
	line_str(&l, " found ");
	line_hex(&l, actual);
	line_str(&l, "\n");
	sys_print(buf);
	/* re-base on what memory holds, so one corruption is reported once */
	*sum = actual;
	st->checksum = actual;
}

#define PACE_BATCH 8 /* pages between pacing checks */

static void __attribute__((noreturn)) dirty(u64 sum)
{
	volatile struct status *st = STATUS;
	const u64 npages = st->work_bytes / PAGE_SIZE;
	const u64 words = cfg.bytes / 8;
	const u64 hot = npages / 10 ? npages / 10 : 1;
	const u32 pattern = cfg.pattern;
	const u64 verify = cfg.verify;
	u64 rng = 0x5445524E2D524E47ULL; /* any non-zero seed; fixed for repeatability */
	u64 touches = 0, seq = 0, pass_left = npages, passes = 0;

	/* Pacing: TSC ticks per 4096-byte page in 48.16 fixed point; the next
	   batch may start at pace_next. */
	const u64 tpp = cfg.rate_mbps ? (PAGE_SIZE * st->tsc_khz << 16) / (cfg.rate_mbps * 1000) : 0;
	u64 pace_next = rdtsc(), pace_frac = 0;

	st->phase = PHASE_DIRTY;
	for (;;) {
		u64 page;
		if (pattern == PATTERN_SEQ) {
			page = seq;
			if (++seq == npages)
				seq = 0;
		} else {
			u64 r = xorshift64(&rng);
			/* hotspot: the low 32 bits decide hot (90%) or anywhere */
			u64 span = pattern == PATTERN_HOTSPOT && ((r & 0xFFFFFFFF) * 10 >> 32) < 9 ? hot : npages;
			page = scale(r, span);
		}

		u64 *p = (u64 *)(WORK_BASE + page * PAGE_SIZE);
		u64 v = mix64(touches);
		for (u64 j = 0; j < words; j++) {
			u64 nv = (v + j * 0x9E3779B97F4A7C15ULL) | 1;
			sum += nv - p[j];
			p[j] = nv;
		}
		touches++;

		u64 now = rdtsc();
		st->iterations = touches;
		st->checksum = sum;
		st->tsc = now;

		if (--pass_left == 0) {
			pass_left = npages;
			st->passes = ++passes;
			if (verify && passes % verify == 0)
				self_check(&sum);
		}
		turn(now);
		if (io_active && touches % PACE_BATCH == 0)
			io_service(now);
		if (tpp && touches % PACE_BATCH == 0) {
			u64 inc = PACE_BATCH * tpp + pace_frac;
			pace_next += inc >> 16;
			pace_frac = inc & 0xFFFF;
			/* more than 100 ms behind (too slow, or the VM was paused):
			   start afresh instead of bursting to catch up */
			if ((i64)(now - pace_next) > (i64)(ticks_per_s / 10)) {
				pace_next = now;
				pace_frac = 0;
			}
			while ((i64)(now - pace_next) < 0) {
				poll_turn(now);
				cpu_relax();
				now = rdtsc();
			}
		}
		maybe_progress(now);
	}
}

void user_main(void)
{
	volatile struct status *st = STATUS;
	ticks_per_s = st->tsc_khz * 1000;
	if (cfg.progress_s)
		next_progress = rdtsc() + cfg.progress_s * ticks_per_s;

	if (cfg.crash == CRASH_PF) {
		/* a fault raised in ring 3, delivered to ring 0 through TSS.RSP0 */
		sys_print("tern-guest: crash=pf: ring-3 read of unmapped 0x40000000000\n");
		(void)*(volatile u64 *)0x40000000000ULL;
	}
	/* devices first (a few ms of MMIO), so their workloads run from the start */
	disk_on = net_on = 0;
	if (cfg.disk || cfg.ip)
		virtio_scan();
	if (cfg.disk)
		disk_on = disk_init() == 0;
	if (cfg.ip)
		net_on = net_init() == 0;
	io_active = disk_on || net_on;
	max_stall = 0;
	last_turn = rdtsc(); /* the stall measure starts with the workload */
	st->phase = PHASE_FILL;
	fill();
	u64 sum = sum_words(WORK_BASE, st->work_bytes);
	st->checksum = sum;
	if (st->work_bytes == 0)
		idle();
	dirty(sum);
}
