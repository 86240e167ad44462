/*
 * virtio.c - ring-3 virtio-mmio transport: finding devices in the 24 slots
 * of QEMU microvm's window, the modern initialisation sequence, and split
 * virtqueues polled in memory.
 */
#include "virtio.h"

struct virtio_found vfound;

/* Reads 2-3 registers per slot (~72 MMIO exits, a few ms under QEMU). */
void virtio_scan(void)
{
	vfound = (struct virtio_found){0};
	for (u64 n = 0; n < VIRTIO_MMIO_SLOTS; n++) {
		u64 base = VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE;
		if (mmio_r32(base + VM_MAGIC) != VIRTIO_MMIO_MAGIC)
			continue;
		u32 id = mmio_r32(base + VM_DEVICE_ID);
		if (id == 0) /* an empty transport */
			continue;
		vfound.devices++;
		u32 version = mmio_r32(base + VM_VERSION);
		if (id == VIRTIO_ID_BLOCK && !vfound.blk) {
			vfound.blk = base;
			vfound.blk_version = version;
		} else if (id == VIRTIO_ID_NET && !vfound.net) {
			vfound.net = base;
			vfound.net_version = version;
		}
	}
}

/* Reset, ACKNOWLEDGE, DRIVER; returns the 64 device feature bits. */
u64 virtio_begin(u64 base)
{
	mmio_w32(base + VM_STATUS, 0);
	mmio_w32(base + VM_STATUS, VS_ACKNOWLEDGE);
	mmio_w32(base + VM_STATUS, VS_ACKNOWLEDGE | VS_DRIVER);
	mmio_w32(base + VM_DEVICE_FEATURES_SEL, 0);
	u64 lo = mmio_r32(base + VM_DEVICE_FEATURES);
	mmio_w32(base + VM_DEVICE_FEATURES_SEL, 1);
	u64 hi = mmio_r32(base + VM_DEVICE_FEATURES);
	return hi << 32 | lo;
}

/* Writes the driver features, sets FEATURES_OK and reads it back: 0 when
   the device kept it (accepted the subset), -1 when it refused. */
int virtio_set_features(u64 base, u64 features)
{
	mmio_w32(base + VM_DRIVER_FEATURES_SEL, 0);
	mmio_w32(base + VM_DRIVER_FEATURES, (u32)features);
	mmio_w32(base + VM_DRIVER_FEATURES_SEL, 1);
	mmio_w32(base + VM_DRIVER_FEATURES, (u32)(features >> 32));
	mmio_w32(base + VM_STATUS, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK);
	return (mmio_r32(base + VM_STATUS) & VS_FEATURES_OK) ? 0 : -1;
}

/* Queue `index` with its rings at mem (desc), mem+4K (avail), mem+8K (used);
   size min(want, QueueNumMax). 0 on success, -1 if the queue is absent. */
int vq_setup(struct vq *q, u64 base, u16 index, u64 mem, u16 want)
{
	mmio_w32(base + VM_QUEUE_SEL, index);
	if (mmio_r32(base + VM_QUEUE_READY))
		return -1; /* cannot be: the device was reset */
	u32 max = mmio_r32(base + VM_QUEUE_NUM_MAX);
	if (max == 0)
		return -1;
	u32 size = want < max ? want : max;
	if (size > VQ_MAX)
		size = VQ_MAX;
	while (size & (size - 1)) /* ring indices are masked: a power of 2 */
		size &= size - 1;
	u64 *z = (u64 *)mem;
	for (u64 i = 0; i < 3 * PAGE_SIZE / 8; i++)
		z[i] = 0;
	q->mmio = base;
	q->index = index;
	q->size = (u16)size;
	q->desc = (volatile struct vdesc *)mem;
	q->avail = (volatile u16 *)(mem + PAGE_SIZE);
	q->used = (volatile u16 *)(mem + 2 * PAGE_SIZE);
	q->avail_idx = q->used_idx = 0;
	q->avail[0] = VRING_AVAIL_F_NO_INTERRUPT; /* we never take interrupts */

	mmio_w32(base + VM_QUEUE_NUM, size);
	u64 d = mem, a = mem + PAGE_SIZE, u = mem + 2 * PAGE_SIZE;
	mmio_w32(base + VM_QUEUE_DESC_LOW, (u32)d);
	mmio_w32(base + VM_QUEUE_DESC_HIGH, (u32)(d >> 32));
	mmio_w32(base + VM_QUEUE_DRIVER_LOW, (u32)a);
	mmio_w32(base + VM_QUEUE_DRIVER_HIGH, (u32)(a >> 32));
	mmio_w32(base + VM_QUEUE_DEVICE_LOW, (u32)u);
	mmio_w32(base + VM_QUEUE_DEVICE_HIGH, (u32)(u >> 32));
	mmio_w32(base + VM_QUEUE_READY, 1);
	return 0;
}

void virtio_driver_ok(u64 base)
{
	mmio_w32(base + VM_STATUS, VS_ACKNOWLEDGE | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
}

void virtio_fail(u64 base) { mmio_w32(base + VM_STATUS, mmio_r32(base + VM_STATUS) | VS_FAILED); }

/* Makes the chain at `head` available, without telling the device. */
void vq_add(struct vq *q, u16 head)
{
	q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
	compiler_barrier(); /* x86 keeps stores in order: ring entry before idx */
	q->avail[1] = ++q->avail_idx;
}

/* Makes the chain at `head` available and notifies the device. */
void vq_publish(struct vq *q, u16 head)
{
	vq_add(q, head);
	vq_kick(q);
}

/* Notifies the device of what vq_add published, unless it said it does not
   need it (VRING_USED_F_NO_NOTIFY: it is still looking at the ring). */
void vq_kick(struct vq *q)
{
	mfence(); /* the idx store must be visible before we read used->flags */
	if (!(q->used[0] & VRING_USED_F_NO_NOTIFY)) {
		/* the vCPU waits for the VMM's exit handling: publish what it costs */
		u64 t = rdtsc();
		mmio_w32(q->mmio + VM_QUEUE_NOTIFY, q->index);
		volatile struct status *st = STATUS;
		st->notify_ticks += rdtsc() - t;
		st->notifies++;
	}
}

/* One completed chain, if the device returned one: no MMIO, just memory. */
int vq_poll(struct vq *q, u32 *id, u32 *len)
{
	if (q->used[1] == q->used_idx)
		return 0;
	compiler_barrier(); /* x86 keeps loads in order: idx before the entry */
	volatile u32 *e = (volatile u32 *)(q->used + 2) + 2 * (q->used_idx & (q->size - 1));
	*id = e[0];
	*len = e[1];
	q->used_idx++;
	return 1;
}
