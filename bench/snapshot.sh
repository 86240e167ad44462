#!/usr/bin/env bash
# Snapshot and restore speed of a 1 GiB guest holding 512 MiB of non-zero data,
# to a file on tmpfs (/dev/shm), with the release build.
#   bash bench/snapshot.sh [runs]        (default 3 runs; prints a Markdown table)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
bash scripts/setup.sh release >/dev/null
tern=.build/release/tern
work=$(mktemp -d /dev/shm/tern-bench.XXXXXX)
trap 'rm -rf "$work"; kill $(jobs -p) 2>/dev/null || true' EXIT

echo "| run | file MB | snapshot s | snapshot MB/s | restore s | restore MB/s |"
echo "| --- | --- | --- | --- | --- | --- |"
for run in $(seq "$runs"); do
    sock="$work/src.sock"
    $tern run --kernel guest/build/tern-guest.elf --memory 1G --cmdline "fill=512 progress=0" \
        --serial off --api-socket "$sock" 2>/dev/null &
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    # Wait for the fill to finish (phase 3 = idle at offset 0x0C of the status block).
    for _ in $(seq 200); do
        phase=$($tern memory read --api-socket "$sock" --addr 0x10200c --length 1 --out - 2>/dev/null | od -An -tu1 | tr -d ' ')
        [ "$phase" = "3" ] && break
        sleep 0.1
    done
    snap=$($tern snapshot --api-socket "$sock" --to "$work/vm.snap" --json)
    $tern quit --api-socket "$sock"
    wait
    read -r bytes seconds < <(python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["file_bytes"], s["seconds"])' <<<"$snap")

    dsock="$work/dst.sock"
    log=$($tern run --restore "$work/vm.snap" --paused --serial off --api-socket "$dsock" 2>&1 &
          for _ in $(seq 100); do [ -S "$dsock" ] && $tern info --api-socket "$dsock" >/dev/null 2>&1 && break; sleep 0.05; done
          $tern quit --api-socket "$dsock"; wait)
    restore_s=$(grep -o 'MB in [0-9.]* s' <<<"$log" | awk '{print $3}')
    python3 - "$run" "$bytes" "$seconds" "$restore_s" <<'PY'
import sys
run, size, snap, restore = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
mb = size / 1e6
print(f"| {run} | {mb:.0f} | {snap:.3f} | {mb / snap:.0f} | {restore:.3f} | {mb / restore:.0f} |")
PY
    rm -f "$work/vm.snap"
done
