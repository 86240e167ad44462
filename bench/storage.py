#!/usr/bin/env python3
"""Storage migration, Tern against QEMU 7.2 (issue 22): a VM and its disk move together.

For each case (disk size, data on it, the guest's write rate) and repetition,
migrates the test guest (guest/build/tern-guest.elf, 1 GiB of RAM) with its
virtio-blk disk, in alternating order:

- QEMU 7.2 (`-M microvm`, `virtio-blk-device` on a raw image) the way libvirt
  does it: the destination (`-incoming defer`) exports its disk over NBD
  (`nbd-server-start`, `nbd-server-add` writable); the source runs
  `drive-mirror` (`sync: full`, `mode: existing`) to that export and waits for
  BLOCK_JOB_READY; then `migrate` with the `pause-before-switchover`
  capability; in `pre-switchover`, `block-job-cancel` (which, on a ready
  mirror, completes it: BLOCK_JOB_COMPLETED), then `migrate-continue`.
- Tern: `tern run --incoming ... --disk id=disk0,path=DST.img` and
  `tern migrate --storage copy --json`. Skipped, with a message, when
  `tern migrate --help` does not list `--storage`.

The destination runs in a network namespace made here, joined to the host by a
veth pair, so the bytes on the wire (both directions, all connections: memory,
disk, control) are the veth's counters. After the migration the guest runs on
the destination for `--after-s`; its own disk checks must stay clean
(disk_errors 0, disk_verified grows); then the destination is paused and its
whole image is checked against the guest's tag table (read from guest RAM) and
the image the source started from: every block the guest wrote holds that
write (or a later one), every other block holds the source's original data.

One JSON line per migration goes to --out; a Markdown report to stdout
(and with --markdown FILE between <!-- storage-bench:start/end --> markers).

    python3 bench/storage.py --cases 1g-r20 --vmms qemu        # the issue's measured case, QEMU only
    python3 bench/storage.py --repeat 3 --markdown docs/BENCHMARKS.md
    python3 bench/storage.py --summarize bench/results/storage.jsonl

Needs root (KVM, ip netns, veth). Python 3 standard library only. See bench/README.md.
"""

import argparse
import datetime
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "qemu"))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree from the imports below
import qemu_migrate as qm  # noqa: E402  (QMP client, warm_host)
import benchlib as bl  # noqa: E402
import devices as dv  # noqa: E402  (status block decoding, the Tern API over its socket)
from benchlib import (BenchError, Interrupted, LIVE, blocked_signals, kill_hard, log, med, ratio,  # noqa: E402
                      reap, sh, signal_proc, spawn, tail)

bl.set_prog("storage")

MARK_START = "<!-- storage-bench:start -->"
MARK_END = "<!-- storage-bench:end -->"
TITLE = "## Storage migration: Tern vs QEMU 7.2 (drive-mirror to NBD)"
MIB = 1 << 20
STATUS_GPA = dv.STATUS_GPA
STATUS_LEN = dv.STATUS_LEN
WORK_BASE = 0x1000000
BLOCK = 4096
SECTOR = 512
BLK_MAGIC = 0x314B4C424E524554  # "TERNBLK1", word 0 of every sector the guest writes
C1, C2 = 0x9E3779B97F4A7C15, 0xD1B54A32D192ED03
TAG_NONE, TAG_UNKNOWN = 0, 0xFFFFFFFF
M64 = (1 << 64) - 1

# The veth pair between the host (source side) and the namespace (destination side).
NET_HOST, NET_NS, NET_PREFIX = "10.123.78.1", "10.123.78.2", 24
VETH_HOST, VETH_NS = "tsto0", "tsto1"

CASES = {
    "1g-r20": {"disk_mib": 1024, "data_mib": 512, "rate": 20,
               "what": "1 GiB disk holding 512 MiB of data, guest writing at 20 MB/s (the issue's measured case)"},
    "1g-flat": {"disk_mib": 1024, "data_mib": 512, "rate": 0,
                "what": "1 GiB disk holding 512 MiB of data, guest writing flat out"},
    "4g-r20": {"disk_mib": 4096, "data_mib": 2048, "rate": 20,
               "what": "4 GiB disk holding 2 GiB of data, guest writing at 20 MB/s"},
    "4g-flat": {"disk_mib": 4096, "data_mib": 2048, "rate": 0,
                "what": "4 GiB disk holding 2 GiB of data, guest writing flat out"},
}


COPY_MODES = ("background", "write-blocking")


def guest_blocks(args, case):
    """The blocks the guest writes (its tag table's length): the whole disk, or the part holding data."""
    c = CASES[case]
    return (c["disk_mib"] if args.write_span == "disk" else c["data_mib"]) * MIB // BLOCK


def guest_cmdline(args, case):
    c = CASES[case]
    span = "" if args.write_span == "disk" else " disk_blocks=%d" % (c["data_mib"] * MIB // BLOCK)
    return ("disk=write disk_pattern=rand disk_block=%d disk_rate=%d disk_flush=%d disk_verify=%d%s progress=0"
            % (BLOCK, c["rate"], args.disk_flush, args.disk_verify, span))


# ---------------------------------------------------------------- small helpers

def record_failure(rec, e):
    """A cell that failed (BenchError) or was interrupted: its status and why; a status it had set stays."""
    if isinstance(e, BenchError):
        rec["status"] = rec.get("status") if rec.get("status") not in (None, "error", "running") else "error"
        rec["error"] = str(e)
    else:
        rec["status"] = "interrupted"
        rec["error"] = "interrupted (Ctrl-C or SIGTERM)"




def in_ns(ctx, cmd):
    """The command inside the destination's namespace (ip netns exec execs it: same pid)."""
    return (["ip", "netns", "exec", ctx.netns] + cmd) if ctx.netns else cmd


def wire_counters(ctx):
    """The host end's veth counters: tx = towards the destination, rx = from it (bytes include the
    Ethernet/IP/TCP headers, once per GSO segment)."""
    if not ctx.netns:
        return None
    out = {}
    for k in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"):
        with open("/sys/class/net/%s/statistics/%s" % (VETH_HOST, k)) as f:
            out[k] = int(f.read())
    out["t"] = time.monotonic()
    return out


def wire_delta(a, b):
    if not a or not b:
        return None
    return {"to_dst_bytes": b["tx_bytes"] - a["tx_bytes"], "from_dst_bytes": b["rx_bytes"] - a["rx_bytes"],
            "to_dst_packets": b["tx_packets"] - a["tx_packets"],
            "from_dst_packets": b["rx_packets"] - a["rx_packets"],
            "bytes": b["tx_bytes"] - a["tx_bytes"] + b["rx_bytes"] - a["rx_bytes"]}


def netns_up(ctx):
    ns = ctx.netns
    sh(["ip", "netns", "add", ns])
    ctx.netns_made = True
    sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    sh(["ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", ns])
    sh(["ip", "link", "set", VETH_HOST, "mtu", str(ctx.args.mtu)])
    sh(["ip", "-n", ns, "link", "set", VETH_NS, "mtu", str(ctx.args.mtu)])
    sh(["ip", "addr", "add", "%s/%d" % (NET_HOST, NET_PREFIX), "dev", VETH_HOST])
    sh(["ip", "-n", ns, "addr", "add", "%s/%d" % (NET_NS, NET_PREFIX), "dev", VETH_NS])
    sh(["ip", "link", "set", VETH_HOST, "up"])
    sh(["ip", "-n", ns, "link", "set", VETH_NS, "up"])
    log("network namespace %s: destination at %s (%s), source side %s (%s), MTU %d" % (
        ns, NET_NS, VETH_NS, NET_HOST, VETH_HOST, ctx.args.mtu))


def netns_down(ctx):
    if not getattr(ctx, "netns_made", False):
        return
    r = sh(["ip", "netns", "pids", ctx.netns], check=False)
    for pid in r.stdout.decode().split():
        try:  # only processes this script started can be in the namespace it made
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh(["ip", "link", "del", VETH_HOST], check=False)
    sh(["ip", "netns", "del", ctx.netns], check=False)
    ctx.netns_made = False
    log("network namespace %s deleted" % ctx.netns)


def pick_port():
    # the namespace holds nothing but what this script starts: any port is free there
    return random.randint(20000, 59999)


# ---------------------------------------------------------------- images

def base_image(ctx, case):
    """The image every run of the case starts from, made once per invocation: `data_mib` MiB of random
    bytes at its start, the rest a hole."""
    c = CASES[case]
    key = (c["disk_mib"], c["data_mib"])
    if key in ctx.bases:
        return ctx.bases[key]
    path = os.path.join(ctx.image_dir, "base-%d-%d.img" % key)
    t = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(c["data_mib"]):
            f.write(os.urandom(MIB))
        f.truncate(c["disk_mib"] * MIB)
        f.flush()
        os.fsync(f.fileno())
    log("base image %s: %d MiB of random data, then a hole up to %d MiB (%.1f s)" % (
        path, c["data_mib"], c["disk_mib"], time.monotonic() - t))
    ctx.bases[key] = path
    return path


def copy_sparse(src, dst):
    sh(["cp", "--sparse=always", src, dst], timeout=600)


def allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def mix64(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def guest_sector(s, g):
    words = [BLK_MAGIC, s, g] + [mix64((s * C1 + g * C2 + j) & M64) | 1 for j in range(3, SECTOR // 8)]
    return struct.pack("<64Q", *words)


def check_image(base, img, tags, full_sample=64):
    """The destination's image against the guest's tag table (u32 per 4 KiB block: the generation of
    its last completed write, 0 none, 0xFFFFFFFF unknown) and the image the source started from.
    A tagged block: every sector names itself (TERNBLK1, its number) with the tag's generation or a
    later one (a write in flight when the VM was paused); a sample of them is compared word by word.
    An untagged block: the base's bytes, or sectors the guest wrote in flight. Anything else is bad."""
    t0 = time.monotonic()
    nblocks = len(tags)
    res = {"blocks": nblocks, "tagged": 0, "untagged": 0, "unknown": 0, "newer": 0, "in_flight": 0,
           "bad_blocks": 0, "lost": 0, "stale": 0, "misplaced": 0, "base_differs": 0,
           "full_checked": 0, "full_bad": 0, "first_bad": []}
    try:
        size = os.path.getsize(img)
    except OSError as e:
        res["error"] = "cannot stat %s: %s" % (img, e)
        return res
    res["image_bytes"] = size
    if size < nblocks * BLOCK:
        res["error"] = "the image has %d bytes, the disk %d" % (size, nblocks * BLOCK)
        return res
    tagged_blocks = [b for b in range(nblocks) if tags[b] not in (TAG_NONE, TAG_UNKNOWN)]
    sample = set(random.Random(nblocks).sample(tagged_blocks, min(full_sample, len(tagged_blocks))))
    chunk = 256 * BLOCK
    with open(base, "rb") as fb, open(img, "rb") as fi:
        for off in range(0, nblocks * BLOCK, chunk):
            bb = fb.read(chunk)
            ib = fi.read(chunk)
            first = off // BLOCK
            n = min(chunk, nblocks * BLOCK - off) // BLOCK
            if len(ib) < n * BLOCK:
                res["error"] = "short read at %d" % off
                return res
            if bb == ib and not any(tags[first + i] not in (TAG_NONE, TAG_UNKNOWN) for i in range(n)):
                res["untagged"] += n
                continue
            for i in range(n):
                b = first + i
                tag = tags[b]
                blk = ib[i * BLOCK:(i + 1) * BLOCK]
                why = None
                if tag == TAG_UNKNOWN:
                    res["unknown"] += 1
                    continue
                if tag == TAG_NONE:
                    res["untagged"] += 1
                    if blk == bb[i * BLOCK:(i + 1) * BLOCK]:
                        continue
                    # a write in flight when the VM was paused: self-describing sectors
                    ok = all(struct.unpack_from("<QQ", blk, k * SECTOR) == (BLK_MAGIC, b * 8 + k)
                             for k in range(BLOCK // SECTOR))
                    if ok:
                        res["in_flight"] += 1
                        continue
                    why = "base_differs"
                else:
                    res["tagged"] += 1
                    newer = False
                    for k in range(BLOCK // SECTOR):
                        m, s, g = struct.unpack_from("<QQQ", blk, k * SECTOR)
                        if m != BLK_MAGIC:
                            why = "lost"
                        elif s != b * 8 + k:
                            why = "misplaced"
                        elif g < tag:
                            why = "stale"
                        elif g > tag:
                            newer = True
                        if why:
                            break
                    if not why and newer:
                        res["newer"] += 1
                    if not why and b in sample:
                        res["full_checked"] += 1
                        for k in range(BLOCK // SECTOR):
                            s = b * 8 + k
                            g = struct.unpack_from("<Q", blk, k * SECTOR + 16)[0]
                            if blk[k * SECTOR:(k + 1) * SECTOR] != guest_sector(s, g):
                                why = "corrupt"
                                res["full_bad"] += 1
                                break
                if why:
                    res["bad_blocks"] += 1
                    if why in res:
                        res[why] += 1
                    if len(res["first_bad"]) < 8:
                        res["first_bad"].append({"block": b, "tag": tag, "why": why,
                                                 "words": list(struct.unpack_from("<3Q", blk, 0))})
    res["seconds"] = round(time.monotonic() - t0, 2)
    res["ok"] = res["bad_blocks"] == 0 and "error" not in res
    return res


def tag_table(raw, nblocks):
    if len(raw) < nblocks * 4:
        raise BenchError("the tag table read returned %d bytes, not %d" % (len(raw), nblocks * 4))
    return list(struct.unpack_from("<%dI" % nblocks, raw, 0))


# ---------------------------------------------------------------- QEMU

class QMP(qm.QMP):
    """qemu_migrate's client, plus waiting for events."""

    def pump(self, timeout):
        """Reads one message within `timeout` s (events are kept); False if none came."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise BenchError("QMP connection closed")
                self.buf += chunk
        except socket.timeout:
            return False
        finally:
            self.sock.settimeout(10)
        line, self.buf = self.buf.split(b"\n", 1)
        r = json.loads(line)
        if "event" in r:
            self.events.append(r)
        return True

    def wait_event(self, pred, timeout, since=0, alive=None):
        """The first event from index `since` for which pred(event) holds; None after `timeout` s."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.events):
                if pred(self.events[i]):
                    return self.events[i]
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if alive:
                alive()
            self.pump(min(left, 0.5))


def ev_time(e):
    return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6


def qemu_status(q):
    out = q.hmp("xp /%dgx 0x%x" % (STATUS_LEN // 8, STATUS_GPA))
    words = []
    for ln in out.splitlines():
        if ":" in ln:
            words += [int(tok, 16) for tok in ln.split(":", 1)[1].split()]
    if len(words) < STATUS_LEN // 8:
        raise BenchError("cannot parse QMP xp output: %r" % out[:200])
    return dv.decode_status(struct.pack("<%dQ" % (STATUS_LEN // 8), *words[:STATUS_LEN // 8]))


def qemu_cmd(ctx, cmdline, image, serial, qmp_sock, incoming):
    a = ctx.args
    cmd = [a.qemu, "-M", "microvm", "-accel", "kvm", "-m", "%dM" % a.memory_mib, "-nodefaults", "-no-reboot",
           "-display", "none", "-global", "virtio-mmio.force-legacy=false", "-kernel", ctx.guest,
           "-append", cmdline, "-serial", "file:" + serial, "-qmp", "unix:%s,server=on,wait=off" % qmp_sock,
           "-device", "virtio-blk-device,drive=d0",
           "-drive", "id=d0,file=%s,format=raw,if=none,%s" % (image, a.qemu_drive)]
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd


def stop_qemu(p, q, name):
    if p is None:
        return None
    def quit_qmp():
        if q is not None:
            q.sock.settimeout(2)
            q.cmd("quit")
    rc = dv.stop_proc(p, name, quit_qmp)
    if q is not None:
        q.close()
    return rc


def run_qemu(ctx, case, rep, order, copy_mode):
    a = ctx.args
    c = CASES[case]
    rec = base_record(ctx, case, rep, "qemu-" + copy_mode, order)
    rec["qemu_copy_mode"] = copy_mode
    d = tempfile.mkdtemp(prefix="qemu-%s-" % case, dir=ctx.tmp)
    src_img = os.path.join(ctx.image_dir, "qemu-src.img")
    dst_img = os.path.join(ctx.image_dir, "qemu-dst.img")
    src = dst = sq = dq = None
    host = NET_NS if ctx.netns else "127.0.0.1"
    try:
        base = base_image(ctx, case)
        copy_sparse(base, src_img)
        with open(dst_img, "wb") as f:  # libvirt creates the destination's image, the same size, empty
            f.truncate(c["disk_mib"] * MIB)
        rec["src_image_allocated_bytes"] = allocated(src_img)
        cmdline = rec["cmdline"]
        dsock, ssock = os.path.join(d, "dst.qmp"), os.path.join(d, "src.qmp")
        dcmd = in_ns(ctx, qemu_cmd(ctx, cmdline, dst_img, os.path.join(d, "dst-serial.log"), dsock, True))
        scmd = qemu_cmd(ctx, cmdline, src_img, os.path.join(d, "src-serial.log"), ssock, False)
        rec["qemu_dst_command"], rec["qemu_src_command"] = shlex.join(dcmd), shlex.join(scmd)
        dst = spawn("qemu destination", dcmd, stdout=os.path.join(d, "dst.log"), stderr=subprocess.STDOUT)
        src = spawn("qemu source", scmd, stdout=os.path.join(d, "src.log"), stderr=subprocess.STDOUT)

        def alive():
            for p, role in ((src, "src"), (dst, "dst")):
                if p.poll() is not None:
                    LIVE.pop(p.pid, None)
                    raise BenchError("%s QEMU exited with %s: %s" % (role, p.returncode,
                                                                     tail(os.path.join(d, role + ".log"), 800)))
        dq = QMP(dsock, 30)
        sq = QMP(ssock, 30)
        rec["qemu_version"] = "%(major)d.%(minor)d.%(micro)d" % sq.version.get("qemu", {})
        st = wait_disk_running(lambda: qemu_status(sq), alive, a.boot_timeout_s, os.path.join(d, "src-serial.log"))
        time.sleep(a.warmup_s)
        alive()
        rec["src_before"] = qemu_status(sq)
        rec["warm_host_s"] = round(qm.warm_host(a.warm_host_gib), 3)
        rec["host_loadavg_1m_before"] = round(os.getloadavg()[0], 2)

        # the destination: incoming on one port, its disk exported over NBD on another
        mport = pick_port()
        nport = mport + 1
        dq.cmd("migrate-incoming", uri="tcp:%s:%d" % (host, mport))
        dq.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": host, "port": str(nport)}})
        dq.cmd("nbd-server-add", device="d0", writable=True)
        rec["ports"] = {"migration": mport, "nbd": nport}
        # the source: capabilities and parameters first (no cap on bandwidth, as in migration.py)
        sq.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True},
                                                         {"capability": "pause-before-switchover", "state": True}])
        sq.cmd("migrate-set-parameters", **{"downtime-limit": a.max_downtime_ms,
                                            "max-bandwidth": qm.UNLIMITED_BANDWIDTH})
        rec["src_iterations_before"] = qemu_status(sq)["iterations"]

        # 1. the mirror, to ready
        w0 = wire_counters(ctx)
        mirror_args = {"job-id": "mirror0", "device": "d0", "target": "nbd://%s:%d/d0" % (host, nport),
                       "format": "raw", "mode": "existing", "sync": "full"}
        if copy_mode != "background":
            mirror_args["copy-mode"] = copy_mode
        if a.qemu_granularity:
            mirror_args["granularity"] = a.qemu_granularity
        rec["qemu_mirror_args"] = mirror_args
        n0 = len(sq.events)
        t_wall0 = time.time()
        t0 = time.monotonic()
        sq.cmd("drive-mirror", **mirror_args)
        jobs = sq.cmd("query-block-jobs")
        rec["qemu_mirror_job"] = jobs[0] if jobs else None
        progress = []  # the job's len/offset and the wire every 10 s, until ready

        def alive_and_progress():
            alive()
            now = time.monotonic()
            if now - (progress[-1]["t_s"] + t0 if progress else t0) >= 10:
                j = sq.cmd("query-block-jobs")
                w = wire_delta(w0, wire_counters(ctx)) or {}
                progress.append({"t_s": round(now - t0, 1), "len": j[0]["len"] if j else None,
                                 "offset": j[0]["offset"] if j else None, "wire_bytes": w.get("bytes")})
                log("qemu mirror after %.0f s: offset %.0f MB of len %.0f MB (the len grows as the guest dirties "
                    "what was copied)%s" % (now - t0, (progress[-1]["offset"] or 0) / 1e6, (progress[-1]["len"] or 0) / 1e6,
                                            ", wire %.0f MB" % (w["bytes"] / 1e6) if w.get("bytes") else ""))
        e = sq.wait_event(lambda e: e["event"] in ("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
                          and e.get("data", {}).get("device") == "mirror0", a.mirror_timeout_s, n0,
                          alive_and_progress)
        rec["mirror_progress"] = progress
        if e is None or e["event"] != "BLOCK_JOB_READY":
            rec["status"] = "timeout" if e is None else "failed"
            rec["error"] = ("the mirror was not ready after %.0f s" % a.mirror_timeout_s if e is None
                            else "the mirror ended before ready: %s" % json.dumps(e))
            rec["qemu_jobs_at_error"] = sq.cmd("query-block-jobs")
            rec["wire"] = wire_delta(w0, wire_counters(ctx))
            rec["src_at_error"] = qemu_status(sq)
            return rec
        rec["mirror_ready_ms"] = round((ev_time(e) - t_wall0) * 1000, 1)
        jobs = sq.cmd("query-block-jobs")
        rec["mirror_at_ready"] = {k: jobs[0].get(k) for k in ("len", "offset", "busy", "ready")} if jobs else None
        w_ready = wire_counters(ctx)
        log("qemu mirror ready after %.1f s (%s)" % (rec["mirror_ready_ms"] / 1000, rec["mirror_at_ready"]))

        # 2. migrate, with a pause before the switch-over
        n1 = len(sq.events)
        t_mig = time.monotonic()
        sq.cmd("migrate", uri="tcp:%s:%d" % (host, mport))
        e = sq.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in
                          ("pre-switchover", "failed", "cancelled", "completed"), a.timeout_s, n1, alive)
        if e is None or e["data"]["status"] != "pre-switchover":
            rec["status"] = "timeout" if e is None else e["data"]["status"]
            rec["error"] = "migrate did not reach pre-switchover: %s" % (
                "timeout after %.0f s" % a.timeout_s if e is None else json.dumps(sq.cmd("query-migrate")))
            if e is None:
                sq.cmd("migrate_cancel")
            return rec
        t_pre = ev_time(e)
        # 3. the source is paused: the mirror completes (cancel on a ready mirror), then the switch-over
        n2 = len(sq.events)
        sq.cmd("block-job-cancel", device="mirror0")
        e = sq.wait_event(lambda e: e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR")
                          and e.get("data", {}).get("device") == "mirror0", 60, n2, alive)
        if e is None or e["event"] != "BLOCK_JOB_COMPLETED" or e["data"].get("error"):
            rec["status"] = "failed"
            rec["error"] = "the mirror did not complete in pre-switchover: %s" % (json.dumps(e) if e else "timeout")
            sq.cmd("migrate_cancel")
            return rec
        rec["mirror_completed"] = e["data"]
        t_job_done = ev_time(e)
        n3 = len(sq.events)
        sq.cmd("migrate-continue", state="pre-switchover")
        t_cont = time.time()
        e = sq.wait_event(lambda e: e["event"] == "MIGRATION" and e["data"]["status"] in
                          ("completed", "failed", "cancelled"), 60, n3, alive)
        w1 = wire_counters(ctx)
        if e is None:
            raise BenchError("no end of the migration 60 s after migrate-continue")
        t_done = ev_time(e)
        info = sq.cmd("query-migrate")
        end = time.monotonic() + 5
        while info.get("status") == "completed" and not info.get("total-time") and time.monotonic() < end:
            time.sleep(0.01)  # QEMU 7.2 marks completed a moment before it computes the times
            info = sq.cmd("query-migrate")
        rec["qemu_query_migrate"] = info
        ram = info.get("ram", {})
        rec.update({
            "status": info.get("status"),
            "total_ms": round((t_done - t_wall0) * 1000, 1),
            "wall_ms": round((time.monotonic() - t0) * 1000, 1),
            "migrate_total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "pre_switchover_ms": round((t_cont - t_pre) * 1000, 1),
            "mirror_complete_ms": round((t_job_done - t_pre) * 1000, 1),
            "ram_bytes_sent": ram.get("transferred"),
            "disk_bytes_counted": rec["mirror_completed"].get("offset"),
            "wire": wire_delta(w0, w1),
            "wire_mirror_phase": wire_delta(w0, w_ready),
        })
        rec["counted_bytes"] = (rec["ram_bytes_sent"] or 0) + (rec["disk_bytes_counted"] or 0)
        if info.get("error-desc"):
            rec["error"] = info["error-desc"]
        if rec["status"] != "completed":
            return rec
        # downtime seen from outside: the source's STOP to the destination's RESUME
        deadline = time.monotonic() + 10
        while not dq.cmd("query-status").get("running"):
            if time.monotonic() > deadline:
                raise BenchError("the destination is not running 10 s after the migration")
            time.sleep(0.05)
        dq.drain(0.05)
        sq.drain(0.05)
        stops = [ev_time(x) for x in sq.events[n1:] if x["event"] == "STOP"]
        resumes = [ev_time(x) for x in dq.events if x["event"] == "RESUME"]
        rec["downtime_events_ms"] = round((resumes[-1] - stops[0]) * 1000, 1) if stops and resumes else None

        # 4. the guest on the destination
        after_checks(ctx, rec, lambda: qemu_status(dq), lambda: dst.poll() is None)
        dq.cmd("stop")
        nb, ng = c["disk_mib"] * MIB // BLOCK, guest_blocks(a, case)
        tags_path = os.path.join(d, "tags.bin")
        dq.cmd("pmemsave", val=WORK_BASE, size=ng * 4, filename=tags_path)
        with open(tags_path, "rb") as f:
            tags = tag_table(f.read(), ng) + [TAG_NONE] * (nb - ng)
        rec["image_check"] = check_image(base, dst_img, tags)
        rec["dst_image_allocated_bytes"] = allocated(dst_img)
        finish_checks(rec)
    except (BenchError, KeyboardInterrupt, Interrupted) as e:
        record_failure(rec, e)
    finally:
        with blocked_signals():
            rec["dst_exit"] = stop_qemu(dst, dq, "qemu destination")
            rec["src_exit"] = stop_qemu(src, sq, "qemu source")
            if rec["status"] != "completed" or not rec.get("check_ok"):
                for role in ("src", "dst"):
                    for kind in ("log", "serial"):
                        text = tail(os.path.join(d, "%s%s.log" % (role, "-serial" if kind == "serial" else "")), 1500)
                        if text:
                            rec["%s_%s" % (role, kind)] = text
            for p in (src_img, dst_img):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if a.keep_tmp:
                rec["tmp_dir"] = d
            else:
                shutil.rmtree(d, ignore_errors=True)
    return rec


# ---------------------------------------------------------------- Tern

def tern_has_storage(tern):
    try:
        r = subprocess.run([tern, "migrate", "--help"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--storage" in r.stdout.decode("utf-8", "replace") + r.stderr.decode("utf-8", "replace")


def tern_status(sock):
    if not os.path.exists(sock):
        return None
    code, body = dv.http_get_unix(sock, "/v1/vm/memory?address=%d&length=%d" % (STATUS_GPA, STATUS_LEN))
    if code != 200:
        raise BenchError("GET /v1/vm/memory answered %d: %s" % (code, body[:200]))
    return dv.decode_status(body)


def tern_memory(sock, addr, length):
    out = b""
    step = 1 << 20
    while len(out) < length:
        n = min(step, length - len(out))
        code, body = dv.http_get_unix(sock, "/v1/vm/memory?address=%d&length=%d" % (addr + len(out), n), timeout=30)
        if code != 200 or len(body) != n:
            raise BenchError("GET /v1/vm/memory (%d bytes at 0x%x) answered %d, %d bytes" % (
                n, addr + len(out), code, len(body)))
        out += body
    return out


def tern_cli(ctx, *args, timeout=15):
    r = subprocess.run([ctx.tern] + list(args), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError("tern %s failed (exit %d): %s" % (" ".join(args), r.returncode,
                                                           r.stderr.decode("utf-8", "replace").strip()))
    return r.stdout


def storage_bytes(report):
    """Disk bytes in the report's `storage` object: the sum of each disk's `bytes` (or the nearest name)."""
    st = report.get("storage")
    if not isinstance(st, dict):
        return None
    disks = st.get("disks", st)
    items = disks.values() if isinstance(disks, dict) else disks if isinstance(disks, list) else []
    total = None
    for dk in items:
        if not isinstance(dk, dict):
            continue
        for k in ("bytes", "transferred_bytes", "sent_bytes", "bytes_sent"):
            if isinstance(dk.get(k), (int, float)):
                total = (total or 0) + dk[k]
                break
    if total is None:
        for k in ("bytes", "transferred_bytes"):
            if isinstance(st.get(k), (int, float)):
                return st[k]
    return total


def run_tern(ctx, case, rep, order):
    a = ctx.args
    c = CASES[case]
    rec = base_record(ctx, case, rep, "tern", order)
    rec["tern_binary"] = ctx.tern_info
    d = tempfile.mkdtemp(prefix="tern-%s-" % case, dir=ctx.tmp)
    src_img = os.path.join(ctx.image_dir, "tern-src.img")
    dst_img = os.path.join(ctx.image_dir, "tern-dst.img")  # not created here: the destination makes it
    ssock, dsock = os.path.join(d, "src.sock"), os.path.join(d, "dst.sock")
    serr, derr = os.path.join(d, "src-stderr.log"), os.path.join(d, "dst-stderr.log")
    mout, merr = os.path.join(d, "migrate-stdout.json"), os.path.join(d, "migrate-stderr.log")
    host = NET_NS if ctx.netns else "127.0.0.1"
    src = dst = mig = None
    try:
        base = base_image(ctx, case)
        copy_sparse(base, src_img)
        for p in (dst_img,):
            if os.path.exists(p):
                os.unlink(p)
        rec["src_image_allocated_bytes"] = allocated(src_img)
        for attempt in range(5):
            port = pick_port()
            cmd = in_ns(ctx, [ctx.tern, "run", "--insecure", "--incoming", "tcp:%s:%d" % (host, port),
                              "--disk", "id=disk0,path=%s" % dst_img, "--api-socket", dsock,
                              "--serial", "file:" + os.path.join(d, "dst-serial.log")] + shlex.split(a.tern_run_args))
            rec["tern_dst_command"] = shlex.join(cmd)
            dst = spawn("tern destination", cmd, stderr=derr)
            state = dv_wait_line(dst, derr, "waiting for an incoming migration", 60)
            if state == "ok":
                break
            text = tail(derr, 800)
            LIVE.pop(dst.pid, None)
            if state == "exited" and "in use" in text.lower() and attempt < 4:
                continue
            raise BenchError("tern destination %s: %s" % ("exited with %s" % dst.returncode if state == "exited"
                                                          else "not listening after 60 s", text))
        cmd = [ctx.tern, "run", "--kernel", ctx.guest, "--memory", "%dM" % a.memory_mib,
               "--disk", "path=%s,id=disk0" % src_img, "--cmdline", rec["cmdline"], "--api-socket", ssock,
               "--serial", "file:" + os.path.join(d, "src-serial.log")] + shlex.split(a.tern_run_args)
        rec["tern_src_command"] = shlex.join(cmd)
        src = spawn("tern source", cmd, stderr=serr)

        def alive():
            for p, role, path in ((src, "source", serr), (dst, "destination", derr)):
                if p.poll() is not None:
                    LIVE.pop(p.pid, None)
                    raise BenchError("%s tern exited with %s: %s" % (role, p.returncode, tail(path, 800)))

        def status():
            try:
                return tern_status(ssock)
            except (OSError, BenchError):
                return None  # while it boots ("the VM is still being created")
        wait_disk_running(status, alive, a.boot_timeout_s, os.path.join(d, "src-serial.log"))
        time.sleep(a.warmup_s)
        alive()
        rec["src_before"] = tern_status(ssock)
        rec["src_iterations_before"] = rec["src_before"]["iterations"]
        rec["warm_host_s"] = round(qm.warm_host(a.warm_host_gib), 3)
        rec["host_loadavg_1m_before"] = round(os.getloadavg()[0], 2)
        cmd = [ctx.tern, "migrate", "--api-socket", ssock, "--to", "tcp:%s:%d" % (host, port), "--insecure",
               "--storage", a.tern_storage, "--max-downtime", "%g" % a.max_downtime_ms,
               "--timeout", "%g" % a.timeout_s, "--json"] + shlex.split(a.tern_args)
        rec["tern_migrate_command"] = shlex.join(cmd)
        w0 = wire_counters(ctx)
        t0 = time.monotonic()
        mig = spawn("tern migrate", cmd, stdout=mout, stderr=merr)
        hard = a.timeout_s + a.mirror_timeout_s
        if not reap(mig, hard):
            log("tern migrate still running after %.0f s: cancelling (SIGINT)" % hard)
            rec["driver_timeout"] = True
            signal_proc(mig, signal.SIGINT)
            if not reap(mig, 60):
                kill_hard(mig, "tern migrate")
        rec["wall_ms"] = round((time.monotonic() - t0) * 1000, 1)
        w1 = wire_counters(ctx)
        rec["wire"] = wire_delta(w0, w1)
        rec["tern_migrate_exit"] = mig.returncode
        err_text = tail(merr, 2000)
        if err_text:
            rec["tern_migrate_stderr"] = err_text
        try:
            with open(mout) as f:
                text = f.read().strip()
            report = json.loads(text) if text else None
        except (OSError, ValueError) as e:
            raise BenchError("tern migrate printed no JSON report (exit %s, %s): %s" % (mig.returncode, e, err_text))
        if report is None:
            raise BenchError("tern migrate printed no report (exit %s): %s" % (mig.returncode, err_text))
        rec["tern_report"] = report
        rec.update({
            "status": "timeout" if rec.get("driver_timeout") and report.get("status") != "completed"
                      else report.get("status"),
            "total_ms": report.get("total_ms"),
            "downtime_ms": report.get("downtime_ms"),
            "downtime_upper_bound_ms": report.get("downtime_upper_bound_ms"),
            "setup_ms": report.get("setup_ms"),
            "counted_bytes": report.get("transferred_bytes"),
            "ram_bytes_sent": None,
            "disk_bytes_counted": storage_bytes(report),
            "tern_storage": report.get("storage"),
            "switchover_reason": report.get("switchover_reason"),
            "rounds_count": len(report.get("rounds") or []),
        })
        if report.get("reason"):
            rec["error"] = report["reason"]
        if report.get("status") != "completed":
            rec.setdefault("error", "migration ended with status %s" % report.get("status"))
            return rec
        if reap(src, 15):
            rec["src_exit_code"] = src.returncode
        else:
            rec["src_still_running"] = True
        if dst.poll() is not None:
            raise BenchError("the destination exited (%s) after the migration: %s" % (dst.returncode, tail(derr, 800)))
        after_checks(ctx, rec, lambda: tern_status(dsock), lambda: dst.poll() is None)
        tern_cli(ctx, "pause", "--api-socket", dsock)
        nb, ng = c["disk_mib"] * MIB // BLOCK, guest_blocks(a, case)
        tags = tag_table(tern_memory(dsock, WORK_BASE, ng * 4), ng) + [TAG_NONE] * (nb - ng)
        rec["image_check"] = check_image(base, dst_img, tags)
        rec["dst_image_allocated_bytes"] = allocated(dst_img)
        finish_checks(rec)
    except (BenchError, KeyboardInterrupt, Interrupted) as e:
        record_failure(rec, e)
    finally:
        with blocked_signals():
            if mig is not None and mig.poll() is None:
                signal_proc(mig, signal.SIGINT)  # cancel: the VM stays on the source
                if not reap(mig, 30):
                    kill_hard(mig, "tern migrate")
            if mig is not None:
                LIVE.pop(mig.pid, None)
            rec["dst_exit"] = stop_tern(ctx, dst, dsock, "tern destination")
            rec.setdefault("src_exit_code", stop_tern(ctx, src, ssock, "tern source"))
            if rec["status"] != "completed" or not rec.get("check_ok"):
                for role, path in (("src_stderr", serr), ("dst_stderr", derr),
                                   ("src_serial", os.path.join(d, "src-serial.log")),
                                   ("dst_serial", os.path.join(d, "dst-serial.log"))):
                    text = tail(path, 1500)
                    if text:
                        rec[role] = text
            for p in (src_img, dst_img):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if a.keep_tmp:
                rec["tmp_dir"] = d
            else:
                shutil.rmtree(d, ignore_errors=True)
    return rec


def dv_wait_line(p, path, needle, timeout):
    deadline = time.monotonic() + timeout
    while True:
        if needle in tail(path, 20000):
            return "ok"
        if p.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.05)


def stop_tern(ctx, p, sock, name):
    if p is None:
        return None
    quit_ok = p.poll() is None and bl.tern_quit(ctx.tern, sock)
    return bl.terminate(p, name, 10 if quit_ok else 0.2)


# ---------------------------------------------------------------- shared steps

def base_record(ctx, case, rep, vmm, order):
    c = CASES[case]
    return {
        "bench": "storage", "run_id": ctx.run_id, "case": case, "vmm": vmm, "repeat": rep, "order": order,
        "cmdline": guest_cmdline(ctx.args, case), "memory_mib": ctx.args.memory_mib,
        "disk_mib": c["disk_mib"], "data_mib": c["data_mib"], "disk_rate_mbps": c["rate"],
        "max_downtime_ms": ctx.args.max_downtime_ms, "wire_measured": bool(ctx.netns),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "error", "check_ok": False,
    }


def wait_disk_running(status, alive, timeout, serial):
    """Until the guest's disk workload runs (disk_state 1, requests completing)."""
    def ready(st):
        if not st["magic_ok"]:
            return False
        if st["phase"] in (0xE, 0xF) or st["disk_state"] == 2:
            raise BenchError("the guest failed (phase 0x%X, disk_state %d)" % (st["phase"], st["disk_state"]))
        return st["disk_state"] == 1 and st["disk_writes"] > 8
    try:  # either failure with the guest's last serial lines
        return bl.wait_for(status, alive, timeout, ready, "the guest's disk workload did not start",
                           errors=(OSError, BenchError, qm.BenchError))
    except BenchError as e:
        raise BenchError("%s: %s" % (e, tail(serial, 600)))


def after_checks(ctx, rec, status, running):
    """The guest on the destination: one sample at once, one `--after-s` later."""
    a = status()
    time.sleep(ctx.args.after_s)
    b = status()
    rec["dst_first"], rec["dst_second"] = a, b
    src = rec.get("src_before") or {}
    rec["guest_check"] = {
        "magic": a["magic_ok"] and b["magic_ok"],
        "disk_state": b["disk_state"],
        "disk_errors": b["disk_errors"],
        "mem_errors": b["errors"],
        "disk_verified_grew": b["disk_verified"] > a["disk_verified"],
        "disk_verified_beyond_source": b["disk_verified"] > src.get("disk_verified", 0),
        "disk_writes_grew": b["disk_writes"] > a["disk_writes"],
        "running": running(),
        "writes_after": b["disk_writes"] - a["disk_writes"],
        "verified_after": b["disk_verified"] - a["disk_verified"],
    }
    g = rec["guest_check"]
    g["ok"] = bool(g["magic"] and g["disk_state"] == 1 and g["disk_errors"] == 0 and g["mem_errors"] == 0
                   and g["disk_verified_grew"] and g["disk_writes_grew"] and g["running"])


def finish_checks(rec):
    g = rec.get("guest_check") or {}
    i = rec.get("image_check") or {}
    rec["check_ok"] = bool(g.get("ok") and i.get("ok"))
    if not rec["check_ok"]:
        problems = []
        if not g.get("ok"):
            problems.append("guest check: %s" % json.dumps(g))
        if not i.get("ok"):
            problems.append("image check: %s" % json.dumps(i))
        rec["error"] = "; ".join(problems)


# ---------------------------------------------------------------- report

def fmt(v, kind=""):
    if v is None:
        return "-"
    if kind == "ms":
        return "%.0f" % v if v >= 100 else "%.1f" % v
    if kind == "mb":
        return "%.0f" % v if v >= 100 else "%.1f" % v
    if kind == "ratio":
        return "%.3f" % v if v < 0.1 else ("%.2f" % v if v < 10 else "%.1f" % v)
    return "%g" % v if isinstance(v, (int, float)) else str(v)


def getk(r, key):
    v = r
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def cell(runs, key, kind, scale=1.0):
    """Median over the completed runs, then each run in order when there are several (* = not completed)."""
    def val(r):
        v = getk(r, key)
        return None if v is None else v / scale
    done = [r for r in runs if r.get("status") == "completed"]
    m = med([val(r) for r in done])
    s = fmt(m, kind)
    if len(runs) > 1:
        s += " (" + ", ".join(fmt(val(r), kind) + ("" if r.get("status") == "completed" else "*")
                              for r in runs) + ")"
    return s, m


def check_word(r):
    if r.get("status") != "completed":
        return r.get("status") or "-"
    g = "clean" if (r.get("guest_check") or {}).get("ok") else "NOT CLEAN"
    i = r.get("image_check") or {}
    return "%s / image %s" % (g, "ok" if i.get("ok") else ("BAD (%d blocks)" % i.get("bad_blocks", 0)
                                                           if i else "not checked"))


def counted(values):
    seen = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    return ", ".join(k if n == 1 else "%s ×%d" % (k, n) for k, n in seen.items()) or "-"


ROWS = [  # label, key (the same for both), kind, scale
    ("total ms (Tern: report `total_ms`; QEMU: `drive-mirror` → MIGRATION completed)", "total_ms", "ms", 1),
    ("downtime ms (Tern: report; QEMU: `downtime`, source side)", "downtime_ms", "ms", 1),
    ("bytes on the wire MB, both directions (veth counters)", "wire.bytes", "mb", 1e6),
    ("&nbsp;&nbsp;of which towards the destination MB", "wire.to_dst_bytes", "mb", 1e6),
    ("bytes the VMM counts MB (Tern `transferred_bytes`; QEMU `ram.transferred` + the mirror job's offset)",
     "counted_bytes", "mb", 1e6),
    ("&nbsp;&nbsp;of which disk MB (Tern: its report's `storage`; QEMU: the mirror job's offset)",
     "disk_bytes_counted", "mb", 1e6),
]
QEMU_ROWS = [
    ("QEMU mirror ready ms (after `drive-mirror`)", "mirror_ready_ms", "ms", 1),
    ("QEMU `total-time` of `migrate` ms", "migrate_total_ms", "ms", 1),
    ("QEMU pre-switchover pause ms (`block-job-cancel` → COMPLETED → `migrate-continue`)", "pre_switchover_ms",
     "ms", 1),
    ("QEMU downtime ms, source STOP → destination RESUME events", "downtime_events_ms", "ms", 1),
    ("QEMU RAM MB (`ram.transferred`)", "ram_bytes_sent", "mb", 1e6),
]


def cell_label(name):
    return "Tern" if name == "tern" else "QEMU %s" % name[len("qemu-"):]


def last_mirror(r):
    """For a mirror that never became ready: how far it got (offset of len, MB)."""
    j = (r.get("qemu_jobs_at_error") or [None])[0]
    return None if not j else "%.0f of %.0f MB" % (j["offset"] / 1e6, j["len"] / 1e6)


def render_markdown(records, meta):
    p = meta.get("params", {})
    m = meta.get("machine", {})
    cells = p.get("cells") or sorted({r["vmm"] for r in records})
    qcells = [c for c in cells if c != "tern"]
    lines = [MARK_START, TITLE, ""]
    lines.append("Generated by `bench/storage.py` (see `bench/README.md`).")
    lines.append("")
    lines.append("- command: `%s`" % meta.get("command"))
    lines.append("- date: %s" % meta.get("date"))
    lines.append("- machine: %s CPUs (`nproc`), %s, kernel %s, load average %s at the start" % (
        m.get("nproc"), m.get("cpu_model") or "unknown CPU", m.get("kernel"), m.get("loadavg")))
    if qcells:
        lines.append("- QEMU: %s, `-M microvm -accel kvm -global virtio-mmio.force-legacy=false`, `virtio-blk-device` "
                     "on a raw image (`%s`); the destination `-incoming defer`, `nbd-server-start` + `nbd-server-add` "
                     "(writable); the source `drive-mirror` (`sync: full`, `mode: existing`%s) to the export, "
                     "BLOCK_JOB_READY, `migrate` with `pause-before-switchover`, in pre-switchover `block-job-cancel` "
                     "(which completes a ready mirror), BLOCK_JOB_COMPLETED, `migrate-continue`; max-bandwidth "
                     "100 GB/s, downtime-limit %s ms; one cell per `copy-mode`: %s" % (
                         m.get("qemu_version"), p.get("qemu_drive"),
                         ", granularity %s" % p["qemu_granularity"] if p.get("qemu_granularity") else "",
                         p.get("max_downtime_ms"), ", ".join("`%s`" % c[len("qemu-"):] for c in qcells)))
    t = m.get("tern") or {}
    if p.get("tern_skipped"):
        lines.append("- tern: **cells skipped**: %s" % p["tern_skipped"])
    elif t:
        lines.append("- tern: commit %s%s, %s build (`%s`, built %s); `tern migrate --storage %s --max-downtime %s%s`" % (
            m.get("tern_commit"), " + uncommitted changes" if m.get("tern_tree_dirty") else "", t.get("build"),
            t.get("path"), t.get("mtime"), p.get("tern_storage"), p.get("max_downtime_ms"),
            " " + p["tern_args"] if p.get("tern_args") else ""))
    lines.append("- guest: `%s`, %d MiB RAM, `disk=write disk_pattern=rand disk_block=4096 disk_rate=R disk_flush=%s "
                 "disk_verify=%s progress=0` (R = 20 MB/s or 0 = flat out; %s; no memory workload)" % (
                     p.get("guest"), p.get("memory_mib", 0), p.get("disk_flush"), p.get("disk_verify"),
                     "its random 4 KiB writes land only in the part holding data (`disk_blocks=`)"
                     if p.get("write_span") == "data" else
                     "its random 4 KiB writes cover the whole disk, data and hole alike"))
    lines.append("- images in %s: the source's a sparse copy of a base image holding random data at its start, the "
                 "rest a hole; the disk workload runs %s s before the migration; %g GiB of host memory touched "
                 "and freed (`--warm-host-gib`) just before it" % (
                     p.get("image_dir"), p.get("warmup_s"), p.get("warm_host_gib") or 0))
    lines.append("- wire: %s" % ("the destination in a network namespace behind a veth pair (MTU %s); bytes are the "
                                 "veth's counters over the migration, both directions, headers included" % p.get("mtu")
                                 if p.get("wire") == "veth" else "loopback, bytes on the wire not measured"))
    lines.append("- checks: the guest runs on the destination for %s s: disk_errors 0, disk_verified and disk_writes "
                 "growing (`clean`); then the destination is paused and its whole image checked against the "
                 "guest's tag table (read from guest RAM) and the base image (`image ok`: no write lost or stale, "
                 "no original block changed)" % p.get("after_s"))
    lines.append("")
    cases = []
    for r in records:
        if r["case"] not in cases:
            cases.append(r["case"])
    ov = ["| case | QEMU copy mode | Tern total ms | QEMU total ms | Tern/QEMU | Tern downtime ms | QEMU downtime ms "
          "| Tern/QEMU | Tern wire MB | QEMU wire MB | Tern/QEMU | checks Tern / QEMU |",
          "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    body = []
    for case in cases:
        runs = [r for r in records if r["case"] == case]
        by = {c: [r for r in runs if r["vmm"] == c] for c in cells}
        tern = by.get("tern", [])
        body.append("### %s: %s" % (case, CASES.get(case, {}).get("what", "")))
        body.append("")
        body.append("Guest: `%s`." % runs[0].get("cmdline"))
        body.append("")
        hdr = "| |" + "".join(" %s |%s" % (cell_label(c), "" if c == "tern" else " Tern/QEMU |") for c in cells)
        body.append(hdr)
        body.append("| --- |" + "".join(" ---: |" if c == "tern" else " ---: | ---: |" for c in cells))
        body.append("| status |" + "".join(" %s |%s" % (counted([r["status"] for r in by[c]]),
                                                       "" if c == "tern" else " |") for c in cells))
        meds = {}
        for label, key, kind, scale in ROWS:
            row = "| %s |" % label
            tc, tmv = cell(tern, key, kind, scale) if tern else ("-", None)
            for c in cells:
                if c == "tern":
                    row += " %s |" % tc
                else:
                    qc, qmv = cell(by[c], key, kind, scale)
                    meds[(c, key)] = (tmv, qmv)
                    row += " %s | %s |" % (qc, fmt(ratio(tmv, qmv), "ratio"))
            body.append(row)
        for label, key, kind, scale in QEMU_ROWS:
            body.append("| %s |" % label + "".join(" |" if c == "tern" else " %s | |" % cell(by[c], key, kind, scale)[0]
                                                   for c in cells))
        if any(r.get("qemu_jobs_at_error") for r in runs):
            body.append("| QEMU mirror when given up (offset of len) |" + "".join(
                " |" if c == "tern" else " %s | |" % (counted([last_mirror(r) or "-" for r in by[c]])) for c in cells))
        if tern:
            body.append("| Tern switch-over |" + "".join(
                " %s |" % counted([r.get("switchover_reason") or "-" for r in tern]) if c == "tern" else " | |"
                for c in cells))
        body.append("| destination image allocated MB |" + "".join(
            " %s |%s" % (cell(by[c], "dst_image_allocated_bytes", "mb", 1e6)[0], "" if c == "tern" else " |")
            for c in cells))
        body.append("| guest check / image check |" + "".join(
            " %s |%s" % (counted([check_word(r) for r in by[c]]), "" if c == "tern" else " |") for c in cells))
        bad = [r for r in runs if r.get("status") != "completed" or not r.get("check_ok")]
        if bad:
            body.append("")
            for r in bad:
                body.append("- %s run %d: %s: %s" % (cell_label(r["vmm"]), r["repeat"] + 1, r.get("status"),
                                                   (r.get("error") or "").replace("\n", " ").replace("|", "/")[:400]))
        body.append("")
        for c in qcells:
            tt, qt = meds[(c, "total_ms")]
            td, qd = meds[(c, "downtime_ms")]
            tw, qw = meds[(c, "wire.bytes")]
            ov.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s |" % (
                case, c[len("qemu-"):], fmt(tt, "ms"), fmt(qt, "ms"), fmt(ratio(tt, qt), "ratio"), fmt(td, "ms"),
                fmt(qd, "ms"), fmt(ratio(td, qd), "ratio"), fmt(tw, "mb"), fmt(qw, "mb"),
                fmt(ratio(tw, qw), "ratio"), counted([check_word(r) for r in tern]) if tern else "-",
                counted([check_word(r) for r in by[c]])))
    lines.append("Overview (medians of the completed runs; the issue's aims: Tern/QEMU at most 0.25 for total "
                 "time and 0.1 for downtime, at most 1 for bytes, and converging flat out; details and every run "
                 "below):")
    lines.append("")
    lines += ov
    lines.append("")
    lines += body
    lines.append("What the numbers are: QEMU's total runs from `drive-mirror` to the source's MIGRATION "
                 "completed event (the mirror's bulk copy, then the RAM migration, as libvirt runs them); its "
                 "`downtime` is the source's, from the stop to the last byte sent, and includes the "
                 "pre-switchover pause in which the mirror completes. A mirror that is not ready within "
                 "`--mirror-timeout-s` (%s s) is given up (status `timeout`): in `background` mode every 4 KiB "
                 "guest write dirties a whole granule (64 KiB for a raw image) that is copied again, and the "
                 "mirror is ready only once its dirty bitmap is empty. QEMU's counted disk bytes are the mirror "
                 "job's progress (`offset` at BLOCK_JOB_COMPLETED): zeroed ranges (NBD write-zeroes, a few bytes "
                 "on the wire) and re-copies included. The wire counts every connection, headers included."
                 % p.get("mirror_timeout_s", "-"))
    lines.append("")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: %s (default: all)" % ", ".join(CASES))
    ap.add_argument("--repeat", type=int, default=1, help="runs per case and VMM (default 1)")
    ap.add_argument("--vmms", default="tern,qemu", help="tern, qemu or both (default tern,qemu)")
    ap.add_argument("--tern", help="tern binary (default .build/release/tern, else .build/debug/tern)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--guest", default=os.path.join(REPO, "guest", "build", "tern-guest.elf"))
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "storage.jsonl"),
                    help="JSON lines, appended (default bench/results/storage.jsonl)")
    ap.add_argument("--markdown", metavar="FILE",
                    help="also write the report into FILE between %s and %s" % (MARK_START, MARK_END))
    ap.add_argument("--memory-mib", type=int, default=1024, help="guest RAM (default 1024)")
    ap.add_argument("--disk-flush", type=int, default=32, help="guest disk_flush=N (default 32)")
    ap.add_argument("--disk-verify", type=int, default=8, help="guest disk_verify=N (default 8)")
    ap.add_argument("--write-span", default="disk", choices=["disk", "data"],
                    help="where the guest's random writes land: the whole disk (default) or only the part holding "
                         "data (disk_blocks=)")
    ap.add_argument("--max-downtime-ms", type=int, default=300, help="downtime target for both (default 300)")
    ap.add_argument("--timeout-s", type=float, default=120.0,
                    help="QEMU: time allowed from `migrate` to pre-switchover; Tern: tern migrate --timeout (default 120)")
    ap.add_argument("--mirror-timeout-s", type=float, default=180.0,
                    help="QEMU: time allowed for the mirror to become ready; Tern: added to --timeout-s as the "
                         "driver's hard limit (default 180)")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="disk workload running before the migration (default 3)")
    ap.add_argument("--after-s", type=float, default=5.0, help="the guest running on the destination before its check (default 5)")
    ap.add_argument("--boot-timeout-s", type=float, default=60.0)
    ap.add_argument("--warm-host-gib", type=float, default=4.0,
                    help="touch and free this much memory (4 KiB pages) just before each migration, so that the "
                         "destination's image (page cache) and RAM are memory the host has backed (default 4; 0 = off)")
    ap.add_argument("--qemu-drive", default="cache=writeback,aio=threads",
                    help="QEMU -drive cache/aio options for both sides (default cache=writeback,aio=threads, the "
                         "like-for-like mode for Tern's buffered I/O: bench/README.md, devices)")
    ap.add_argument("--qemu-copy-modes", default="background,write-blocking", metavar="LIST",
                    help="drive-mirror copy modes, each its own QEMU cell: background (libvirt's default: the "
                         "guest's writes dirty the mirror's bitmap, copied again later) and/or write-blocking "
                         "(libvirt's --copy-storage-synchronous-writes: each guest write done on both sides before "
                         "it completes) (default both)")
    ap.add_argument("--qemu-granularity", type=int, default=0,
                    help="drive-mirror granularity in bytes (default 0 = QEMU's: the image's cluster size, 64 KiB for raw)")
    ap.add_argument("--tern-storage", default="copy", help="tern migrate --storage (default copy)")
    ap.add_argument("--tern-args", default="", metavar="ARGS", help="more options for tern migrate (one quoted argument)")
    ap.add_argument("--tern-run-args", default="", metavar="ARGS", help="more options for both tern run processes")
    ap.add_argument("--wire", default="veth", choices=["veth", "loopback"],
                    help="veth (default): the destination in a network namespace, bytes on the wire counted; "
                         "loopback: both on 127.0.0.1, not counted")
    ap.add_argument("--mtu", type=int, default=1500, help="the veth's MTU (default 1500)")
    ap.add_argument("--image-dir", default="/tmp", help="where the images go (default /tmp)")
    ap.add_argument("--pause-s", type=float, default=2.0, help="pause between migrations (default 2)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep logs and sockets' directories")
    ap.add_argument("--summarize", metavar="JSONL",
                    help="no runs: print (and with --markdown write) the report of the last run_id in JSONL")
    args = ap.parse_args()
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in args.case_list:
        if c not in CASES:
            ap.error("unknown case %r (known: %s)" % (c, ", ".join(CASES)))
    args.vmm_list = bl.vmm_names(ap, args.vmms)
    args.copy_modes = [m.strip() for m in args.qemu_copy_modes.split(",") if m.strip()]
    for m in args.copy_modes:
        if m not in COPY_MODES:
            ap.error("unknown copy mode %r (background, write-blocking)" % m)
    if "qemu" in args.vmm_list and not args.copy_modes:
        ap.error("--qemu-copy-modes: at least one")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


class Ctx:
    netns = None
    netns_made = False


def main():
    args = parse_args()
    if args.summarize:
        records = bl.last_run(args.summarize, "storage", "storage")
        bl.emit_report(render_markdown(records, records[0].get("meta", {})), args.markdown, MARK_START, MARK_END)
        return 0
    bl.raise_on_sigterm()
    ctx = Ctx()
    ctx.args = args
    guest_src = os.path.abspath(args.guest)
    if not os.path.isfile(guest_src):
        sys.exit("storage.py: guest not found: %s (make -C guest)" % guest_src)
    if "qemu" in args.vmm_list and not shutil.which(args.qemu):
        sys.exit("storage.py: %s not found (apt-get install qemu-system-x86)" % args.qemu)
    now = datetime.datetime.now(datetime.timezone.utc)
    ctx.run_id = now.strftime("%Y%m%dT%H%M%SZ") + "-%d" % os.getpid()
    ctx.tmp = tempfile.mkdtemp(prefix="stobench-")
    ctx.image_dir = tempfile.mkdtemp(prefix="stobench-img-", dir=args.image_dir)
    ctx.bases = {}
    ctx.guest = os.path.join(ctx.tmp, "tern-guest.elf")
    shutil.copy2(guest_src, ctx.guest)
    with open(ctx.guest, "rb") as f:
        guest_sha = hashlib.sha256(f.read()).hexdigest()
    vmms = list(args.vmm_list)
    ctx.tern_info = None
    tern_skipped = None
    if "tern" in vmms:
        tern_path = None
        try:
            tern_path = bl.pick_tern(args.tern)
        except SystemExit as e:
            tern_skipped = str(e)
        if tern_path:
            ctx.tern = os.path.join(ctx.tmp, "tern")
            shutil.copy2(tern_path, ctx.tern)  # a rebuild during the run cannot change it halfway
            ctx.tern_info = bl.tern_binary_info(tern_path)
            if not tern_has_storage(ctx.tern):
                tern_skipped = ("`%s migrate --help` does not list `--storage` (storage migration not in this "
                                "build yet)" % ctx.tern_info["path"])
        if tern_skipped:
            log("SKIPPING the Tern cells: %s" % tern_skipped)
            vmms.remove("tern")
    if not vmms:
        shutil.rmtree(ctx.tmp, ignore_errors=True)
        shutil.rmtree(ctx.image_dir, ignore_errors=True)
        log("nothing to run")
        return 1
    meta = {
        "command": "python3 " + shlex.join(sys.argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": bl.machine_facts(args.qemu, ctx.tern_info),
        "params": {"guest": os.path.relpath(guest_src, REPO), "guest_sha256": guest_sha,
                   "memory_mib": args.memory_mib, "write_span": args.write_span, "disk_flush": args.disk_flush, "disk_verify": args.disk_verify,
                   "max_downtime_ms": args.max_downtime_ms, "timeout_s": args.timeout_s,
                   "warmup_s": args.warmup_s, "after_s": args.after_s, "mirror_timeout_s": args.mirror_timeout_s, "warm_host_gib": args.warm_host_gib,
                   "qemu_drive": args.qemu_drive, "qemu_copy_modes": args.copy_modes,
                   "qemu_granularity": args.qemu_granularity, "tern_storage": args.tern_storage,
                   "tern_args": args.tern_args, "wire": args.wire, "mtu": args.mtu, "image_dir": args.image_dir,
                   "repeat": args.repeat, "cases": args.case_list, "vmms": vmms, "tern_skipped": tern_skipped},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records = []
    rc = 0
    interrupted = False
    try:
        if args.wire == "veth":
            ctx.netns = "ternbench-sto-%d" % os.getpid()
            netns_up(ctx)
        # the cells: tern, then one QEMU per drive-mirror copy mode
        cells = [v for v in vmms if v == "tern"] + (["qemu-" + m for m in args.copy_modes] if "qemu" in vmms else [])
        meta["params"]["cells"] = cells
        step = 0
        for rep in range(args.repeat):
            for ci, case in enumerate(args.case_list):
                order = cells if (rep + ci) % 2 == 0 else list(reversed(cells))
                for pos, vmm in enumerate(order):
                    if step:
                        time.sleep(args.pause_s)
                    step += 1
                    log("== %s, run %d/%d, %s" % (case, rep + 1, args.repeat, vmm))
                    rec = (run_tern(ctx, case, rep, pos) if vmm == "tern"
                           else run_qemu(ctx, case, rep, pos, vmm[len("qemu-"):]))
                    rec["meta"] = meta
                    records.append(rec)
                    bl.append_jsonl(args.out, rec)
                    w = rec.get("wire") or {}
                    log("== %s %s: %s, total %s ms, downtime %s ms, wire %s MB, checks %s%s" % (
                        case, vmm, rec.get("status"), fmt(rec.get("total_ms"), "ms"), fmt(rec.get("downtime_ms"), "ms"),
                        fmt(w.get("bytes") and w["bytes"] / 1e6, "mb"), check_word(rec),
                        ("; error: " + rec["error"][:600]) if rec.get("error") else ""))
                    if rec.get("status") != "completed" or not rec.get("check_ok"):
                        rc = 1
                    if rec.get("status") == "interrupted":
                        raise Interrupted("interrupted during a run")
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        log("interrupted: stopping; the report covers the runs that finished")
    except BenchError as e:
        log("error: %s" % e)
        rc = 1
    finally:
        with blocked_signals():
            dv.kill_leftovers()
            netns_down(ctx)
            shutil.rmtree(ctx.image_dir, ignore_errors=True)
            if not args.keep_tmp:
                shutil.rmtree(ctx.tmp, ignore_errors=True)
            else:
                log("temp dir kept: %s" % ctx.tmp)
    if records:
        bl.emit_report(render_markdown(records, meta), args.markdown, MARK_START, MARK_END)
    log("results: %s" % args.out)
    return 130 if interrupted else rc


if __name__ == "__main__":
    sys.exit(main())
