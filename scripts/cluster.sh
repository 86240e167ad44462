#!/usr/bin/env bash
# A cluster of tern hosts on one machine, for the cluster tests, the benchmark and the demo:
# scripts/lan.sh's LAN of network namespaces, a `ternd agent` on each host, and a
# `ternd controller` (SQLite store) in the client namespace, all with certificates and a token
# key made for the occasion. Nothing leaves the namespaces.
#
#   bash scripts/cluster.sh up PREFIX DIR        make the LAN (LAN_HOSTS hosts, default 4), DIR/certs/*,
#                                                DIR/token, start the agents and the controller, add the hosts
#   bash scripts/cluster.sh agent PREFIX DIR N   (re)start host N's agent (after `kill`, it adopts its VMs)
#   bash scripts/cluster.sh controller PREFIX DIR [N]  (re)start controller N (default 1) on its store
#   bash scripts/cluster.sh etcd PREFIX DIR      (re)start etcd (ETCD=1 clusters)
#   bash scripts/cluster.sh down PREFIX DIR      stop everything and remove the namespaces (DIR is kept)
#
# Host i is PREFIX-hi at 10.240.0.i, its agent on 10.240.0.i:7400, state in DIR/hi, log DIR/hi/agent.log,
# pid DIR/hi/agent.pid; each may hold AGENT_MEMORY of VMs (default 2G); AGENT_ARGS adds to its command line. The controller's socket is
# DIR/controller.sock (TERN_CONTROLLER=DIR/controller.sock tern cluster ...), its log DIR/controller.log and pid
# DIR/controller.pid; CONTROLLER_ARGS adds to its command line (limits, timeouts, --verify). Its web page,
# GET routes and /metrics are on CONTROLLER_HTTP (default 127.0.0.1:8080) inside PREFIX-cl:
# ip netns exec PREFIX-cl curl http://127.0.0.1:8080/metrics
# With ETCD=1: etcd in PREFIX-cl on http://10.240.0.100:2379 (data DIR/etcd, log DIR/etcd.log, pid DIR/etcd.pid);
# the agents keep liveness leases there, and CONTROLLERS (default 1) controllers named c1, c2, ... share it
# (controller N: socket DIR/controllerN.sock for N > 1, web page on port 8079+N, log DIR/controllerN.log).
set -euo pipefail
# shellcheck source=scripts/netns-common.sh
. "$(dirname "${BASH_SOURCE[0]}")/netns-common.sh"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
# The binaries: TERN_BIN_DIR, else the debug build (the tests'), else the release build (setup.sh release).
if [ -n "${TERN_BIN_DIR:-}" ]; then BIN="$TERN_BIN_DIR"
elif [ -x "$HERE/.build/debug/ternd" ]; then BIN="$HERE/.build/debug"
else BIN="$HERE/.build/release"; fi

die() { echo "cluster: $*" >&2; exit 1; }

ETCD_URL=http://10.240.0.100:2379

start_etcd() {
    local prefix="$1" dir="$2"
    command -v etcd >/dev/null || die "etcd is not installed (scripts/setup.sh installs etcd-server)"
    (
        close_inherited_fds
        exec ip netns exec "$prefix-cl" etcd --name tern --data-dir "$dir/etcd" --listen-client-urls "$ETCD_URL" \
            --advertise-client-urls "$ETCD_URL" --listen-peer-urls http://127.0.0.1:2380 \
            --initial-advertise-peer-urls http://127.0.0.1:2380 --initial-cluster tern=http://127.0.0.1:2380 >>"$dir/etcd.log" 2>&1
    ) &
    echo $! >"$dir/etcd.pid"
    for _ in $(seq 100); do
        ip netns exec "$prefix-cl" curl -sf -X POST "$ETCD_URL/v3/kv/range" -d '{"key":"AA=="}' >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "etcd did not start: $(tail -3 "$dir/etcd.log")"
}

start_agent() {
    local prefix="$1" dir="$2" i="$3" etcd=()
    mkdir -p "$dir/h$i"
    [ -n "${ETCD:-}" ] && etcd=(--etcd "$ETCD_URL")
    (
        close_inherited_fds
        exec ip netns exec "$prefix-h$i" "$BIN/ternd" agent --name "h$i" --listen "10.240.0.$i:7400" \
            --tls-dir "$dir/certs/h$i" --token-key "$dir/token/token.pub" --state-dir "$dir/h$i" \
            --memory "${AGENT_MEMORY:-2G}" --tern "$BIN/tern" "${etcd[@]}" ${AGENT_ARGS:-} >>"$dir/h$i/agent.log" 2>&1
    ) &
    echo $! >"$dir/h$i/agent.pid"
}

# Controller N's socket, log and pid file names (controller 1 keeps the plain names).
controller_file() { if [ "$2" = 1 ]; then echo "$1/controller.$3"; else echo "$1/controller$2.$3"; fi; }

start_controller() {
    local prefix="$1" dir="$2" n="${3:-1}" store socket log
    socket=$(controller_file "$dir" "$n" sock) log=$(controller_file "$dir" "$n" log)
    store=(--store "$dir/controller.sqlite")
    [ -n "${ETCD:-}" ] && store=(--etcd "$ETCD_URL" --name "c$n")
    rm -f "$socket"
    # shellcheck disable=SC2086
    (
        close_inherited_fds
        exec ip netns exec "$prefix-cl" "$BIN/ternd" controller "${store[@]}" \
            --api-socket "$socket" --tls-dir "$dir/certs/controller" --token-key "$dir/token/token.key" \
            --http "127.0.0.1:$((8079 + n))" ${CONTROLLER_ARGS:-} >>"$log" 2>&1
    ) &
    echo $! >"$(controller_file "$dir" "$n" pid)"
    for _ in $(seq 100); do
        [ -S "$socket" ] && return 0
        sleep 0.05
    done
    die "controller $n did not start: $(tail -3 "$log")"
}

wait_agent() {
    local dir="$1" i="$2"
    for _ in $(seq 100); do
        grep -q "agent serving" "$dir/h$i/agent.log" 2>/dev/null && return 0
        sleep 0.05
    done
    die "agent h$i did not start: $(tail -3 "$dir/h$i/agent.log")"
}

cmd="${1:-}"
case "$cmd" in
up)
    [ $# -eq 3 ] || die "usage: cluster.sh up PREFIX DIR"
    prefix="$2" dir="$3" hosts="${LAN_HOSTS:-4}"
    [ -x "$BIN/ternd" ] && [ -x "$BIN/tern" ] || die "no ternd/tern in $BIN (swift build)"
    mkdir -p "$dir"
    LAN_HOSTS="$hosts" bash "$HERE/scripts/lan.sh" up "$prefix" >/dev/null
    if [ ! -f "$dir/certs/controller/cert.pem" ]; then
        "$BIN/tern" certs init "$dir/certs/ca" --name tern-ca >/dev/null
        "$BIN/tern" certs init "$dir/certs/controller" --name controller --ca "$dir/certs/ca" >/dev/null
        for i in $(seq "$hosts"); do "$BIN/tern" certs init "$dir/certs/h$i" --name "h$i" --ca "$dir/certs/ca" >/dev/null; done
        "$BIN/tern" token init "$dir/token" >/dev/null
    fi
    [ -n "${ETCD:-}" ] && start_etcd "$prefix" "$dir"
    for i in $(seq "$hosts"); do start_agent "$prefix" "$dir" "$i"; done
    for i in $(seq "$hosts"); do wait_agent "$dir" "$i"; done
    start_controller "$prefix" "$dir" 1
    # The first controller leads before a second one starts (with etcd, only the leader writes).
    for _ in $(seq 100); do
        "$BIN/tern" cluster status --controller "$dir/controller.sock" 2>/dev/null | grep -q leading && break
        sleep 0.1
    done
    for n in $(seq 2 "${CONTROLLERS:-1}"); do start_controller "$prefix" "$dir" "$n"; done
    for i in $(seq "$hosts"); do
        "$BIN/tern" cluster add-host --controller "$dir/controller.sock" "h$i" "10.240.0.$i:7400" >/dev/null
    done
    echo "cluster: $hosts hosts up; TERN_CONTROLLER=$dir/controller.sock tern cluster hosts"
    ;;
agent)
    [ $# -eq 4 ] || die "usage: cluster.sh agent PREFIX DIR N"
    start_agent "$2" "$3" "$4"
    wait_agent "$3" "$4"
    ;;
controller)
    [ $# -ge 3 ] || die "usage: cluster.sh controller PREFIX DIR [N]"
    start_controller "$2" "$3" "${4:-1}"
    ;;
etcd)
    [ $# -eq 3 ] || die "usage: cluster.sh etcd PREFIX DIR"
    start_etcd "$2" "$3"
    ;;
down)
    [ $# -eq 3 ] || die "usage: cluster.sh down PREFIX DIR"
    bash "$HERE/scripts/lan.sh" down "$2"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
