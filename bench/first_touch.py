#!/usr/bin/env python3
"""What writing to fresh memory costs on this host (docs/MIGRATION.md, "Preallocated destinations").

    python3 bench/first_touch.py [--gib N]

Writes N GiB (default 4) into N fresh 1 GiB memfds, one after another and all kept
alive, with 4 MiB pwrites, then writes the last one again (its pages now present).
Prints MB/s for each. On a nested host, the first GiB often reuses pages the host
freed recently; the later ones show the cost of memory the host has to back anew.
"""
import argparse, os, time

ap = argparse.ArgumentParser()
ap.add_argument("--gib", type=int, default=4)
a = ap.parse_args()
chunk = b"\x07" * (4 << 20)
size = 1 << 30
kept = []

def write_all(fd):
    start = time.monotonic()
    for offset in range(0, size, len(chunk)):
        os.pwrite(fd, chunk, offset)
    return size / 1e6 / (time.monotonic() - start)

print("command: `python3 bench/first_touch.py --gib %d`" % a.gib)
print()
print("| memfd | pwrite MB/s |")
print("| --- | ---: |")
for i in range(a.gib):
    fd = os.memfd_create("first-touch-%d" % i)
    os.ftruncate(fd, size)
    kept.append(fd)
    print("| fresh GiB %d | %.0f |" % (i + 1, write_all(fd)), flush=True)
print("| GiB %d again (pages present) | %.0f |" % (a.gib, write_all(kept[-1])))
