/*
 * config.c - the guest's command line: space-separated key=value words.
 * Runs once in ring 0 (a few thousand instructions, fine even emulated).
 */
#include "tern.h"

static const char *const pattern_names[] = {"seq", "random", "hotspot"};
static const char *const crash_names[] = {"none", "triple", "ud", "pf"};
static const char *const disk_names[] = {"off", "write", "read"};
static const char *const disk_pattern_names[] = {"seq", "rand"};

static int word_eq(const char *s, u32 n, const char *lit)
{
	u32 i = 0;
	for (; i < n; i++)
		if (lit[i] != s[i])
			return 0;
	return lit[i] == 0;
}

/* Decimal only; refuses empty strings, other characters and overflow. */
static int parse_u64(const char *s, u32 n, u64 *out)
{
	u64 v = 0;
	if (n == 0)
		return -1;
	for (u32 i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		u64 d = (u64)(s[i] - '0');
		if (v > (~0ULL - d) / 10)
			return -1;
		v = v * 10 + d;
	}
	*out = v;
	return 0;
}

/* A.B.C.D/PREFIX, PREFIX 1..32 */
static int parse_ip(const char *s, u32 n, u32 *ip, u32 *prefix)
{
	u32 i = 0, v = 0;
	for (int part = 0; part < 5; part++) {
		u32 start = i;
		u64 x = 0;
		while (i < n && s[i] >= '0' && s[i] <= '9' && i - start < 3)
			x = x * 10 + (u64)(s[i++] - '0');
		if (i == start || x > (part < 4 ? 255u : 32u))
			return -1;
		if (part < 4) {
			v = v << 8 | (u32)x;
			if (i == n || s[i++] != (part < 3 ? '.' : '/'))
				return -1;
		} else {
			if (i != n || x == 0)
				return -1;
			*prefix = (u32)x;
		}
	}
	*ip = v;
	return v ? 0 : -1;
}

static int pick(const char *v, u32 vn, const char *const *names, u32 count, u32 *out)
{
	for (u32 i = 0; i < count; i++)
		if (word_eq(v, vn, names[i])) {
			*out = i;
			return 0;
		}
	return -1;
}

static int fail(char *err, u32 cap, const char *what, const char *w, u32 wn)
{
	struct line l;
	line_init(&l, err, cap);
	line_str(&l, what);
	line_str(&l, " '");
	line_strn(&l, w, wn);
	line_str(&l, "'");
	return -1;
}

int config_parse(const char *s, struct config *c, char *err, u32 errcap)
{
	*c = (struct config){.verify = 1, .progress_s = 1, .bytes = 4096, .disk_block = 4096, .disk_verify = 8};
	/* Limits keep later arithmetic (MiB to bytes, rate to ticks) in range;
	   whether fill/dirty fit in RAM is checked by the caller. */
	const u64 max_mib = 1ULL << 24, max_rate = 1ULL << 20, max_secs = 1ULL << 20;

	for (int first = 1;; first = 0) {
		while (*s == ' ' || *s == '\t')
			s++;
		if (!*s)
			return 0;
		const char *w = s;
		while (*s && *s != ' ' && *s != '\t')
			s++;
		u32 wn = (u32)(s - w), kn = 0;
		while (kn < wn && w[kn] != '=')
			kn++;
		if (kn == wn) {
			/* GRUB and QEMU put the kernel's path first: skip it */
			if (first)
				continue;
			return fail(err, errcap, "expected key=value, got", w, wn);
		}
		const char *v = w + kn + 1;
		u32 vn = wn - kn - 1;
		u64 n;
		u32 e;

		if (word_eq(w, kn, "fill") || word_eq(w, kn, "dirty")) {
			if (parse_u64(v, vn, &n) || n > max_mib)
				return fail(err, errcap, "bad size in MiB:", w, wn);
			*(w[0] == 'f' ? &c->fill_mib : &c->dirty_mib) = n;
		} else if (word_eq(w, kn, "pattern")) {
			if (pick(v, vn, pattern_names, 3, &e))
				return fail(err, errcap, "pattern must be seq, random or hotspot:", w, wn);
			c->pattern = e;
		} else if (word_eq(w, kn, "rate")) {
			if (parse_u64(v, vn, &n) || n > max_rate)
				return fail(err, errcap, "bad rate in MB/s:", w, wn);
			c->rate_mbps = n;
		} else if (word_eq(w, kn, "bytes")) {
			if (parse_u64(v, vn, &n) || n < 8 || n > 4096 || n % 8)
				return fail(err, errcap, "bytes must be 8..4096, a multiple of 8:", w, wn);
			c->bytes = (u32)n;
		} else if (word_eq(w, kn, "verify")) {
			if (parse_u64(v, vn, &n))
				return fail(err, errcap, "bad pass count:", w, wn);
			c->verify = n;
		} else if (word_eq(w, kn, "progress")) {
			if (parse_u64(v, vn, &n) || n > max_secs)
				return fail(err, errcap, "bad seconds:", w, wn);
			c->progress_s = n;
		} else if (word_eq(w, kn, "crash")) {
			if (pick(v, vn, crash_names + 1, 3, &e))
				return fail(err, errcap, "crash must be triple, ud or pf:", w, wn);
			c->crash = e + 1;
		} else if (word_eq(w, kn, "disk")) {
			if (pick(v, vn, disk_names, 3, &e))
				return fail(err, errcap, "disk must be write, read or off:", w, wn);
			c->disk = e;
		} else if (word_eq(w, kn, "disk_pattern")) {
			if (word_eq(v, vn, "random")) /* the memory workload's spelling */
				e = DISK_RAND;
			else if (pick(v, vn, disk_pattern_names, 2, &e))
				return fail(err, errcap, "disk_pattern must be seq or rand:", w, wn);
			c->disk_pattern = e;
		} else if (word_eq(w, kn, "disk_rate")) {
			if (parse_u64(v, vn, &n) || n > max_rate)
				return fail(err, errcap, "bad disk_rate in MB/s:", w, wn);
			c->disk_rate = n;
		} else if (word_eq(w, kn, "disk_block")) {
			if (parse_u64(v, vn, &n) || n == 0 || n % 512 || n > MiB)
				return fail(err, errcap, "disk_block must be a multiple of 512, at most 1048576:", w, wn);
			c->disk_block = n;
		} else if (word_eq(w, kn, "disk_flush") || word_eq(w, kn, "disk_verify")) {
			if (parse_u64(v, vn, &n) || n > 0xFFFFFFFFULL)
				return fail(err, errcap, "bad request count:", w, wn);
			*(w[5] == 'f' ? &c->disk_flush : &c->disk_verify) = n;
		} else if (word_eq(w, kn, "disk_blocks")) {
			if (parse_u64(v, vn, &n) || n > 0x7FFFFFFFULL)
				return fail(err, errcap, "bad block count:", w, wn);
			c->disk_blocks = n;
		} else if (word_eq(w, kn, "ip")) {
			if (parse_ip(v, vn, &c->ip, &c->ip_prefix))
				return fail(err, errcap, "ip must be A.B.C.D/PREFIX:", w, wn);
		} else {
			return fail(err, errcap, "unknown key in", w, wn);
		}
	}
}

void config_describe(const struct config *c, char *out, u32 cap)
{
	struct line l;
	line_init(&l, out, cap);
	line_str(&l, "tern-guest: workload: fill=");
	line_dec(&l, c->fill_mib);
	line_str(&l, "MiB dirty=");
	line_dec(&l, c->dirty_mib);
	line_str(&l, "MiB");
	if (c->dirty_mib == 0) {
		line_str(&l, " (idle)");
	} else {
		line_str(&l, " pattern=");
		line_str(&l, pattern_names[c->pattern]);
		line_str(&l, " rate=");
		if (c->rate_mbps) {
			line_dec(&l, c->rate_mbps);
			line_str(&l, "MB/s");
		} else {
			line_str(&l, "max");
		}
		line_str(&l, " bytes=");
		line_dec(&l, c->bytes);
		line_str(&l, " verify=");
		line_dec(&l, c->verify);
	}
	line_str(&l, " progress=");
	line_dec(&l, c->progress_s);
	line_str(&l, "s");
	if (c->crash) {
		line_str(&l, " crash=");
		line_str(&l, crash_names[c->crash]);
	}
	if (c->disk) {
		line_str(&l, " disk=");
		line_str(&l, disk_names[c->disk]);
		line_str(&l, " disk_pattern=");
		line_str(&l, disk_pattern_names[c->disk_pattern]);
		line_str(&l, " disk_block=");
		line_dec(&l, c->disk_block);
		line_str(&l, " disk_rate=");
		if (c->disk_rate) {
			line_dec(&l, c->disk_rate);
			line_str(&l, "MB/s");
		} else {
			line_str(&l, "max");
		}
		if (c->disk == DISK_WRITE) {
			line_str(&l, " disk_flush=");
			line_dec(&l, c->disk_flush);
			line_str(&l, " disk_verify=");
			line_dec(&l, c->disk_verify);
		}
		if (c->disk_blocks) {
			line_str(&l, " disk_blocks=");
			line_dec(&l, c->disk_blocks);
		}
	}
	if (c->ip) {
		line_str(&l, " ip=");
		for (int i = 3; i >= 0; i--) {
			line_dec(&l, c->ip >> (8 * i) & 0xFF);
			line_str(&l, i ? "." : "/");
		}
		line_dec(&l, c->ip_prefix);
	}
	line_str(&l, "\n");
}
