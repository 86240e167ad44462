/*
 * virtio.h - the guest's ring-3 virtio-mmio transport (version 2 only, i.e.
 * virtio 1.x "modern") and split virtqueues, shared by the block and network
 * drivers.
 *
 * Everything here runs in ring 3: ring 0 is emulated under PVM. An MMIO
 * access exits to the VMM (about 40 us under QEMU on this host), so the
 * drivers touch registers only to set up and to notify; completions are
 * found by polling the used rings in memory. No interrupts: IF stays 0, and
 * every avail ring carries VIRTQ_AVAIL_F_NO_INTERRUPT.
 */
#ifndef TERN_VIRTIO_H
#define TERN_VIRTIO_H

#include "tern.h"

/* QEMU microvm's virtio-mmio window (Tern uses the same one) */
#define VIRTIO_MMIO_BASE 0xfeb00000ULL
#define VIRTIO_MMIO_SLOTS 24
#define VIRTIO_MMIO_STRIDE 0x200ULL
#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

/* register offsets (virtio 1.x, 4.2.2) */
#define VM_MAGIC 0x000
#define VM_VERSION 0x004
#define VM_DEVICE_ID 0x008
#define VM_VENDOR_ID 0x00c
#define VM_DEVICE_FEATURES 0x010
#define VM_DEVICE_FEATURES_SEL 0x014
#define VM_DRIVER_FEATURES 0x020
#define VM_DRIVER_FEATURES_SEL 0x024
#define VM_QUEUE_SEL 0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM 0x038
#define VM_QUEUE_READY 0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_STATUS 0x070
#define VM_QUEUE_DESC_LOW 0x080
#define VM_QUEUE_DESC_HIGH 0x084
#define VM_QUEUE_DRIVER_LOW 0x090
#define VM_QUEUE_DRIVER_HIGH 0x094
#define VM_QUEUE_DEVICE_LOW 0x0a0
#define VM_QUEUE_DEVICE_HIGH 0x0a4
#define VM_CONFIG_GENERATION 0x0fc
#define VM_CONFIG 0x100

/* device status bits */
#define VS_ACKNOWLEDGE 1u
#define VS_DRIVER 2u
#define VS_DRIVER_OK 4u
#define VS_FEATURES_OK 8u
#define VS_FAILED 128u

#define VIRTIO_F_VERSION_1 (1ULL << 32)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

/* ---- fixed driver memory, below WORK_BASE (see docs/GUEST.md) ---- */
#define DRIVER_BASE 0x200000ULL
#define DRIVER_END 0x1000000ULL
#define BLK_QUEUE 0x200000ULL	 /* 3 pages: desc, avail, used */
#define BLK_REQ 0x203000ULL	 /* request header (16 bytes) */
#define BLK_STATUS 0x203010ULL	 /* status byte */
#define BLK_ID 0x203020ULL	 /* GET_ID answer (20 bytes) */
#define BLK_DATA 0x300000ULL	 /* data buffer, up to 1 MiB */
#define BLK_DATA_MAX 0x100000ULL
#define NET_RXQ 0x400000ULL	 /* 3 pages each */
#define NET_TXQ 0x404000ULL
#define NET_CTRLQ 0x408000ULL
#define NET_CTRL_BUF 0x40c000ULL /* control command, 1 page */
#define NET_RX_BUFS 0x500000ULL	 /* NET_BUFS x NET_BUF_SIZE */
#define NET_TX_BUFS 0x520000ULL
#define NET_BUF_SIZE 2048ULL
/* Enough frames in flight to ride out a host that leaves the device's worker unscheduled for
   milliseconds while TCP streams: with fewer, echo answers found no free tx buffer and were dropped. */
#define NET_BUFS 64
#define NET_TCP_BUFS 0x430000ULL /* TCP_CONNS x TCP_BUF (to 0x4AFFFF): each connection's echo bytes */
#define TCP_CONNS 8
#define TCP_BUF 65536u		 /* a power of two; the window advertised is at most 65535 */
#define VQ_MAX 256 /* a queue's rings fit one page each */

struct vdesc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct vq {
	u64 mmio; /* device registers */
	volatile struct vdesc *desc;
	volatile u16 *avail; /* [0] flags, [1] idx, [2 + i] ring */
	volatile u16 *used;  /* [0] flags, [1] idx, then {u32 id, u32 len}[] */
	u16 size, index;
	u16 avail_idx; /* next avail index to publish */
	u16 used_idx;  /* next used index to consume */
};

static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u16 mmio_r16(u64 a) { return *(volatile u16 *)a; }
static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

/* What the scan found: the first device of each kind (0 = none). */
struct virtio_found {
	u64 blk, net;
	u32 blk_version, net_version;
	u32 devices;
};
extern struct virtio_found vfound;

void virtio_scan(void);
u64 virtio_begin(u64 base);
int virtio_set_features(u64 base, u64 features);
int vq_setup(struct vq *q, u64 base, u16 index, u64 mem, u16 want);
void virtio_driver_ok(u64 base);
void virtio_fail(u64 base);
void vq_add(struct vq *q, u16 head);
void vq_kick(struct vq *q);
void vq_publish(struct vq *q, u16 head);
int vq_poll(struct vq *q, u32 *id, u32 *len);

/* disk.c */
int disk_init(void);
void disk_service(u64 now);
void disk_progress(struct line *l);

/* net.c */
int net_init(void);
void net_service(u64 now);

/* tcp.c (net.h has what it shares with net.c) */
void tcp_init(u64 ticks_per_s);
void tcp_service(u64 now);

#endif
