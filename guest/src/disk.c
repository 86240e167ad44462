/*
 * disk.c - ring-3 polled virtio-blk driver and the self-checking disk
 * workload (disk=write|read).
 *
 * One request in flight. The main loop calls disk_service() between batches
 * of page touches (or continuously when the memory workload idles); it looks
 * at the used ring in memory, handles a completion, and issues the next
 * request when the pace allows. The only MMIO in steady state is the
 * QueueNotify write after each request.
 *
 * Content: every 512-byte sector s written in generation g holds 64 words
 *   word 0 = "TERNBLK1", word 1 = s, word 2 = g,
 *   word j >= 3 = mix64(s * C1 + g * C2 + j) | 1,
 * so it is a deterministic function of (sector, generation) and describes
 * itself. Each write uses a new generation; once it completed with status
 * OK the block's tag (its generation) is stored in a tag table in guest RAM,
 * which travels with the VM through snapshots and migrations. A block read
 * back must match its tag exactly (catches lost, stale, misdirected and
 * corrupted writes). A block without a tag (disk=read: nothing written in
 * this boot) is checked against its own headers: sectors that are not in
 * this format (never written, foreign data) are skipped.
 */
#include "virtio.h"

#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1ULL << 6)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2

#define SECTOR 512ULL
#define SECTOR_WORDS 64
#define BLK_MAGIC 0x314B4C424E524554ULL /* "TERNBLK1" */
#define C1 0x9E3779B97F4A7C15ULL
#define C2 0xD1B54A32D192ED03ULL
#define TAG_NONE 0u		 /* never written in this boot */
#define TAG_UNKNOWN 0xFFFFFFFFu	 /* a write failed: content unknown */
#define MAX_LINES 16		 /* mismatch / error lines printed, each */

struct blk_req {
	u32 type;
	u32 reserved;
	u64 sector;
};

enum kind { K_NONE, K_WRITE, K_READ, K_VERIFY, K_FLUSH, K_GET_ID };
static const char *const kind_names[] = {"none", "write", "read", "verify read", "flush", "get-id"};

static struct {
	struct vq q;
	u64 base;
	int running, can_flush;
	u64 nblocks, block_bytes, spb; /* spb: sectors per block */
	u32 *tags;		       /* per block; NULL for disk=read */
	u32 *list;		       /* blocks ever tagged, in first-write order */
	u64 nlisted;
	u32 gen; /* last generation used */
	/* the request in flight */
	u32 kind, req_gen;
	u64 block, submitted;
	int warned_stuck;
	/* what comes next */
	u64 writes_since_flush, since_verify, seq, rng;
	int want_flush, want_verify;
	u64 tpr, pace_next, pace_frac; /* ticks per request, 48.16 fixed point */
	u64 ticks_per_s;
	u32 mismatch_lines, error_lines;
} d;

static void put(const char *s) { sys_print(s); }

static int fail(const char *why, u64 a, u64 b)
{
	char buf[300];
	struct line l;
	line_init(&l, buf, sizeof buf);
	line_str(&l, "tern-guest: disk: error: ");
	line_str(&l, why);
	if (a) {
		line_str(&l, " ");
		line_hex(&l, a);
	}
	if (b) {
		line_str(&l, " / ");
		line_hex(&l, b);
	}
	line_str(&l, "\n");
	put(buf);
	STATUS->disk_state = DEV_FAILED;
	return -1;
}

/* ---- content ---- */
static void fill_block(u64 block, u32 g)
{
	u64 *p = (u64 *)BLK_DATA;
	for (u64 k = 0; k < d.spb; k++, p += SECTOR_WORDS) {
		u64 s = block * d.spb + k, base = s * C1 + (u64)g * C2;
		p[0] = BLK_MAGIC;
		p[1] = s;
		p[2] = g;
		for (u64 j = 3; j < SECTOR_WORDS; j++)
			p[j] = mix64(base + j) | 1;
	}
}

static void report_mismatch(u64 block, u64 s, u64 j, u64 want, u64 got, u32 g, int tagged)
{
	if (d.mismatch_lines > MAX_LINES)
		return;
	char buf[300];
	struct line l;
	line_init(&l, buf, sizeof buf);
	if (d.mismatch_lines++ == MAX_LINES) {
		line_str(&l, "tern-guest: further DISK MISMATCHes are counted, not printed\n");
	} else {
		line_str(&l, "tern-guest: DISK MISMATCH block ");
		line_dec(&l, block);
		line_str(&l, " sector ");
		line_dec(&l, s);
		line_str(&l, " word ");
		line_dec(&l, j);
		line_str(&l, ": expected ");
		line_hex(&l, want);
		line_str(&l, " found ");
		line_hex(&l, got);
		line_str(&l, tagged ? " (tag: generation " : " (self-described: generation ");
		line_dec(&l, g);
		line_str(&l, ")\n");
	}
	put(buf);
}

/* The block just read into BLK_DATA against its tag, or, untagged, against
   its sectors' own headers. 1 matched, 0 nothing to check, -1 mismatch. */
static int check_block(u64 block, u32 tag)
{
	const u64 *p = (const u64 *)BLK_DATA;
	int checked = 0;
	if (tag == TAG_UNKNOWN)
		return 0;
	for (u64 k = 0; k < d.spb; k++, p += SECTOR_WORDS) {
		u64 s = block * d.spb + k;
		u32 g = tag;
		if (tag == TAG_NONE) {
			if (p[0] != BLK_MAGIC)
				continue; /* not written by this guest: nothing to expect */
			g = (u32)p[2];
		}
		u64 base = s * C1 + (u64)g * C2;
		for (u64 j = 0; j < SECTOR_WORDS; j++) {
			u64 want = j == 0 ? BLK_MAGIC : j == 1 ? s : j == 2 ? g : mix64(base + j) | 1;
			if (p[j] != want) {
				report_mismatch(block, s, j, want, p[j], g, tag != TAG_NONE);
				return -1;
			}
		}
		checked = 1;
	}
	return checked;
}

/* ---- requests ---- */
static void submit(u32 kind, u64 block, u64 now)
{
	volatile struct blk_req *r = (volatile struct blk_req *)BLK_REQ;
	volatile struct vdesc *desc = d.q.desc;
	r->type = kind == K_WRITE ? BLK_T_OUT : kind == K_FLUSH ? BLK_T_FLUSH : kind == K_GET_ID ? BLK_T_GET_ID : BLK_T_IN;
	r->reserved = 0;
	r->sector = kind == K_FLUSH || kind == K_GET_ID ? 0 : block * d.spb;
	*(volatile u8 *)BLK_STATUS = 0xFF;

	desc[0].addr = BLK_REQ;
	desc[0].len = sizeof(struct blk_req);
	desc[0].flags = VRING_DESC_F_NEXT;
	desc[0].next = 1;
	if (kind == K_FLUSH) {
		desc[0].next = 2;
	} else if (kind == K_GET_ID) {
		desc[1].addr = BLK_ID;
		desc[1].len = 20;
		desc[1].flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
	} else {
		desc[1].addr = BLK_DATA;
		desc[1].len = (u32)d.block_bytes;
		desc[1].flags = VRING_DESC_F_NEXT | (kind == K_WRITE ? 0 : VRING_DESC_F_WRITE);
	}
	desc[1].next = 2;
	desc[2].addr = BLK_STATUS;
	desc[2].len = 1;
	desc[2].flags = VRING_DESC_F_WRITE;
	desc[2].next = 0;

	d.kind = kind;
	d.block = block;
	d.submitted = now;
	d.warned_stuck = 0;
	vq_publish(&d.q, 0);
}

static void report_status(u8 status)
{
	if (d.error_lines > MAX_LINES)
		return;
	char buf[200];
	struct line l;
	line_init(&l, buf, sizeof buf);
	if (d.error_lines++ == MAX_LINES) {
		line_str(&l, "tern-guest: further DISK ERRORs are counted, not printed\n");
	} else {
		line_str(&l, "tern-guest: DISK ERROR ");
		line_str(&l, kind_names[d.kind]);
		if (d.kind != K_FLUSH) {
			line_str(&l, " block ");
			line_dec(&l, d.block);
		}
		line_str(&l, ": status ");
		line_dec(&l, status);
		line_str(&l, status == BLK_S_IOERR ? " (IOERR)\n" : status == BLK_S_UNSUPP ? " (UNSUPP)\n" : "\n");
	}
	put(buf);
}

static void complete(void)
{
	volatile struct status *st = STATUS;
	u8 status = *(volatile u8 *)BLK_STATUS;
	u32 kind = d.kind;
	d.kind = K_NONE;
	st->disk_ops++;
	if (status != BLK_S_OK) {
		st->disk_errors++;
		report_status(status);
	}
	switch (kind) {
	case K_WRITE:
		st->disk_writes++;
		if (status == BLK_S_OK) {
			st->disk_bytes += d.block_bytes;
			if (d.tags[d.block] == TAG_NONE)
				d.list[d.nlisted++] = (u32)d.block;
			d.tags[d.block] = d.req_gen; /* only now: the write is done */
		} else if (d.tags[d.block] != TAG_NONE) {
			d.tags[d.block] = TAG_UNKNOWN;
		}
		if (cfg.disk_flush && d.can_flush && ++d.writes_since_flush >= cfg.disk_flush) {
			d.writes_since_flush = 0;
			d.want_flush = 1;
		}
		if (cfg.disk_verify && ++d.since_verify >= cfg.disk_verify) {
			d.since_verify = 0;
			d.want_verify = 1;
		}
		break;
	case K_READ:
	case K_VERIFY:
		st->disk_reads++;
		if (status == BLK_S_OK) {
			st->disk_bytes += d.block_bytes;
			int r = check_block(d.block, d.tags ? d.tags[d.block] : TAG_NONE);
			if (r > 0) {
				st->disk_verified++;
			} else if (r < 0) {
				st->disk_errors++;
				/* like the memory check's re-base: one corruption is
				   counted once, not at every read-back until rewritten */
				if (d.tags && d.tags[d.block] != TAG_NONE)
					d.tags[d.block] = TAG_UNKNOWN;
			}
		}
		break;
	case K_FLUSH:
		st->disk_flushes++;
		break;
	}
}

/* The workload's own next block (not a read-back). */
static u64 next_block(void)
{
	if (cfg.disk_pattern == DISK_RAND)
		return scale(xorshift64(&d.rng), d.nblocks);
	u64 b = d.seq;
	if (++d.seq == d.nblocks)
		d.seq = 0;
	return b;
}

static void next_request(u64 now)
{
	if (d.want_flush) {
		d.want_flush = 0;
		submit(K_FLUSH, 0, now);
		return;
	}
	if (d.want_verify) {
		d.want_verify = 0;
		if (d.nlisted) {
			u64 b = d.list[scale(xorshift64(&d.rng), d.nlisted)];
			if (d.tags[b] != TAG_UNKNOWN) {
				submit(K_VERIFY, b, now);
				return;
			}
		}
	}
	if (d.tpr) {
		if ((i64)(now - d.pace_next) < 0)
			return;
		u64 inc = d.tpr + d.pace_frac;
		d.pace_next += inc >> 16;
		d.pace_frac = inc & 0xFFFF;
		/* more than 100 ms behind (too slow, or the VM was paused):
		   start afresh instead of bursting to catch up */
		if ((i64)(now - d.pace_next) > (i64)(d.ticks_per_s / 10)) {
			d.pace_next = now;
			d.pace_frac = 0;
		}
	}
	u64 b = next_block();
	if (cfg.disk == DISK_WRITE) {
		if (++d.gen == TAG_UNKNOWN)
			d.gen = 1;
		d.req_gen = d.gen;
		fill_block(b, d.gen);
		submit(K_WRITE, b, now);
	} else {
		submit(K_READ, b, now);
	}
}

void disk_service(u64 now)
{
	if (!d.running)
		return;
	if (d.kind != K_NONE) {
		u32 id, len;
		if (!vq_poll(&d.q, &id, &len)) {
			if (!d.warned_stuck && (i64)(now - d.submitted) > (i64)(10 * d.ticks_per_s)) {
				d.warned_stuck = 1;
				char buf[120];
				struct line l;
				line_init(&l, buf, sizeof buf);
				line_str(&l, "tern-guest: disk: warning: a ");
				line_str(&l, kind_names[d.kind]);
				line_str(&l, " request is not done after 10 s, still polling\n");
				put(buf);
			}
			return;
		}
		complete();
	}
	next_request(now);
}

void disk_progress(struct line *l)
{
	volatile struct status *st = STATUS;
	line_str(l, " disk_ops=");
	line_dec(l, st->disk_ops);
	line_str(l, " disk_errors=");
	line_dec(l, st->disk_errors);
	line_str(l, " disk_verified=");
	line_dec(l, st->disk_verified);
}

/* ---- set-up ---- */
static u64 config_u64(u64 base, u64 off)
{
	u32 g, lo, hi;
	do { /* a consistent pair: the config generation did not move */
		g = mmio_r32(base + VM_CONFIG_GENERATION);
		lo = mmio_r32(base + VM_CONFIG + off);
		hi = mmio_r32(base + VM_CONFIG + off + 4);
	} while (g != mmio_r32(base + VM_CONFIG_GENERATION));
	return (u64)hi << 32 | lo;
}

int disk_init(void)
{
	volatile struct status *st = STATUS;
	char buf[400];
	struct line l;
	memset(&d, 0, sizeof d); /* .bss may not be zeroed by the loader */
	d.ticks_per_s = st->tsc_khz * 1000;
	d.rng = 0x4449534B2D524E47ULL; /* "DISK-RNG": fixed, for repeatability */

	if (!vfound.blk)
		return fail("no virtio-blk device in the 24 virtio-mmio slots at 0xfeb00000", 0, 0);
	u64 base = d.base = vfound.blk;
	if (vfound.blk_version != 2) {
		line_init(&l, buf, sizeof buf);
		line_str(&l, "virtio-blk at ");
		line_hex(&l, base);
		line_str(&l, " is virtio-mmio version ");
		line_dec(&l, vfound.blk_version);
		line_str(&l, " (legacy); only version 2 (virtio 1.x) is supported: under QEMU add "
			     "-global virtio-mmio.force-legacy=false");
		return fail(buf, 0, 0);
	}

	u64 offered = virtio_begin(base);
	if (!(offered & VIRTIO_F_VERSION_1)) {
		virtio_fail(base);
		return fail("virtio-blk does not offer VIRTIO_F_VERSION_1; features", offered, 0);
	}
	u64 want = VIRTIO_F_VERSION_1 | (offered & VIRTIO_BLK_F_FLUSH);
	if (virtio_set_features(base, want)) {
		virtio_fail(base);
		return fail("virtio-blk refused FEATURES_OK for features", want, 0);
	}
	d.can_flush = (want & VIRTIO_BLK_F_FLUSH) != 0;
	u64 sectors = config_u64(base, 0);
	u32 blk_size = offered & VIRTIO_BLK_F_BLK_SIZE ? mmio_r32(base + VM_CONFIG + 0x14) : 512;
	st->disk_capacity = sectors * SECTOR;
	if (cfg.disk == DISK_WRITE && (offered & VIRTIO_BLK_F_RO)) {
		virtio_fail(base);
		return fail("the disk is read-only (VIRTIO_BLK_F_RO) but disk=write was asked", 0, 0);
	}
	if (vq_setup(&d.q, base, 0, BLK_QUEUE, 16)) {
		virtio_fail(base);
		return fail("virtio-blk has no usable queue 0", 0, 0);
	}
	virtio_driver_ok(base);

	/* GET_ID, synchronously: the device works before the workload starts */
	d.block_bytes = cfg.disk_block;
	d.spb = cfg.disk_block / SECTOR;
	for (int i = 0; i < 20; i++)
		((volatile u8 *)BLK_ID)[i] = 0;
	u64 t0 = rdtsc();
	submit(K_GET_ID, 0, t0);
	u32 id, len;
	while (!vq_poll(&d.q, &id, &len)) {
		if (rdtsc() - t0 > 5 * d.ticks_per_s) {
			virtio_fail(base);
			return fail("virtio-blk did not answer a GET_ID request in 5 s", 0, 0);
		}
		cpu_relax();
	}
	u8 id_status = *(volatile u8 *)BLK_STATUS;
	d.kind = K_NONE;
	st->disk_ops++;
	if (id_status != BLK_S_OK && id_status != BLK_S_UNSUPP) { /* GET_ID is optional */
		st->disk_errors++;
		d.kind = K_GET_ID;
		report_status(id_status);
		d.kind = K_NONE;
	}

	d.nblocks = st->disk_capacity / d.block_bytes;
	if (cfg.disk_blocks && cfg.disk_blocks < d.nblocks)
		d.nblocks = cfg.disk_blocks;
	if (d.nblocks > 0x7FFFFFFFULL)
		d.nblocks = 0x7FFFFFFFULL;
	if (d.nblocks == 0)
		return fail("the disk is smaller than one block: capacity, disk_block", st->disk_capacity, d.block_bytes);

	u64 tag_base = 0, tag_end = 0;
	if (cfg.disk == DISK_WRITE) {
		/* above the memory workload's area, in RAM that travels with the VM */
		u64 mib = cfg.fill_mib > cfg.dirty_mib ? cfg.fill_mib : cfg.dirty_mib;
		tag_base = (WORK_BASE + mib * MiB + 2 * MiB - 1) & ~(2 * MiB - 1);
		tag_end = tag_base + d.nblocks * 8;
		if (tag_end > work_limit) {
			line_init(&l, buf, sizeof buf);
			line_str(&l, "the tag table for ");
			line_dec(&l, d.nblocks);
			line_str(&l, " blocks needs RAM ");
			line_hex(&l, tag_base);
			line_str(&l, "..");
			line_hex(&l, tag_end);
			line_str(&l, " but usable RAM ends at ");
			line_hex(&l, work_limit);
			line_str(&l, ": give the VM more memory, or use disk_blocks= or a larger disk_block");
			return fail(buf, 0, 0);
		}
		d.tags = (u32 *)tag_base;
		d.list = (u32 *)(tag_base + d.nblocks * 4);
		u64 *z = (u64 *)tag_base;
		for (u64 i = 0; i < d.nblocks / 2 + 1; i++) /* the tags; the list needs no zeros */
			z[i] = 0;
	}
	if (cfg.disk_rate)
		d.tpr = (d.block_bytes * st->tsc_khz << 16) / (cfg.disk_rate * 1000);
	d.pace_next = rdtsc();

	line_init(&l, buf, sizeof buf);
	line_str(&l, "tern-guest: disk: virtio-blk at ");
	line_hex(&l, base);
	line_str(&l, ": ");
	line_dec(&l, sectors);
	line_str(&l, " sectors (");
	line_dec(&l, st->disk_capacity / MiB);
	line_str(&l, " MiB) blk_size=");
	line_dec(&l, blk_size);
	line_str(&l, d.can_flush ? " flush" : " no-flush");
	if (offered & VIRTIO_BLK_F_RO)
		line_str(&l, " read-only");
	line_str(&l, " queue=");
	line_dec(&l, d.q.size);
	line_str(&l, " id='");
	for (int i = 0; i < 20; i++) {
		char c = ((volatile char *)BLK_ID)[i];
		if (!c)
			break;
		char t[2] = {c >= 0x20 && c < 0x7f ? c : '?', 0};
		line_str(&l, t);
	}
	line_str(&l, "'; using ");
	line_dec(&l, d.nblocks);
	line_str(&l, " blocks of ");
	line_dec(&l, d.block_bytes);
	line_str(&l, " bytes");
	if (d.tags) {
		line_str(&l, ", tags at ");
		line_hex(&l, tag_base);
		line_str(&l, "..");
		line_hex(&l, tag_end);
	}
	line_str(&l, "\n");
	put(buf);
	if (cfg.disk_flush && !d.can_flush)
		put("tern-guest: disk: note: the device offers no VIRTIO_BLK_F_FLUSH: disk_flush is ignored\n");

	d.running = 1;
	st->disk_state = DEV_RUNNING;
	return 0;
}
