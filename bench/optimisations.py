#!/usr/bin/env python3
"""Ablation of Tern's migration optimisations, and QEMU 7.2 with xbzrle, in one run.

    python3 bench/optimisations.py [--repeat N] [--tern PATH] [--timeout-s S]

    python3 bench/optimisations.py --links line --variants "tern plain,tern +streams"

Workloads (1 GiB guest, max downtime 300 ms):
  random64: fill=512 dirty=256 pattern=random rate=200 bytes=64
  hotspot64: fill=512 dirty=256 pattern=hotspot rate=200 bytes=64
Links: cap (100 MB/s, like the issue's) and line (loopback, no cap).
Variants: Tern plain, +xbzrle, +dirty-frequency ordering, +streams (4), +zstd,
xbzrle+ordering, everything; QEMU plain, xbzrle (256 MiB cache) and multifd (4 channels).
Prints a Markdown table (medians of --repeat runs) with bytes, total time,
downtime and pages re-sent after the first pass (Tern). "downtime" is each
VMM's own figure (Tern: source pause to destination resume; QEMU: its
`downtime`, source side only); "pause→resume" is the same span for both:
Tern's downtime, and QEMU's STOP event at the source to its RESUME event at
the destination.
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
GUEST = os.path.join(REPO, "guest", "build", "tern-guest.elf")
WORKLOADS = {
    "random64": "fill=512 dirty=256 pattern=random rate=200 bytes=64 progress=0",
    "hotspot64": "fill=512 dirty=256 pattern=hotspot rate=200 bytes=64 progress=0",
}
# Every variant names its order, since dirty-frequency is tern's default:
# "plain" is pre-copy with none of the optimisations.
SEQ = ["--order", "sequential"]
TERN_VARIANTS = {
    "tern plain": SEQ,
    "tern +xbzrle": ["--compress", "xbzrle"] + SEQ,
    "tern +ordering": ["--order", "dirty-frequency"],
    "tern +streams": ["--streams", "4"] + SEQ,
    "tern +zstd": ["--compress", "zstd"] + SEQ,
    "tern +xbzrle +ordering": ["--compress", "xbzrle", "--order", "dirty-frequency"],
    "tern all": ["--compress", "xbzrle,zstd", "--order", "dirty-frequency", "--streams", "4"],
}
QEMU_VARIANTS = {
    "qemu plain": [],
    "qemu xbzrle": ["--xbzrle-cache-mib", "256"],
    "qemu multifd": ["--multifd", "4"],
}
CAP = 100_000_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(tern, sock):
    raw = subprocess.run([tern, "memory", "read", "--api-socket", sock, "--addr", "0x102000", "--length", "0x48", "--out", "-"],
                         capture_output=True, timeout=10).stdout
    if len(raw) < 0x48 or raw[:8] != b"TERNSTAT":
        return None
    return int.from_bytes(raw[0x0C:0x10], "little")


def run_tern(tern, cmdline, extra, timeout_s, cap):
    work = tempfile.mkdtemp(prefix="tern-opt-")
    port = free_port()
    dst = subprocess.Popen([tern, "run", "--insecure", "--incoming", "tcp:127.0.0.1:%d" % port, "--api-socket", work + "/d.sock", "--serial", "off"],
                           stderr=subprocess.DEVNULL)
    src = subprocess.Popen([tern, "run", "--kernel", GUEST, "--memory", "1G", "--cmdline", cmdline, "--api-socket", work + "/s.sock",
                            "--serial", "off"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(work + "/s.sock") and status(tern, work + "/s.sock") in (2, 3):
                break
            time.sleep(0.2)
        time.sleep(2)
        out = subprocess.run([tern, "migrate", "--insecure", "--api-socket", work + "/s.sock", "--to", "tcp:127.0.0.1:%d" % port,
                              "--max-downtime", "300", "--timeout", str(timeout_s), "--json"]
                             + (["--bandwidth", str(cap)] if cap else []) + extra,
                             capture_output=True, text=True, timeout=timeout_s + 300).stdout
        r = json.loads(out)
        return {"status": r["status"], "mb": r["transferred_bytes"] / 1e6, "total_ms": r["total_ms"],
                "downtime_ms": r.get("downtime_ms"), "span_ms": r.get("downtime_ms"), "resent": r.get("resent_pages"), "switch": r.get("switchover_reason")}
    finally:
        for p in (src, dst):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (src, dst):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def run_qemu(cmdline, extra, timeout_s, cap):
    cmd = [sys.executable, os.path.join(HERE, "qemu", "qemu_migrate.py"), "--guest", GUEST, "--memory", "1024", "--cmdline", cmdline,
           "--max-downtime-ms", "300", "--timeout-s", str(timeout_s)] + (["--bandwidth", str(cap)] if cap else []) + extra
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 300).stdout
    r = json.loads(out)
    return {"status": r.get("status"), "mb": (r.get("transferred_bytes") or 0) / 1e6, "total_ms": r.get("total_ms"),
            "downtime_ms": r.get("downtime_ms"), "span_ms": r.get("downtime_events_ms"), "resent": None, "switch": None}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tern", default=os.path.join(REPO, ".build", "release", "tern"))
    ap.add_argument("--timeout-s", type=int, default=60)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--links", default="cap,line", help="cap (100 MB/s), line (no cap), or both (default)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
    a = ap.parse_args()
    wanted = set(v.strip() for v in a.variants.split(",")) if a.variants else None
    print("command: `python3 bench/optimisations.py %s`" % " ".join(sys.argv[1:]))
    print()
    print("| link | workload | variant | status | MB sent | total ms | downtime ms | pause→resume ms | pages re-sent |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for link in a.links.split(","):
      cap = CAP if link == "cap" else None
      for workload in a.workloads.split(","):
        cmdline = WORKLOADS[workload]
        variants = [(name, lambda extra=extra: run_tern(a.tern, cmdline, extra, a.timeout_s, cap)) for name, extra in TERN_VARIANTS.items()]
        if not a.no_qemu:
            variants += [(name, lambda extra=extra: run_qemu(cmdline, extra, a.timeout_s, cap)) for name, extra in QEMU_VARIANTS.items()]
        variants = [(n, r) for n, r in variants if wanted is None or n in wanted]
        for name, run in variants:
            runs = []
            for _ in range(a.repeat):
                try:
                    runs.append(run())
                except Exception as e:  # a failed run is reported, not hidden
                    runs.append({"status": "error: %s" % e, "mb": None, "total_ms": None, "downtime_ms": None, "span_ms": None, "resent": None})
            fmt = lambda v, f="%.0f": "-" if v is None else f % v
            states = ", ".join(sorted(set(str(r["status"]) for r in runs)))
            print("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (link, workload, name, states, fmt(median([r["mb"] for r in runs])),
                  fmt(median([r["total_ms"] for r in runs])), fmt(median([r["downtime_ms"] for r in runs]), "%.1f"),
                  fmt(median([r["span_ms"] for r in runs]), "%.1f"),
                  fmt(median([r["resent"] for r in runs]))))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
