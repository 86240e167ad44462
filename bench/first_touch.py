#!/usr/bin/env python3
"""What writing to fresh memory costs on this host (docs/MIGRATION.md, "Preallocated destinations").

    python3 bench/first_touch.py [--gib N] [--kind memfd|anon|anon-thp] [--before memfd|anon-thp --before-gib M] [--threads T]

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

`--threads T` splits each GiB between T threads writing at once. With
`--kind memfd` they do not go faster (measured 2026-12-02: about 300 MB/s with one
or two): pwrites into one file take its inode lock in turn, which is why
Tern's destinations place pages by UFFDIO_COPY or through the mapping, where
two placing threads did go faster (post-copy with `--streams 2`,
docs/MIGRATION.md, "Parallel streams"). Python's copies into a mapping keep
its global lock, so `--kind anon` shows no parallelism either. `--spin` keeps one core busy meanwhile (a busy-looping process), as
a migrating guest's vCPU does: then the threads share what is left.
"""
import argparse, mmap, os, subprocess, sys, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--gib", type=int, default=4)
ap.add_argument("--kind", choices=["memfd", "anon", "anon-thp"], default="memfd")
ap.add_argument("--before", choices=["memfd", "anon", "anon-thp"])
ap.add_argument("--before-gib", type=int, default=2)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--spin", action="store_true")
a = ap.parse_args()
chunk = b"\x07" * (4 << 20)
size = 1 << 30
kept = []

def write_range(target, kind, begin, end):
    for offset in range(begin, end, len(chunk)):
        if kind == "memfd":
            os.pwrite(target, chunk, offset)
        else:
            target[offset:offset + len(chunk)] = chunk

def write_all(target, kind=a.kind, threads=a.threads):
    share = size // threads
    workers = [threading.Thread(target=write_range, args=(target, kind, i * share, (i + 1) * share)) for i in range(threads)]
    start = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
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
threads = (" --threads %d" % a.threads if a.threads != 1 else "") + (" --spin" if a.spin else "")
print("command: `python3 bench/first_touch.py --gib %d --kind %s%s%s`" % (a.gib, a.kind, before, threads))
spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if a.spin else None
print()
print("| %s | %s MB/s |" % (a.kind, "pwrite" if a.kind == "memfd" else "copy"))
print("| --- | ---: |")
for i in range(a.before_gib if a.before else 0):
    kept.append(fresh(100 + i, a.before))
    print("| before: %s GiB %d | %.0f |" % (a.before, i + 1, write_all(kept[-1], a.before, 1)), flush=True)
for i in range(a.gib):
    kept.append(fresh(i))
    print("| fresh GiB %d | %.0f |" % (i + 1, write_all(kept[-1])), flush=True)
print("| GiB %d again (pages present) | %.0f |" % (a.gib, write_all(kept[-1])))
if spinner:
    spinner.kill()
