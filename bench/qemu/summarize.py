#!/usr/bin/env python3
"""Markdown table from qemu_migrate.py results (JSON lines, as run_cases.sh writes).

usage: python3 bench/qemu/summarize.py RESULTS.jsonl [--median]
With --median, repeated runs of a case (same "case" name) are folded into one
row with the median of each number and every status seen.
"""
import json
import statistics
import sys


def num(v, fmt="%.0f"):
    return "-" if v is None else fmt % v


def row(d):
    tb = d.get("transferred_bytes")
    extra = []
    if d.get("mode") == "postcopy":
        extra.append("postcopy_happened=%s reqs=%s" % (d.get("postcopy_happened"), d.get("postcopy_requests")))
    if d.get("xbzrle"):
        x = d["xbzrle"]
        extra.append("xbzrle pages=%s bytes=%s overflow=%s misses=%s" % (
            x.get("pages"), x.get("bytes"), x.get("overflow"), x.get("cache_miss")))
    if d.get("error"):
        extra.append(d["error"][:60])
    return {
        "case": d.get("case", d.get("cmdline")),
        "status": d.get("status"),
        "total_ms": d.get("total_ms"),
        "downtime_ms": d.get("downtime_ms"),
        "downtime_events_ms": d.get("downtime_events_ms"),
        "transferred_mb": None if tb is None else tb / 1e6,
        "throughput_mbps": d.get("throughput_mbps"),
        "syncs": d.get("dirty_sync_count"),
        "dst_ok": d.get("dst_ok"),
        "notes": "; ".join(extra),
    }


def main():
    rows = [row(json.loads(l)) for l in open(sys.argv[1]) if l.strip()]
    if "--median" in sys.argv:
        by = {}
        for r in rows:
            by.setdefault(r["case"], []).append(r)
        out = []
        for case, rs in by.items():
            m = {"case": "%s (n=%d)" % (case, len(rs))}
            for k in ("total_ms", "downtime_ms", "downtime_events_ms", "transferred_mb",
                      "throughput_mbps", "syncs"):
                vals = [r[k] for r in rs if r[k] is not None]
                m[k] = statistics.median(vals) if vals else None
            m["status"] = ",".join(sorted(set(str(r["status"]) for r in rs)))
            m["dst_ok"] = ",".join(sorted(set(str(r["dst_ok"]) for r in rs)))
            m["notes"] = " | ".join(sorted(set(r["notes"] for r in rs if r["notes"])))
            out.append(m)
        rows = out
    print("| case | status | total ms | downtime ms (QEMU) | downtime ms (STOP->RESUME) "
          "| transferred MB | MB/s | syncs | dst ok | notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["case"], r["status"], num(r["total_ms"]), num(r["downtime_ms"]),
            num(r["downtime_events_ms"], "%.1f"), num(r["transferred_mb"], "%.1f"),
            num(r["throughput_mbps"], "%.1f"), num(r["syncs"]), r["dst_ok"], r["notes"]))


if __name__ == "__main__":
    main()
