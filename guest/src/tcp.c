/*
 * tcp.c - a minimal TCP echo service on port 7, for TCP_CONNS connections
 * at a time (ring 3, polled from net_service).
 *
 * Passive open only. In-order data is copied into the connection's echo
 * buffer, ACKed at once, and sent back as the peer's window allows. A
 * segment that starts beyond what was received (a hole: frames were lost)
 * is answered at once with an ACK of what we have (a duplicate ACK, so the
 * peer retransmits the hole fast); its bytes are kept in place in the
 * buffer if they start or extend the one out-of-order range held, so that
 * filling the hole delivers them too, and dropped otherwise (the peer sends
 * them again). Without that, a peer in loss recovery that sends new data
 * beside its retransmissions has it dropped and waits for a timeout, with
 * backoff, every time. The window we advertise is the buffer's free space,
 * so the peer never sends more than we can hold, and the right edge never
 * moves left. The buffer keeps every echo
 * byte until the peer ACKs it: after a timeout (RFC 6298 estimate, at least
 * 200 ms, doubling up to 1 s) or three duplicate ACKs the connection goes
 * back to snd_una and sends again, so frames lost while the VM migrates come
 * back. The peer's FIN is ACKed; once everything before it is echoed, our
 * FIN follows, and the connection is freed when that is ACKed (we close
 * second, so there is no TIME-WAIT). Segments for other ports, or for no
 * connection, get an RST. MSS: ours is 1460, the peer's (default 536) is
 * honoured; no other option is sent, so the peer uses no window scaling,
 * timestamps nor SACK.
 *
 * Sequence numbers are compared modulo 2^32 (seq_lt and friends).
 */
#include "net.h"

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_PSH 0x08
#define TH_ACK 0x10

#define OUR_MSS 1460
#define TX_KEEP 16	      /* tx buffers left for ARP, ping and UDP */
#define RTO_MIN_MS 200
#define RTO_MAX_MS 1000
#define RTO_INIT_MS 500	      /* before the first RTT sample */
#define MAX_RETRIES 15	      /* then the connection is given up (RST) */
#define RECYCLE_IDLE_S 10     /* a new SYN may take over a slot silent this long */

enum tcp_state { FREE = 0, SYN_RCVD, ESTABLISHED, CLOSE_WAIT, LAST_ACK };

struct tcb {
	u32 state;
	u8 mac[6]; /* the peer's, from its latest segment */
	u16 rport;
	u32 rip;
	/* send side: [snd_una, snd_end) is in the buffer, [snd_una, snd_max)
	   has been sent, snd_nxt is the next to send (< snd_max after a go-back);
	   snd_end is also the sequence number of our FIN */
	u32 iss, snd_una, snd_nxt, snd_max, snd_end;
	u32 snd_wnd, wl1, wl2, mss, dupacks;
	u32 rcv_nxt;
	u32 ooo_seq, ooo_len; /* one range received beyond a hole, in the buffer */
	int ooo_fin;	      /* and the FIN right after it */
	int ack_now, probe;
	u64 rto, deadline; /* ticks; deadline 0 = no timer */
	u32 retries;
	u64 srtt, rttvar; /* ticks, 0 = no sample yet */
	u32 rtt_seq;	  /* timing the segment that ends here, if rtt_start */
	u64 rtt_start;
	u64 heard;
	u8 *buf;
};

static struct {
	struct tcb c[TCP_CONNS];
	u64 ms; /* ticks per millisecond */
	u64 now;
	u32 open;
	int queued; /* frames given to the device but not notified yet */
	u16 ip_id;
} t;

static inline int seq_lt(u32 a, u32 b) { return (int)(a - b) < 0; }
static inline int seq_le(u32 a, u32 b) { return (int)(a - b) <= 0; }
static inline u32 min32(u32 a, u32 b) { return a < b ? a : b; }

/* bytes in the echo buffer (once the SYN is acked, snd_una is past it) */
static u32 held(const struct tcb *c) { return c->state == SYN_RCVD ? 0 : c->snd_end - c->snd_una; }
static u32 rcv_wnd(const struct tcb *c) { return TCP_BUF - held(c); }
/* the buffer offset of sequence number s (data starts at iss + 1) */
static u32 boff(const struct tcb *c, u32 s) { return (s - c->iss - 1) & (TCP_BUF - 1); }

/* ---- sending ---- */

/* One segment to (mac, dip:dport) from our sport, with len bytes from c's
   buffer starting at sequence number seq (c may be NULL when len is 0), and
   the MSS option when opt. 0 if no tx buffer was free. */
static int emit(const u8 *mac, u32 dip, u16 sport, u16 dport, u32 seq, u32 ack, u32 flags, u32 wnd, int opt,
		const struct tcb *c, u32 len)
{
	u16 id;
	u8 *f = net_tx_buffer(&id, flags & TH_RST ? 0 : TX_KEEP);
	if (!f)
		return 0;
	u32 hl = opt ? 24 : 20, tl = hl + len;
	copy(f, mac, 6);
	copy(f + 6, net_mac(), 6);
	put16(f + 12, ETH_IP);
	u8 *ip = f + 14, *th = ip + 20;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, 20 + tl);
	put16(ip + 4, t.ip_id++);
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = IP_TCP;
	put16(ip + 10, 0);
	put32(ip + 12, net_ip());
	put32(ip + 16, dip);
	put16(ip + 10, csum(ip, 20));
	put16(th, sport);
	put16(th + 2, dport);
	put32(th + 4, seq);
	put32(th + 8, flags & TH_ACK ? ack : 0);
	th[12] = (u8)(hl / 4) << 4;
	th[13] = (u8)flags;
	put16(th + 14, wnd > 0xFFFF ? 0xFFFF : wnd);
	put32(th + 16, 0); /* checksum, urgent pointer */
	if (opt) {
		th[20] = 2; /* MSS */
		th[21] = 4;
		put16(th + 22, OUR_MSS);
	}
	if (len) {
		u32 o = boff(c, seq), first = min32(len, TCP_BUF - o);
		copy(th + hl, c->buf + o, first);
		copy(th + hl + first, c->buf, len - first);
	}
	u8 pseudo[12];
	copy(pseudo, ip + 12, 8);
	pseudo[8] = 0;
	pseudo[9] = IP_TCP;
	put16(pseudo + 10, tl);
	put16(th + 16, csum_fold(csum_add(csum_add(0, pseudo, 12), th, tl)));
	u32 flen = 14 + 20 + tl;
	for (; flen < 60; flen++) /* pad to the Ethernet minimum */
		f[flen] = 0;
	net_tx_queue(id, flen);
	t.queued = 1;
	STATUS->tcp_tx++;
	if (flags & TH_RST)
		STATUS->tcp_resets++;
	return 1;
}

static int send_seg(struct tcb *c, u32 seq, u32 flags, u32 len)
{
	return emit(c->mac, c->rip, ECHO_PORT, c->rport, seq, c->rcv_nxt, flags | TH_ACK, rcv_wnd(c), flags & TH_SYN,
		    c, len);
}

/* The answer to a segment no connection takes (RFC 793, "reset generation"). */
static void reset_for(const u8 *f, const u8 *ip, const u8 *th, u32 dlen)
{
	u32 flags = th[13], seq = get32(th + 4);
	if (flags & TH_RST)
		return;
	if (flags & TH_ACK)
		emit(f + 6, get32(ip + 12), get16(th + 2), get16(th), get32(th + 8), 0, TH_RST, 0, 0, NULL, 0);
	else
		emit(f + 6, get32(ip + 12), get16(th + 2), get16(th), 0,
		     seq + dlen + !!(flags & TH_SYN) + !!(flags & TH_FIN), TH_RST | TH_ACK, 0, 0, NULL, 0);
}

static void release(struct tcb *c)
{
	c->state = FREE;
	t.open--;
}

static void arm(struct tcb *c)
{
	int outstanding = c->snd_una != c->snd_max;
	int stuck = c->state != SYN_RCVD && c->snd_wnd == 0 && c->snd_nxt != c->snd_end; /* persist */
	if (!outstanding && !stuck)
		c->deadline = 0;
	else if (!c->deadline)
		c->deadline = t.now + c->rto;
}

/* Sends what the connection owes: the SYN-ACK, data within the peer's
   window (from snd_nxt), the FIN, or a bare ACK. */
static void output(struct tcb *c)
{
	if (c->state == SYN_RCVD) {
		if (c->snd_nxt == c->iss && send_seg(c, c->iss, TH_SYN, 0)) {
			c->snd_nxt = c->iss + 1;
			c->snd_max = c->iss + 1;
			if (!c->rtt_start && !c->retries) {
				c->rtt_seq = c->iss + 1;
				c->rtt_start = t.now;
			}
			c->ack_now = 0;
		}
		arm(c);
		return;
	}
	int closing = c->state == CLOSE_WAIT || c->state == LAST_ACK;
	for (;;) {
		u32 wnd = c->snd_wnd ? c->snd_wnd : (u32)c->probe;
		u32 limit = c->snd_una + wnd;
		if (seq_lt(c->snd_nxt, c->snd_end)) {
			u32 room = seq_lt(c->snd_nxt, limit) ? limit - c->snd_nxt : 0;
			u32 len = min32(min32(c->snd_end - c->snd_nxt, room), c->mss);
			if (len == 0)
				break;
			int fin = closing && c->snd_nxt + len == c->snd_end;
			if (!send_seg(c, c->snd_nxt, TH_PSH | (fin ? TH_FIN : 0), len))
				break;
			if (seq_lt(c->snd_nxt, c->snd_max))
				STATUS->tcp_retransmits++;
			else if (!c->rtt_start) {
				c->rtt_seq = c->snd_nxt + len;
				c->rtt_start = t.now;
			}
			c->snd_nxt += len + fin;
			c->probe = 0;
		} else if (closing && c->snd_nxt == c->snd_end) {
			if (!send_seg(c, c->snd_end, TH_FIN, 0))
				break;
			if (seq_lt(c->snd_nxt, c->snd_max))
				STATUS->tcp_retransmits++;
			c->snd_nxt = c->snd_end + 1;
		} else {
			break;
		}
		if (c->snd_nxt == c->snd_end + 1)
			c->state = LAST_ACK;
		if (seq_lt(c->snd_max, c->snd_nxt))
			c->snd_max = c->snd_nxt;
		c->ack_now = 0; /* every segment carries the ACK */
	}
	if (c->ack_now && send_seg(c, c->snd_nxt, 0, 0))
		c->ack_now = 0;
	arm(c);
}

/* ---- receiving ---- */

static u32 peer_mss(const u8 *th, u32 hl)
{
	for (u32 i = 20; i < hl;) {
		u8 kind = th[i];
		if (kind == 0)
			break;
		if (kind == 1) {
			i++;
			continue;
		}
		if (i + 1 >= hl || th[i + 1] < 2 || i + th[i + 1] > hl)
			break;
		if (kind == 2 && th[i + 1] == 4) {
			u32 m = get16(th + i + 2);
			return m < 64 ? 64 : m > OUR_MSS ? OUR_MSS : m;
		}
		i += th[i + 1];
	}
	return 536;
}

static void rtt_sample(struct tcb *c, u64 r)
{
	if (!c->srtt) {
		c->srtt = r;
		c->rttvar = r / 2;
	} else {
		u64 d = r > c->srtt ? r - c->srtt : c->srtt - r;
		c->rttvar = (3 * c->rttvar + d) / 4;
		c->srtt = (7 * c->srtt + r) / 8;
	}
	u64 var = 4 * c->rttvar;
	if (var < RTO_MIN_MS * t.ms)
		var = RTO_MIN_MS * t.ms;
	c->rto = c->srtt + var;
	if (c->rto > RTO_MAX_MS * t.ms)
		c->rto = RTO_MAX_MS * t.ms;
}

/* A SYN for port 7 from a peer with no connection. */
static void accept_syn(const u8 *f, const u8 *ip, const u8 *th, u32 hl)
{
	struct tcb *c = NULL, *oldest = NULL;
	for (u32 i = 0; i < TCP_CONNS && !c; i++) {
		struct tcb *x = &t.c[i];
		if (x->state == FREE)
			c = x;
		else if (!oldest || x->heard < oldest->heard)
			oldest = x;
	}
	if (!c && oldest && t.now - oldest->heard > RECYCLE_IDLE_S * 1000 * t.ms) {
		c = oldest;
		release(c);
	}
	if (!c) {
		reset_for(f, ip, th, 0);
		return;
	}
	u8 *buf = c->buf;
	memset(c, 0, sizeof *c);
	c->buf = buf;
	c->state = SYN_RCVD;
	t.open++;
	copy(c->mac, f + 6, 6);
	c->rip = get32(ip + 12);
	c->rport = get16(th);
	c->rcv_nxt = get32(th + 4) + 1;
	c->iss = (u32)mix64(t.now ^ (u64)c->rip << 16 ^ c->rport);
	c->snd_una = c->snd_nxt = c->snd_max = c->iss;
	c->snd_end = c->iss + 1;
	c->snd_wnd = get16(th + 14);
	c->wl1 = get32(th + 4);
	c->mss = peer_mss(th, hl);
	c->rto = RTO_INIT_MS * t.ms;
	c->heard = t.now;
}

/* Copies n received bytes starting at receive sequence number seq to where
   they will be echoed from: each byte received is one byte to send, so
   receive and send positions differ by snd_end - rcv_nxt. */
static void put(struct tcb *c, u32 seq, const u8 *data, u32 n)
{
	u32 o = boff(c, c->snd_end + (seq - c->rcv_nxt)), first = min32(n, TCP_BUF - o);
	copy(c->buf + o, data, first);
	copy(c->buf, data + first, n - first);
}

/* A segment beyond a hole: kept in place, in the window, if it extends the
   one range held so far (or starts it), so that once the hole is filled
   the peer need not send it again; dropped otherwise. */
static void hold(struct tcb *c, u32 seq, const u8 *data, u32 dlen, int fin)
{
	u32 off = seq - c->rcv_nxt, wnd = rcv_wnd(c);
	if (off >= wnd) {
		STATUS->tcp_dropped++;
		return;
	}
	if (dlen > wnd - off) {
		dlen = wnd - off;
		fin = 0;
	}
	u32 start = seq, end = seq + dlen;
	if (c->ooo_len) {
		u32 oend = c->ooo_seq + c->ooo_len;
		if (seq_lt(oend, start) || seq_lt(end, c->ooo_seq)) { /* not touching it */
			STATUS->tcp_dropped++;
			return;
		}
		if (seq_lt(c->ooo_seq, start))
			start = c->ooo_seq;
		if (seq_lt(end, oend)) {
			end = oend;
			fin = c->ooo_fin;
		} else if (end == oend) {
			fin |= c->ooo_fin;
		}
	}
	put(c, seq, data, dlen);
	c->ooo_seq = start;
	c->ooo_len = end - start;
	c->ooo_fin = fin;
}

static void segment(struct tcb *c, const u8 *f, const u8 *th, const u8 *data, u32 dlen)
{
	u32 flags = th[13], seq = get32(th + 4), ack = get32(th + 8), wnd = get16(th + 14);
	c->heard = t.now;
	copy(c->mac, f + 6, 6);

	if (flags & TH_RST) { /* only one that starts where we expect (RFC 5961) */
		if (seq == c->rcv_nxt)
			release(c);
		else
			c->ack_now = 1;
		return;
	}
	if (flags & TH_SYN) {
		if (c->state == SYN_RCVD && seq + 1 == c->rcv_nxt)
			c->snd_nxt = c->iss; /* our SYN-ACK was lost: again */
		else
			c->ack_now = 1; /* a challenge ACK */
		return;
	}
	if (!(flags & TH_ACK))
		return;

	if (c->state == SYN_RCVD) {
		if (ack != c->iss + 1) {
			reset_for(f, f + 14, th, dlen);
			return;
		}
		c->state = ESTABLISHED;
		STATUS->tcp_accepted++;
		c->wl1 = seq - 1; /* take this segment's window */
	}

	/* the ACK */
	if (seq_lt(c->snd_max, ack)) { /* acks what we never sent */
		c->ack_now = 1;
		return;
	}
	if (seq_lt(c->snd_una, ack)) {
		if (c->rtt_start && seq_le(c->rtt_seq, ack)) {
			rtt_sample(c, t.now - c->rtt_start);
			c->rtt_start = 0;
		}
		c->snd_una = ack;
		if (seq_lt(c->snd_nxt, ack))
			c->snd_nxt = ack;
		c->retries = 0;
		c->dupacks = 0;
		c->deadline = 0; /* re-armed by output */
		if (!c->srtt)
			c->rto = RTO_INIT_MS * t.ms;
	} else if (ack == c->snd_una && dlen == 0 && !(flags & TH_FIN) && wnd == c->snd_wnd &&
		   c->snd_una != c->snd_max && ++c->dupacks == 3) {
		c->snd_nxt = c->snd_una; /* fast retransmit: go back */
		c->rtt_start = 0;
	}
	if (ack == c->snd_una && wnd == 0)
		c->retries = 0; /* a zero-window probe answered: the peer is alive */
	if (seq_lt(c->wl1, seq) || (c->wl1 == seq && seq_le(c->wl2, ack))) {
		c->snd_wnd = wnd;
		c->wl1 = seq;
		c->wl2 = ack;
	}
	if (c->state == LAST_ACK && ack == c->snd_end + 1) { /* our FIN is acked */
		release(c);
		return;
	}

	/* the data and the FIN */
	if (dlen == 0 && !(flags & TH_FIN))
		return;
	c->ack_now = 1; /* at once, also for a segment beyond a hole: a duplicate ACK */
	if (c->state != ESTABLISHED) /* after the peer's FIN: nothing new can come */
		return;
	if (seq_lt(c->rcv_nxt, seq)) {
		hold(c, seq, data, dlen, flags & TH_FIN);
		return;
	}
	u32 skip = c->rcv_nxt - seq;
	if (skip > dlen) /* all old */
		return;
	u32 take = dlen - skip, n = min32(take, rcv_wnd(c));
	put(c, c->rcv_nxt, data + skip, n);
	c->snd_end += n;
	c->rcv_nxt += n;
	int fin = n == take && (flags & TH_FIN);
	if (n < take)
		STATUS->tcp_dropped++;
	if (c->ooo_len && seq_le(c->ooo_seq, c->rcv_nxt)) { /* the hole is filled */
		u32 end = c->ooo_seq + c->ooo_len;
		if (seq_lt(c->rcv_nxt, end)) {
			c->snd_end += end - c->rcv_nxt;
			c->rcv_nxt = end;
			fin = c->ooo_fin;
		}
		c->ooo_len = 0;
	}
	if (fin) {
		c->rcv_nxt++;
		c->state = CLOSE_WAIT;
	}
}

void tcp_input(const u8 *f, const u8 *ip, u32 ihl, u32 total)
{
	const u8 *th = ip + ihl;
	u32 tl = total - ihl;
	if (tl < 20)
		return;
	u32 hl = (th[12] >> 4) * 4u;
	if (hl < 20 || hl > tl)
		return;
	u8 pseudo[12];
	copy(pseudo, ip + 12, 8);
	pseudo[8] = 0;
	pseudo[9] = IP_TCP;
	put16(pseudo + 10, tl);
	if (csum_fold(csum_add(csum_add(0, pseudo, 12), th, tl)) != 0)
		return;
	STATUS->tcp_rx++;
	t.now = rdtsc();
	u32 rip = get32(ip + 12), dlen = tl - hl;
	u16 rport = get16(th), lport = get16(th + 2);
	if (lport == ECHO_PORT && t.open)
		for (u32 i = 0; i < TCP_CONNS; i++) {
			struct tcb *c = &t.c[i];
			if (c->state != FREE && c->rip == rip && c->rport == rport) {
				segment(c, f, th, th + hl, dlen);
				return;
			}
		}
	if (lport == ECHO_PORT && (th[13] & (TH_SYN | TH_ACK | TH_RST | TH_FIN)) == TH_SYN)
		accept_syn(f, ip, th, hl);
	else
		reset_for(f, ip, th, dlen);
}

/* ---- timers and output, from every turn of net_service ---- */
void tcp_service(u64 now)
{
	t.now = now;
	for (u32 i = 0; t.open && i < TCP_CONNS; i++) {
		struct tcb *c = &t.c[i];
		if (c->state == FREE)
			continue;
		if (c->deadline && (i64)(now - c->deadline) >= 0) {
			if (++c->retries > MAX_RETRIES) {
				send_seg(c, c->snd_nxt, TH_RST, 0);
				release(c);
				continue;
			}
			c->snd_nxt = c->snd_una; /* go back: everything unacked again */
			if (c->snd_wnd == 0)
				c->probe = 1; /* a zero window: probe it with one byte */
			c->rto *= 2;
			if (c->rto > RTO_MAX_MS * t.ms)
				c->rto = RTO_MAX_MS * t.ms;
			c->rtt_start = 0; /* Karn: no sample from a retransmission */
			c->deadline = 0;
		}
		output(c);
	}
	if (t.queued) { /* one notify for the whole batch, RSTs from tcp_input included */
		t.queued = 0;
		net_tx_kick();
	}
}

void tcp_init(u64 ticks_per_s)
{
	memset(&t, 0, sizeof t); /* .bss may not be zeroed by the loader */
	t.ms = ticks_per_s / 1000;
	t.now = rdtsc();
	for (u32 i = 0; i < TCP_CONNS; i++)
		t.c[i].buf = (u8 *)(NET_TCP_BUFS + i * TCP_BUF);
}
