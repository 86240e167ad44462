#!/bin/sh
# Boots the test guests under QEMU and checks their serial output.
#   guest/tools/qemu-smoke.sh [kvm|tcg]     (after make -C guest)
# Needs qemu-system-x86_64 (Debian: qemu-system-x86). Each case runs a few
# seconds; the whole script takes about three minutes on KVM. The disk cases
# boot QEMU's microvm machine with a virtio-blk device on a scratch image; the
# network case (root, iproute2 and python3 only, else skipped) runs QEMU in a
# network namespace of its own with a TAP and pings the guest from inside it,
# echoes UDP and a TCP stream, and checks that a closed TCP port is refused.
set -u
ACCEL=${1:-kvm}
HERE=$(cd "$(dirname "$0")/.." && pwd)
ELF=$HERE/build/tern-guest.elf
AOUT=$HERE/build/aout-hello.bin
OUT=$(mktemp)
IMG=$(mktemp)
NS=ternsmoke$$
trap 'rm -f "$OUT" "$IMG"; ip netns del "$NS" 2>/dev/null' EXIT
fails=0

# run SECONDS MEM KERNEL APPEND: serial output in $OUT, QEMU's status in $rc
run() {
	timeout "$1" qemu-system-x86_64 -accel "$ACCEL" -m "$2" -kernel "$3" -append "$4" \
		-serial stdio -display none -no-reboot -monitor none >"$OUT" 2>/dev/null
	rc=$?
}
# runm SECONDS APPEND [QEMU ARGS]: the same on microvm, modern virtio-mmio
runm() {
	t=$1 a=$2
	shift 2
	timeout "$t" qemu-system-x86_64 -M microvm -accel "$ACCEL" -m 256M -nodefaults -nographic \
		-no-reboot -global virtio-mmio.force-legacy=false -kernel "$ELF" -append "$a" \
		-serial stdio "$@" >"$OUT" 2>/dev/null
	rc=$?
}
blk() { # [DRIVE OPTIONS]: a virtio-blk device on $IMG
	echo -device virtio-blk-device,drive=d0 -drive "id=d0,file=$IMG,format=raw,if=none,cache=none${1-}"
}
check() { # NAME: fails unless every further argument is a pattern found in $OUT
	name=$1
	shift
	for pat in "$@"; do
		if ! grep -Eq -- "$pat" "$OUT"; then
			echo "FAIL $name: no match for /$pat/"
			sed 's/^/    | /' "$OUT"
			fails=$((fails + 1))
			return
		fi
	done
	echo "ok   $name"
}
refuse() { # NAME PATTERN: fails if PATTERN is in $OUT
	if grep -Eq -- "$2" "$OUT"; then
		echo "FAIL $1: unexpected /$2/"
		fails=$((fails + 1))
	fi
}

run 10 128 "$AOUT" "hi there"
check aout-hello "^aout-hello: multiboot ok, cmdline=.*hi there$"
[ "$rc" = 0 ] || { echo "FAIL aout-hello: QEMU did not exit on reset (rc=$rc)"; fails=$((fails + 1)); }

for pat in seq random hotspot; do
	run 12 1024 "$ELF" "fill=64 dirty=32 pattern=$pat rate=200 progress=1"
	check "dirty $pat" "^tern-guest: mem=1024MiB tsc_khz=[0-9]+ cmdline=" \
		"pattern=$pat rate=200MB/s" "^tern-guest: fill done: 64 MiB" \
		"^tern-guest: phase=dirty iter=[1-9][0-9]* passes=[1-9][0-9]* verified=[1-9][0-9]* errors=0$"
	refuse "dirty $pat" "MISMATCH|exception"
done

run 12 1024 "$ELF" "fill=16 dirty=16 pattern=random bytes=8 verify=3"
check "bytes=8" "bytes=8 verify=3" "phase=dirty .* verified=[1-9][0-9]* errors=0$"
refuse "bytes=8" "MISMATCH|exception"

run 10 1024 "$ELF" "progress=1"
check idle "workload: fill=0MiB dirty=0MiB \(idle\)" "^tern-guest: phase=idle iter=[1-9][0-9]* passes=0"

run 15 1024 "$ELF" "fill=960 progress=0"
check fill-960 "^tern-guest: fill done: 960 MiB in [0-9]+ ms \([0-9]+ MiB/s\)"

run 10 1024 "$ELF" "crash=triple"
check crash-triple "crash=triple: ud2 with an empty IDT"
[ "$rc" = 0 ] || { echo "FAIL crash-triple: QEMU did not exit (rc=$rc)"; fails=$((fails + 1)); }

run 8 1024 "$ELF" "crash=ud"
check crash-ud "^tern-guest: exception 6 at rip=0x[0-9a-f]+ err=0x0 cr2=0x0 \(ring 0\)$"

run 8 1024 "$ELF" "crash=pf"
check crash-pf "^tern-guest: exception 14 at rip=0x[0-9a-f]+ err=0x4 cr2=0x40000000000 \(ring 3\)$"

run 8 1024 "$ELF" "fill=1100"
check too-big "^tern-guest: error: fill/dirty need RAM"
refuse too-big "fill done"

run 8 1024 "$ELF" "fill=1 colour=blue"
check unknown-key "^tern-guest: error: unknown key in 'colour=blue'$"

run 8 1024 "$ELF" "dirty=4 bytes=12"
check bad-bytes "^tern-guest: error: bytes must be"

# ---- disk (microvm, virtio-blk) ----
truncate -s 0 "$IMG" && truncate -s 64M "$IMG"
DISK_LINE="disk_ops=[1-9][0-9]* disk_errors=0 disk_verified=[1-9][0-9]*$"
runm 8 "disk=write disk_pattern=rand disk_flush=16 progress=1" $(blk)
check "disk write rand" "^tern-guest: disk: virtio-blk at 0xfeb[0-9a-f]+: 131072 sectors \(64 MiB\)" \
	"^tern-guest: phase=idle iter=[1-9][0-9]* .* $DISK_LINE"
refuse "disk write rand" "MISMATCH|DISK ERROR|exception|error:"

runm 8 "disk=write disk_blocks=4096 progress=1" $(blk)
check "disk write seq" "using 4096 blocks of 4096 bytes" "$DISK_LINE"
refuse "disk write seq" "MISMATCH|DISK ERROR|exception|error:"

runm 8 "disk=read disk_blocks=4096 progress=1" $(blk) # verified through the sectors' own headers
check "disk read" "disk=read" "$DISK_LINE"
refuse "disk read" "MISMATCH|DISK ERROR|exception|error:"

runm 8 "fill=32 dirty=16 pattern=random rate=100 disk=write disk_block=1048576 disk_pattern=rand disk_rate=20 progress=1" $(blk)
check "disk 1MiB + dirty" "using 64 blocks of 1048576 bytes" \
	"^tern-guest: phase=dirty .* verified=[1-9][0-9]* errors=0 $DISK_LINE"
refuse "disk 1MiB + dirty" "MISMATCH|DISK ERROR|exception|error:"

# zeros written behind the guest's back must be found
timeout 12 qemu-system-x86_64 -M microvm -accel "$ACCEL" -m 256M -nodefaults -nographic -no-reboot \
	-global virtio-mmio.force-legacy=false -kernel "$ELF" -serial stdio $(blk) \
	-append "disk=write disk_pattern=rand disk_blocks=2048 disk_rate=1 disk_verify=1 progress=1" \
	>"$OUT" 2>/dev/null &
sleep 6
dd if=/dev/zero of="$IMG" bs=1M count=8 conv=notrunc oflag=direct 2>/dev/null
wait
check "disk corruption found" "^tern-guest: DISK MISMATCH block [0-9]+ sector [0-9]+ word 0: expected 0x314b4c424e524554 found 0x0" \
	"disk_errors=[1-9][0-9]*"

runm 6 "disk=write" $(blk ,readonly=on)
check "disk read-only" "^tern-guest: disk: error: the disk is read-only"

timeout 6 qemu-system-x86_64 -M microvm -accel "$ACCEL" -m 256M -nodefaults -nographic -no-reboot \
	-kernel "$ELF" -append "disk=write" -serial stdio $(blk) >"$OUT" 2>/dev/null
check "disk legacy" "^tern-guest: disk: error: .* version 1 \(legacy\).*-global virtio-mmio.force-legacy=false"

runm 6 "disk=write progress=1"
check "disk missing" "^tern-guest: disk: error: no virtio-blk device" "^tern-guest: phase=idle iter=[1-9]"

run 8 1024 "$ELF" "disk=write disk_block=1000"
check bad-disk-block "^tern-guest: error: disk_block must be"

# ---- network (microvm, virtio-net on a TAP in a namespace made here) ----
runm 5 "ip=192.168.77.2/24 progress=1"
check "net missing" "^tern-guest: net: error: no virtio-net device" "net_rx=0 net_tx=0 net_announces=0$"

run 8 1024 "$ELF" "ip=192.168.77.2"
check bad-ip "^tern-guest: error: ip must be A.B.C.D/PREFIX"

if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && command -v python3 >/dev/null &&
	ip netns add "$NS" 2>/dev/null; then
	ip netns exec "$NS" sh -c 'ip link set lo up && ip tuntap add dev tap0 mode tap &&
		ip addr add 192.168.77.1/24 dev tap0 && ip link set tap0 up'
	ip netns exec "$NS" timeout 10 qemu-system-x86_64 -M microvm -accel "$ACCEL" -m 256M -nodefaults \
		-nographic -no-reboot -global virtio-mmio.force-legacy=false -kernel "$ELF" -serial stdio \
		-append "ip=192.168.77.2/24 progress=1" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
		-device virtio-net-device,netdev=n0 >"$OUT" 2>/dev/null &
	sleep 4
	# 20 ICMP echoes and 20 UDP echoes (port 7), all to the guest, inside the namespace
	RES=$(ip netns exec "$NS" python3 -c '
import os, socket, struct
def cs(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
g = "192.168.77.2"
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); r.settimeout(1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1)
icmp = udp = 0
for i in range(20):
    p = os.urandom(32)
    r.sendto(struct.pack("!BBHHH", 8, 0, cs(struct.pack("!BBHHH", 8, 0, 0, 77, i) + p), 77, i) + p, (g, 0))
    try:
        while True:
            d = r.recv(2048)[20:]
            if d[0] == 0 and d[4:8] == struct.pack("!HH", 77, i):
                icmp += d[8:] == p and cs(d) == 0
                break
    except socket.timeout: pass
    m = os.urandom(1 + 60 * i)
    u.sendto(m, (g, 7))
    try: udp += u.recv(2048) == m
    except socket.timeout: pass
# TCP echo: 200 kB checked byte for byte, then both FINs; port 9 is refused (RST)
t = socket.create_connection((g, 7), timeout=3)
data, got = os.urandom(200000), b""
for i in range(0, len(data), 4000):
    t.sendall(data[i:i + 4000])
    while len(got) < i + 4000:
        got += t.recv(65536)
t.shutdown(socket.SHUT_WR)
tcp = got == data and t.recv(10) == b""
t.close()
try:
    socket.create_connection((g, 9), timeout=2)
    rst = False
except ConnectionRefusedError:
    rst = True
except OSError:
    rst = False
print("net-echo icmp=%d/20 udp=%d/20 tcp=%s rst=%s" % (icmp, udp, tcp, rst))' 2>&1)
	wait
	echo "$RES" >>"$OUT"
	check "net echo" "^tern-guest: net: virtio-net at 0xfeb[0-9a-f]+: mac=([0-9a-f]{2}:){5}[0-9a-f]{2} ip=192.168.77.2/24 link=up" \
		"^net-echo icmp=20/20 udp=20/20 tcp=True rst=True$" "net_rx=[1-9][0-9]* net_tx=[1-9][0-9]* net_announces=[1-9][0-9]*$"
	ip netns del "$NS"
else
	echo "skip net echo (needs root, iproute2 and python3)"
fi

echo "$fails failure(s)"
[ "$fails" = 0 ]
