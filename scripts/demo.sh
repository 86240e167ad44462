#!/usr/bin/env bash
# The main job: sets up a fresh machine, boots Tern's bundled test guest in one
# tern process, live-migrates it to a second tern process over TCP on
# loopback, prints the migration report, and shows the guest still running on
# the destination. The migration runs over mutual TLS 1.3 with certificates
# made for the two "hosts" by `tern certs init`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release
tern=.build/release/tern
work=$(mktemp -d /tmp/tern-demo.XXXXXX)
port=$((20000 + RANDOM % 20000))
cleanup() {
    $tern quit --api-socket "$work/dst.sock" >/dev/null 2>&1 || true
    $tern quit --api-socket "$work/src.sock" >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

status() { # iterations, passes, verified, errors of the guest behind API socket $1
    $tern memory read --api-socket "$1" --addr 0x102000 --length 0x48 --out - |
        python3 -c 'import struct,sys; b=sys.stdin.buffer.read(); print("iterations=%d passes=%d verified=%d errors=%d" % (struct.unpack_from("<Q",b,0x10)[0], *struct.unpack_from("<QQQ",b,0x30)))'
}

echo "== certificates: tern certs init (a CA, and one certificate each for the source and the destination)"
$tern certs init "$work/tls-src" --name source.local
$tern certs init "$work/tls-dst" --name destination.local --ca "$work/tls-src"
echo "== destination: tern run --incoming tcp:127.0.0.1:$port --tls-dir ... --tls-allow source.local"
$tern run --incoming "tcp:127.0.0.1:$port" --tls-dir "$work/tls-dst" --tls-allow source.local \
    --api-socket "$work/dst.sock" --serial "file:$work/dst-serial.log" &
echo "== source: a 1 GiB guest filling 512 MiB, then rewriting 64 MiB at random at 200 MB/s"
$tern run --kernel guest/build/tern-guest.elf --memory 1G --api-socket "$work/src.sock" --serial "file:$work/src-serial.log" \
    --cmdline "fill=512 dirty=64 pattern=random rate=200 progress=1" &
for _ in $(seq 100); do [ -S "$work/src.sock" ] && grep -q "phase=dirty" "$work/src-serial.log" 2>/dev/null && break; sleep 0.1; done
sleep 2
echo "   source guest: $(status "$work/src.sock")"

echo "== tern migrate --to tcp:127.0.0.1:$port --tls-dir ... --verify"
$tern migrate --api-socket "$work/src.sock" --to "tcp:127.0.0.1:$port" --tls-dir "$work/tls-src" --tls-allow destination.local \
    --max-downtime 300 --verify

sleep 1
echo "== the guest runs on the destination now (its own checksum of its working set holds):"
echo "   $(status "$work/dst.sock")"
sleep 1
echo "   $(status "$work/dst.sock")"
echo "== destination serial console, last lines:"
tail -n 3 "$work/dst-serial.log"
