#!/usr/bin/env python3
"""Live migration, Tern against QEMU 7.2: same guest, same workloads, one run.

For each case (a guest command line, optionally a bandwidth cap) and each
repetition, migrates the test guest (guest/build/tern-guest.elf, 1 GiB) once
between two `tern` processes and once between two QEMU processes (with
bench/qemu/qemu_migrate.py, run as a subprocess), in alternating order, over
loopback; checks that the guest keeps running on the destination; writes one
JSON line per migration to --out and prints a Markdown report (optionally
written into a file between <!-- migration-bench:start/end --> markers).

    python3 bench/migration.py                       # all cases, once
    python3 bench/migration.py --cases idle,flat64 --repeat 3 \\
        --out /tmp/mig.jsonl --markdown docs/BENCHMARKS.md
    python3 bench/migration.py --cases hot960,random256 --tls --warm-host-gib 2 \\
        --repeat 3 --markdown docs/BENCHMARKS.md     # Tern plain and TLS, QEMU plain and TLS
    python3 bench/migration.py --summarize /tmp/mig.jsonl   # report only

Python 3 standard library only. See bench/README.md.
"""

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "qemu"))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree from the imports below
import qemu_migrate as qm  # noqa: E402  (constants and free_port only; the run itself is a subprocess)
import benchlib as bl  # noqa: E402
from benchlib import (BenchError, Interrupted, LIVE, blocked_signals, kill_hard, log, med, ratio,  # noqa: E402
                      reap, signal_proc, spawn, tail)

bl.set_prog("migration")

QEMU_SCRIPT = os.path.join(HERE, "qemu", "qemu_migrate.py")
MARK_START = "<!-- migration-bench:start -->"
MARK_END = "<!-- migration-bench:end -->"
ARGS_MODE = ["precopy"]
ARGS_VARIANTS = []  # "prealloc", "qemu-memfd", "warm-host", "tern-run", "tls": the run's setup, naming its section
TERN_RUN_ARGS = [""]


def section_name():
    """Each mode and setup has its own section in the Markdown file: migration-bench[-postcopy][-prealloc][-qemu-memfd]."""
    return "migration-bench" + ("" if ARGS_MODE[0] == "precopy" else "-" + ARGS_MODE[0]) + "".join(
        "-" + variant for variant in ARGS_VARIANTS)


def marks():
    """Report markers of this run's section."""
    if section_name() == "migration-bench":
        return MARK_START, MARK_END
    return "<!-- %s:start -->" % section_name(), "<!-- %s:end -->" % section_name()


def section_title():
    title = "## Live migration: Tern vs QEMU 7.2" + ("" if ARGS_MODE[0] == "precopy" else " (%s)" % ARGS_MODE[0])
    if "prealloc" in ARGS_VARIANTS:
        title += ", destinations preallocated"
    if "qemu-memfd" in ARGS_VARIANTS:
        title += ", QEMU's guest RAM in a memfd (as Tern's)"
    if "warm-host" in ARGS_VARIANTS:
        title += ", host memory warmed before each migration"
    if "tern-run" in ARGS_VARIANTS:
        title += ", tern run %s" % TERN_RUN_ARGS[0]
    if "tls" in ARGS_VARIANTS:
        title += ", in clear and over mutual TLS"
    return title
STATUS_LEN = 0xA0

RANDOM256 = "fill=512 dirty=256 pattern=random rate=200 progress=0"
# name -> guest command line, bandwidth cap (bytes/s, both VMMs), the name of
# the same case in bench/qemu/run_cases.sh (results-reference.jsonl)
CASES = {
    "idle": {"cmdline": "progress=0", "bandwidth": None, "qemu_case": "idle"},
    "hot960": {"cmdline": "fill=960 dirty=16 pattern=hotspot progress=0", "bandwidth": None,
               "qemu_case": "hotspot960"},
    "flat64": {"cmdline": "fill=512 dirty=64 progress=0", "bandwidth": None, "qemu_case": "seq64-flat"},
    "random256": {"cmdline": RANDOM256, "bandwidth": None, "qemu_case": "random256-r200"},
    "random256cap": {"cmdline": RANDOM256, "bandwidth": 100000000, "qemu_case": "random256-r200-bw100M"},
}


CHANNELS = ("plain", "tls")
TLS_SOURCE_NAME = "source.local"
TLS_DESTINATION_NAME = "destination.local"


# ---------------------------------------------------------------- processes

def children_of(pid):
    """Pids whose parent is `pid` (from /proc/*/stat)."""
    return [k for k, fields in bl.processes() if len(fields) > 1 and int(fields[1]) == pid]


def stop_tern_run(tern, p, sock, name):
    """`tern quit` through the API, then SIGTERM (tern stops cleanly), then SIGKILL; all bounded."""
    if p is None:
        return None
    quit_ok = p.poll() is None and bl.tern_quit(tern, sock)
    return bl.terminate(p, name, 10 if quit_ok else 0.2)


def stop_qemu_script(p):
    """SIGTERM makes qemu_migrate.py stop its QEMUs, print its JSON and exit; if it does not
    within 30 s, its QEMUs (own sessions, found by parent pid) and then it are killed."""
    if p is None or p.poll() is not None:
        if p is not None:
            LIVE.pop(p.pid, None)
        return
    kids = children_of(p.pid)
    signal_proc(p, signal.SIGTERM)
    if reap(p, 30):
        return
    for k in kids:
        try:
            os.kill(k, signal.SIGKILL)
            log("killed QEMU pid %d" % k)
        except ProcessLookupError:
            pass
    kill_hard(p, "qemu_migrate.py")


def kill_leftovers():
    bl.kill_leftovers(lambda p, name: stop_qemu_script(p) if name == "qemu_migrate.py"
                      else bl.terminate(p, name, 0))


# ------------------------------------------------------------- tern helpers

def parse_status(raw):
    if len(raw) < 0x60:
        raise BenchError("status block read returned %d bytes" % len(raw))
    magic, version, phase = struct.unpack_from("<QII", raw, 0)
    (iterations, tsc, tsc_khz, checksum, passes, verified, errors, work_base, work_bytes,
     fill_bytes) = struct.unpack_from("<10Q", raw, 0x10)
    return {
        "magic_ok": magic == qm.STATUS_MAGIC, "version": version, "phase": phase,
        "phase_name": qm.PHASE_NAMES.get(phase, hex(phase)), "iterations": iterations,
        "passes": passes, "verified": verified, "errors": errors, "fill_bytes": fill_bytes,
    }


def tern_status(tern, sock):
    try:
        r = subprocess.run([tern, "memory", "read", "--api-socket", sock, "--addr", "0x102000",
                            "--length", "0x%X" % STATUS_LEN, "--out", "-"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
    except subprocess.TimeoutExpired:
        raise BenchError("tern memory read on %s did not answer within 15 s" % sock)
    if r.returncode != 0:
        raise BenchError("tern memory read on %s failed (exit %d): %s" % (
            sock, r.returncode, r.stderr.decode("utf-8", "replace").strip()))
    return parse_status(r.stdout)


def check_running(p, role, errlog):
    if p.poll() is not None:
        LIVE.pop(p.pid, None)
        raise BenchError("%s tern exited with %s: %s" % (role, p.returncode, tail(errlog, 800)))


def wait_for_line(p, path, needle, timeout):
    """Waits until `needle` appears in the file `path`; returns 'ok', 'exited' or 'timeout'."""
    deadline = time.monotonic() + timeout
    while True:
        if needle in tail(path, 20000):
            return "ok"
        if p.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.05)


# ---------------------------------------------------------------- certificates

def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_certificates(ctx):
    """One CA and two host certificates for the run, with `tern certs init` (the source's directory
    holds the CA): Tern reads DIR/ca.pem, cert.pem, key.pem; QEMU's tls-creds-x509 reads its own
    names, so its two directories are symlinks to the same files: both VMMs use the same keys."""
    d = os.path.join(ctx.tmp, "tls")
    os.makedirs(d)
    src, dst = os.path.join(d, "source"), os.path.join(d, "destination")
    commands = [[ctx.tern, "certs", "init", src, "--name", TLS_SOURCE_NAME],
                [ctx.tern, "certs", "init", dst, "--name", TLS_DESTINATION_NAME, "--ca", src]]
    for cmd in commands:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        if r.returncode != 0:
            sys.exit("migration.py: %s failed (exit %d): %s" % (shlex.join(cmd), r.returncode,
                                                              r.stderr.decode("utf-8", "replace").strip()))
    qsrc, qdst = os.path.join(d, "qemu-source"), os.path.join(d, "qemu-destination")
    links = {qsrc: {"ca-cert.pem": "../source/ca.pem", "client-cert.pem": "../source/cert.pem",
                    "client-key.pem": "../source/key.pem"},
             qdst: {"ca-cert.pem": "../destination/ca.pem", "server-cert.pem": "../destination/cert.pem",
                    "server-key.pem": "../destination/key.pem"}}
    for qdir, names in links.items():
        os.makedirs(qdir, mode=0o700)
        for name, target in names.items():
            os.symlink(target, os.path.join(qdir, name))
    info = {
        "tern_source_dir": src, "tern_destination_dir": dst, "qemu_source_dir": qsrc, "qemu_destination_dir": qdst,
        "source_name": TLS_SOURCE_NAME, "destination_name": TLS_DESTINATION_NAME,
        "commands": [shlex.join(["tern"] + c[1:]).replace(ctx.tmp, "$TMP") for c in commands],
        "sha256": {"ca.pem": sha256_file(os.path.join(src, "ca.pem")),
                   "source cert.pem": sha256_file(os.path.join(src, "cert.pem")),
                   "destination cert.pem": sha256_file(os.path.join(dst, "cert.pem"))},
    }
    if sha256_file(os.path.join(dst, "ca.pem")) != info["sha256"]["ca.pem"]:
        sys.exit("migration.py: the destination's ca.pem is not the source's CA")
    log("certificates for the TLS cells: one CA, %s and %s, in %s" % (TLS_SOURCE_NAME, TLS_DESTINATION_NAME, d))
    return info


def check_tern_channel(rec, report, channel):
    """The report's `channel` must say what the cell asked for: TLS 1.3, or plaintext."""
    ch = report.get("channel") or {}
    rec["tern_channel"] = ch
    if channel == "tls":
        ok = ch.get("transport") == "tls" and ch.get("tls_version") == "TLSv1.3"
    else:
        ok = ch.get("transport") == "plaintext"
    rec["channel_ok"] = ok
    if not ok:
        rec["channel_error"] = "CHANNEL CHECK FAILED: the %s cell's report says channel %s" % (channel, json.dumps(ch))
        log(rec["channel_error"])
    return ok


def check_qemu_channel(rec, report, channel):
    """QEMU's side: tls-creds set on both QEMUs, and (TLS) its trace showing a completed handshake with
    the peer's certificate allowed on both sides; plain: no tls-creds."""
    src_creds = (report.get("qemu_parameters") or {}).get("tls-creds")
    dst_creds = (report.get("qemu_parameters_dst") or {}).get("tls-creds")
    rec["qemu_tls_creds"] = [src_creds, dst_creds]
    if "tls_check" in report:
        rec["qemu_tls_check"] = report["tls_check"]
    if channel == "tls":
        ok = (report.get("channel") == "tls" and src_creds == "tls0" and dst_creds == "tls0"
              and bool((report.get("tls_check") or {}).get("ok")))
    else:
        ok = report.get("channel", "plain") == "plain" and not src_creds and not dst_creds
    rec["channel_ok"] = ok
    if not ok:
        rec["channel_error"] = "CHANNEL CHECK FAILED: the %s cell's QEMU says tls-creds %r/%r, TLS trace %s" % (
            channel, src_creds, dst_creds, json.dumps(report.get("tls_check")))
        log(rec["channel_error"])
    return ok


def channel_failed(rec):
    """A migration that completed over another channel than its cell's is not the cell it claims to
    be: status error (out of the medians), the check's words first in its error."""
    if rec["status"] == "completed":
        rec["migration_status"] = rec["status"]
        rec["status"] = "error"
        rec["error"] = rec["channel_error"] + ("; " + rec["error"] if rec.get("error") else "")


# ---------------------------------------------------------------- one run

def base_record(ctx, case, rep, vmm, order, channel):
    c = CASES[case]
    return {
        "bench": "migration", "run_id": ctx.run_id, "case": case, "vmm": vmm, "channel": channel, "repeat": rep,
        "order": order, "cmdline": c["cmdline"], "memory_mib": ctx.args.memory_mib,
        "max_downtime_ms": ctx.args.max_downtime_ms, "bandwidth_bytes_per_s": c["bandwidth"],
        "timeout_s": ctx.args.timeout_s, "warmup_s": ctx.args.warmup_s,
        "qemu_reference_case": c["qemu_case"],
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "status": "error", "dst_ok": False,
    }


def run_tern(ctx, case, rep, order, channel="plain"):
    a = ctx.args
    c = CASES[case]
    tls = channel == "tls"
    rec = base_record(ctx, case, rep, "tern", order, channel)
    rec["tern_binary"] = ctx.tern_info
    rec["tern_max_rounds"] = a.tern_max_rounds
    rec["tern_verify"] = a.verify
    tern = ctx.tern
    d = tempfile.mkdtemp(prefix="tern-%s-" % case, dir=ctx.tmp)
    ssock, dsock = os.path.join(d, "src.sock"), os.path.join(d, "dst.sock")
    serr, derr = os.path.join(d, "src-stderr.log"), os.path.join(d, "dst-stderr.log")
    mout, merr = os.path.join(d, "migrate-stdout.json"), os.path.join(d, "migrate-stderr.log")
    src = dst = mig = None
    try:
        # destination: listens on a free loopback port (retry if someone takes it first).
        # Readiness is its log line: probing the port would be taken as the migration.
        for attempt in range(5):
            port = qm.free_port()
            dst = spawn("tern destination", [
                tern, "run"] + (["--tls-dir", ctx.tls["tern_destination_dir"]] if tls else ["--insecure"]) + [
                "--incoming", "tcp:127.0.0.1:%d" % port, "--api-socket", dsock,
                "--serial", "file:" + os.path.join(d, "dst-serial.log")]
                + (["--memory", "%dM" % a.memory_mib, "--prealloc"] if a.prealloc else [])
                + shlex.split(a.tern_run_args), stderr=derr)
            state = wait_for_line(dst, derr, "waiting for an incoming migration", 60)
            if state == "ok":
                break
            text = tail(derr, 800)
            if state == "exited":
                LIVE.pop(dst.pid, None)
                if "in use" in text.lower() and attempt < 4:
                    log("port %d taken (%s), retrying" % (port, text))
                    continue
                raise BenchError("tern destination exited with %s: %s" % (dst.returncode, text))
            raise BenchError("tern destination not listening after 30 s: %s" % text)
        rec["port"] = port

        src = spawn("tern source", [
            tern, "run", "--kernel", ctx.guest, "--memory", "%dM" % a.memory_mib,
            "--cmdline", c["cmdline"], "--api-socket", ssock,
            "--serial", "file:" + os.path.join(d, "src-serial.log")] + shlex.split(a.tern_run_args), stderr=serr)
        t0 = time.monotonic()
        deadline = t0 + a.boot_timeout_s
        st = None
        while True:
            check_running(src, "source", serr)
            if os.path.exists(ssock):
                try:
                    st = tern_status(tern, ssock)
                except BenchError as e:
                    # "the VM is still being created" and the like, while it boots
                    st = {"read_error": str(e)}
                if st.get("magic_ok") and st["phase"] in (2, 3):
                    break
                if st.get("magic_ok") and st["phase"] in (0xE, 0xF):
                    raise BenchError("guest on the source failed: phase %s; serial: %s" % (
                        st["phase_name"], tail(os.path.join(d, "src-serial.log"), 800)))
            if time.monotonic() > deadline:
                raise BenchError("guest did not reach dirty/idle in %.0f s (last %r)" % (a.boot_timeout_s, st))
            time.sleep(0.2)
        rec["src_ready_s"] = round(time.monotonic() - t0, 3)
        rec["src_phase"] = st["phase_name"]
        rec["src_fill_bytes"] = st["fill_bytes"]
        log("tern guest ready after %.1f s, phase %s; warm-up %.1f s" % (
            rec["src_ready_s"], st["phase_name"], a.warmup_s))
        time.sleep(a.warmup_s)
        if a.warm_host_gib:
            log("warmed %g GiB of host memory in %.1f s" % (a.warm_host_gib, qm.warm_host(a.warm_host_gib)))
        check_running(src, "source", serr)
        check_running(dst, "destination", derr)
        st = tern_status(tern, ssock)
        rec["src_iterations_before"] = st["iterations"]
        rec["src_errors_before"] = st["errors"]
        rec["host_cpus"] = os.cpu_count()
        rec["host_loadavg_1m_before"] = round(os.getloadavg()[0], 2)

        # TLS: the source pins the destination's name, as QEMU's tls-hostname does
        cmd = [tern, "migrate"] + (["--tls-dir", ctx.tls["tern_source_dir"], "--tls-allow", TLS_DESTINATION_NAME]
                                   if tls else ["--insecure"]) + [
               "--api-socket", ssock, "--to", "tcp:127.0.0.1:%d" % port,
               "--max-downtime", "%g" % a.max_downtime_ms, "--timeout", "%g" % a.timeout_s, "--json"]
        if c["bandwidth"]:
            cmd += ["--bandwidth", str(c["bandwidth"])]
        if a.tern_max_rounds:
            cmd += ["--max-rounds", str(a.tern_max_rounds)]
        if a.verify:
            cmd += ["--verify"]
        if a.mode != "precopy":
            cmd += ["--mode", a.mode]
        cmd += shlex.split(a.tern_args)
        if tls:
            cmd += shlex.split(a.tern_tls_args)
        rec["tern_migrate_command"] = shlex.join(cmd)
        t_start = time.monotonic()
        mig = spawn("tern migrate", cmd, stdout=mout, stderr=merr)
        # Tern's --timeout forces the switch-over, it does not end the migration: allow
        # the stop-and-copy on top. Past that, SIGINT (= tern migrate-cancel), then kill.
        hard = a.timeout_s + a.migrate_grace_s
        if not reap(mig, hard):
            log("tern migrate still running after %.0f s: cancelling (SIGINT)" % hard)
            rec["driver_timeout"] = True
            signal_proc(mig, signal.SIGINT)
            if not reap(mig, 60):
                kill_hard(mig, "tern migrate")
        rec["wall_ms"] = round((time.monotonic() - t_start) * 1000, 1)
        rec["host_loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        rec["tern_migrate_exit"] = mig.returncode
        stderr_text = tail(merr, 2000)
        if stderr_text:
            rec["tern_migrate_stderr"] = stderr_text
        try:
            with open(mout) as f:
                text = f.read().strip()
            report = json.loads(text) if text else None
        except (OSError, ValueError) as e:
            raise BenchError("tern migrate printed no JSON report (exit %s, %s): %s" % (
                mig.returncode, e, stderr_text))
        if report is None:
            raise BenchError("tern migrate printed no report (exit %s): %s" % (mig.returncode, stderr_text))
        rec["tern_report"] = report
        rounds = report.get("rounds") or []
        rec.update({
            "status": "timeout" if rec.get("driver_timeout") and report.get("status") != "completed"
                      else report.get("status"),
            "total_ms": report.get("total_ms"),
            "downtime_ms": report.get("downtime_ms"),
            "downtime_upper_bound_ms": report.get("downtime_upper_bound_ms"),
            "downtime_clock": report.get("downtime_clock"),
            "setup_ms": report.get("setup_ms"),
            "transferred_bytes": report.get("transferred_bytes"),
            "ram_bytes": report.get("ram_bytes"),
            "data_pages": report.get("data_pages"),
            "zero_pages": report.get("zero_pages"),
            "throughput_mbps": report.get("throughput_m_bps"),
            # every entry of `rounds`, the final stop-and-copy one included
            "rounds_count": len(rounds),
            "switchover_reason": report.get("switchover_reason"),
            "verification": report.get("verification"),
        })
        if report.get("reason"):
            rec["error"] = report["reason"]
        channel_ok = check_tern_channel(rec, report, channel)
        # the destination's side of it, as its log says (recorded, not checked: a log line is no interface)
        said = [ln for ln in tail(derr, 20000).splitlines() if "the source is" in ln]
        if said:
            rec["tern_dst_channel_log"] = said[-1]

        if report.get("status") == "completed":
            # the source ends by itself after a completed migration
            if reap(src, 15):
                rec["src_exit_code"] = src.returncode
            else:
                rec["src_exit_code"] = None
                rec["src_still_running"] = True
            check_running(dst, "destination", derr)
            first = tern_status(tern, dsock)
            time.sleep(0.5)
            second = tern_status(tern, dsock)
            rec["dst_magic_ok"] = first["magic_ok"] and second["magic_ok"]
            rec["dst_phase"] = second["phase_name"]
            rec["dst_iterations_first"] = first["iterations"]
            rec["dst_iterations_second"] = second["iterations"]
            rec["dst_iterations_advancing"] = second["iterations"] > first["iterations"]
            rec["dst_errors"] = second["errors"]
            rec["dst_verified"] = second["verified"]
            rec["dst_ok"] = bool(rec["dst_magic_ok"] and rec["dst_iterations_advancing"]
                                 and second["errors"] == 0 and second["phase"] in (2, 3)
                                 and second["iterations"] >= rec["src_iterations_before"])
        else:
            rec["dst_iterations_advancing"] = None
            rec["dst_errors"] = None
            rec.setdefault("error", "migration ended with status %s" % report.get("status"))
        if not channel_ok:
            channel_failed(rec)
    except BenchError as e:
        if not rec.get("status"):
            rec["status"] = "error"
        rec["dst_ok"] = False
        rec["error"] = str(e)
    except (KeyboardInterrupt, Interrupted):
        rec["status"] = "interrupted"
        rec["dst_ok"] = False
        rec["error"] = "interrupted (Ctrl-C or SIGTERM)"
    finally:
        with blocked_signals():
            if mig is not None and mig.poll() is None:
                signal_proc(mig, signal.SIGINT)  # cancel: the VM stays on the source
                if not reap(mig, 30):
                    kill_hard(mig, "tern migrate")
            if mig is not None:
                LIVE.pop(mig.pid, None)
                if rec["status"] == "interrupted":
                    # what tern migrate said after the cancel (its report, or an error line)
                    rec["tern_migrate_exit"] = mig.returncode
                    rec["tern_migrate_stdout"] = tail(mout, 3000)
                    rec["tern_migrate_stderr"] = tail(merr, 2000)
            rec["dst_exit_code"] = stop_tern_run(tern, dst, dsock, "tern destination")
            src_rc = stop_tern_run(tern, src, ssock, "tern source")
            rec.setdefault("src_exit_code", src_rc)
            if rec.get("status") != "completed" or not rec.get("dst_ok"):
                for role, path in (("src_stderr", serr), ("dst_stderr", derr),
                                   ("src_serial", os.path.join(d, "src-serial.log")),
                                   ("dst_serial", os.path.join(d, "dst-serial.log"))):
                    text = tail(path, 1500)
                    if text:
                        rec[role] = text
            if ctx.args.keep_tmp:
                rec["tmp_dir"] = d
            else:
                shutil.rmtree(d, ignore_errors=True)
    return rec


def run_qemu(ctx, case, rep, order, channel="plain"):
    a = ctx.args
    c = CASES[case]
    rec = base_record(ctx, case, rep, "qemu", order, channel)
    d = tempfile.mkdtemp(prefix="qemu-%s-" % case, dir=ctx.tmp)
    out = os.path.join(d, "qemu_migrate.json")
    cmd = [sys.executable, QEMU_SCRIPT, "--guest", ctx.guest, "--memory", str(a.memory_mib),
           "--cmdline", c["cmdline"], "--max-downtime-ms", "%d" % a.max_downtime_ms,
           "--timeout-s", "%g" % a.timeout_s, "--warmup-s", "%g" % a.warmup_s,
           "--boot-timeout-s", "%g" % a.boot_timeout_s, "--qemu", a.qemu]
    if c["bandwidth"]:
        cmd += ["--bandwidth", str(c["bandwidth"])]
    if a.prealloc:
        cmd += ["--dst-prealloc"]
    if a.qemu_ram != "anon":
        cmd += ["--ram", a.qemu_ram]
    if a.warm_host_gib:
        cmd += ["--warm-host-gib", "%g" % a.warm_host_gib]
    if a.mode == "postcopy":
        # Switch to post-copy at once, before any pre-copy pass: the same as Tern's --mode postcopy.
        cmd += ["--mode", "postcopy", "--postcopy-after-syncs", "0"]
    if channel == "tls":
        cmd += ["--tls-src-dir", ctx.tls["qemu_source_dir"], "--tls-dst-dir", ctx.tls["qemu_destination_dir"],
                "--tls-hostname", TLS_DESTINATION_NAME]
        if a.qemu_tls_priority:
            cmd += ["--tls-priority", a.qemu_tls_priority]
    rec["qemu_migrate_command"] = shlex.join(cmd)
    p = None
    try:
        t_start = time.monotonic()
        p = spawn("qemu_migrate.py", cmd, stdout=out)  # its diagnostics go to our stderr
        hard = a.boot_timeout_s + a.warmup_s + a.timeout_s + a.migrate_grace_s
        if not reap(p, hard):
            log("qemu_migrate.py still running after %.0f s: stopping it" % hard)
            rec["driver_timeout"] = True
            stop_qemu_script(p)
        rec["wall_ms_script"] = round((time.monotonic() - t_start) * 1000, 1)
        rec["qemu_script_exit"] = p.returncode
        try:
            with open(out) as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
            report = json.loads(lines[-1])
        except (OSError, ValueError, IndexError) as e:
            raise BenchError("qemu_migrate.py printed no JSON (exit %s): %s" % (p.returncode, e))
        rec["qemu_report"] = report
        for k in ("status", "total_ms", "downtime_ms", "downtime_events_ms", "setup_ms", "wall_ms",
                  "transferred_bytes", "ram_bytes", "zero_pages", "normal_pages", "dirty_sync_count",
                  "throughput_mbps", "dst_ok", "dst_iterations_advancing", "dst_errors",
                  "src_iterations_before", "src_ready_s", "host_cpus", "host_loadavg_1m_before",
                  "host_loadavg_1m_after", "qemu_version", "error"):
            if k in report:
                rec[k] = report[k]
        rec["dst_ok"] = bool(report.get("dst_ok"))
        rec["status"] = report.get("status") or "error"
        if not check_qemu_channel(rec, report, channel):
            channel_failed(rec)
    except BenchError as e:
        rec["status"] = rec.get("status") or "error"
        rec["error"] = str(e)
    except (KeyboardInterrupt, Interrupted):
        rec["status"] = "interrupted"
        rec["dst_ok"] = False
        rec["error"] = "interrupted (Ctrl-C or SIGTERM)"
    finally:
        with blocked_signals():
            stop_qemu_script(p)
            if rec["status"] == "interrupted":
                rec["qemu_script_exit"] = None if p is None else p.returncode
                rec["qemu_script_stdout"] = tail(out, 3000)
            if not a.keep_tmp:
                shutil.rmtree(d, ignore_errors=True)
            else:
                rec["tmp_dir"] = d
    return rec


# ---------------------------------------------------------------- report

def fmt(v, kind):
    if v is None:
        return "-"
    if kind == "ms":
        return "%.0f" % v if v >= 100 else "%.1f" % v
    if kind == "mb":
        return "%.0f" % v if v >= 100 else "%.1f" % v
    if kind == "ratio":
        return "%.2f" % v if v < 10 else "%.1f" % v
    return "%g" % v if isinstance(v, (int, float)) else str(v)


def counted(values):
    seen = {}
    for v in values:
        seen[v] = seen.get(v, 0) + 1
    return ", ".join(k if n == 1 and len(values) == 1 else "%s ×%d" % (k, n) for k, n in seen.items())


def stat_cell(runs, key, kind, scale=1.0):
    """Median over the completed runs (over all, marked *, if none completed), then every run."""
    def val(r):
        v = r.get(key)
        return None if v is None else v / scale
    done = [r for r in runs if r.get("status") == "completed"]
    m = med([val(r) for r in done]) if done else med([val(r) for r in runs])
    incomplete = m is not None and not done
    cell = fmt(m, kind) + ("*" if incomplete else "")
    if len(runs) > 1:
        parts = [fmt(val(r), kind) + ("" if r.get("status") == "completed" or val(r) is None else "*")
                 for r in runs]
        cell += " (" + ", ".join(parts) + ")"
    return cell, (m, incomplete)


CASE_ROWS = [  # label, Tern's key, QEMU's key, format, scale
    ("total ms", "total_ms", "total_ms", "ms", 1.0),
    ("downtime ms (Tern: pause→resume; QEMU: `downtime`)", "downtime_ms", "downtime_ms", "ms", 1.0),
    ("downtime ms (Tern: pause→resume; QEMU: STOP→RESUME events)", "downtime_ms", "downtime_events_ms",
     "ms", 1.0),
    ("transferred MB", "transferred_bytes", "transferred_bytes", "mb", 1e6),
]


def case_opening(case, runs, n):
    """A case's title (guest command line, cap) and, for several runs, how to read the cells."""
    c = CASES.get(case, {})
    lines = []
    title = "### %s: `%s`" % (case, c.get("cmdline", runs[0].get("cmdline")))
    bw = runs[0].get("bandwidth_bytes_per_s")
    if bw:
        title += ", capped at %.0f MB/s (Tern `--bandwidth %d`, QEMU `max-bandwidth`)" % (bw / 1e6, bw)
    lines.append(title)
    lines.append("")
    if n > 1:
        lines.append("Median of %d runs (completed runs only), then each run in order; * = that run did "
                     "not complete." % n)
        lines.append("")
    return lines


def dst_state(r):
    if r.get("dst_ok"):
        return "ok"
    return "FAILED" if r.get("status") == "completed" else "not migrated"


def failed_runs(runs, label):
    """One line per run that did not complete or whose destination check failed; label(r) names its cell."""
    errors = []
    for r in runs:
        if r.get("status") != "completed" or not r.get("dst_ok"):
            msg = r.get("error") or r.get("tern_migrate_stderr") or ""
            if r.get("switchover_reason") and r["vmm"] == "tern":
                msg = (msg + "; " if msg else "") + "switch-over: " + r["switchover_reason"]
            errors.append("- %s run %d: %s%s" % (label(r), r["repeat"] + 1, r.get("status"),
                                                ": " + msg.replace("\n", " ")[:300] if msg else ""))
    return [""] + errors if errors else []


def case_table(case, runs):
    tern = [r for r in runs if r["vmm"] == "tern"]
    qemu = [r for r in runs if r["vmm"] == "qemu"]
    lines = case_opening(case, runs, max(len(tern), len(qemu)))
    lines.append("| | Tern | QEMU 7.2 | Tern/QEMU |")
    lines.append("| --- | ---: | ---: | ---: |")
    lines.append("| status | %s | %s | |" % (counted([r["status"] for r in tern]) or "-",
                                              counted([r["status"] for r in qemu]) or "-"))
    summary = {}
    for label, tk, qk, kind, scale in CASE_ROWS:
        tc, tm = stat_cell(tern, tk, kind, scale) if tern else ("-", (None, False))
        qc, qm_ = stat_cell(qemu, qk, kind, scale) if qemu else ("-", (None, False))
        r = fmt(ratio(tm[0], qm_[0]), "ratio")
        if r != "-" and (tm[1] or qm_[1]):
            r += "*"
        lines.append("| %s | %s | %s | %s |" % (label, tc, qc, r))
        summary[(tk, qk)] = (tm, qm_)
    if tern:
        ub, _ = stat_cell(tern, "downtime_upper_bound_ms", "ms")
        lines.append("| Tern downtime upper bound ms (pause → `resumed` back at the source) | %s | | |" % ub)
        rc, _ = stat_cell(tern, "rounds_count", "n")
        lines.append("| Tern rounds (incl. stop-and-copy) | %s | | |" % rc)
        lines.append("| Tern switch-over | %s | | |" % (counted([r.get("switchover_reason") or "-" for r in tern])))
    if qemu:
        sc, _ = stat_cell(qemu, "dirty_sync_count", "n")
        lines.append("| QEMU dirty syncs | | %s | |" % sc)
    lines.append("| destination runs (iterations advance, errors 0) | %s | %s | |" % (
        counted([dst_state(r) for r in tern]) or "-", counted([dst_state(r) for r in qemu]) or "-"))
    lines.extend(failed_runs(runs, lambda r: r["vmm"]))
    return lines, summary


def report_header(meta):
    """The section's opening: markers, title, command, date, machine, builds and parameters."""
    lines = [marks()[0], section_title(), ""]
    lines.append("Generated by `bench/migration.py` (see `bench/README.md`).")
    lines.append("")
    lines.append("- command: `%s`" % meta.get("command"))
    lines.append("- date: %s" % meta.get("date"))
    m = meta.get("machine", {})
    lines.append("- machine: %s CPUs (`nproc`), %s, kernel %s, load average %s at the start" % (
        m.get("nproc"), m.get("cpu_model") or "unknown CPU", m.get("kernel"), m.get("loadavg")))
    lines.append("- QEMU: %s" % m.get("qemu_version"))
    t = m.get("tern", {})
    lines.append("- tern: commit %s%s, %s build (`%s`, built %s)" % (
        m.get("tern_commit"), " + uncommitted changes" if m.get("tern_tree_dirty") else "",
        t.get("build"), t.get("path"), t.get("mtime")))
    p = meta.get("params", {})
    lines.append("- guest: `%s`, %d MiB; max downtime %s ms for both; no bandwidth cap unless stated "
                 "(QEMU `max-bandwidth` 100 GB/s); migration timeout %s s (Tern `--timeout`: forces the "
                 "switch-over; QEMU: `migrate_cancel`, status `timeout`); %s s warm-up after the guest's "
                 "fill; order of Tern and QEMU alternates from case to case and run to run" % (
                     p.get("guest"), p.get("memory_mib", 0), p.get("max_downtime_ms"), p.get("timeout_s"),
                     p.get("warmup_s")) + ("; %g GiB of 4 KiB pages touched and freed just before each migration "
                                           "(`--warm-host-gib`), so both destinations find host-backed memory"
                                           % p["warm_host_gib"] if p.get("warm_host_gib") else ""))
    return lines


def render_markdown(records, meta):
    if any(r.get("channel") == "tls" for r in records):
        return render_channels_markdown(records, meta)
    lines = report_header(meta)
    lines.append("")
    cases = []
    for r in records:
        if r["case"] not in cases:
            cases.append(r["case"])
    overview = ["| case | Tern total ms | QEMU total ms | Tern downtime ms | QEMU downtime ms "
                "(`downtime` / STOP→RESUME) | Tern MB | QEMU MB |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    body = []
    for case in cases:
        runs = [r for r in records if r["case"] == case]
        tbl, s = case_table(case, runs)
        body.extend(tbl)
        body.append("")
        def f(pair, kind):
            v, incomplete = pair
            return fmt(v, kind) + ("*" if incomplete else "")
        tt, qt = s[("total_ms", "total_ms")]
        td, qd = s[("downtime_ms", "downtime_ms")]
        _, qe = s[("downtime_ms", "downtime_events_ms")]
        tb, qb = s[("transferred_bytes", "transferred_bytes")]
        overview.append("| %s | %s | %s | %s | %s / %s | %s | %s |" % (
            case, f(tt, "ms"), f(qt, "ms"), f(td, "ms"), f(qd, "ms"), f(qe, "ms"), f(tb, "mb"), f(qb, "mb")))
    lines.append("Overview (medians of completed runs; * = no run completed: the value is up to the timeout "
                 "or failure; details and every run below):")
    lines.append("")
    lines.extend(overview)
    lines.append("")
    if ARGS_MODE[0] == "postcopy":
        lines.append("Post-copy detail (medians): Tern faults and fault latency as the destination measured them "
                     "(from the fault's request to the page's placement); QEMU's `postcopy-requests`.")
        lines.append("")
        lines.append("| case | Tern faults | Tern fault latency p50 / p99 / max ms | Tern pages pushed / pulled | "
                     "Tern memory complete at ms | QEMU postcopy requests |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        def median(values):
            values = sorted(v for v in values if v is not None)
            return values[len(values) // 2] if values else None
        for case in cases:
            tern = [(r.get("tern_report") or {}) for r in records if r["case"] == case and r.get("vmm") == "tern"]
            post = [t.get("postcopy") or {} for t in tern]
            qemu = [(r.get("qemu_report") or {}).get("postcopy_requests") for r in records if r["case"] == case and r.get("vmm") == "qemu"]
            def m(key):
                v = median([p.get(key) for p in post])
                return "-" if v is None else ("%.3f" % v if isinstance(v, float) else str(v))
            complete = median([t.get("memory_complete_at_ms") for t in tern])
            lines.append("| %s | %s | %s / %s / %s | %s / %s | %s | %s |" % (
                case, m("faults"), m("fault_latency_p50_ms"), m("fault_latency_p99_ms"), m("fault_latency_max_ms"),
                m("pages_pushed"), m("pages_pulled"), "-" if complete is None else "%.0f" % complete,
                "-" if median(qemu) is None else median(qemu)))
        lines.append("")
    lines.extend(body)
    lines.extend(report_footer())
    return "\n".join(lines) + "\n"


def report_footer(extra=()):
    """What the numbers are, and the closing marker."""
    lines = []
    lines.append("What the numbers are:")
    lines.append("")
    lines.append("- **Tern downtime** (`downtime_ms`): from the moment the source paused the vCPUs to the "
                 "moment the destination resumed them, both read on the host's shared monotonic clock "
                 "(`downtime_clock: shared-monotonic`; same host, same boot). The upper bound is the "
                 "source's pause to the destination's `resumed` message arriving back at the source.")
    lines.append("- **QEMU `downtime`** is measured by the source alone: from just before it stops the vCPUs "
                 "until the last RAM and device state are written to the socket; the destination's load "
                 "and resume are not in it. **STOP→RESUME** (`downtime_events_ms`) is the source's QMP "
                 "`STOP` event to the destination's `RESUME` event (host wall clock): the figure that "
                 "measures the same span as Tern's downtime.")
    lines.append("- **total**: Tern `total_ms`, from the `migrate` request (connect, handshake) to the "
                 "destination's confirmation that the VM runs there; QEMU `total-time`, from `migrate` to "
                 "completion, setup included.")
    lines.append("- **transferred**: Tern, every byte it sent (page frames and headers, zero-page runs, VM "
                 "state); QEMU, `ram.transferred` (RAM pages with their headers; device state not "
                 "included). RAM sizes differ a little: QEMU's `ram.total` includes VGA RAM and ROMs "
                 "(1091379200 bytes for 1 GiB) against Tern's 1073741824. MB = 10^6 bytes.")
    lines.append("- **Tern/QEMU** is the ratio of the two medians: below 1, Tern took less time, less "
                 "downtime or fewer bytes.")
    lines.append("- A run that did not converge: Tern switches over anyway (after `--max-rounds`, its "
                 "`--timeout`, or three rounds in which the dirty set stopped shrinking; the switch-over "
                 "row says which) and its downtime grows with what is still dirty; QEMU keeps iterating "
                 "until the timeout and is cancelled (`timeout`, statistics as of the last poll).")
    lines.append("- 2-core host shared with other work: single runs of the same case vary up to 2x "
                 "(see `bench/qemu/README.md`); use `--repeat 3` or more and look at the load average "
                 "recorded in each JSON line (`host_loadavg_1m_before`).")
    lines.extend(extra)
    lines.append(marks()[1])
    return lines


# ---------------------------------------------------------------- report: plain against TLS

CELLS = [("tern", "plain"), ("tern", "tls"), ("qemu", "plain"), ("qemu", "tls")]
CELL_LABELS = {("tern", "plain"): "Tern plain", ("tern", "tls"): "Tern TLS",
               ("qemu", "plain"): "QEMU plain", ("qemu", "tls"): "QEMU TLS"}
# numerator cell, denominator cell, label; shown where both cells ran
CELL_RATIOS = [(("tern", "tls"), ("tern", "plain"), "Tern TLS/plain"),
               (("tern", "tls"), ("qemu", "tls"), "Tern TLS/QEMU TLS"),
               (("qemu", "tls"), ("qemu", "plain"), "QEMU TLS/plain")]
# issue 24's aims: TLS adds at most 15% to Tern's total; Tern with TLS at most half of QEMU with TLS
AIM_TLS_COST = 1.15
AIM_VS_QEMU = 0.5


def cell_runs(runs, cell):
    return [r for r in runs if r["vmm"] == cell[0] and r.get("channel", "plain") == cell[1]]


def channel_summary(r):
    """What the channel was, as the run's own report showed it."""
    if r["vmm"] == "tern":
        ch = r.get("tern_channel") or (r.get("tern_report") or {}).get("channel") or {}
        if ch.get("transport") == "tls":
            return "%s %s" % (ch.get("tls_version"), ch.get("cipher"))
        return ch.get("transport") or "-"
    if r.get("channel") == "tls":
        check = r.get("qemu_tls_check") or {}
        if not check:
            return "-"
        return "TLS, handshake and peer verified on both sides" if check.get("ok") else "TLS NOT VERIFIED"
    return "plaintext" if r.get("qemu_tls_creds") is not None else "-"


def channel_case_table(case, runs):
    """One case: a column per VMM and channel, then the ratios of their medians."""
    cells = [cell for cell in CELLS if cell_runs(runs, cell)]
    ratios = [x for x in CELL_RATIOS if x[0] in cells and x[1] in cells]
    lines = case_opening(case, runs, max(len(cell_runs(runs, cell)) for cell in cells))
    lines.append("| | " + " | ".join(CELL_LABELS[x] for x in cells) + "".join(" | " + x[2] for x in ratios) + " |")
    lines.append("| --- |" + " ---: |" * (len(cells) + len(ratios)))
    def row(label, texts):
        lines.append("| %s | %s |" % (label, " | ".join(texts)))
    row("status", [counted([r["status"] for r in cell_runs(runs, x)]) for x in cells] + [""] * len(ratios))
    summary = {}
    for label, tk, qk, kind, scale in CASE_ROWS:
        stats = {}
        texts = []
        for x in cells:
            text, m = stat_cell(cell_runs(runs, x), tk if x[0] == "tern" else qk, kind, scale)
            stats[x] = m
            texts.append(text)
        for num, den, _ in ratios:
            r = fmt(ratio(stats[num][0], stats[den][0]), "ratio")
            if r != "-" and (stats[num][1] or stats[den][1]):
                r += "*"
            texts.append(r)
        row(label, texts)
        summary[(tk, qk)] = stats
    def tern_only(label, key, kind=None, count=False):
        texts = []
        for x in cells:
            rs = cell_runs(runs, x)
            if x[0] != "tern":
                texts.append("")
            elif count:
                texts.append(counted([r.get(key) or "-" for r in rs]))
            else:
                texts.append(stat_cell(rs, key, kind)[0])
        row(label, texts + [""] * len(ratios))
    tern_only("Tern downtime upper bound ms (pause → `resumed` back at the source)", "downtime_upper_bound_ms", "ms")
    tern_only("Tern rounds (incl. stop-and-copy)", "rounds_count", "n")
    tern_only("Tern switch-over", "switchover_reason", count=True)
    if any(x[0] == "qemu" for x in cells):
        row("QEMU dirty syncs", ["" if x[0] == "tern" else stat_cell(cell_runs(runs, x), "dirty_sync_count", "n")[0]
                                 for x in cells] + [""] * len(ratios))
    row("channel (from each run's report)", [counted([channel_summary(r) for r in cell_runs(runs, x)])
                                             for x in cells] + [""] * len(ratios))
    row("destination runs (iterations advance, errors 0)",
        [counted([dst_state(r) for r in cell_runs(runs, x)]) for x in cells] + [""] * len(ratios))
    lines.extend(failed_runs(runs, lambda r: CELL_LABELS[(r["vmm"], r.get("channel", "plain"))]))
    return lines, summary


def aim_text(value, aim):
    if value is None:
        return "-"
    return "%s %s" % (fmt(value, "ratio"), "(met)" if value <= aim else "(not met)")


def render_channels_markdown(records, meta):
    lines = report_header(meta)
    t = meta.get("tls") or {}
    p = meta.get("params", {})
    lines.append("- channels: plain (Tern `--insecure` on both sides; QEMU without `tls-creds`) and mutual TLS "
                 "on the same certificates, made once for the run (%s: one P-256 CA, `%s` for the source, "
                 "`%s` for the destination): Tern `tern run --tls-dir` and `tern migrate --tls-dir --tls-allow "
                 "%s`%s; QEMU `-object tls-creds-x509,endpoint=server|client,verify-peer=on` on both sides over "
                 "the same files (symlinks named as QEMU wants them), `tls-creds` on both and `tls-hostname %s` "
                 "on the source%s. Every VMM runs every channel; the order of the cells alternates from case "
                 "to case and run to run" % (
                     "; ".join("`%s`" % c for c in t.get("commands", [])) or "`tern certs init`",
                     t.get("source_name"), t.get("destination_name"), t.get("destination_name"),
                     (", TLS cells also `%s`" % p["tern_tls_args"]) if p.get("tern_tls_args") else "",
                     t.get("destination_name"),
                     (", priority `%s`" % p["qemu_tls_priority"]) if p.get("qemu_tls_priority") else ""))
    lines.append("")
    cases = []
    for r in records:
        if r["case"] not in cases:
            cases.append(r["case"])
    overview = ["| case | Tern plain total ms | Tern TLS total ms | QEMU TLS total ms | Tern TLS/plain total "
                "(aim ≤ %.2f) | Tern TLS/QEMU TLS total (aim ≤ %.1f) | Tern plain downtime ms | Tern TLS "
                "downtime ms | QEMU TLS downtime ms (`downtime` / STOP→RESUME) | Tern TLS/QEMU TLS downtime "
                "(aim ≤ %.1f; of `downtime` / of STOP→RESUME) | QEMU plain total / downtime ms |" % (
                    AIM_TLS_COST, AIM_VS_QEMU, AIM_VS_QEMU),
                "| --- |" + " ---: |" * 10]
    body = []
    for case in cases:
        runs = [r for r in records if r["case"] == case]
        tbl, s = channel_case_table(case, runs)
        body.extend(tbl)
        body.append("")
        def get(key, cell):
            return s[key].get(cell, (None, False))
        def f(pair, kind):
            v, incomplete = pair
            return fmt(v, kind) + ("*" if incomplete and v is not None else "")
        tot = ("total_ms", "total_ms")
        dt = ("downtime_ms", "downtime_ms")
        ev = ("downtime_ms", "downtime_events_ms")
        tp, tt, qt, qp = (get(tot, x) for x in (("tern", "plain"), ("tern", "tls"), ("qemu", "tls"), ("qemu", "plain")))
        dp, dtt, dq, dqp = (get(dt, x) for x in (("tern", "plain"), ("tern", "tls"), ("qemu", "tls"), ("qemu", "plain")))
        eq = get(ev, ("qemu", "tls"))
        overview.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s | %s / %s |" % (
            case, f(tp, "ms"), f(tt, "ms"), f(qt, "ms"),
            aim_text(ratio(tt[0], tp[0]), AIM_TLS_COST), aim_text(ratio(tt[0], qt[0]), AIM_VS_QEMU),
            f(dp, "ms"), f(dtt, "ms"), f(dq, "ms"), f(eq, "ms"),
            aim_text(ratio(dtt[0], dq[0]), AIM_VS_QEMU), fmt(ratio(dtt[0], eq[0]), "ratio"),
            f(qp, "ms"), f(dqp, "ms")))
    lines.append("Overview (medians of completed runs; * = no run completed; a ratio is of two medians, "
                 "the raw numbers beside it; details and every run below). Aims (issue 24): TLS adds at most "
                 "15% to Tern's total time; Tern with TLS takes at most half of QEMU with TLS's total time and "
                 "downtime (QEMU's own `downtime`, the smaller of its two figures):")
    lines.append("")
    lines.extend(overview)
    lines.append("")
    lines.extend(body)
    lines.extend(report_footer([
        "- **channel**: Tern, the `channel` section of its migration report (transport, TLS version, "
        "cipher; a TLS cell must say TLS 1.3, a plain cell plaintext, or it is an error); QEMU, its "
        "`tls-creds` on both sides and its trace (`qio_channel_tls_handshake_complete` and "
        "`qio_channel_tls_credentials_allow` on both sides, no failure or denial). QEMU reports no TLS "
        "version or cipher; with its default priority GnuTLS 3.7 takes TLS 1.3 with AES-256-GCM "
        "(bench/qemu/README.md), Tern's OpenSSL AES-128-GCM.",
        "- **Tern TLS/plain** and the other ratios are of two medians; Tern's total includes the TLS "
        "handshakes of every connection (the control connection and any extra stream).",
    ]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated, from: %s (default: all)" % ", ".join(CASES))
    ap.add_argument("--repeat", type=int, default=1, help="runs per case and VMM (default 1)")
    ap.add_argument("--vmms", default="tern,qemu", help="which side(s) to run: tern,qemu (default both)")
    ap.add_argument("--tern", help="tern binary (default .build/release/tern, else .build/debug/tern)")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary (passed to qemu_migrate.py)")
    ap.add_argument("--guest", default=os.path.join(REPO, "guest", "build", "tern-guest.elf"))
    ap.add_argument("--out", help="JSON lines, appended (default bench/results/migration-<date>.jsonl)")
    ap.add_argument("--markdown", metavar="FILE",
                    help="also write the report into FILE between %s and %s" % (MARK_START, MARK_END))
    ap.add_argument("--memory-mib", type=int, default=1024, help="guest RAM (default 1024)")
    ap.add_argument("--max-downtime-ms", type=int, default=300, help="downtime target (default 300)")
    ap.add_argument("--timeout-s", type=float, default=120.0,
                    help="migration timeout for both (Tern --timeout, QEMU --timeout-s; default 120)")
    ap.add_argument("--migrate-grace-s", type=float, default=300.0,
                    help="hard limit past --timeout-s before the driver cancels/kills a migration (default 300)")
    ap.add_argument("--warmup-s", type=float, default=2.0, help="run time after the fill (default 2)")
    ap.add_argument("--boot-timeout-s", type=float, default=120.0, help="time allowed for the fill (default 120)")
    ap.add_argument("--pause-s", type=float, default=1.0, help="pause between migrations (default 1)")
    ap.add_argument("--tern-max-rounds", type=int, default=None, help="tern migrate --max-rounds (default: tern's, 30)")
    ap.add_argument("--mode", default="precopy", choices=["precopy", "postcopy"],
                    help="precopy (default), or postcopy for both (QEMU: postcopy-ram, migrate-start-postcopy at once)")
    ap.add_argument("--prealloc", action="store_true",
                    help="destinations allocate and touch guest RAM before the migration "
                         "(tern run --memory M --prealloc; QEMU -mem-prealloc)")
    ap.add_argument("--qemu-ram", default="anon", choices=["anon", "memfd"],
                    help="QEMU's guest RAM: anon (its default; huge pages where the kernel allows) or memfd "
                         "(memory-backend-memfd: 4 KiB shmem pages, as Tern's)")
    ap.add_argument("--warm-host-gib", type=float, default=0, metavar="GIB",
                    help="just before each migration, touch and free GIB GiB of memory, so that both VMMs' "
                         "destinations find host-backed memory (docs/BENCHMARKS.md, \"First touch\")")
    ap.add_argument("--tern-args", default="", metavar="ARGS",
                    help="more options for tern migrate, e.g. '--streams 2' (quoted as one argument)")
    ap.add_argument("--tern-run-args", default="", metavar="ARGS",
                    help="more options for both tern run processes, e.g. '--thp off' (quoted as one argument)")
    ap.add_argument("--channels", default="plain", metavar="LIST",
                    help="comma-separated, from: plain, tls (default plain). plain: Tern with --insecure on both "
                         "sides, QEMU without TLS; tls: mutual TLS 1.3 for Tern (tern run --tls-dir, tern migrate "
                         "--tls-dir --tls-allow destination.local) and QEMU with tls-creds-x509 (verify-peer=on "
                         "on both sides, tls-hostname destination.local) on the same certificates, made once per "
                         "run with tern certs init (one CA, source.local, destination.local). Every VMM runs "
                         "every channel; a cell whose report does not show the channel it asked for fails")
    ap.add_argument("--tls", action="store_true", help="the same as --channels plain,tls")
    ap.add_argument("--tern-tls-args", default="", metavar="ARGS",
                    help="more options for tern migrate in the TLS cells only, e.g. '--streams 2'")
    ap.add_argument("--qemu-tls-priority", metavar="STR",
                    help="GnuTLS priority string for QEMU's TLS cells (tls-creds-x509 priority=; default "
                         "QEMU's, under which it takes AES-256-GCM; 'NORMAL:-AES-256-GCM:-CHACHA20-POLY1305' "
                         "leaves AES-128-GCM, Tern's first choice)")
    ap.add_argument("--verify", action="store_true",
                    help="tern migrate --verify (digests both sides; adds to Tern's downtime)")
    ap.add_argument("--no-copy", action="store_true",
                    help="run the tern binary in place (default: copy it to the temp dir first, so a "
                         "rebuild during the run cannot change it)")
    ap.add_argument("--keep-tmp", action="store_true", help="keep logs and sockets' directories")
    ap.add_argument("--summarize", metavar="JSONL",
                    help="no runs: print (and with --markdown write) the report of the last run_id in JSONL")
    args = ap.parse_args()
    if args.tls:
        args.channels = "plain,tls"
    args.channel_list = [c.strip() for c in args.channels.split(",") if c.strip()]
    for c in args.channel_list:
        if c not in CHANNELS:
            ap.error("unknown channel %r (plain, tls)" % c)
    if not args.channel_list:
        ap.error("--channels: at least one of plain, tls")
    ARGS_MODE[0] = getattr(args, "mode", "precopy")
    ARGS_VARIANTS[:] = ((["prealloc"] if args.prealloc else []) + (["qemu-memfd"] if args.qemu_ram == "memfd" else [])
                        + (["warm-host"] if args.warm_host_gib else []) + (["tern-run"] if args.tern_run_args else [])
                        + (["tls"] if "tls" in args.channel_list else []))
    TERN_RUN_ARGS[0] = args.tern_run_args
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in args.case_list:
        if c not in CASES:
            ap.error("unknown case %r (known: %s)" % (c, ", ".join(CASES)))
    args.vmm_list = bl.vmm_names(ap, args.vmms)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    return args


def summarize(args):
    records = bl.last_run(args.summarize, "migration", "migration")
    if any(r.get("channel") == "tls" for r in records) and "tls" not in ARGS_VARIANTS:
        ARGS_VARIANTS.append("tls")
    meta = records[0].get("meta", {})
    bl.emit_report(render_markdown(records, meta), args.markdown, *marks())
    return 0


class Ctx:
    pass


def main():
    args = parse_args()
    if args.summarize:
        return summarize(args)

    bl.raise_on_sigterm()

    ctx = Ctx()
    ctx.args = args
    ctx.guest = os.path.abspath(args.guest)
    if not os.path.isfile(ctx.guest):
        sys.exit("migration.py: guest not found: %s (make -C guest)" % ctx.guest)
    tern_path = bl.pick_tern(args.tern)
    ctx.tern_info = bl.tern_binary_info(tern_path)
    ctx.tern_info["size"] = os.stat(tern_path).st_size
    now = datetime.datetime.now(datetime.timezone.utc)
    ctx.run_id = now.strftime("%Y%m%dT%H%M%SZ") + "-%d" % os.getpid()
    out = args.out or os.path.join(REPO, "bench", "results", "migration-%s.jsonl" % now.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = {
        "command": "python3 " + shlex.join(sys.argv),
        "date": now.isoformat(timespec="seconds"),
        "machine": bl.machine_facts(args.qemu, ctx.tern_info),
        "params": {"guest": os.path.relpath(ctx.guest, REPO), "memory_mib": args.memory_mib,
                   "max_downtime_ms": args.max_downtime_ms, "timeout_s": args.timeout_s,
                   "warmup_s": args.warmup_s, "warm_host_gib": args.warm_host_gib, "repeat": args.repeat, "cases": args.case_list,
                   "vmms": args.vmm_list, "channels": args.channel_list},
    }
    ctx.tmp = tempfile.mkdtemp(prefix="migbench-")
    if args.no_copy:
        ctx.tern = tern_path
    else:
        ctx.tern = os.path.join(ctx.tmp, "tern")
        shutil.copy2(tern_path, ctx.tern)
    ctx.tls = make_certificates(ctx) if "tls" in args.channel_list else None
    if ctx.tls:
        meta["tls"] = {k: v for k, v in ctx.tls.items() if not k.endswith("_dir")}
        meta["params"]["tern_tls_args"] = args.tern_tls_args
        meta["params"]["qemu_tls_priority"] = args.qemu_tls_priority
    log("tern %s (%s build, %s), QEMU %s, results -> %s" % (
        ctx.tern_info["path"], ctx.tern_info["build"], ctx.tern_info["mtime"],
        meta["machine"]["qemu_version"], out))

    records = []
    rc = 0
    interrupted = False
    try:
        step = 0
        for rep in range(args.repeat):
            for ci, case in enumerate(args.case_list):
                # one cell per VMM and channel: tern, qemu (plain), then tern, qemu (tls)
                order = [(vmm, ch) for ch in args.channel_list for vmm in args.vmm_list]
                if (rep + ci) % 2 == 1:
                    order.reverse()
                for pos, (vmm, channel) in enumerate(order):
                    if step:
                        time.sleep(args.pause_s)
                    step += 1
                    label = vmm if args.channel_list == ["plain"] else "%s %s" % (vmm, channel)
                    log("== %s, run %d/%d, %s" % (case, rep + 1, args.repeat, label))
                    fn = run_tern if vmm == "tern" else run_qemu
                    rec = fn(ctx, case, rep, pos, channel)
                    rec["meta"] = meta
                    records.append(rec)
                    bl.append_jsonl(out, rec)
                    log("== %s %s: %s, total %s ms, downtime %s ms%s, %s MB, destination %s%s" % (
                        case, label, rec.get("status"), fmt(rec.get("total_ms"), "ms"),
                        fmt(rec.get("downtime_ms"), "ms"),
                        (" (STOP->RESUME %s ms)" % fmt(rec.get("downtime_events_ms"), "ms"))
                        if vmm == "qemu" else
                        (" (%s rounds, %s)" % (rec.get("rounds_count"), rec.get("switchover_reason") or "-")),
                        fmt(None if rec.get("transferred_bytes") is None else rec["transferred_bytes"] / 1e6, "mb"),
                        "ok" if rec.get("dst_ok") else "NOT OK",
                        ("; error: " + rec["error"]) if rec.get("error") else ""))
                    if rec.get("status") != "completed" or not rec.get("dst_ok"):
                        rc = 1
                    if rec.get("status") == "interrupted":
                        raise Interrupted("interrupted during a run")
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        log("interrupted: stopping; the report covers the runs that finished")
    finally:
        with blocked_signals():
            kill_leftovers()
            if args.keep_tmp:
                if not args.no_copy:
                    os.unlink(ctx.tern)
                log("temp dir kept: %s" % ctx.tmp)
            else:
                shutil.rmtree(ctx.tmp, ignore_errors=True)
    if records:
        bl.emit_report(render_markdown(records, meta), args.markdown, *marks())
    log("results: %s" % out)
    return 130 if interrupted else rc


if __name__ == "__main__":
    sys.exit(main())
