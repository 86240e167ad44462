#!/usr/bin/env bash
# Where the CPU of one pre-copy goes: `perf record -a` around `tern migrate` of a
# filled 1 GiB guest (host memory warmed first, as bench/migration.py --warm-host-gib 2
# does), then the samples per thread and the top symbols of the two busiest threads
# (the destination's receive thread and the source's sender).
#
#   bash bench/profile.sh ["GUEST CMDLINE"] [-- tern run options for both sides]
#   bash bench/profile.sh "fill=960 dirty=16 pattern=hotspot progress=0" -- --thp off
#   MIGRATE_ARGS="--mode postcopy" bash bench/profile.sh "fill=512 dirty=256 pattern=random rate=200 bytes=64 progress=0"
#
# TLS=1 migrates over mutual TLS (certificates made for the run) instead of in clear.
# Needs perf (linux-perf), a release build and the guest. The perf data stays in
# $PROFILE_OUT (default /tmp/tern-profile.data).
set -euo pipefail
cd "$(dirname "$0")/.."
CMDLINE="fill=960 dirty=16 pattern=hotspot progress=0"
if [[ $# -gt 0 && $1 != "--" ]]; then CMDLINE=$1; shift; fi
if [[ ${1:-} == "--" ]]; then shift; fi
OUT=${PROFILE_OUT:-/tmp/tern-profile.data}
TERN=.build/release/tern
GUEST=guest/build/tern-guest.elf
work=$(mktemp -d)
trap 'kill $src $dst 2>/dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
$TERN run --kernel $GUEST --memory 1G --cmdline "$CMDLINE" --api-socket "$work/s.sock" --serial off "$@" 2> "$work/src.log" &
src=$!
sleep 5
python3 -c "
import mmap
m = mmap.mmap(-1, 2 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for o in range(0, 2 << 30, 4 << 20): m[o:o + (4 << 20)] = b'\x01' * (4 << 20)
"
channel_dst=(--insecure) channel_src=(--insecure)
if [ "${TLS:-0}" = 1 ]; then
    $TERN certs init "$work/tls-src" --name source.local > /dev/null
    $TERN certs init "$work/tls-dst" --name destination.local --ca "$work/tls-src" > /dev/null
    channel_dst=(--tls-dir "$work/tls-dst") channel_src=(--tls-dir "$work/tls-src")
fi
$TERN run "${channel_dst[@]}" --incoming "tcp:127.0.0.1:$port" --api-socket "$work/d.sock" --serial off "$@" 2> "$work/dst.log" &
dst=$!
sleep 0.5
perf record -q -a -g -o "$OUT" -- $TERN migrate "${channel_src[@]}" --api-socket "$work/s.sock" --to "tcp:127.0.0.1:$port" --json ${MIGRATE_ARGS:-} > "$work/report.json" 2>/dev/null
python3 -c "
import json; r = json.load(open('$work/report.json'))
print('status %s, total %.0f ms, downtime %.1f ms, %.0f MB, rounds (pages, ms): %s' % (r['status'], r['total_ms'], r['downtime_ms'] or -1,
      r['transferred_bytes'] / 1e6, [(x['pages'], round(x['duration_ms'])) for x in r['rounds']]))"
echo "samples per thread (perf's cpu-clock, 4 kHz; the guest's own execution is not sampled):"
perf script -i "$OUT" -F comm,tid 2>/dev/null | sort | uniq -c | sort -rn | head -6
for tid in $(perf script -i "$OUT" -F comm,tid 2>/dev/null | sort | uniq -c | sort -rn | awk '$2 != "swapper" {print $3}' | head -${TOP_THREADS:-2}); do
    echo "thread $tid, top symbols:"
    perf report -i "$OUT" --no-children --tid "$tid" --percentage relative --sort dso,sym -g none --stdio 2>/dev/null | grep -v "^#" | grep -v "^$" | head -8
done
