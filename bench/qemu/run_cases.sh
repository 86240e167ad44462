#!/bin/sh
# Runs the reference set of QEMU migration cases, one JSON line per case,
# into $OUT (default: bench/qemu/results-<date>.jsonl). Run from the repo root
# after `make -C guest`. Each case takes ~10-20 s (the two 100 MB/s cases up
# to ~70 s: they may not converge and stop at their 60 s timeout).
# REPEAT=n runs the whole set n times.
set -u
G=${GUEST:-guest/build/tern-guest.elf}
M=${MEMORY:-1024}
OUT=${OUT:-bench/qemu/results-$(date +%Y%m%d-%H%M%S).jsonl}
PY="python3 bench/qemu/qemu_migrate.py --guest $G --memory $M --max-downtime-ms 300"
RND="fill=512 dirty=256 pattern=random rate=200 progress=0"
run() { # name, args...
	name=$1; shift
	echo "== $name" >&2
	$PY "$@" | python3 -c 'import json,sys; d=json.load(sys.stdin); d["case"]=sys.argv[1]; print(json.dumps(d))' "$name" >>"$OUT"
}
for rep in $(seq ${REPEAT:-1}); do
run idle              --cmdline "progress=0"
run hotspot960        --cmdline "fill=960 dirty=16 pattern=hotspot progress=0"
run seq64-flat        --cmdline "fill=512 dirty=64 progress=0"
run random256-r200    --cmdline "$RND"
run random256-r200-bw100M --cmdline "$RND" --bandwidth 100000000 --timeout-s 60
run random256-r200-bw100M-autoconv --cmdline "$RND" --bandwidth 100000000 --timeout-s 60 --auto-converge
run random256-r200-xbzrle --cmdline "$RND" --xbzrle-cache-mib 256
run random256-r200-multifd4 --cmdline "$RND" --multifd 4
run seq64-flat-postcopy --cmdline "fill=512 dirty=64 progress=0" --mode postcopy
run seq64-flat-postcopy-now --cmdline "fill=512 dirty=64 progress=0" --mode postcopy --postcopy-after-syncs 0
run random256-r200-postcopy --cmdline "$RND" --mode postcopy
done
echo "results: $OUT" >&2
