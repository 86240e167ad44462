#!/usr/bin/env bash
# The main job: sets up a fresh machine, boots Tern's bundled test guest in one
# tern process, live-migrates it to a second tern process, prints the migration
# report, and shows the guest still running on the destination. The two tern
# processes run on two "hosts" of a LAN on this machine (network namespaces
# behind a learning switch, scripts/lan.sh); the guest has a NIC on its host's
# bridge, and a client on the switch probes it every millisecond through the
# move (`tern probe`). The migration runs over mutual TLS 1.3 with certificates
# made for the two hosts by `tern certs init`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh release
tern=.build/release/tern
work=$(mktemp -d /tmp/tern-demo.XXXXXX)
port=$((20000 + RANDOM % 20000))
lan="demo$$"
cleanup() {
    $tern quit --api-socket "$work/dst.sock" >/dev/null 2>&1 || true
    $tern quit --api-socket "$work/src.sock" >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    bash scripts/lan.sh down "$lan" >/dev/null 2>&1 || true
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
echo "== a LAN: hosts $lan-h1 (10.240.0.1) and $lan-h2 (10.240.0.2) behind a switch, a client $lan-cl, a TAP on each host"
bash scripts/lan.sh up "$lan" >/dev/null
bash scripts/lan.sh tap "$lan" h1 tapa
bash scripts/lan.sh tap "$lan" h2 tapb
echo "== destination on h2: tern run --incoming tcp:10.240.0.2:$port --tls-dir ... --tls-allow source.local --net id=net0,tap=tapb"
ip netns exec "$lan-h2" $tern run --incoming "tcp:10.240.0.2:$port" --tls-dir "$work/tls-dst" --tls-allow source.local \
    --net id=net0,tap=tapb --api-socket "$work/dst.sock" --serial "file:$work/dst-serial.log" &
echo "== source on h1: a 1 GiB guest at 10.240.0.10 filling 512 MiB, then rewriting 64 MiB at random at 200 MB/s"
ip netns exec "$lan-h1" $tern run --kernel guest/build/tern-guest.elf --memory 1G --api-socket "$work/src.sock" \
    --serial "file:$work/src-serial.log" --net tap=tapa,mac=52:54:00:7e:00:01 \
    --cmdline "fill=512 dirty=64 pattern=random rate=200 progress=1 ip=10.240.0.10/24" &
for _ in $(seq 100); do [ -S "$work/src.sock" ] && grep -q "phase=dirty" "$work/src-serial.log" 2>/dev/null && break; sleep 0.1; done
sleep 2
echo "   source guest: $(status "$work/src.sock")"

ip netns exec "$lan-cl" ping -c 2 -i 0.2 -W 1 10.240.0.10 >/dev/null
echo "== client: tern probe 10.240.0.10 (UDP echo every 1 ms, 12 s)"
ip netns exec "$lan-cl" $tern probe 10.240.0.10 --duration 12 --migration-report "$work/report.json" \
    --api-socket "$work/dst.sock" >"$work/probe.txt" 2>&1 &
probe=$!
sleep 1

echo "== tern migrate --to tcp:10.240.0.2:$port --tls-dir ... --verify"
$tern migrate --api-socket "$work/src.sock" --to "tcp:10.240.0.2:$port" --tls-dir "$work/tls-src" --tls-allow destination.local \
    --max-downtime 300 --verify --save-report "$work/report.json"

sleep 1
echo "== the guest runs on the destination now (its own checksum of its working set holds):"
echo "   $(status "$work/dst.sock")"
sleep 1
echo "   $(status "$work/dst.sock")"
echo "== destination serial console, last lines:"
tail -n 3 "$work/dst-serial.log"
echo "== what the client saw (tern probe):"
wait "$probe" || true
cat "$work/probe.txt"
