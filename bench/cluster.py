#!/usr/bin/env python3
"""Evacuation schedules (issue 26): how fast the cluster empties a host, and at what downtime.

For each schedule and repetition, in alternating order, a fresh namespace cluster
(scripts/cluster.sh: 4 hosts, an agent each, a SQLite controller) with
`--vms` (8) VMs of `--memory-mib` (512) on h1, each filling `--fill-mib` (256)
with data, then one evacuation of h1 to h2..h4 through `tern cluster evacuate`.
The VMs' workloads are a mix, the same for every schedule: half idle, a
quarter dirtying 64 MiB at random at 50 MB/s, a quarter 128 MiB at 150 MB/s.

Schedules (controller options; everything else at the controller's defaults:
downtime target 300 ms, progress timeout 150 s with post-copy, 800 s per GiB):

- `nova`: one migration at a time (Nova's default): --max-parallel 1 --order fifo
- `kubevirt`: KubeVirt's limits: 5 per cluster, 2 outbound per host, --order fifo
- `tern`: Tern's own: one into each destination at once (--max-inbound 1, up to
  3 outbound), largest first, and post-copy as soon as pre-copy stops gaining
  (--progress-timeout 3).

Reported per run: time to empty the host (the evacuation's first migration
created to its last finished, by the controller's records), the worst
downtime and how many exceeded the target, the bytes sent, post-copy
escalations. The host is warmed (`--warm-host-gib`, default 10) before the
VMs boot. One JSON line per run goes to --out; a Markdown report to stdout
(and with --markdown FILE between <!-- cluster-bench:start/end --> markers).

    python3 bench/cluster.py --repeat 2 --markdown docs/BENCHMARKS.md
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "qemu"))
import benchlib as bl  # noqa: E402
import qemu_migrate as qm  # noqa: E402  (warm_host)

MARKS = ("<!-- cluster-bench:start -->", "<!-- cluster-bench:end -->")
SCHEDULES = {
    "nova": "--max-parallel 1 --max-outbound 1 --order fifo",
    "kubevirt": "--max-parallel 5 --max-outbound 2 --max-inbound 5 --order fifo",
    "tern": "--max-parallel 3 --max-outbound 3 --max-inbound 1 --order tern --progress-timeout 3",
}


def workload(index, vms, fill):
    if index < vms // 2:
        return "fill=%d" % fill
    if index < vms * 3 // 4:
        return "fill=%d dirty=64 pattern=random rate=50 verify=0" % fill
    return "fill=%d dirty=128 pattern=random rate=150 verify=0" % fill


def run_one(args, schedule, repetition, run_id):
    prefix = "cb%d" % (os.getpid() % 1000)
    directory = "/tmp/tern-cluster-bench-%s" % prefix
    subprocess.run(["rm", "-rf", directory], check=True)
    env = dict(os.environ, LAN_HOSTS="4", AGENT_MEMORY="%dM" % (args.vms * args.memory_mib + 512),
               CONTROLLER_ARGS="--interval 0.2 " + SCHEDULES[schedule], TERN_BIN_DIR=args.bin)
    tern = os.path.join(args.bin, "tern")
    socket = directory + "/controller.sock"

    def cluster(*words, timeout=60):
        out = subprocess.run([tern, "cluster", words[0], "--controller", socket, "--json"] + list(words[1:]),
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise bl.BenchError("tern cluster %s: %s" % (" ".join(words), out.stderr.strip()))
        return out.stdout

    try:
        rec = {"bench": "cluster", "run_id": run_id, "schedule": schedule, "repetition": repetition,
               "vms": args.vms, "memory_mib": args.memory_mib, "fill_mib": args.fill_mib,
               "controller_args": SCHEDULES[schedule]}
        rec["warm_host_s"] = round(qm.warm_host(args.warm_host_gib), 3)
        up = subprocess.run(["bash", os.path.join(bl.REPO, "scripts/cluster.sh"), "up", prefix, directory],
                            env=env, capture_output=True, text=True, timeout=120)
        if up.returncode != 0:
            raise bl.BenchError("cluster.sh up: " + up.stderr.strip())
        for index in range(args.vms):
            cluster("create-vm", "vm%d" % index, "--host", "h1", "--kernel", args.guest,
                    "--memory", "%dM" % args.memory_mib, "--cmdline", workload(index, args.vms, args.fill_mib))
        # Every guest has filled its memory (its status block's phase is past fill).
        deadline = time.monotonic() + 120
        while True:
            placed = json.loads(cluster("vms"))
            running = [p for p in placed if p["vm"]["state"] == "running"]
            filled = 0
            for p in running:
                sock = "%s/h1/vms/%s.sock" % (directory, p["vm"]["spec"]["name"])
                out = subprocess.run([tern, "memory", "read", "--api-socket", sock, "--addr", "0x102000", "--length", "16",
                                      "--out", "-"], capture_output=True, timeout=10)
                # Phase (u32 at offset 12): 2 dirty, 3 idle.
                if out.returncode == 0 and len(out.stdout) >= 16 and out.stdout[12] in (2, 3):
                    filled += 1
            if filled == args.vms:
                break
            if time.monotonic() > deadline:
                raise bl.BenchError("the guests did not finish filling: %d of %d" % (filled, args.vms))
            time.sleep(0.5)
        time.sleep(args.settle_s)
        started = time.monotonic()
        cluster("evacuate", "h1", "--wait", timeout=1800)
        rec["wall_s"] = round(time.monotonic() - started, 3)
        migrations = json.loads(cluster("migrations"))
        if len(migrations) != args.vms or any(m["phase"] != "completed" for m in migrations):
            raise bl.BenchError("not every migration completed: %s" % [(m["vm"], m["phase"], m.get("reason")) for m in migrations])
        created = min(m["created_at"] for m in migrations)
        finished = max(m["finished_at"] for m in migrations)
        parse = lambda t: time.mktime(time.strptime(t.replace("Z", ""), "%Y-%m-%dT%H:%M:%S"))  # noqa: E731
        rec["empty_s_controller"] = parse(finished) - parse(created)
        downtimes = [m.get("downtime_ms") or 0 for m in migrations]
        rec["worst_downtime_ms"] = round(max(downtimes), 1)
        rec["median_downtime_ms"] = round(statistics.median(downtimes), 1)
        rec["over_target"] = sum(1 for d in downtimes if d > 300)
        rec["bytes"] = sum(m["transferred_bytes"] for m in migrations)
        rec["postcopy_escalations"] = sum(1 for m in migrations if "postcopy" in m["escalations"])
        rec["migrations"] = [{k: m.get(k) for k in ("vm", "destination", "downtime_ms", "total_ms", "transferred_bytes",
                                                    "escalations", "attempt")} for m in migrations]
        return rec
    finally:
        subprocess.run(["bash", os.path.join(bl.REPO, "scripts/cluster.sh"), "down", prefix, directory],
                       capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", directory])


def render(records, meta):
    lines = [MARKS[0], "", "## Evacuation schedules: one at a time, KubeVirt's limits, Tern's", "",
             "`%s` on %s (%s), commit %s. %d VMs of %d MiB (%d MiB filled; half idle, a quarter dirtying 64 MiB at "
             "50 MB/s, a quarter 128 MiB at 150 MB/s) evacuated from h1 to h2..h4 of a namespace cluster "
             "(scripts/cluster.sh, mutual TLS); host warmed with %s GiB before each run. Medians of %d runs per "
             "schedule; time to empty is the wall time of `tern cluster evacuate --wait`."
             % (meta["command"], meta["date"], meta["host"], meta["commit"], records[0]["vms"], records[0]["memory_mib"],
                records[0]["fill_mib"], meta["warm"], meta["repeat"]), "",
             "| schedule | controller options | time to empty s | worst downtime ms | over 300 ms | GiB sent | post-copy | runs (empty s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    medians = {}
    for schedule in SCHEDULES:
        runs = [r for r in records if r["schedule"] == schedule]
        if not runs:
            continue
        empty = statistics.median(r["wall_s"] for r in runs)
        medians[schedule] = empty
        lines.append("| %s | `%s` | %.1f | %.1f | %d | %.2f | %d | %s |" % (
            schedule, SCHEDULES[schedule], empty, statistics.median(r["worst_downtime_ms"] for r in runs),
            max(r["over_target"] for r in runs), statistics.median(r["bytes"] for r in runs) / 2**30,
            max(r["postcopy_escalations"] for r in runs), ", ".join("%.1f" % r["wall_s"] for r in runs)))
    if "tern" in medians:
        lines += ["", "Tern's time to empty against the others: " + ", ".join(
            "%.2f of %s's" % (medians["tern"] / medians[s], s) for s in medians if s != "tern") + "."]
    lines += ["", MARKS[1], ""]
    return "\n".join(lines)


def main():
    bl.set_prog("cluster")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--fill-mib", type=int, default=256)
    ap.add_argument("--settle-s", type=float, default=2)
    ap.add_argument("--warm-host-gib", type=float, default=10)
    ap.add_argument("--bin", default=os.path.join(bl.REPO, ".build/release"))
    ap.add_argument("--guest", default=os.path.join(bl.REPO, "guest/build/tern-guest.elf"))
    ap.add_argument("--out", default=os.path.join(bl.REPO, "bench/results/cluster.jsonl"))
    ap.add_argument("--markdown")
    args = ap.parse_args()
    schedules = args.schedules.split(",")
    for schedule in schedules:
        if schedule not in SCHEDULES:
            sys.exit("cluster.py: unknown schedule %s (%s)" % (schedule, ", ".join(SCHEDULES)))
    for binary in ("tern", "ternd"):
        if not os.access(os.path.join(args.bin, binary), os.X_OK):
            sys.exit("cluster.py: no %s in %s (swift build -c release)" % (binary, args.bin))
    run_id = time.strftime("%Y%m%d-%H%M%S")
    records = []
    for repetition in range(args.repeat):
        for schedule in (schedules if repetition % 2 == 0 else list(reversed(schedules))):
            bl.log("run %d: %s" % (repetition + 1, schedule))
            rec = run_one(args, schedule, repetition, run_id)
            bl.append_jsonl(args.out, rec)
            records.append(rec)
            bl.log("  emptied in %.1f s, worst downtime %.1f ms, %.2f GiB" % (rec["wall_s"], rec["worst_downtime_ms"], rec["bytes"] / 2**30))
    commit = subprocess.run(["git", "-C", bl.REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python3 bench/cluster.py " + " ".join(sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
            "host": "2 cores, %d GiB" % round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30),
            "commit": commit, "warm": args.warm_host_gib, "repeat": args.repeat}
    bl.emit_report(render(records, meta), args.markdown, *MARKS)


if __name__ == "__main__":
    main()
