#!/bin/bash
# One pre-copy migration of the bundled guest between two tern processes on
# loopback, with options for each side; prints the round-by-round numbers the
# docs quote (docs/MIGRATION.md, "Pages that did not change" and "Pre-copy").
#
#   bash bench/two_tern.sh "GUEST CMDLINE" ["SOURCE RUN ARGS"] ["DESTINATION RUN ARGS"] ["MIGRATE ARGS"]
#   e.g. bash bench/two_tern.sh "fill=512 dirty=256 pattern=random rate=200 progress=0" "--thp off" "" "--order sequential"
#
# TERN (default .build/release/tern) picks the binary; WARMUP_S (default 7) is
# how long the guest runs (its fill, then dirtying) before the migration; TLS=1
# migrates over mutual TLS (certificates made for the run) instead of in clear.
set -euo pipefail
cd "$(dirname "$0")/.."
tern=${TERN:-.build/release/tern}
[ -x "$tern" ] || { echo "two_tern.sh: no $tern (bash scripts/setup.sh release)" >&2; exit 1; }
dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
channel_dst=(--insecure) channel_src=(--insecure)
if [ "${TLS:-0}" = 1 ]; then
    $tern certs init "$dir/tls-src" --name source.local > /dev/null
    $tern certs init "$dir/tls-dst" --name destination.local --ca "$dir/tls-src" > /dev/null
    channel_dst=(--tls-dir "$dir/tls-dst") channel_src=(--tls-dir "$dir/tls-src")
fi
$tern run "${channel_dst[@]}" --incoming tcp:127.0.0.1:$port --api-socket "$dir/dst.sock" ${3:-} > "$dir/dst.log" 2>&1 &
$tern run --kernel guest/build/tern-guest.elf --memory 1G --cpus 1 --cmdline "$1" \
    --api-socket "$dir/src.sock" ${2:-} > "$dir/src.log" 2>&1 &
sleep "${WARMUP_S:-7}"
$tern migrate "${channel_src[@]}" --api-socket "$dir/src.sock" --to tcp:127.0.0.1:$port --json ${4:-} > "$dir/report.json" \
    || { echo "two_tern.sh: the migration failed:" >&2; cat "$dir/report.json" >&2; exit 1; }
python3 - "$dir/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
first = r["rounds"][0]
print("status %s (%s): total %.0f ms, downtime %.1f ms, %.0f MB, %d rounds" % (
    r["status"], r.get("switchover_reason"), r["total_ms"], r["downtime_ms"] or 0, r["transferred_bytes"] / 1e6, len(r["rounds"])))
print("first pass %.0f ms, %d dirty pages after it; unchanged pages %s, re-sent %s, re-send probe %s" % (
    first["duration_ms"], first["dirty_pages"], r.get("unchanged_pages", 0), r.get("resent_pages"), r.get("resend_probe_pages", 0)))
print("rounds (pages, dirty after, predicted ms):", [(x["pages"], x["dirty_pages"], round(x["predicted_downtime_ms"])) for x in r["rounds"]])
if r.get("verification"):
    print("verify: match" if r["verification"]["match"] else "verify: MISMATCH")
PY
grep -ho "re-send probe: .*" "$dir/src.log" || true   # with "--log-level debug" among the source arguments
$tern quit --api-socket "$dir/dst.sock" > /dev/null 2>&1 || true
