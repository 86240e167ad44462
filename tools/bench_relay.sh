#!/usr/bin/env bash
# Measures tools/delay_relay.py: RTT of a 1-byte ping-pong and bulk transfers both ways, on
# loopback and across two network namespaces (scripts/netns.sh). About a minute; every step
# has a timeout, and the namespaces and processes it starts are removed at the end.
#
#   bash tools/bench_relay.sh [loopback|netns|all]      (default all; netns needs root)
#
# Environment: DELAY_MS=25 (one way), RATE_MBIT=1000, BYTES=500M, PINGS=20,
#   NETNS_PREFIX=ternrb (namespaces ternrb-a, ternrb-b), NETNS_SUBNET=237, PORT=4000 (PORT+1 too).
# Cases: "direct" is the same client and server without the relay (baseline); "relay" adds
# DELAY_MS each way; "relay+cap" adds --rate-mbit RATE_MBIT; "tbf+relay" rate-limits the veth
# pair in the kernel (RATE=...mbit, tbf) and uses the relay for the delay only.
# Columns: median ping RTT; MB/s (1e6 bytes/s) end to end, i.e. from the client's first byte to
# the last byte or the server's answer (includes about one RTT); MB/s as a stream, measured by
# the receiver from its first to its last byte.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-all}"
delay="${DELAY_MS:-25}"
rate="${RATE_MBIT:-1000}"
bytes="${BYTES:-500M}"
pings="${PINGS:-20}"
prefix="${NETNS_PREFIX:-ternrb}"
subnet="${NETNS_SUBNET:-237}"
port="${PORT:-4000}"
case "$mode" in loopback|netns|all) ;; *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2; exit 2 ;; esac

work=$(mktemp -d /tmp/bench_relay.XXXXXX)
pids=()
netns_up=0
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ "$netns_up" = 1 ] && bash scripts/netns.sh down "$prefix"
    rm -rf "$work"
}
trap cleanup EXIT

# inns NAMESPACE|- COMMAND...: runs COMMAND inside a namespace, or here for "-".
inns() { local ns="$1"; shift; if [ "$ns" = - ]; then "$@"; else ip netns exec "$ns" "$@"; fi; }

wait_file() {
    local i
    for i in $(seq 100); do [ -f "$1" ] && return 0; sleep 0.1; done
    echo "bench: $1 did not appear" >&2
    return 1
}

field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

results=()
# measure NAME CLIENT_NS SERVER_NS SERVER_ADDR RELAY_NS(or none) CLIENT_TARGET [RELAY ARGS...]
measure() {
    local name="$1" client_ns="$2" server_ns="$3" server_addr="$4" relay_ns="$5" target="$6"
    shift 6
    rm -f "$work/server.ready" "$work/relay.ready"
    inns "$server_ns" timeout 180 python3 tools/netbench.py serve --listen "$server_addr" \
        --ready-file "$work/server.ready" --max-connections 3 --timeout 170 &
    pids+=($!)
    wait_file "$work/server.ready"
    if [ "$relay_ns" != none ]; then
        inns "$relay_ns" timeout 180 python3 tools/delay_relay.py --connect "$server_addr" \
            --ready-file "$work/relay.ready" --max-connections 3 "$@" 2>"$work/relay.log" &
        pids+=($!)
        wait_file "$work/relay.ready"
    fi
    local ping send recv
    ping=$(inns "$client_ns" timeout 60 python3 tools/netbench.py ping --connect "$target" --count "$pings" --timeout 50)
    send=$(inns "$client_ns" timeout 120 python3 tools/netbench.py send --connect "$target" --bytes "$bytes" --timeout 100)
    recv=$(inns "$client_ns" timeout 120 python3 tools/netbench.py recv --connect "$target" --bytes "$bytes" --timeout 100)
    wait "${pids[@]: -1}" 2>/dev/null || true
    [ "$relay_ns" != none ] && wait "${pids[@]: -2:1}" 2>/dev/null || true
    echo "== $name"
    echo "   $ping"
    echo "   $send"
    echo "   $recv"
    [ "$relay_ns" != none ] && sed 's/^/   /' "$work/relay.log"
    results+=("$(printf '%-32s %9s %12s %12s %12s %12s' "$name" "$(field "$ping" median_ms)" \
        "$(field "$send" rate_MBps)" "$(field "$send" server_rate_MBps)" \
        "$(field "$recv" rate_MBps)" "$(field "$recv" stream_rate_MBps)")")
}

if [ "$mode" = loopback ] || [ "$mode" = all ]; then
    lo="127.0.0.1:$((port + 1))"
    relay="127.0.0.1:$port"
    measure "loopback direct" - - "$lo" none "$lo"
    measure "loopback relay ${delay}ms" - - "$lo" - "$relay" --listen "$relay" --delay-ms "$delay"
    measure "loopback relay ${delay}ms+${rate}Mbit" - - "$lo" - "$relay" --listen "$relay" --delay-ms "$delay" --rate-mbit "$rate"
fi

if [ "$mode" = netns ] || [ "$mode" = all ]; then
    bash scripts/netns.sh check
    netns_up=1
    NETNS_SUBNET="$subnet" bash scripts/netns.sh up "$prefix" >/dev/null
    a="$prefix-a" b="$prefix-b"
    b_addr="10.$subnet.0.2"
    inner="127.0.0.1:$((port + 1))"
    outer="$b_addr:$port"
    measure "netns direct" "$a" "$b" "$b_addr:$((port + 1))" none "$b_addr:$((port + 1))"
    measure "netns relay ${delay}ms" "$a" "$b" "$inner" "$b" "$outer" --listen "$outer" --delay-ms "$delay"
    measure "netns relay ${delay}ms+${rate}Mbit" "$a" "$b" "$inner" "$b" "$outer" --listen "$outer" --delay-ms "$delay" --rate-mbit "$rate"
    RATE="${rate}mbit" NETNS_SUBNET="$subnet" bash scripts/netns.sh up "$prefix" >/dev/null
    measure "netns tbf ${rate}mbit direct" "$a" "$b" "$b_addr:$((port + 1))" none "$b_addr:$((port + 1))"
    measure "netns tbf ${rate}mbit+relay ${delay}ms" "$a" "$b" "$inner" "$b" "$outer" --listen "$outer" --delay-ms "$delay"
fi

echo
echo "bulk: $bytes each way; MB/s = 1e6 bytes/s (x8 = Mbit/s)"
printf '%-32s %9s %12s %12s %12s %12s\n' case "ping ms" "send e2e" "send stream" "recv e2e" "recv stream"
printf '%s\n' "${results[@]}"
