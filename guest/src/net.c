/* net.c - placeholder: the network responder is not built in yet. */
#include "virtio.h"

int net_init(void)
{
	sys_print("tern-guest: net: error: the network responder is not built in yet\n");
	STATUS->net_state = DEV_FAILED;
	return -1;
}

void net_service(u64 now) { (void)now; }
