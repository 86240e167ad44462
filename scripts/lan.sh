#!/usr/bin/env bash
# A LAN, or a WAN of sites, of "hosts" on one machine, for the network-continuity tests, the
# benchmark and the demo (live migration between tern processes on different hosts, measured
# from a client). Everything lives in network namespaces named PREFIX-*; nothing leaves them.
#
#   bash scripts/lan.sh up PREFIX            LAN: PREFIX-h1..hN, each with a bridge br0, joined by veth
#                                            links to the switch PREFIX-sw (a learning bridge br0); the
#                                            client PREFIX-cl on the switch. Addresses on the VM's
#                                            segment 10.240.0.0/24: host i 10.240.0.i (on its br0),
#                                            client 10.240.0.100; give the VM e.g. 10.240.0.10
#   bash scripts/lan.sh wan-up PREFIX        WAN: the same hosts as sites on their own subnets
#                                            10.241.i.0/24 (host i 10.241.i.2), joined only through the
#                                            router PREFIX-rt; the VM's segment 10.240.0.0/24 stretched
#                                            over VXLAN (id 42, UDP 4789) between the hosts' br0 and the
#                                            client PREFIX-cl, a third site (10.241.N+1.2) whose vx0
#                                            holds 10.240.0.100. With DELAY_MS, the VXLAN underlay and
#                                            the TCP ports in WAN_TCP_PORTS pass through delaying relays
#   bash scripts/lan.sh down PREFIX          remove either topology, its TAPs and its processes (idempotent)
#   bash scripts/lan.sh tap PREFIX HOST TAP  a persistent TAP named TAP on HOST's (h1, h2, ...) br0, up
#   bash scripts/lan.sh fdb PREFIX MAC       where the network sends MAC: the switch port (LAN) or the
#                                            client's VXLAN remote (WAN), as h1, h2, cl...; "none" if unknown
#   bash scripts/lan.sh ageing PREFIX SECS   forwarding-entry ageing: the switch's bridge (LAN), or every
#                                            bridge and VXLAN fdb (WAN); 300 s unless changed
#   bash scripts/lan.sh flush PREFIX         forget the learned entries (switch, or every bridge and vx0)
#   bash scripts/lan.sh check                exit 0 if this machine can build them (root, bridge, vxlan)
#
# Environment for up and wan-up:
#   LAN_HOSTS=2       number of hosts (1-9)
#   AGEING=300        initial ageing time in seconds (see ageing)
#   RATE=1gbit        optional tbf rate limit, egress, on both ends of every host's link (LAN: to the
#                     switch; WAN: to the router, and the client's); tc units: kbit, mbit, gbit
#   DELAY_MS=100      WAN only: one-way delay of the underlay between sites, added by
#                     tools/udp_delay_relay.py in PREFIX-rt (RTT through the overlay = 2 x DELAY_MS).
#                     The relay stands in for site i at 10.241.100.i; VTEPs use those as remotes.
#   WAN_TCP_PORTS="4000"  WAN with DELAY_MS: for each port P, tools/delay_relay.py in PREFIX-rt
#                     forwards 10.241.100.i:P to 10.241.i.2:P with the same delay (migrate through it:
#                     tern migrate --to tcp:10.241.100.2:4000). The hosts' own addresses stay direct.
# `up`/`wan-up` on a PREFIX already in use first remove what is there. Inside every namespace lo
# is up. Names inside the namespaces: host: br0, uplink (LAN) or wan0 (WAN), vx0 (WAN), the TAPs;
# switch: br0 with ports h1..hN and cl; client: eth0 (LAN) or wan0 + vx0 (WAN); router: h1..hN, cl.
# Run a command on a host with `ip netns exec PREFIX-h1 COMMAND`. There is no netem on these
# machines: delay only comes from the relays. docs/NETWORK.md describes both topologies.
set -euo pipefail
# shellcheck source=scripts/netns-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns-common.sh"

HERE="$(cd "$(dirname "$0")/.." && pwd)"

usage() {
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() { echo "lan: $*" >&2; exit 1; }

need_root() {
    command -v ip >/dev/null || die "ip (iproute2) is not installed"
    command -v bridge >/dev/null || die "bridge (iproute2) is not installed"
    [ "$(id -u)" = 0 ] || die "must run as root"
}



# Every namespace of PREFIX, whichever topology made it.
prefix_namespaces() {
    local p="$1"
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${p//./\\.}-(h[0-9]+|sw|cl|rt)$" || true
}

# The relays' logs and ready files (WAN with DELAY_MS).
state_dir() { echo "/tmp/lan-$1"; }

cmd_down() {
    need_root
    local ns
    for ns in $(prefix_namespaces "$1"); do
        remove_ns "$ns"
    done
    rm -rf "$(state_dir "$1")"
}

check_prefix() {
    [[ "$1" =~ ^[A-Za-z0-9][A-Za-z0-9_.]{0,20}$ ]] || die "PREFIX must be 1-21 letters, digits, _ or . (not '$1')"
}

hosts_count() {
    local n="${LAN_HOSTS:-2}"
    [[ "$n" =~ ^[1-9]$ ]] || die "LAN_HOSTS must be 1-9, not '$n'"
    echo "$n"
}

ageing_secs() {
    local a="${1:-${AGEING:-300}}"
    [[ "$a" =~ ^[0-9]+$ ]] && [ "$a" -le 1000000 ] || die "ageing must be whole seconds (0-1000000), not '$a'"
    echo "$a"
}


rate_from_env() {
    [ -n "${RATE:-}" ] || return 0
    local bps
    bps=$(rate_bps "$RATE") && [ "$bps" -gt 0 ] || die "bad RATE '$RATE' (examples: 1gbit, 500mbit)"
    echo "$bps"
}

# tbf on the egress of DEV in NS, as scripts/netns.sh does it (burst: 4 ms at the rate, at least
# 256 KiB, so a GSO packet and a timer tick's worth fit; queue: 10 ms of traffic).
apply_rate() {
    local ns="$1" dev="$2" bps="$3" burst
    [ -n "$bps" ] || return 0
    burst=$((bps / 8 / 250))
    [ "$burst" -lt 262144 ] && burst=262144
    ip -n "$ns" link set "$dev" txqueuelen 10000
    tc -n "$ns" qdisc replace dev "$dev" root tbf rate "$bps"bit burst "$burst" latency 10ms
}

new_ns() {
    ip netns add "$1"
    ip -n "$1" link set lo up
}

# A bridge br0 in NS: no STP (ports forward at once), the given ageing.
new_bridge() {
    local ns="$1" ageing="$2"
    ip -n "$ns" link add br0 type bridge stp_state 0 ageing_time $((ageing * 100))
    ip -n "$ns" link set br0 up
}

# A veth pair between two namespaces, both ends created in place (no name in the root namespace).
veth_pair() {
    local ns1="$1" dev1="$2" ns2="$3" dev2="$4"
    ip link add "$dev1" netns "$ns1" type veth peer name "$dev2" netns "$ns2" ||
        die "could not create the veth pair $ns1/$dev1 - $ns2/$dev2"
}

wait_carrier() { # NS DEV ...: bounded to 2 s
    local i ns dev ok
    for i in $(seq 40); do
        ok=1
        while [ $# -ge 2 ]; do
            ns="$1" dev="$2"
            shift 2
            [ "$(ip netns exec "$ns" cat "/sys/class/net/$dev/carrier" 2>/dev/null)" = 1 ] || ok=0
        done
        [ "$ok" = 1 ] && return 0
        sleep 0.05
    done
}

wait_ping() { # NS ADDRESS: up to 3 s
    local i
    for i in 1 2 3; do
        ip netns exec "$1" ping -q -n -c 1 -W 1 "$2" >/dev/null 2>&1 && return 0
    done
    die "$1 cannot reach $2"
}

cmd_up() {
    local p="$1" n ageing bps i h sw="$1-sw" cl="$1-cl"
    check_prefix "$p"
    n=$(hosts_count)
    ageing=$(ageing_secs)
    bps=$(rate_from_env)
    need_root
    cmd_down "$p"
    new_ns "$sw"
    new_bridge "$sw" "$ageing"
    for i in $(seq "$n"); do
        h="$p-h$i"
        new_ns "$h"
        new_bridge "$h" 300
        veth_pair "$h" uplink "$sw" "h$i"
        ip -n "$h" link set uplink master br0 up
        ip -n "$sw" link set "h$i" master br0 up
        ip -n "$h" addr add "10.240.0.$i/24" dev br0
        apply_rate "$h" uplink "$bps"
        apply_rate "$sw" "h$i" "$bps"
    done
    new_ns "$cl"
    veth_pair "$cl" eth0 "$sw" cl
    ip -n "$sw" link set cl master br0 up
    ip -n "$cl" addr add 10.240.0.100/24 dev eth0
    ip -n "$cl" link set eth0 up
    wait_carrier "$cl" eth0 "$p-h1" uplink
    # new links settle for up to a second (a first ARP can go unanswered): wait until the client
    # reaches every host, which also shows the LAN works
    for i in $(seq "$n"); do
        wait_ping "$cl" "10.240.0.$i"
    done
    echo "lan: $n host(s) $p-h1..h$n (10.240.0.1..$n on br0), switch $sw (ageing ${ageing} s), client $cl (10.240.0.100)${RATE:+, rate $RATE on each host link}"
}

# ---- WAN ----
# Site i (host hi, i = 1..N; the client is site N+1): underlay 10.241.i.0/24, router .1, site .2;
# the relay's stand-in for site i is 10.241.100.i.
cmd_wan_up() {
    local p="$1" n ageing bps i j h rt="$1-rt" cl="$1-cl" delay="${DELAY_MS:-}" remote site ns
    check_prefix "$p"
    n=$(hosts_count)
    ageing=$(ageing_secs)
    bps=$(rate_from_env)
    if [ -n "$delay" ]; then
        [[ "$delay" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "DELAY_MS must be a number of milliseconds, not '$delay'"
    fi
    local ports="${WAN_TCP_PORTS:-}"
    for j in $ports; do
        [[ "$j" =~ ^[0-9]+$ ]] && [ "$j" -ge 1 ] && [ "$j" -le 65535 ] || die "bad port '$j' in WAN_TCP_PORTS"
        [ "$j" != 4789 ] || die "WAN_TCP_PORTS cannot hold 4789 (VXLAN)"
    done
    [ -z "$ports" ] || [ -n "$delay" ] || die "WAN_TCP_PORTS needs DELAY_MS"
    need_root
    cmd_down "$p"
    new_ns "$rt"
    ip netns exec "$rt" sysctl -qw net.ipv4.ip_forward=1
    local sites=$((n + 1))
    for i in $(seq "$sites"); do
        if [ "$i" -le "$n" ]; then site="h$i" ns="$p-h$i"; else site="cl" ns="$cl"; fi
        new_ns "$ns"
        veth_pair "$rt" "$site" "$ns" wan0
        # room for VXLAN's 50 bytes, so the overlay carries full 1500-byte frames
        ip -n "$rt" link set "$site" mtu 1600 up
        ip -n "$ns" link set wan0 mtu 1600 up
        ip -n "$rt" addr add "10.241.$i.1/24" dev "$site"
        ip -n "$ns" addr add "10.241.$i.2/24" dev wan0
        ip -n "$ns" route add default via "10.241.$i.1"
        ip -n "$rt" addr add "10.241.100.$i/32" dev lo
        apply_rate "$rt" "$site" "$bps"
        apply_rate "$ns" wan0 "$bps"
    done
    for i in $(seq "$sites"); do
        if [ "$i" -le "$n" ]; then ns="$p-h$i"; else ns="$cl"; fi
        ip -n "$ns" link add vx0 type vxlan id 42 local "10.241.$i.2" dstport 4789 learning ageing "$ageing"
        ip -n "$ns" link set vx0 mtu 1500
        # head-end replication: broadcast, multicast and unknown unicast go to every other site
        for j in $(seq "$sites"); do
            [ "$j" = "$i" ] && continue
            if [ -n "$delay" ]; then remote="10.241.100.$j"; else remote="10.241.$j.2"; fi
            bridge -n "$ns" fdb append 00:00:00:00:00:00 dev vx0 dst "$remote"
        done
        if [ "$i" -le "$n" ]; then
            new_bridge "$ns" "$ageing"
            ip -n "$ns" link set vx0 master br0 up
        else
            ip -n "$ns" addr add 10.240.0.100/24 dev vx0
            ip -n "$ns" link set vx0 up
            tx_checksum_off "$ns" vx0
        fi
    done
    if [ -n "$delay" ]; then
        local args=() port
        for i in $(seq "$sites"); do
            args+=(--endpoint "10.241.100.$i:4789=10.241.$i.2:4789")
        done
        mkdir -p "$(state_dir "$p")"
        start_bg "$rt" "$(state_dir "$p")/udp-relay" python3 "$HERE/tools/udp_delay_relay.py" --delay-ms "$delay" "${args[@]}"
        for port in $ports; do
            for i in $(seq "$n"); do
                start_bg "$rt" "$(state_dir "$p")/tcp-relay-h$i-$port" python3 "$HERE/tools/delay_relay.py" \
                    --listen "10.241.100.$i:$port" --connect "10.241.$i.2:$port" --delay-ms "$delay"
            done
        done
    fi
    wait_carrier "$cl" wan0 "$p-h1" wan0
    for i in $(seq "$n"); do
        wait_ping "$cl" "10.241.$i.2"
    done
    echo "wan: $n site(s) $p-h1..h$n (10.241.1..$n.2, br0 + vx0), router $rt, client $cl (10.241.$sites.2; 10.240.0.100 on vx0), VXLAN ageing ${ageing} s${delay:+, underlay delay $delay ms each way through 10.241.100.x}${ports:+, TCP $ports relayed}${RATE:+, rate $RATE on each site link}"
}

# Turns transmit checksum offload off on DEV in NS (ethtool -K DEV tx off, without ethtool: the
# legacy ETHTOOL_STXCSUM ioctl). The client's own TCP and UDP packets would otherwise enter the
# tunnel with only the pseudo-header summed (CHECKSUM_PARTIAL, finished by a NIC that is not
# there); the kernel carries that state to the TAP, but the UDP relay receives the VXLAN payload
# as plain bytes, so the guest would get a wrong checksum.
tx_checksum_off() {
    ip netns exec "$1" python3 -c '
import array, fcntl, socket, struct, sys
buf = array.array("I", [0x17, 0])  # ETHTOOL_STXCSUM, off
fcntl.ioctl(socket.socket(), 0x8946, struct.pack("16sP", sys.argv[1].encode(), buf.buffer_info()[0]))  # SIOCETHTOOL
' "$2" || die "could not turn checksum offload off on $1/$2"
}

# Starts COMMAND in NS in the background, its output in BASE.log, and waits until its ready
# file BASE.ready exists (the command removes it on exit; the process ends with the namespace).
start_bg() {
    local ns="$1" base="$2" i
    shift 2
    local ready="$base.ready" log="$base.log"
    rm -f "$ready"
    # Without the descriptors this script inherited: a caller that waits for its end (Swift's Process
    # watches a socket its child inherits) would otherwise wait for the relay too.
    (close_inherited_fds; exec ip netns exec "$ns" setsid "$@" --ready-file "$ready" </dev/null >"$log" 2>&1) &
    for i in $(seq 100); do
        [ -e "$ready" ] && return 0
        sleep 0.05
    done
    cat "$log" >&2
    die "$(basename "$base") did not start in $ns (log: $log)"
}

# ---- operations on a running topology ----
topology() { # -> lan | wan, or fails
    if ns_exists "$1-sw"; then echo lan; elif ns_exists "$1-rt"; then echo wan; else
        die "no LAN or WAN named $1 (bash scripts/lan.sh up $1)"
    fi
}

cmd_tap() {
    local p="$1" host="$2" tap="$3" ns="$1-$2"
    need_root
    [[ "$host" =~ ^h[0-9]$ ]] && ns_exists "$ns" || die "no host $ns"
    [[ "$tap" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "bad TAP name '$tap' (1-15 characters)"
    if ! ip -n "$ns" link show "$tap" >/dev/null 2>&1; then
        ip -n "$ns" tuntap add dev "$tap" mode tap
    fi
    ip -n "$ns" link set "$tap" master br0 up
}

# normalised MAC: lower case, colons
norm_mac() {
    local m="${1,,}"
    [[ "$m" =~ ^([0-9a-f]{2}:){5}[0-9a-f]{2}$ ]] || die "bad MAC '$1' (expected xx:xx:xx:xx:xx:xx)"
    echo "$m"
}

cmd_fdb() {
    local p="$1" mac topo line dst i
    mac=$(norm_mac "$2")
    need_root
    topo=$(topology "$p")
    if [ "$topo" = lan ]; then
        line=$(bridge -n "$p-sw" fdb show br br0 | awk -v m="$mac" '$1 == m && $2 == "dev" && !/permanent/ {print $3; exit}')
        echo "${line:-none}"
        return
    fi
    dst=$(bridge -n "$p-cl" fdb show dev vx0 | awk -v m="$mac" '$1 == m {for (i = 2; i < NF; i++) if ($i == "dst") {print $(i + 1); exit}}')
    if [ -z "$dst" ]; then echo none; return; fi
    # 10.241.i.2 or the relay's 10.241.100.i stand for site i
    i=$(echo "$dst" | awk -F. '$3 == 100 {print $4; exit} {print $3}')
    if ns_exists "$p-h$i"; then echo "h$i"; else echo "$dst"; fi
}

cmd_ageing() {
    local p="$1" secs topo ns
    secs=$(ageing_secs "$2")
    need_root
    topo=$(topology "$p")
    if [ "$topo" = lan ]; then
        ip -n "$p-sw" link set br0 type bridge ageing_time $((secs * 100))
        return
    fi
    for ns in $(prefix_namespaces "$p"); do
        [ "$ns" = "$p-rt" ] && continue
        ip -n "$ns" link set vx0 type vxlan ageing "$secs"
        if ip -n "$ns" link show br0 >/dev/null 2>&1; then
            ip -n "$ns" link set br0 type bridge ageing_time $((secs * 100))
        fi
    done
}

cmd_flush() {
    local p="$1" topo ns
    need_root
    topo=$(topology "$p")
    if [ "$topo" = lan ]; then
        ip -n "$p-sw" link set br0 type bridge fdb_flush
        return
    fi
    for ns in $(prefix_namespaces "$p"); do
        [ "$ns" = "$p-rt" ] && continue
        # learned VXLAN entries only: the all-zeros flood entries are permanent
        bridge -n "$ns" fdb show dev vx0 | awk '$1 != "00:00:00:00:00:00" && !/permanent/ {print $1}' |
            while read -r mac; do bridge -n "$ns" fdb del "$mac" dev vx0 2>/dev/null || true; done
        if ip -n "$ns" link show br0 >/dev/null 2>&1; then
            ip -n "$ns" link set br0 type bridge fdb_flush
        fi
    done
}

cmd_check() {
    command -v ip >/dev/null || die "ip (iproute2) is not installed"
    command -v bridge >/dev/null || die "bridge (iproute2) is not installed"
    [ "$(id -u)" = 0 ] || die "must run as root to create network namespaces"
    local ns="ternlanchk-$$" err
    err=$(ip netns add "$ns" 2>&1) || die "cannot create a network namespace: $err"
    if ! err=$( { ip -n "$ns" link add br0 type bridge &&
        ip -n "$ns" link add veth0 type veth peer name veth1 &&
        ip -n "$ns" link add vx0 type vxlan id 1 local 127.0.0.1 dstport 4789; } 2>&1); then
        ip netns del "$ns" 2>/dev/null || true
        die "cannot create a bridge, a veth pair or a VXLAN device: $err"
    fi
    ip netns del "$ns"
}

need_args() { [ "$1" -ge "$2" ] || usage; }

case "${1:-}" in
    up) need_args $# 2; cmd_up "$2" ;;
    wan-up) need_args $# 2; cmd_wan_up "$2" ;;
    down) need_args $# 2; check_prefix "$2"; cmd_down "$2" ;;
    tap) need_args $# 4; cmd_tap "$2" "$3" "$4" ;;
    fdb) need_args $# 3; cmd_fdb "$2" "$3" ;;
    ageing) need_args $# 3; cmd_ageing "$2" "$3" ;;
    flush) need_args $# 2; cmd_flush "$2" ;;
    check) cmd_check ;;
    *) usage ;;
esac
