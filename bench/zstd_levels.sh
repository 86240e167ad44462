#!/usr/bin/env bash
# zstd's ratio and speed per level on memory-like data (docs/BENCHMARKS.md, "zstd levels"):
# 64 MiB of this machine's shared libraries (a stand-in for a guest's code and page
# cache) and 32 MiB of /dev/urandom (like the test guest's fill), in 4 MiB blocks
# like Tern's page frames, one core. Needs the zstd command (Debian's zstd package).
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ls /usr/lib/x86_64-linux-gnu/*.so* | head -400 | xargs cat 2>/dev/null | head -c 67108864 > "$work/libraries" || true
head -c 33554432 /dev/urandom > "$work/random"
for level in 1 2 3 5 9 19; do
    zstd -b$level -i1 -B4194304 "$work/libraries" 2>&1 | tr '\r' '\n' | grep -o '([^)]*), *[0-9.]* MB/s, *[0-9.]* MB/s' | tail -1 | sed "s/^/libraries level $level: ratio /"
done
for level in 1 3; do
    zstd -b$level -i1 -B4194304 "$work/random" 2>&1 | tr '\r' '\n' | grep -o '([^)]*), *[0-9.]* MB/s, *[0-9.]* MB/s' | tail -1 | sed "s/^/random level $level: ratio /"
done
