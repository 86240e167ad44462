#!/usr/bin/env python3
"""What writing to fresh memory costs on this host (docs/MIGRATION.md, "Preallocated destinations").

    python3 bench/first_touch.py [--gib N] [--kind memfd|anon|anon-thp] [--before memfd|anon-thp --before-gib M]

Writes N GiB (default 4) into N fresh 1 GiB memfds, one after another and all kept
alive, with 4 MiB pwrites, then writes the last one again (its pages now present).
Prints MB/s for each. `--kind anon` writes private anonymous mappings instead
(what QEMU's guest RAM is), with 4 MiB copies into the mapping; `--kind anon-thp`
adds madvise(MADV_HUGEPAGE), so the kernel backs it with 2 MiB pages where it can. On a nested host, the first GiB often reuses pages the host
freed recently; the later ones show the cost of memory the host has to back anew.

`--before KIND --before-gib M` first touches M GiB of that kind and keeps it, as
a source VM's fill would on a one-host benchmark: 4 KiB pages (memfd, Tern's
guest RAM) use up the free memory the host still backs; 2 MiB pages (anon-thp,
QEMU's guest RAM) come from large free blocks the host has already taken back
(free page reporting), and leave the backed remainder to what comes after.
"""
import argparse, mmap, os, time

ap = argparse.ArgumentParser()
ap.add_argument("--gib", type=int, default=4)
ap.add_argument("--kind", choices=["memfd", "anon", "anon-thp"], default="memfd")
ap.add_argument("--before", choices=["memfd", "anon", "anon-thp"])
ap.add_argument("--before-gib", type=int, default=2)
a = ap.parse_args()
chunk = b"\x07" * (4 << 20)
size = 1 << 30
kept = []

def write_all(target, kind=a.kind):
    start = time.monotonic()
    for offset in range(0, size, len(chunk)):
        if kind == "memfd":
            os.pwrite(target, chunk, offset)
        else:
            target[offset:offset + len(chunk)] = chunk
    return size / 1e6 / (time.monotonic() - start)

def fresh(i, kind=a.kind):
    if kind.startswith("anon"):
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if kind == "anon-thp":
            mapping.madvise(mmap.MADV_HUGEPAGE)
        return mapping
    fd = os.memfd_create("first-touch-%d" % i)
    os.ftruncate(fd, size)
    return fd

before = " --before %s --before-gib %d" % (a.before, a.before_gib) if a.before else ""
print("command: `python3 bench/first_touch.py --gib %d --kind %s%s`" % (a.gib, a.kind, before))
print()
print("| %s | %s MB/s |" % (a.kind, "pwrite" if a.kind == "memfd" else "copy"))
print("| --- | ---: |")
for i in range(a.before_gib if a.before else 0):
    kept.append(fresh(100 + i, a.before))
    print("| before: %s GiB %d | %.0f |" % (a.before, i + 1, write_all(kept[-1], a.before)), flush=True)
for i in range(a.gib):
    kept.append(fresh(i))
    print("| fresh GiB %d | %.0f |" % (i + 1, write_all(kept[-1])), flush=True)
print("| GiB %d again (pages present) | %.0f |" % (a.gib, write_all(kept[-1])))
