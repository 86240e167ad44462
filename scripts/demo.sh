#!/usr/bin/env bash
# Sets up a fresh machine and boots Tern's bundled test guest, showing its
# progress on the serial console and its status block through the API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release
tern=.build/release/tern
socket=$(mktemp -u /tmp/tern-demo.XXXXXX.sock)

echo "== booting the test guest: 1 GiB of RAM, fill 256 MiB, then dirty 64 MiB at random at 200 MB/s"
$tern run --kernel guest/build/tern-guest.elf --memory 1G \
    --cmdline "fill=256 dirty=64 pattern=random rate=200 progress=1" --api-socket "$socket" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
sleep 3
echo "== tern info"
$tern info --api-socket "$socket"
echo "== the guest's status block (docs/GUEST.md), read through the API"
$tern memory read --api-socket "$socket" --addr 0x102000 --length 0x60
echo "== pause, resume, quit"
$tern pause --api-socket "$socket" && $tern info --api-socket "$socket" | head -1
sleep 1
$tern resume --api-socket "$socket" && $tern info --api-socket "$socket" | head -1
sleep 1
$tern quit --api-socket "$socket"
wait $pid
trap - EXIT
echo "== done"
