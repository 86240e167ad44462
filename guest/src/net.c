/*
 * net.c - ring-3 polled virtio-net driver and a tiny responder (ip=A.B.C.D/N):
 * answers ARP requests for its address, ICMP echo requests and UDP echo
 * (port 7), and hands TCP to the echo service of tcp.c; sends a gratuitous
 * ARP at start-up and whenever the device asks for an announcement
 * (VIRTIO_NET_S_ANNOUNCE, e.g. after a live migration), acking it on the
 * control queue.
 *
 * The main loop calls net_service() between disk requests and page batches
 * (continuously when everything else idles). It looks at the rx and tx used
 * rings in memory; the only MMIO in steady state is a QueueNotify per sent
 * packet (and per recycled rx batch, when the device asks for it), plus a
 * read of the config status every 100 ms when announcements are negotiated.
 */
#include "net.h"

#define VIRTIO_NET_F_MAC (1ULL << 5)
#define VIRTIO_NET_F_STATUS (1ULL << 16)
#define VIRTIO_NET_F_CTRL_VQ (1ULL << 17)
#define VIRTIO_NET_F_GUEST_ANNOUNCE (1ULL << 21)
#define VIRTIO_NET_S_LINK_UP 1
#define VIRTIO_NET_S_ANNOUNCE 2
#define VIRTIO_NET_CTRL_ANNOUNCE 3
#define VIRTIO_NET_CTRL_ANNOUNCE_ACK 0
#define NET_HDR 12 /* struct virtio_net_hdr, modern: num_buffers included */

#define RXQ 0
#define TXQ 1
#define CTRLQ 2


static struct {
	struct vq rx, tx, ctrl;
	u64 base;
	u64 features;
	int has_ctrl, can_announce, ctrl_busy;
	u8 mac[6];
	u32 ip; /* host byte order */
	u16 tx_free[NET_BUFS];
	u32 tx_nfree;
	u64 ticks_per_s, next_status_poll;
} n;

static int fail(const char *why)
{
	sys_print("tern-guest: net: error: ");
	sys_print(why);
	sys_print("\n");
	STATUS->net_state = DEV_FAILED;
	return -1;
}

/* ---- sending ---- */
static void tx_reclaim(void)
{
	u32 id, len;
	while (vq_poll(&n.tx, &id, &len))
		if (id < n.tx.size && n.tx_nfree < NET_BUFS)
			n.tx_free[n.tx_nfree++] = (u16)id;
}

/* A frame buffer to fill (after its virtio-net header), or NULL if all are
   in flight; then tx_send(id, frame length). net_tx_buffer leaves `keep`
   buffers free, so TCP cannot starve the ARP, ping and UDP answers. */
static u8 *tx_buffer_keep(u16 *id, u32 keep)
{
	tx_reclaim();
	if (n.tx_nfree <= keep)
		return NULL;
	*id = n.tx_free[--n.tx_nfree];
	u8 *b = (u8 *)(NET_TX_BUFS + *id * NET_BUF_SIZE);
	for (u32 i = 0; i < NET_HDR; i++) /* no offloads: an all-zero header */
		b[i] = 0;
	return b + NET_HDR;
}
static u8 *tx_buffer(u16 *id) { return tx_buffer_keep(id, 0); }
u8 *net_tx_buffer(u16 *id, u32 keep) { return tx_buffer_keep(id, keep); }

/* Makes the frame available to the device; tx_send also notifies it, net_tx_queue
   leaves that to net_tx_kick, once for a batch. */
static void tx_queue(u16 id, u32 frame_len)
{
	volatile struct vdesc *d = &n.tx.desc[id];
	d->addr = NET_TX_BUFS + id * NET_BUF_SIZE;
	d->len = NET_HDR + frame_len;
	d->flags = 0;
	d->next = 0;
	vq_add(&n.tx, id);
	STATUS->net_tx++;
}
static void tx_send(u16 id, u32 frame_len)
{
	tx_queue(id, frame_len);
	vq_kick(&n.tx);
}
void net_tx_queue(u16 id, u32 frame_len) { tx_queue(id, frame_len); }
void net_tx_kick(void) { vq_kick(&n.tx); }
const u8 *net_mac(void) { return n.mac; }
u32 net_ip(void) { return n.ip; }

/* Broadcast ARP request for our own address (sender = target = us), so
   switches and neighbours learn where we are. */
static void gratuitous_arp(void)
{
	u16 id;
	u8 *f = tx_buffer(&id);
	if (!f)
		return;
	for (int i = 0; i < 6; i++) {
		f[i] = 0xFF;
		f[6 + i] = n.mac[i];
		f[22 + i] = n.mac[i]; /* sender MAC */
		f[32 + i] = 0;	      /* target MAC */
	}
	put16(f + 12, ETH_ARP);
	put16(f + 14, 1);      /* Ethernet */
	put16(f + 16, ETH_IP); /* IPv4 */
	f[18] = 6;
	f[19] = 4;
	put16(f + 20, 1); /* request */
	put32(f + 28, n.ip);
	put32(f + 38, n.ip);
	for (int i = 42; i < 60; i++) /* pad to the Ethernet minimum */
		f[i] = 0;
	tx_send(id, 60);
	STATUS->net_announces++;
}

/* ---- answering ---- */
static void answer_arp(const u8 *f, u32 len)
{
	if (len < 42 || get16(f + 14) != 1 || get16(f + 16) != ETH_IP || f[18] != 6 || f[19] != 4 ||
	    get16(f + 20) != 1 || get32(f + 38) != n.ip)
		return;
	u16 id;
	u8 *r = tx_buffer(&id);
	if (!r)
		return;
	copy(r, f + 6, 6); /* to the asker */
	copy(r + 6, n.mac, 6);
	copy(r + 12, f + 12, 8); /* type, htype, ptype, hlen, plen */
	put16(r + 20, 2);	 /* reply */
	copy(r + 22, n.mac, 6);
	put32(r + 28, n.ip);
	copy(r + 32, f + 22, 10); /* target = the asker's MAC and IP */
	for (int i = 42; i < 60; i++)
		r[i] = 0;
	tx_send(id, 60);
}

static void answer_ip(const u8 *f, u32 len)
{
	const u8 *ip = f + 14;
	if (len < 34 || (ip[0] >> 4) != 4)
		return;
	u32 ihl = (ip[0] & 15) * 4u, total = get16(ip + 2);
	if (ihl < 20 || total < ihl || 14 + total > len || get32(ip + 16) != n.ip)
		return;
	if (get16(ip + 6) & 0x3FFF) /* a fragment (MF or an offset): not for us */
		return;
	if (csum(ip, ihl) != 0)
		return;
	if (ip[9] == IP_TCP) {
		tcp_input(f, ip, ihl, total);
		return;
	}
	const u8 *l4 = ip + ihl;
	u32 l4len = total - ihl;
	int icmp = ip[9] == IP_ICMP && l4len >= 8 && l4[0] == 8 && l4[1] == 0;
	int udp = ip[9] == IP_UDP && l4len >= 8 && get16(l4 + 2) == ECHO_PORT && get16(l4 + 4) <= l4len &&
		  get16(l4 + 4) >= 8;
	if (!icmp && !udp)
		return;
	if (icmp && csum(l4, l4len) != 0)
		return;

	u16 id;
	u8 *r = tx_buffer(&id);
	if (!r)
		return;
	copy(r, f + 6, 6); /* back where it came from */
	copy(r + 6, n.mac, 6);
	put16(r + 12, ETH_IP);
	u8 *rip = r + 14;
	copy(rip, ip, total); /* fits: a received frame fits a buffer of the same size */
	copy(rip + 12, ip + 16, 4); /* swap the addresses */
	copy(rip + 16, ip + 12, 4);
	rip[8] = 64; /* TTL */
	put16(rip + 10, 0);
	put16(rip + 10, csum(rip, ihl));
	u8 *r4 = rip + ihl;
	if (icmp) {
		r4[0] = 0; /* echo reply */
		put16(r4 + 2, 0);
		put16(r4 + 2, csum(r4, l4len));
	} else {
		/* swap the ports; with the addresses swapped too, the pseudo-header
		   sum is the same, so the UDP checksum (or its 0) stays valid */
		copy(r4, l4 + 2, 2);
		copy(r4 + 2, l4, 2);
	}
	tx_send(id, 14 + total);
}

static void receive(const u8 *f, u32 len)
{
	if (len < 14)
		return;
	int to_us = 1, bcast = 1;
	for (int i = 0; i < 6; i++) {
		to_us &= f[i] == n.mac[i];
		bcast &= f[i] == 0xFF;
	}
	if (!to_us && !bcast)
		return;
	u16 type = get16(f + 12);
	if (type == ETH_ARP)
		answer_arp(f, len);
	else if (type == ETH_IP && to_us)
		answer_ip(f, len);
}

/* ---- announcements ---- */
static void announce_check(u64 now)
{
	if ((i64)(now - n.next_status_poll) < 0)
		return;
	n.next_status_poll = now + n.ticks_per_s / 10; /* 100 ms: it is an MMIO read */
	if (n.ctrl_busy) {
		u32 id, len;
		if (!vq_poll(&n.ctrl, &id, &len))
			return;
		n.ctrl_busy = 0;
	}
	/* config 0x04: mac[4], mac[5], then u16 status (a 32-bit aligned read) */
	u32 status = mmio_r32(n.base + VM_CONFIG + 4) >> 16;
	if (!(status & VIRTIO_NET_S_ANNOUNCE))
		return;
	gratuitous_arp();
	/* ack: {u8 class, u8 command} device-readable, {u8 ack} device-writable */
	volatile u8 *cmd = (volatile u8 *)NET_CTRL_BUF;
	cmd[0] = VIRTIO_NET_CTRL_ANNOUNCE;
	cmd[1] = VIRTIO_NET_CTRL_ANNOUNCE_ACK;
	cmd[16] = 0xFF;
	volatile struct vdesc *d = n.ctrl.desc;
	d[0].addr = NET_CTRL_BUF;
	d[0].len = 2;
	d[0].flags = VRING_DESC_F_NEXT;
	d[0].next = 1;
	d[1].addr = NET_CTRL_BUF + 16;
	d[1].len = 1;
	d[1].flags = VRING_DESC_F_WRITE;
	d[1].next = 0;
	vq_publish(&n.ctrl, 0);
	n.ctrl_busy = 1;
}

/* ---- the loop ---- */
void net_service(u64 now)
{
	u32 id, len, recycled = 0;
	while (vq_poll(&n.rx, &id, &len)) {
		if (id >= n.rx.size)
			continue;
		STATUS->net_rx++;
		if (len > NET_BUF_SIZE) /* a device bug: do not read past the buffer */
			len = NET_BUF_SIZE;
		if (len > NET_HDR)
			receive((const u8 *)(NET_RX_BUFS + id * NET_BUF_SIZE + NET_HDR), len - NET_HDR);
		vq_add(&n.rx, (u16)id); /* the buffer goes straight back */
		recycled++;
	}
	if (recycled)
		vq_kick(&n.rx);
	tcp_service(now);
	if (n.can_announce)
		announce_check(now);
}

/* ---- set-up ---- */
static void put_hex2(struct line *l, u8 v)
{
	char t[3] = {"0123456789abcdef"[v >> 4], "0123456789abcdef"[v & 15], 0};
	line_str(l, t);
}

int net_init(void)
{
	volatile struct status *st = STATUS;
	char buf[300];
	struct line l;
	memset(&n, 0, sizeof n); /* .bss may not be zeroed by the loader */
	n.ticks_per_s = st->tsc_khz * 1000;
	n.ip = cfg.ip;

	if (!vfound.net)
		return fail("no virtio-net device in the 24 virtio-mmio slots at 0xfeb00000");
	u64 base = n.base = vfound.net;
	if (vfound.net_version != 2) {
		line_init(&l, buf, sizeof buf);
		line_str(&l, "virtio-net at ");
		line_hex(&l, base);
		line_str(&l, " is virtio-mmio version ");
		line_dec(&l, vfound.net_version);
		line_str(&l, " (legacy); only version 2 (virtio 1.x) is supported: under QEMU add "
			     "-global virtio-mmio.force-legacy=false");
		return fail(buf);
	}
	u64 offered = virtio_begin(base);
	if (!(offered & VIRTIO_F_VERSION_1)) {
		virtio_fail(base);
		return fail("virtio-net does not offer VIRTIO_F_VERSION_1");
	}
	u64 want = VIRTIO_F_VERSION_1 | (offered & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CTRL_VQ));
	if ((offered & VIRTIO_NET_F_GUEST_ANNOUNCE) && (want & VIRTIO_NET_F_CTRL_VQ))
		want |= VIRTIO_NET_F_GUEST_ANNOUNCE; /* needs the control queue */
	if (virtio_set_features(base, want)) {
		virtio_fail(base);
		return fail("virtio-net refused FEATURES_OK");
	}
	n.features = want;
	n.has_ctrl = (want & VIRTIO_NET_F_CTRL_VQ) != 0;
	n.can_announce = (want & VIRTIO_NET_F_GUEST_ANNOUNCE) && (want & VIRTIO_NET_F_STATUS);
	if (want & VIRTIO_NET_F_MAC) {
		for (int i = 0; i < 6; i++)
			n.mac[i] = mmio_r8(base + VM_CONFIG + (u64)i);
	} else {
		/* locally administered, unicast, derived from our address */
		n.mac[0] = 0x02;
		n.mac[1] = 0x54;
		put32(n.mac + 2, n.ip);
	}
	if (vq_setup(&n.rx, base, RXQ, NET_RXQ, NET_BUFS) || vq_setup(&n.tx, base, TXQ, NET_TXQ, NET_BUFS) ||
	    (n.has_ctrl && vq_setup(&n.ctrl, base, CTRLQ, NET_CTRLQ, 4))) {
		virtio_fail(base);
		return fail("virtio-net lacks a queue (rx 0, tx 1, control 2)");
	}
	virtio_driver_ok(base);

	/* every rx descriptor owns one 2 KiB buffer (a full 1514-byte frame and
	   the 12-byte header fit), all posted; tx descriptors likewise */
	for (u16 i = 0; i < n.rx.size; i++) {
		n.rx.desc[i].addr = NET_RX_BUFS + i * NET_BUF_SIZE;
		n.rx.desc[i].len = (u32)NET_BUF_SIZE;
		n.rx.desc[i].flags = VRING_DESC_F_WRITE;
		n.rx.desc[i].next = 0;
		vq_add(&n.rx, i);
	}
	vq_kick(&n.rx);
	for (u16 i = 0; i < n.tx.size; i++)
		n.tx_free[n.tx_nfree++] = i;

	u32 status = want & VIRTIO_NET_F_STATUS ? mmio_r32(base + VM_CONFIG + 4) >> 16 : VIRTIO_NET_S_LINK_UP;
	line_init(&l, buf, sizeof buf);
	line_str(&l, "tern-guest: net: virtio-net at ");
	line_hex(&l, base);
	line_str(&l, ": mac=");
	for (int i = 0; i < 6; i++) {
		put_hex2(&l, n.mac[i]);
		if (i < 5)
			line_str(&l, ":");
	}
	line_str(&l, want & VIRTIO_NET_F_MAC ? "" : " (made up: no VIRTIO_NET_F_MAC)");
	line_str(&l, " ip=");
	for (int i = 3; i >= 0; i--) {
		line_dec(&l, n.ip >> (8 * i) & 0xFF);
		line_str(&l, i ? "." : "/");
	}
	line_dec(&l, cfg.ip_prefix);
	line_str(&l, status & VIRTIO_NET_S_LINK_UP ? " link=up" : " link=down");
	line_str(&l, " queues=");
	line_dec(&l, n.rx.size);
	line_str(&l, "/");
	line_dec(&l, n.tx.size);
	line_str(&l, n.has_ctrl ? " ctrl" : "");
	line_str(&l, n.can_announce ? " announce\n" : "\n");
	sys_print(buf);

	tcp_init(n.ticks_per_s);
	st->net_state = DEV_RUNNING;
	n.next_status_poll = rdtsc();
	gratuitous_arp();
	return 0;
}
