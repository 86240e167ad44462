/*
 * lib.c - the little of a C library the guest needs, usable in both rings.
 * memset/memcpy exist because gcc may emit calls to them even when
 * freestanding; this file is built with -fno-tree-loop-distribute-patterns
 * (as is everything) so these loops do not turn into calls to themselves.
 */
#include "tern.h"

void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

/* Lines are always NUL-terminated and silently truncated at cap - 1. */
void line_init(struct line *l, char *buf, u32 cap)
{
	l->s = buf;
	l->n = 0;
	l->cap = cap;
	buf[0] = 0;
}

void line_strn(struct line *l, const char *s, u32 n)
{
	for (u32 i = 0; i < n && s[i] && l->n + 1 < l->cap; i++)
		l->s[l->n++] = s[i];
	l->s[l->n] = 0;
}

void line_str(struct line *l, const char *s) { line_strn(l, s, ~0u); }

void line_dec(struct line *l, u64 v)
{
	char t[24];
	int i = sizeof t - 1;
	t[i] = 0;
	do {
		t[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	line_str(l, t + i);
}

void line_hex(struct line *l, u64 v)
{
	char t[24];
	int i = sizeof t - 1;
	t[i] = 0;
	do {
		t[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	t[--i] = 'x';
	t[--i] = '0';
	line_str(l, t + i);
}
