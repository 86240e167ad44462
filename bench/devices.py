#!/usr/bin/env python3
"""Devices, Tern against QEMU microvm: the same guest's virtio-blk and virtio-net, one run.

For each case and repetition, boots the test guest (guest/build/tern-guest.elf,
256 MiB) once under `tern run` and once under QEMU's microvm machine per QEMU
drive mode (cache=writeback, the like-for-like case for Tern's buffered
pread/pwrite + fdatasync, and cache=none), in alternating order, with a
virtio-blk disk on a fresh raw image or a virtio-net NIC on a TAP inside a
network namespace made here. Disk cases are measured from the guest's own
counters (status block at guest-physical 0x102000, docs/GUEST.md): two samples
`--window-s` apart after `--warmup-s`, rates over the guest's TSC. Network cases
run tools/udp_echo.py inside the namespace against the guest's UDP echo
(port 7). Host memory is warmed (touched and freed) before each boot. Writes one
JSON line per run to --out and prints a Markdown report (optionally written
into a file between <!-- devices-bench:start/end --> markers).

    python3 bench/devices.py --repeat 1                        # every case, once
    python3 bench/devices.py --cases disk --repeat 3 --markdown docs/BENCHMARKS.md
    python3 bench/devices.py --cases net                       # the network cases alone
    python3 bench/devices.py --summarize bench/results/devices.jsonl   # report only

Needs root (KVM, ip netns, TAP). Python 3 standard library only. See bench/README.md.
"""

import argparse
import datetime
import hashlib
import json
import os
import resource
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
import qemu_migrate as qm  # noqa: E402  (QMP client and warm_host)
import benchlib as bl  # noqa: E402
from benchlib import (BenchError, Interrupted, blocked_signals, log, med, ratio, run_out, sh, spawn,  # noqa: E402
                      tail)

bl.set_prog("devices")

MARK_START = "<!-- devices-bench:start -->"
MARK_END = "<!-- devices-bench:end -->"
TITLE = "## Devices: Tern vs QEMU microvm"
STATUS_GPA = 0x102000
STATUS_LEN = 0x110
MIB = 1 << 20

# Namespace addresses: only inside the namespace this script creates.
NET_HOST = "10.123.77.1"
NET_GUEST = "10.123.77.2"
NET_PREFIX = 24
NET_MAC = "52:54:00:7b:4d:02"  # the same for both VMMs, so the namespace's neighbour entry stays right

BASE = "progress=0"
CASES = {
    "rand4k-write": {
        "kind": "disk", "metric": "writes_per_s", "unit": "IOPS",
        "cmdline": "disk=write disk_pattern=rand disk_block=4096 disk_flush=0 disk_verify=0",
        "what": "4 KiB random writes, flat out, no flush (one request in flight)"},
    "rand4k-write-flush32": {
        "kind": "disk", "metric": "writes_per_s", "unit": "IOPS",
        "cmdline": "disk=write disk_pattern=rand disk_block=4096 disk_flush=32 disk_verify=0",
        "what": "4 KiB random writes, a FLUSH after every 32"},
    "rand4k-write-flush1": {
        "kind": "disk", "metric": "writes_per_s", "unit": "IOPS",
        "cmdline": "disk=write disk_pattern=rand disk_block=4096 disk_flush=1 disk_verify=0",
        "what": "4 KiB random writes, a FLUSH after every write"},
    "seq1m-write": {
        "kind": "disk", "metric": "mb_per_s", "unit": "MB/s",
        "cmdline": "disk=write disk_pattern=seq disk_block=1048576 disk_flush=0 disk_verify=0",
        "what": "1 MiB sequential writes (wrapping around the image), flat out, no flush"},
    "seq1m-write-flush16": {
        "kind": "disk", "metric": "mb_per_s", "unit": "MB/s",
        "cmdline": "disk=write disk_pattern=seq disk_block=1048576 disk_flush=16 disk_verify=0",
        "what": "1 MiB sequential writes, a FLUSH after every 16 (16 MiB)"},
    "rand4k-read": {
        "kind": "disk", "metric": "reads_per_s", "unit": "IOPS", "prepared": True,
        "cmdline": "disk=read disk_pattern=rand disk_block=4096",
        "what": "4 KiB random reads of an image the guest wrote whole once (every block checked)"},
    "udp64": {
        "kind": "net", "size": 64,
        "cmdline": "ip=%s/%d" % (NET_GUEST, NET_PREFIX),
        "what": "UDP echo, 64-byte payload, one datagram in flight (tools/udp_echo.py in the namespace)"},
    "udp1400": {
        "kind": "net", "size": 1400,
        "cmdline": "ip=%s/%d" % (NET_GUEST, NET_PREFIX),
        "what": "UDP echo, 1400-byte payload, one datagram in flight"},
}
GROUPS = {"disk": [c for c in CASES if CASES[c]["kind"] == "disk"],
          "net": [c for c in CASES if CASES[c]["kind"] == "net"]}
DEFAULT_AIO = {"writeback": "threads", "none": "threads"}


# ---------------------------------------------------------------- processes

def stop_proc(p, name, graceful=None):
    """graceful() (quit through the API/QMP) if given, then SIGTERM, then SIGKILL; all bounded."""
    if p is None:
        return None
    if p.poll() is None and graceful is not None:
        try:
            graceful()
        except Exception as e:  # noqa: BLE001 - any failure of the polite way falls through to signals
            log("%s: quit failed (%s); sending SIGTERM" % (name, e))
    return bl.terminate(p, name, 5)


def kill_leftovers():
    bl.kill_leftovers(stop_proc)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid):
    """{tid: (comm, utime + stime ticks)} of every thread of `pid` ({} if it is gone)."""
    out = {}
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[tid] = (comm, int(fields[11]) + int(fields[12]))
    return out


def host_busy_ticks():
    """(ticks all CPUs spent on tasks: user + nice + system in /proc/stat, ticks of kernel threads).
    Kernel threads (children of kthreadd: the journal, writeback and I/O workers) work for whichever
    VMM writes and flushes, so they are not "other work"; interrupts and steal are left out too."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    kthreads = 0
    for pid, fields in bl.processes():
        if pid == 2 or fields[1] == "2":
            kthreads += int(fields[11]) + int(fields[12])
    return v[0] + v[1] + v[2], kthreads


def cpu_use(pid, a, b, ha, hb, seconds, client_s=0.0):
    """The VMM's CPU over a window, in cores: all threads, the busiest (the vCPU: the guest polls flat
    out) and the others (device workers, QEMU's main loop and thread pool); kernel threads; and the
    host's busy cores spent in neither, nor in the echo client (other work on the machine)."""
    per = {}
    for tid, (comm, ticks) in b.items():
        per[tid] = (comm, ticks - a.get(tid, (comm, 0))[1])
    total = sum(t for _, t in per.values())
    busiest = max(per.items(), key=lambda kv: kv[1][1]) if per else None
    f = 1.0 / CLK_TCK / seconds
    (ha, ka), (hb, kb) = ha, hb
    return {
        "vmm_cores": round(total * f, 3),
        "vcpu_thread_cores": round(busiest[1][1] * f, 3) if busiest else None,
        "vcpu_thread_comm": busiest[1][0] if busiest else None,
        "other_threads_cores": round((total - (busiest[1][1] if busiest else 0)) * f, 3),
        "threads": sorted(([c, round(t * f, 3)] for c, t in per.values() if t), key=lambda x: -x[1]),
        "host_busy_cores": round((hb - ha) * f, 3),
        "kernel_threads_cores": round((kb - ka) * f, 3),
        "client_cores": round(client_s / seconds, 3),
        "foreign_busy_cores": round((hb - ha - total - (kb - ka)) * f - client_s / seconds, 3),
    }




# ---------------------------------------------------------------- status block

FIELDS = [  # (offset, struct format, name), docs/GUEST.md "Status block", version 2
    (0x00, "Q", "magic"), (0x08, "I", "version"), (0x0C, "I", "phase"), (0x10, "Q", "iterations"),
    (0x18, "Q", "tsc"), (0x20, "Q", "tsc_khz"), (0x40, "Q", "errors"),
    (0xA0, "Q", "disk_ops"), (0xA8, "Q", "disk_errors"), (0xB0, "Q", "disk_verified"),
    (0xB8, "Q", "net_rx"), (0xC0, "Q", "net_tx"), (0xC8, "Q", "disk_writes"), (0xD0, "Q", "disk_reads"),
    (0xD8, "Q", "disk_flushes"), (0xE0, "Q", "disk_bytes"), (0xE8, "Q", "disk_capacity"),
    (0xF0, "I", "disk_state"), (0xF4, "I", "net_state"), (0xF8, "Q", "net_announces"),
    (0x100, "Q", "notifies"), (0x108, "Q", "notify_ticks"),
]
STATE_NAMES = {0: "off", 1: "running", 2: "failed"}


def decode_status(raw, t_sent=None):
    if len(raw) < STATUS_LEN:
        raise BenchError("status block read returned %d bytes, not %d" % (len(raw), STATUS_LEN))
    st = {name: struct.unpack_from("<" + f, raw, off)[0] for off, f, name in FIELDS}
    st["magic_ok"] = st.pop("magic") == qm.STATUS_MAGIC
    now = time.monotonic()
    st["host_t"] = now if t_sent is None else (t_sent + now) / 2  # the middle of the read
    return st


def http_get_unix(path, target, timeout=10.0):
    """GET over a Unix socket (Tern's API); returns (status code, body bytes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(("GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % target).encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("Tern API closed the connection before its headers")
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        code = int(lines[0].split()[1])
        length = None
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        while length is None or len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return code, body if length is None else body[:length]
    finally:
        s.close()


class TernVM:
    name = "tern"

    def __init__(self, ctx, d, cmdline, disk=None, readonly=False, net=False):
        self.ctx, self.d = ctx, d
        self.sock = os.path.join(d, "api.sock")
        self.serial = os.path.join(d, "serial.log")
        self.logpath = os.path.join(d, "tern.log")
        cmd = [ctx.tern, "run", "--kernel", ctx.guest, "--memory", "%dM" % ctx.args.memory_mib,
               "--cmdline", cmdline, "--serial", "file:" + self.serial, "--api-socket", self.sock]
        if disk:
            cmd += ["--disk", "path=%s%s" % (disk, ",readonly=on" if readonly else "")]
        if net:
            cmd = ["ip", "netns", "exec", ctx.netns] + cmd + ["--net", "tap=%s,mac=%s" % (ctx.tap, NET_MAC)]
        self.cmd = cmd
        self.p = spawn("tern", cmd, stdout=self.logpath, stderr=subprocess.STDOUT)

    def status(self):
        if not os.path.exists(self.sock):
            return None
        t = time.monotonic()
        try:
            code, body = http_get_unix(self.sock, "/v1/vm/memory?address=%d&length=%d" % (STATUS_GPA, STATUS_LEN))
        except (OSError, BenchError):
            return None
        if code != 200:
            return None
        return decode_status(body, t)

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        return stop_proc(self.p, "tern", lambda: bl.tern_quit(self.ctx.tern, self.sock))


class QemuVM:
    def __init__(self, ctx, d, cmdline, disk=None, readonly=False, net=False, drive=None):
        self.ctx, self.d = ctx, d
        self.sock = os.path.join(d, "qmp.sock")
        self.serial = os.path.join(d, "serial.log")
        self.logpath = os.path.join(d, "qemu.log")
        self.qmp = None
        cmd = [ctx.args.qemu, "-M", "microvm", "-accel", "kvm", "-m", "%dM" % ctx.args.memory_mib,
               "-nodefaults", "-no-reboot", "-display", "none", "-global", "virtio-mmio.force-legacy=false",
               "-kernel", ctx.guest, "-append", cmdline, "-serial", "file:" + self.serial,
               "-qmp", "unix:%s,server=on,wait=off" % self.sock]
        if disk:
            cmd += ["-device", "virtio-blk-device,drive=d0",
                    "-drive", "id=d0,file=%s,format=raw,if=none,%s%s" % (disk, drive_opts(drive),
                                                                         ",readonly=on" if readonly else "")]
        if net:
            cmd = ["ip", "netns", "exec", ctx.netns] + cmd + [
                "-netdev", "tap,id=n0,ifname=%s,script=no,downscript=no" % ctx.tap,
                "-device", "virtio-net-device,netdev=n0,mac=%s" % NET_MAC]
        self.cmd = cmd
        self.p = spawn("qemu", cmd, stdout=self.logpath, stderr=subprocess.STDOUT)

    def status(self):
        if self.qmp is None:
            if not os.path.exists(self.sock):
                return None
            try:
                self.qmp = qm.QMP(self.sock, 2)
            except (OSError, qm.BenchError):
                self.qmp = None
                return None
        t = time.monotonic()
        out = self.qmp.hmp("xp /%dgx 0x%x" % (STATUS_LEN // 8, STATUS_GPA))
        words = []
        for ln in out.splitlines():
            if ":" in ln:
                words += [int(tok, 16) for tok in ln.split(":", 1)[1].split()]
        if len(words) < STATUS_LEN // 8:
            raise BenchError("cannot parse QMP xp output: %r" % out[:200])
        return decode_status(struct.pack("<%dQ" % (STATUS_LEN // 8), *words[:STATUS_LEN // 8]), t)

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        def quit_qmp():
            if self.qmp is not None:
                self.qmp.sock.settimeout(2)
                self.qmp.cmd("quit")
        rc = stop_proc(self.p, "qemu", quit_qmp)
        if self.qmp is not None:
            self.qmp.close()
        return rc


def drive_opts(drive):
    return "cache=%s,aio=%s" % (drive["cache"], drive["aio"])


# ---------------------------------------------------------------- helpers for one run

def wait_ready(vm, kind, timeout):
    """Polls the status block until the device workload runs (state 1 and, for the disk, requests
    completing) or failed (state 2). Returns the last status."""
    deadline = time.monotonic() + timeout
    st = None
    while True:
        if not vm.alive():
            raise BenchError("the VMM exited (%s) before the guest's %s ran: %s" % (
                vm.p.returncode, kind, tail(vm.logpath, 600) or tail(vm.serial, 600)))
        try:
            st = vm.status()
        except (OSError, BenchError, qm.BenchError):
            st = None
        if st and st["magic_ok"]:
            if st["phase"] in (0xE, 0xF):
                raise BenchError("guest phase 0x%X: %s" % (st["phase"], tail(vm.serial, 600)))
            state = st["%s_state" % kind]
            if state == 2:
                return st
            if state == 1 and (kind != "disk" or st["disk_ops"] > 1):
                return st
        if time.monotonic() > deadline:
            raise BenchError("the guest's %s did not start within %.0f s (status %s): %s" % (
                kind, timeout, "none" if st is None else "%s_state=%s" % (kind, st.get(kind + "_state")),
                tail(vm.serial, 600)))
        time.sleep(0.1)


def sample(vm):
    try:
        st = vm.status()
    except (OSError, qm.BenchError) as e:
        raise BenchError("could not read the status block: %s" % e)
    if st is None or not st["magic_ok"]:
        raise BenchError("could not read the status block")
    return st


def deltas(a, b):
    dt_tsc = (b["tsc"] - a["tsc"]) / (a["tsc_khz"] * 1e3) if a["tsc_khz"] else None
    dt_wall = b["host_t"] - a["host_t"]
    # The guest's TSC (calibrated by the guest against the PIT) is the clock; the host's monotonic
    # clock between the two reads checks it. Should they disagree by more than 5% (a calibration gone
    # wrong), the host's clock is used and the record says so.
    tsc_ok = bool(dt_tsc and dt_tsc > 0 and abs(dt_tsc - dt_wall) <= 0.05 * dt_wall)
    dt = dt_tsc if tsc_ok else dt_wall
    d = {k: b[k] - a[k] for k in ("disk_ops", "disk_writes", "disk_reads", "disk_flushes", "disk_bytes",
                                  "disk_verified", "net_rx", "net_tx", "notifies", "notify_ticks")}
    out = {"dt_tsc_s": round(dt_tsc, 4) if dt_tsc else None, "dt_wall_s": round(dt_wall, 4),
           "clock": "guest-tsc" if tsc_ok else "host-monotonic (guest TSC rate disagrees)",
           "guest_tsc_khz": a["tsc_khz"], "delta": d}
    out["ops_per_s"] = d["disk_ops"] / dt
    out["writes_per_s"] = d["disk_writes"] / dt
    out["reads_per_s"] = d["disk_reads"] / dt
    out["flushes_per_s"] = d["disk_flushes"] / dt
    out["mb_per_s"] = d["disk_bytes"] / dt / 1e6
    out["us_per_op"] = dt * 1e6 / d["disk_ops"] if d["disk_ops"] else None
    out["notifies_per_op"] = d["notifies"] / d["disk_ops"] if d["disk_ops"] else None
    # ticks per ms: the guest's calibration, or the TSC's rate over the host's clock if that was off
    khz = a["tsc_khz"] if tsc_ok else ((b["tsc"] - a["tsc"]) / dt_wall / 1e3 if dt_wall > 0 else None)
    if d["notifies"] and khz:
        out["notify_us"] = d["notify_ticks"] / d["notifies"] / khz * 1e3
        out["notify_share"] = d["notify_ticks"] / khz / 1e3 / dt
    else:
        out["notify_us"] = None
        out["notify_share"] = None
    return out


def base_record(ctx, case, rep, vmm, order, drive):
    c = CASES[case]
    return {
        "bench": "devices", "run_id": ctx.run_id, "case": case, "kind": c["kind"], "vmm": vmm,
        "drive": drive_opts(drive) if drive else None, "repeat": rep, "order": order,
        "cmdline": "%s %s" % (c["cmdline"], BASE), "memory_mib": ctx.args.memory_mib,
        "warmup_s": ctx.args.warmup_s, "window_s": ctx.args.window_s,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_loadavg_1m_before": round(os.getloadavg()[0], 2), "status": "error",
    }


def make_image(ctx, name):
    path = os.path.join(ctx.image_dir, name)
    with open(path, "wb") as f:
        f.truncate(ctx.args.image_mib * MIB)
    return path


def prepare_read_image(ctx):
    """An image the guest has written whole once (1 MiB sequential writes over every block), flushed to
    the host's disk, so disk=read checks every block it reads. Written once per run of this script and
    shared, read-only, by every read run of both VMMs: both find it in the host's page cache."""
    if ctx.read_image:
        return ctx.read_image
    path = make_image(ctx, "read.img")
    d = tempfile.mkdtemp(prefix="prep-", dir=ctx.tmp)
    blocks = ctx.args.image_mib
    cmdline = "disk=write disk_pattern=seq disk_block=1048576 disk_flush=0 disk_verify=0 " + BASE
    use_tern = "tern" in ctx.vmm_list
    qm.warm_host(ctx.args.warm_host_gib)
    log("writing the read image once (%d MiB, %s, %s)" % (blocks, "tern" if use_tern else "qemu", cmdline))
    vm = TernVM(ctx, d, cmdline, disk=path) if use_tern else QemuVM(
        ctx, d, cmdline, disk=path, drive={"cache": "writeback", "aio": "threads"})
    try:
        wait_ready(vm, "disk", ctx.args.boot_timeout_s)
        deadline = time.monotonic() + 120
        while True:
            st = sample(vm)
            if st["disk_state"] != 1 or st["disk_errors"]:
                raise BenchError("preparing the read image: disk_state %s, disk_errors %d: %s" % (
                    st["disk_state"], st["disk_errors"], tail(vm.serial, 600)))
            if st["disk_writes"] >= blocks + 1:
                break
            if time.monotonic() > deadline:
                raise BenchError("preparing the read image: %d of %d MiB written after 120 s" % (
                    st["disk_writes"], blocks))
            time.sleep(0.2)
    finally:
        with blocked_signals():
            vm.stop()
            shutil.rmtree(d, ignore_errors=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    ctx.read_image = path
    ctx.read_image_by = vm.__class__.__name__
    return path


# ---------------------------------------------------------------- one run

def run_one(ctx, case, rep, vmm, order):
    a = ctx.args
    c = CASES[case]
    drive = ctx.qemu_drives.get(vmm) if c["kind"] == "disk" else None
    rec = base_record(ctx, case, rep, vmm, order, drive)
    d = tempfile.mkdtemp(prefix="%s-%s-" % (vmm, case), dir=ctx.tmp)
    image = None
    vm = None
    try:
        readonly = False
        if c["kind"] == "disk":
            if c.get("prepared"):
                image, readonly = prepare_read_image(ctx), True
                rec["image"] = "written whole once by the guest (under %s), fsynced, read-only" % (
                    "tern" if ctx.read_image_by == "TernVM" else "qemu")
            else:
                image = make_image(ctx, "%s-%s-%d.img" % (vmm, case, rep))
                rec["image"] = "fresh sparse file"
            rec["image_mib"] = a.image_mib
        else:
            sh(["ip", "-n", ctx.netns, "neigh", "flush", "dev", ctx.tap], check=False)
        rec["warm_host_s"] = round(qm.warm_host(a.warm_host_gib), 3)
        rec["warm_host_gib"] = a.warm_host_gib
        cmdline = rec["cmdline"]
        kw = dict(disk=image, readonly=readonly, net=c["kind"] == "net")
        vm = TernVM(ctx, d, cmdline, **kw) if vmm == "tern" else QemuVM(ctx, d, cmdline, drive=drive, **kw)
        rec["command"] = shlex.join(vm.cmd)
        t0 = time.monotonic()
        st = wait_ready(vm, c["kind"], a.boot_timeout_s)
        rec["ready_s"] = round(time.monotonic() - t0, 3)
        state = st["%s_state" % c["kind"]]
        if state == 2:
            rec["status"] = "failed"
            rec["error"] = "the guest's %s_state reads failed: %s" % (c["kind"], tail(vm.serial, 800))
            return rec
        if c["kind"] == "disk":
            run_disk(ctx, vm, rec)
        else:
            run_net(ctx, vm, rec, c)
    except BenchError as e:
        rec["status"] = "error"
        rec["error"] = str(e)
    except (KeyboardInterrupt, Interrupted):
        rec["status"] = "interrupted"
        rec["error"] = "interrupted (Ctrl-C or SIGTERM)"
    finally:
        with blocked_signals():
            if vm is not None:
                if rec["status"] != "ok":
                    rec["serial_tail"] = tail(vm.serial, 1500)
                    rec["vmm_log_tail"] = tail(vm.logpath, 1500)
                rec["vmm_exit"] = vm.stop()
            if image and not CASES[case].get("prepared"):
                try:
                    os.unlink(image)
                except OSError:
                    pass
            if not a.keep_tmp:
                shutil.rmtree(d, ignore_errors=True)
            else:
                rec["tmp_dir"] = d
    return rec


def run_disk(ctx, vm, rec):
    a = ctx.args
    time.sleep(a.warmup_s)
    s1 = sample(vm)
    c1, h1 = thread_cpu(vm.p.pid), host_busy_ticks()
    time.sleep(a.window_s)
    c2, h2 = thread_cpu(vm.p.pid), host_busy_ticks()
    s2 = sample(vm)
    rec["sample_a"], rec["sample_b"] = s1, s2
    rec.update(deltas(s1, s2))
    rec["cpu"] = cpu_use(vm.p.pid, c1, c2, h1, h2, s2["host_t"] - s1["host_t"])
    ops = rec["delta"]["disk_ops"]
    if ops:
        rec["io_threads_cpu_us_per_op"] = rec["cpu"]["other_threads_cores"] * rec["dt_wall_s"] * 1e6 / ops
    rec["disk_errors"] = s2["disk_errors"]
    rec["disk_state"] = STATE_NAMES.get(s2["disk_state"], s2["disk_state"])
    rec["disk_capacity"] = s2["disk_capacity"]
    problems = []
    if s2["disk_errors"]:
        problems.append("disk_errors = %d" % s2["disk_errors"])
    if s2["disk_state"] != 1:
        problems.append("disk_state = %s" % rec["disk_state"])
    if rec["delta"]["disk_ops"] <= 0:
        problems.append("no disk request completed in the window")
    if CASES[rec["case"]].get("prepared") and rec["delta"]["disk_verified"] <= 0:
        problems.append("no block read back was verified")
    if not vm.alive():
        problems.append("the VMM exited")
    rec["status"] = "failed" if problems else "ok"
    if problems:
        rec["error"] = "; ".join(problems) + ": " + tail(vm.serial, 600)


def run_net(ctx, vm, rec, c):
    a = ctx.args
    time.sleep(min(a.warmup_s, 1.0))
    s1 = sample(vm)
    c1, h1 = thread_cpu(vm.p.pid), host_busy_ticks()
    cmd = ["ip", "netns", "exec", ctx.netns, sys.executable, os.path.join(REPO, "tools", "udp_echo.py"),
           NET_GUEST, "--count", str(a.udp_count), "--size", str(c["size"]), "--timeout", "0.2",
           "--warmup", "20"]
    rec["udp_echo_command"] = shlex.join(cmd)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    limit = min(a.udp_count * 0.2 + 30, 300)
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=limit, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise BenchError("udp_echo.py did not finish within %.0f s" % limit)
    c2, h2 = thread_cpu(vm.p.pid), host_busy_ticks()
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s2 = sample(vm)
    rec["sample_a"], rec["sample_b"] = s1, s2
    rec["cpu"] = cpu_use(vm.p.pid, c1, c2, h1, h2, s2["host_t"] - s1["host_t"],
                         client_s=ru2.ru_utime + ru2.ru_stime - ru.ru_utime - ru.ru_stime)
    d = deltas(s1, s2)
    rec["delta"] = d["delta"]
    rec["notify_us"] = d["notify_us"]
    rec["clock"] = d["clock"]
    rec["net_state"] = STATE_NAMES.get(s2["net_state"], s2["net_state"])
    rec["notifies_per_echo"] = d["delta"]["notifies"] / d["delta"]["net_rx"] if d["delta"]["net_rx"] else None
    try:
        res = json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError("udp_echo.py printed no JSON (exit %d): %s" % (
            r.returncode, r.stderr.decode("utf-8", "replace")[-400:]))
    rec["udp_echo"] = res
    rtt = res.get("rtt_us") or {}
    rec["rtt_min_us"], rec["rtt_median_us"], rec["rtt_p99_us"] = rtt.get("min"), rtt.get("median"), rtt.get("p99")
    rec["packets_per_s"] = res.get("packets_per_s")
    rec["lost"] = res.get("lost")
    problems = []
    if not res.get("answered"):
        problems.append("no echo answered")
    if s2["net_state"] != 1:
        problems.append("net_state = %s" % rec["net_state"])
    if not vm.alive():
        problems.append("the VMM exited")
    rec["status"] = "failed" if problems else "ok"
    if res.get("lost"):
        problems.append("%d of %d echoes lost" % (res["lost"], res["sent"]))
    if problems:
        rec["error"] = "; ".join(problems)


# ---------------------------------------------------------------- network namespace

def netns_up(ctx):
    ns, tap = ctx.netns, ctx.tap
    sh(["ip", "netns", "add", ns])
    ctx.netns_made = True
    sh(["ip", "-n", ns, "link", "set", "lo", "up"])
    sh(["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])
    sh(["ip", "-n", ns, "addr", "add", "%s/%d" % (NET_HOST, NET_PREFIX), "dev", tap])
    sh(["ip", "-n", ns, "link", "set", tap, "up"])
    log("network namespace %s: %s %s/%d (guest %s)" % (ns, tap, NET_HOST, NET_PREFIX, NET_GUEST))


def netns_down(ctx):
    if not getattr(ctx, "netns_made", False):
        return
    r = sh(["ip", "netns", "pids", ctx.netns], check=False)
    for pid in r.stdout.decode().split():
        # only processes this script started can be in the namespace it made
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh(["ip", "netns", "del", ctx.netns], check=False)
    ctx.netns_made = False
    log("network namespace %s deleted" % ctx.netns)


# ---------------------------------------------------------------- report

def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "ratio":
        return "%.2f" % v
    if abs(v) >= 1000:
        return "{:,.0f}".format(v)
    if abs(v) >= 100:
        return "%.0f" % v
    if abs(v) >= 10:
        return "%.1f" % v
    return "%.2f" % v


def cell(runs, key):
    """median (min-max) over the runs that passed; the count of runs that did not."""
    ok = [r[key] for r in runs if r.get("status") == "ok" and r.get(key) is not None]
    bad = len([r for r in runs if r.get("status") not in ("ok", "disturbed")])
    if not ok:
        return ("FAILED" if bad else "-"), None
    m = med(ok)
    s = fmt(m)
    if len(ok) > 1:
        s += " (%s–%s)" % (fmt(min(ok)), fmt(max(ok)))
    if bad:
        s += ", %d failed" % bad
    return s, m


def vmm_label(vmm, drives):
    if vmm == "tern":
        return "Tern"
    if vmm == "qemu-net":
        return "QEMU"
    d = drives.get(vmm)
    return "QEMU %s" % (drive_opts(d) if d else vmm)


def render_markdown(records, meta):
    p = meta.get("params", {})
    drives = {k: v for k, v in p.get("qemu_drives", {}).items()}
    vmms = p.get("vmms", [])
    qemus = [v for v in vmms if v != "tern"]
    lines = [MARK_START, TITLE, ""]
    lines.append("Generated by `bench/devices.py` (see `bench/README.md`).")
    lines.append("")
    lines.append("- command: `%s`" % meta.get("command"))
    lines.append("- date: %s" % meta.get("date"))
    m = meta.get("machine", {})
    lines.append("- machine: %s CPUs (`nproc`), %s, kernel %s, load average %s at the start" % (
        m.get("nproc"), m.get("cpu_model") or "unknown CPU", m.get("kernel"), m.get("loadavg")))
    lines.append("- QEMU: %s, `-M microvm -accel kvm -m %sM`, virtio-mmio version 2, ioeventfd (its default)" % (
        m.get("qemu_version"), p.get("memory_mib")))
    t = m.get("tern") or {}
    if not t:
        lines.append("- tern: not run (`--vmms qemu`)")
    else:
        lines.append("- tern: %s build (`%s`, built %s; the last commit then: %s; HEAD at the run: %s%s), "
                 "`--memory %sM`" % (
                     t.get("build"), t.get("path"), t.get("mtime"), t.get("commit_before_build") or "unknown",
                     m.get("tern_commit"), " + uncommitted changes" if m.get("tern_tree_dirty") else "",
                     p.get("memory_mib")))
    lines.append("- guest: `%s` (sha256 %s…, built %s), `%s` appended to every case's command line" % (
        p.get("guest"), (p.get("guest_sha256") or "")[:12], p.get("guest_mtime"), BASE))
    lines.append("- disk: a %d MiB raw image on %s (`%s`), a fresh sparse file per write run; "
                 "one request in flight (the guest's polled ring-3 driver); measured from the guest's own "
                 "counters: two samples %g s apart after %g s of warm-up, rates over the guest's TSC" % (
                     p.get("image_mib", 0), p.get("image_fs"), p.get("image_dir"), p.get("window_s"),
                     p.get("warmup_s")))
    lines.append("- host memory warmed before every boot: %g GiB of 4 KiB pages touched and freed "
                 "(`--warm-host-gib`)" % p.get("warm_host_gib", 0) if p.get("warm_host_gib") else
                 "- host memory not warmed (`--warm-host-gib 0`)")
    lines.append("- order of the VMMs alternates from run to run; each cell: median (min–max) of the runs "
                 "that passed (disk_errors 0, disk_state running)")
    lines.append("")
    cases = []
    for r in records:
        if r["case"] not in cases:
            cases.append(r["case"])
    disk_cases = [c for c in cases if CASES.get(c, {}).get("kind") == "disk"]
    net_cases = [c for c in cases if CASES.get(c, {}).get("kind") == "net"]
    failures = []
    for r in records:
        if r.get("status") not in ("ok", "disturbed"):
            failures.append("- %s, %s, run %d: %s%s" % (
                r["case"], vmm_label(r["vmm"], drives), r["repeat"] + 1, r.get("status"),
                (": " + (r.get("error") or "").replace("\n", " ").replace("|", "/")[:400]) if r.get("error") else ""))
    if disk_cases:
        hdr = "| case | unit | Tern |"
        sep = "| --- | --- | ---: |"
        for q in qemus:
            hdr += " %s | Tern/QEMU |" % vmm_label(q, drives)
            sep += " ---: | ---: |"
        hdr += " notify µs, Tern | " + " | ".join("notify µs, %s" % vmm_label(q, drives) for q in qemus) + " |"
        sep += " ---: |" + " ---: |" * len(qemus)
        lines += [hdr, sep]
        for c in disk_cases:
            runs = [r for r in records if r["case"] == c]
            key = CASES[c]["metric"]
            tc, tm = cell([r for r in runs if r["vmm"] == "tern"], key)
            row = "| %s | %s | %s |" % (c, CASES[c]["unit"], tc)
            for q in qemus:
                qc, qmv = cell([r for r in runs if r["vmm"] == q], key)
                row += " %s | %s |" % (qc, fmt(ratio(tm, qmv), "ratio"))
            row += " %s |" % cell([r for r in runs if r["vmm"] == "tern"], "notify_us")[0]
            for q in qemus:
                row += " %s |" % cell([r for r in runs if r["vmm"] == q], "notify_us")[0]
            lines.append(row)
        lines.append("")
        lines.append("Ratios are of the medians; above 1 Tern is faster. Per request, medians: wall time per "
                     "completed request (µs), the share of the vCPU's time spent in QueueNotify writes, and "
                     "the CPU the VMM's threads other than the vCPU's took per request (µs: device worker, "
                     "QEMU's main loop and thread pool); and how busy the host was with other work (cores "
                     "of 2 spent neither in the VMM nor in kernel threads, median over the case's runs, "
                     "approximate: task and /proc/stat accounting differ by up to ~0.3 cores, shown as 0 "
                     "below 0):")
        lines.append("")
        hdr = "| case |" + "".join(" %s µs/req | notify | I/O CPU µs/req |" % vmm_label(v, drives)
                                   for v in ["tern"] + qemus) + " other work, cores |"
        lines += [hdr, "| --- |" + " ---: | ---: | ---: |" * (1 + len(qemus)) + " ---: |"]
        for c in disk_cases:
            runs = [r for r in records if r["case"] == c]
            row = "| %s |" % c
            for v in ["tern"] + qemus:
                vr = [r for r in runs if r["vmm"] == v and r.get("status") == "ok"]
                share = med([r.get("notify_share") for r in vr])
                row += " %s | %s | %s |" % (fmt(med([r.get("us_per_op") for r in vr])),
                                            "-" if share is None else "%.0f%%" % (share * 100),
                                            fmt(med([r.get("io_threads_cpu_us_per_op") for r in vr])))
            other = med([(r.get("cpu") or {}).get("foreign_busy_cores") for r in runs if r.get("status") == "ok"])
            row += " %s |" % ("-" if other is None else "%.2f" % max(0.0, other))
            lines.append(row)
        lines.append("")
        lines.append("Cases: " + "; ".join("`%s`: %s (`%s`)" % (c, CASES[c]["what"], CASES[c]["cmdline"])
                                           for c in disk_cases) + ".")
        lines.append("")
        notify = {}
        for v in ["tern"] + qemus:
            vals = [r["notify_us"] for r in records if r["vmm"] == v and r.get("kind") == "disk"
                    and r.get("status") == "ok" and r.get("notify_us") is not None]
            if vals:
                notify[v] = (med(vals), min(vals), max(vals), len(vals))
        if notify:
            lines.append("One notification exit (a QueueNotify write from ring 3, timed by the guest around "
                         "the write, `notify_ticks / notifies` in the status block; the write exits to "
                         "the host, which signals the ioeventfd and resumes the vCPU): " + "; ".join(
                             "%s %s µs (%s–%s over %d runs)" % (vmm_label(v, drives), fmt(x[0]), fmt(x[1]),
                                                                fmt(x[2]), x[3]) for v, x in notify.items()) + ".")
            lines.append("")
    if net_cases:
        nq = [v for v in p.get("net_vmms", []) if v != "tern"]
        hdr = "| case | | Tern |" + "".join(" QEMU | Tern/QEMU |" for _ in nq[:1])
        lines += [hdr, "| --- | --- | ---: |" + " ---: | ---: |" * len(nq[:1])]
        nq = [v for v in p.get("net_vmms", []) if v != "tern"]
        q = nq[0] if nq else None
        for c in net_cases:
            runs = [r for r in records if r["case"] == c]
            for key, label in (("rtt_min_us", "RTT min µs"), ("rtt_median_us", "RTT median µs"),
                               ("rtt_p99_us", "RTT p99 µs"), ("packets_per_s", "packets/s (client)"),
                               ("notifies_per_echo", "QueueNotify writes per echo"),
                               ("notify_us", "notify µs")):
                tc, tm = cell([r for r in runs if r["vmm"] == "tern"], key)
                row = "| %s | %s | %s |" % (c, label, tc)
                if q:
                    qc, qmv = cell([r for r in runs if r["vmm"] == q], key)
                    row += " %s | %s |" % (qc, fmt(ratio(tm, qmv), "ratio"))
                lines.append(row)
        lines.append("")
        lines.append("Network: a TAP in a namespace made for the run (%s/%d on the host side, guest `ip=%s/%d`), "
                     "the VMM started in it with `ip netns exec`; `tools/udp_echo.py --count %s` in the namespace "
                     "(20 echoes of warm-up first), one datagram in flight; packets/s is the client's rate "
                     "(answered / elapsed), which includes its own Python work per datagram (with 1400-byte "
                     "payloads it builds each one byte by byte, which bounds it); for RTT a ratio below 1 "
                     "means Tern is faster, for packets/s above 1." % (NET_HOST, NET_PREFIX, NET_GUEST, NET_PREFIX,
                                                             p.get("udp_count")))
        lines.append("")
    redone = [r for r in records if r.get("status") == "disturbed"]
    still = [r for r in records if r.get("status") == "ok" and r.get("disturbed")]
    if p.get("max_other_cores") is not None:
        lines.append("Other work on the machine: a run during whose window more than %s cores were busy "
                     "outside the VMM, kernel threads and the echo client was done again, up to %s times; %d such attempt%s "
                     "left out of the tables (status `disturbed` in the JSON)%s." % (
                         p.get("max_other_cores"), p.get("retries"), len(redone),
                         " was" if len(redone) == 1 else "s were",
                         "" if not still else "; %d final runs were still disturbed and are counted (%s)" % (
                             len(still), ", ".join("%s %s run %d: %.2f cores" % (
                                 r["case"], vmm_label(r["vmm"], drives), r["repeat"] + 1,
                                 r["cpu"]["foreign_busy_cores"]) for r in still))))
    lines.append("")
    if failures:
        lines.append("Runs that did not pass:")
        lines.append("")
        lines.extend(failures)
        lines.append("")
    lines.append(MARK_END)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def commit_before(when):
    """The last commit at `when` (an ISO time): what a binary built then was at least built from."""
    return run_out(["git", "log", "-1", "--format=%h", "--until=" + when]) if when else None


def parse_drive(spec):
    """'writeback' or 'none' (aio from DEFAULT_AIO), or 'cache=X,aio=Y'."""
    d = {}
    if "=" not in spec:
        d = {"cache": spec, "aio": DEFAULT_AIO.get(spec, "threads")}
    else:
        for part in spec.split(","):
            k, _, v = part.partition("=")
            d[k.strip()] = v.strip()
        d.setdefault("cache", "writeback")
        d.setdefault("aio", "threads")
    if d["aio"] == "native" and d["cache"] not in ("none", "directsync"):
        raise ValueError("aio=native needs cache=none or directsync")
    return d


def fs_type(path):
    out = run_out(["df", "-T", path])
    if out:
        rows = out.splitlines()
        if len(rows) > 1:
            f = rows[1].split()
            return "%s (%s)" % (f[1], f[0]) if len(f) > 1 else None
    return None


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="disk,net",
                    help="comma-separated cases or groups (disk, net): %s (default: disk,net)" % ", ".join(CASES))
    ap.add_argument("--repeat", type=int, default=3, help="runs per case and VMM (default 3)")
    ap.add_argument("--vmms", default="tern,qemu", help="tern, qemu or both (default tern,qemu)")
    ap.add_argument("--qemu-drive", action="append", metavar="MODE",
                    help="a QEMU -drive cache/aio mode to run, each its own column (repeatable): writeback, "
                         "none, or cache=X,aio=Y (default: writeback and none, i.e. cache=writeback,aio=%s and "
                         "cache=none,aio=%s; network cases run QEMU once, without a disk)" % (
                             DEFAULT_AIO["writeback"], DEFAULT_AIO["none"]))
    ap.add_argument("--tern", help="tern binary (default .build/release/tern)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--guest", default=os.path.join(REPO, "guest", "build", "tern-guest.elf"))
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "devices.jsonl"),
                    help="JSON lines, appended (default bench/results/devices.jsonl)")
    ap.add_argument("--markdown", metavar="FILE",
                    help="also write the report into FILE between %s and %s" % (MARK_START, MARK_END))
    ap.add_argument("--memory-mib", type=int, default=256, help="guest RAM (default 256)")
    ap.add_argument("--image-dir", default="/tmp", help="where the raw images go (default /tmp)")
    ap.add_argument("--image-mib", type=int, default=1024, help="image size (default 1024)")
    ap.add_argument("--warmup-s", type=float, default=2.0, help="run time before the first sample (default 2)")
    ap.add_argument("--window-s", type=float, default=5.0, help="time between the two samples (default 5)")
    ap.add_argument("--boot-timeout-s", type=float, default=30.0, help="time allowed until the device runs")
    ap.add_argument("--warm-host-gib", type=float, default=4.0,
                    help="touch and free this much memory (4 KiB pages) before every boot, so that the page "
                         "cache the image's first writes allocate is memory the host has backed (default 4; "
                         "0 = off; see bench/README.md)")
    ap.add_argument("--max-other-cores", type=float, default=0.3,
                    help="a run during whose window other work on the machine (busy CPU not spent in the VMM "
                         "or the echo client) took more than this many cores is done again (default 0.3)")
    ap.add_argument("--retries", type=int, default=2,
                    help="how many times a disturbed run is done again; the last attempt counts whatever "
                         "its disturbance (default 2)")
    ap.add_argument("--udp-count", type=int, default=2000, help="echoes per network run (default 2000)")
    ap.add_argument("--netns", default="ternbench-dev-%d" % os.getpid(), help="namespace to create (and delete)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep logs and sockets' directories")
    ap.add_argument("--summarize", metavar="JSONL",
                    help="no runs: print (and with --markdown write) the report of the last run_id in JSONL")
    args = ap.parse_args()
    args.case_list = []
    for c in (c.strip() for c in args.cases.split(",") if c.strip()):
        for x in GROUPS.get(c, [c]):
            if x not in CASES:
                ap.error("unknown case %r (known: %s; groups disk, net)" % (x, ", ".join(CASES)))
            if x not in args.case_list:
                args.case_list.append(x)
    args.vmm_names = bl.vmm_names(ap, args.vmms)
    try:
        args.drive_list = [parse_drive(x.strip()) for x in (args.qemu_drive or ["writeback", "none"])]
    except (ValueError, KeyError) as e:
        ap.error("--qemu-drive: %s" % e)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def summarize(args):
    records = bl.last_run(args.summarize, "devices", "device")
    for r in records:
        # the rates again from the two samples, with this version's arithmetic
        if r.get("sample_a") and r.get("sample_b"):
            d = deltas(r["sample_a"], r["sample_b"])
            if r.get("kind") == "net":
                r.update({k: d[k] for k in ("notify_us", "clock")})
            else:
                r.update(d)
    meta = records[0].get("meta", {})
    t = meta.get("machine", {}).get("tern") or {}
    if t and "commit_before_build" not in t:
        t["commit_before_build"] = commit_before(t.get("mtime"))
    bl.emit_report(render_markdown(records, meta), args.markdown, MARK_START, MARK_END)
    return 0


class Ctx:
    read_image = None
    read_image_by = None
    netns_made = False


def main():
    args = parse_args()
    if args.summarize:
        return summarize(args)

    bl.raise_on_sigterm()

    ctx = Ctx()
    ctx.args = args
    guest_src = os.path.abspath(args.guest)
    if not os.path.isfile(guest_src):
        sys.exit("devices.py: guest not found: %s (make -C guest)" % guest_src)
    tern_path = bl.pick_tern(args.tern) if "tern" in args.vmm_names else None
    if "qemu" in args.vmm_names and not shutil.which(args.qemu):
        sys.exit("devices.py: %s not found (apt-get install qemu-system-x86)" % args.qemu)
    # VMM names: "tern", and one QEMU per drive mode ("qemu-writeback", "qemu-none", ...)
    ctx.qemu_drives = {}
    if "qemu" in args.vmm_names:
        for d in args.drive_list:
            name = "qemu-%s" % d["cache"] + ("" if d["aio"] == DEFAULT_AIO.get(d["cache"]) else "-" + d["aio"])
            ctx.qemu_drives[name] = d
    disk_vmms = (["tern"] if tern_path else []) + list(ctx.qemu_drives)
    net_vmms = (["tern"] if tern_path else []) + (["qemu-net"] if "qemu" in args.vmm_names else [])
    ctx.vmm_list = disk_vmms
    now = datetime.datetime.now(datetime.timezone.utc)
    ctx.run_id = now.strftime("%Y%m%dT%H%M%SZ") + "-%d" % os.getpid()
    ctx.tmp = tempfile.mkdtemp(prefix="devbench-")
    ctx.image_dir = tempfile.mkdtemp(prefix="devbench-img-", dir=args.image_dir)
    # copies, so a rebuild of tern or the guest during the run cannot change them halfway
    ctx.guest = os.path.join(ctx.tmp, "tern-guest.elf")
    shutil.copy2(guest_src, ctx.guest)
    with open(ctx.guest, "rb") as f:
        guest_sha = hashlib.sha256(f.read()).hexdigest()
    tern_info = None
    if tern_path:
        ctx.tern = os.path.join(ctx.tmp, "tern")
        shutil.copy2(tern_path, ctx.tern)
        tern_info = bl.tern_binary_info(tern_path)
        tern_info["commit_before_build"] = commit_before(tern_info["mtime"])
    ctx.netns = args.netns
    ctx.tap = "tbdev0"
    meta = {
        "command": "python3 " + shlex.join(sys.argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": bl.machine_facts(args.qemu, tern_info),
        "params": {"guest": os.path.relpath(guest_src, REPO), "guest_sha256": guest_sha,
                   "guest_mtime": datetime.datetime.fromtimestamp(os.stat(guest_src).st_mtime,
                                                                  datetime.timezone.utc).isoformat(timespec="seconds"),
                   "memory_mib": args.memory_mib, "image_mib": args.image_mib, "image_dir": args.image_dir,
                   "image_fs": fs_type(args.image_dir), "warmup_s": args.warmup_s, "window_s": args.window_s,
                   "warm_host_gib": args.warm_host_gib, "repeat": args.repeat, "cases": args.case_list,
                   "vmms": disk_vmms, "net_vmms": net_vmms, "qemu_drives": ctx.qemu_drives, "udp_count": args.udp_count,
                   "max_other_cores": args.max_other_cores, "retries": args.retries},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log("tern %s, QEMU %s, images in %s (%s), host warmed with %g GiB before every boot, results -> %s" % (
        tern_info and tern_info["path"], meta["machine"]["qemu_version"], ctx.image_dir,
        meta["params"]["image_fs"], args.warm_host_gib, args.out))

    records = []
    rc = 0
    interrupted = False
    try:
        if any(CASES[c]["kind"] == "net" for c in args.case_list):
            netns_up(ctx)
        for rep in range(args.repeat):
            for ci, case in enumerate(args.case_list):
                vmms = disk_vmms if CASES[case]["kind"] == "disk" else net_vmms
                # alternate from case to case and, for each case, from run to run
                order = vmms if (rep + ci) % 2 == 0 else list(reversed(vmms))
                for i, vmm in enumerate(order):
                    for attempt in range(args.retries + 1):
                        log("%s run %d/%d: %s%s" % (case, rep + 1, args.repeat, vmm,
                                                    " (attempt %d)" % (attempt + 1) if attempt else ""))
                        rec = run_one(ctx, case, rep, vmm, i)
                        rec["meta"] = meta
                        rec["attempt"] = attempt
                        other = (rec.get("cpu") or {}).get("foreign_busy_cores")
                        rec["disturbed"] = bool(other is not None and other > args.max_other_cores)
                        retry = rec["status"] == "ok" and rec["disturbed"] and attempt < args.retries
                        if retry:
                            # other work on the machine took more than --max-other-cores during the window:
                            # kept in the JSON, left out of the tables, and the run is done again
                            rec["status"] = "disturbed"
                        bl.append_jsonl(args.out, rec)
                        records.append(rec)
                        if not retry:
                            break
                        log("%s %s run %d: other work took %.2f cores during the window: again" % (
                            case, vmm, rep + 1, other))
                    key = CASES[case].get("metric") or "rtt_median_us"
                    log("%s %s run %d: %s%s%s" % (
                        case, vmm, rep + 1, rec["status"],
                        " %s=%s" % (key, fmt(rec.get(key))) if rec.get(key) is not None else "",
                        (" notify_us=%s" % fmt(rec.get("notify_us"))) if rec.get("notify_us") else "")
                        + ("" if rec["status"] == "ok" else " (%s)" % (rec.get("error") or "")[:300]))
                    if rec["status"] == "interrupted":
                        raise KeyboardInterrupt
                    if rec["status"] != "ok":
                        rc = 1
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        log("interrupted: stopping")
    except BenchError as e:
        log("error: %s" % e)
        rc = 1
    finally:
        with blocked_signals():
            kill_leftovers()
            netns_down(ctx)
            shutil.rmtree(ctx.image_dir, ignore_errors=True)
            if not args.keep_tmp:
                shutil.rmtree(ctx.tmp, ignore_errors=True)
    if records:
        bl.emit_report(render_markdown(records, meta), args.markdown, MARK_START, MARK_END)
    return 130 if interrupted else rc


if __name__ == "__main__":
    sys.exit(main())
