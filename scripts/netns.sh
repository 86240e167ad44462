#!/usr/bin/env bash
# Two network namespaces joined by a veth pair, for multi-host tests on one machine
# (live migration between tern processes in different "hosts").
#
#   bash scripts/netns.sh up [PREFIX]     create PREFIX-a (10.237.0.1/24) and PREFIX-b (10.237.0.2/24)
#   bash scripts/netns.sh down [PREFIX]   remove them (idempotent)
#   bash scripts/netns.sh check           exit 0 if this machine can create namespaces and veth pairs
#
# PREFIX defaults to "tern". Environment:
#   NETNS_SUBNET=237   third octet of the 10.x.0.0/24 addresses (0-255)
#   RATE=1gbit         optional rate limit (tbf) on both veth ends, egress; tc units: kbit, mbit, gbit, bit
#
# Inside each namespace the link is named veth0 and lo is up. `up` on namespaces that already exist
# removes and recreates them. `down` also stops the processes still running in the namespaces
# (SIGTERM, then SIGKILL after 2 s): only test processes started inside them can be there.
# There is no latency emulation here (the netem qdisc does not exist on these machines): use
# tools/delay_relay.py for delay.
set -euo pipefail
# shellcheck source=scripts/netns-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns-common.sh"

usage() {
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_root() {
    command -v ip >/dev/null || { echo "netns: ip (iproute2) is not installed" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "netns: must run as root" >&2; exit 1; }
}




# tbf on the egress of veth0 in a namespace. The bucket must hold what the kernel can release
# between two timer ticks at the full rate plus one GSO super-packet (64 KiB on veth), or tbf
# caps below the rate; 4 ms of traffic (at least 256 KiB) is enough for HZ >= 250. The queue
# limit (latency) is 10 ms of traffic: TCP backs off on drops beyond it.
apply_rate() {
    local ns="$1" bps="$2" burst
    burst=$((bps / 8 / 250))
    [ "$burst" -lt 262144 ] && burst=262144
    ip -n "$ns" link set veth0 txqueuelen 10000
    tc -n "$ns" qdisc replace dev veth0 root tbf rate "$bps"bit burst "$burst" latency 10ms
}

cmd_up() {
    local prefix="$1" subnet="${NETNS_SUBNET:-237}" a="$1-a" b="$1-b"
    [[ "$subnet" =~ ^[0-9]+$ ]] && [ "$subnet" -le 255 ] || { echo "netns: NETNS_SUBNET must be 0-255, not '$subnet'" >&2; exit 1; }
    local bps=""
    if [ -n "${RATE:-}" ]; then
        bps=$(rate_bps "$RATE") && [ "$bps" -gt 0 ] || { echo "netns: bad RATE '$RATE' (examples: 1gbit, 500mbit)" >&2; exit 1; }
    fi
    need_root
    remove_ns "$a"
    remove_ns "$b"
    ip netns add "$a"
    ip netns add "$b"
    # Both ends are created directly inside their namespaces: no name in the root namespace can collide.
    if ! ip link add veth0 netns "$a" type veth peer name veth0 netns "$b"; then
        remove_ns "$a"; remove_ns "$b"
        echo "netns: could not create the veth pair" >&2
        exit 1
    fi
    ip -n "$a" addr add "10.$subnet.0.1/24" dev veth0
    ip -n "$b" addr add "10.$subnet.0.2/24" dev veth0
    local ns
    for ns in "$a" "$b"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set veth0 up
    done
    if [ -n "$bps" ]; then
        apply_rate "$a" "$bps"
        apply_rate "$b" "$bps"
    fi
    # Traffic flows as soon as both ends have carrier (operstate lags by up to a second, but
    # TCP connects at once); the wait is bounded to 2 s.
    local i
    for i in $(seq 40); do
        [ "$(ip netns exec "$a" cat /sys/class/net/veth0/carrier)" = 1 ] &&
            [ "$(ip netns exec "$b" cat /sys/class/net/veth0/carrier)" = 1 ] && break
        sleep 0.05
    done
    echo "netns: $a (10.$subnet.0.1) <-> $b (10.$subnet.0.2)${RATE:+, rate $RATE each way}"
}

cmd_down() {
    need_root
    remove_ns "$1-a"
    remove_ns "$1-b"
}

cmd_check() {
    command -v ip >/dev/null || { echo "netns: ip (iproute2) is not installed" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "netns: must run as root to create network namespaces" >&2; exit 1; }
    local ns="ternchk-$$" err
    if ! err=$(ip netns add "$ns" 2>&1); then
        echo "netns: cannot create a network namespace: $err" >&2
        exit 1
    fi
    if ! err=$(ip -n "$ns" link add veth0 type veth peer name veth1 2>&1); then
        ip netns del "$ns" 2>/dev/null || true
        echo "netns: cannot create a veth pair: $err" >&2
        exit 1
    fi
    ip netns del "$ns"
}

case "${1:-}" in
    up) cmd_up "${2:-tern}" ;;
    down) cmd_down "${2:-tern}" ;;
    check) cmd_check ;;
    *) usage ;;
esac
