#!/usr/bin/env bash
# Where a pre-copy's downtime goes, from Tern's own debug timings, over N runs:
# the pages of the stop-and-copy sent, the destination ready, pause to resume.
#
#   bash bench/stop_and_copy.sh [RUNS] [GUEST CMDLINE] [-- tern migrate options...]
#   bash bench/stop_and_copy.sh 6 "fill=512 dirty=64 progress=0"
#   bash bench/stop_and_copy.sh 3 "fill=512 dirty=256 pattern=random rate=200 bytes=64 progress=0" -- --bandwidth 100000000 --compress xbzrle
#   DST_ARGS="--memory 1G --prealloc" bash bench/stop_and_copy.sh 4     # options for the destination's tern run
#
# Needs a release build (swift build -c release) and the guest (make -C guest).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-6}
CMDLINE=${2:-"fill=512 dirty=64 progress=0"}
shift $(( $# >= 2 ? 2 : $# ))
[[ ${1:-} == "--" ]] && shift
TERN=${TERN:-.build/release/tern}
GUEST=guest/build/tern-guest.elf
echo "| run | MB | rounds | switch-over | stop-and-copy pages | sent after pause ms | destination ready ms | downtime ms |"
echo "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"
for run in $(seq 1 "$RUNS"); do
    work=$(mktemp -d)
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    $TERN run --insecure --incoming "tcp:127.0.0.1:$port" --api-socket "$work/d.sock" --serial off --log-level debug ${DST_ARGS:-} 2> "$work/dst.log" &
    dst=$!
    $TERN run --kernel $GUEST --memory 1G --cmdline "$CMDLINE" --api-socket "$work/s.sock" --serial off --log-level debug 2> "$work/src.log" &
    src=$!
    sleep 4
    $TERN migrate --insecure --api-socket "$work/s.sock" --to "tcp:127.0.0.1:$port" --json "$@" > "$work/report.json" || true
    kill $src $dst 2>/dev/null || true
    wait $src $dst 2>/dev/null || true
    sent=$(grep -o "[0-9]* pages sent [0-9]* ms after the pause" "$work/src.log" | head -1)
    ready=$(grep -o "destination was ready [0-9]* ms" "$work/src.log" | grep -o "[0-9]*" | head -1)
    python3 - "$work/report.json" "$run" "$sent" "${ready:--}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
sent = sys.argv[3].split()
print("| %s | %.0f | %d | %s | %s | %s | %s | %.1f |" % (sys.argv[2], r["transferred_bytes"] / 1e6, len(r["rounds"]), r.get("switchover_reason", "-"),
      sent[0] if sent else "-", sent[3] if sent else "-", sys.argv[4], r.get("downtime_ms") or -1))
PY
    rm -rf "$work"
done
