/*
 * net.h - what the virtio-net driver and responder (net.c) share with the
 * TCP echo service (tcp.c): byte-order helpers, the Internet checksum, and
 * the transmit buffers.
 */
#ifndef TERN_NET_H
#define TERN_NET_H

#include "virtio.h"

#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define IP_ICMP 1
#define IP_TCP 6
#define IP_UDP 17
#define ECHO_PORT 7

static inline u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline void put16(u8 *p, u32 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}
static inline u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static inline void put32(u8 *p, u32 v)
{
	put16(p, v >> 16);
	put16(p + 2, v);
}
static inline void copy(u8 *d, const u8 *s, u32 len)
{
	for (u32 i = 0; i < len; i++)
		d[i] = s[i];
}

/* The Internet checksum (RFC 1071), in pieces: csum_add over each part (all
   but the last of even length), then csum_fold. csum(p, len) is one part. */
static inline u64 csum_add(u64 sum, const u8 *p, u32 len)
{
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += get16(p + i);
	if (len & 1)
		sum += (u32)p[len - 1] << 8;
	return sum;
}
static inline u16 csum_fold(u64 sum)
{
	while (sum >> 16)
		sum = (sum & 0xFFFF) + (sum >> 16);
	return (u16)~sum;
}
static inline u16 csum(const u8 *p, u32 len) { return csum_fold(csum_add(0, p, len)); }

/* net.c: a frame buffer to fill (from its Ethernet header on), or NULL if
   fewer than `keep` would stay free; then net_tx_queue(id, frame length),
   and net_tx_kick() after the last frame of a batch. */
u8 *net_tx_buffer(u16 *id, u32 keep);
void net_tx_queue(u16 id, u32 frame_len);
void net_tx_kick(void);
const u8 *net_mac(void);
u32 net_ip(void);

/* tcp.c: an IPv4 packet to our address with protocol 6, its header checked;
   f is the Ethernet frame, ip its IP header of ihl bytes, total bytes long */
void tcp_input(const u8 *f, const u8 *ip, u32 ihl, u32 total);

#endif
