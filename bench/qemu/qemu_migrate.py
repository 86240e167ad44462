#!/usr/bin/env python3
"""One live migration of the Tern test guest between two QEMU processes.

Starts a destination QEMU (-incoming defer, then QMP migrate-incoming
tcp:127.0.0.1:PORT once its capabilities are set) and a source QEMU, both
booting the Multiboot test guest, waits until the guest's workload is in
its steady state (status block at guest-physical 0x102000 says phase dirty or
idle), migrates it over loopback with the requested mode and parameters, checks
that the guest keeps running on the destination, and prints one JSON object on
stdout. Diagnostics go to stderr. Python 3 standard library only.

See README.md in this directory for the caveats (QEMU's default bandwidth cap,
what "downtime" means in QEMU, how post-copy is triggered).
"""

import argparse
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

STATUS_GPA = 0x102000
STATUS_MAGIC = 0x544154534E524554  # "TERNSTAT"
STATUS_WORDS = 12  # 0x00 .. 0x58 inclusive
PHASE_NAMES = {0: "boot", 1: "fill", 2: "dirty", 3: "idle", 0xE: "error", 0xF: "crashed"}

# When --bandwidth is not given we set max-bandwidth to this: QEMU's default
# (32 MiB/s in 7.2, "max-bandwidth": 33554432) would otherwise throttle the
# migration and make every result a measure of that cap.
UNLIMITED_BANDWIDTH = 100 * 1000 * 1000 * 1000  # 100 GB/s


def log(*a):
    print("[qemu_migrate]", *a, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class QMP:
    """Minimal synchronous QMP client over a unix socket."""

    def __init__(self, path, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(10)
                s.connect(path)
                break
            except OSError as e:
                s.close()
                last = e
                if time.monotonic() > deadline:
                    raise BenchError("cannot connect to QMP %s: %s" % (path, last))
                time.sleep(0.05)
        self.sock = s
        self.buf = b""
        self.events = []
        greeting = self._read_msg()
        if "QMP" not in greeting:
            raise BenchError("unexpected QMP greeting: %r" % greeting)
        self.version = greeting["QMP"].get("version", {})
        self.cmd("qmp_capabilities")

    def _read_msg(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read_msg()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise BenchError("QMP %s failed: %s" % (name, r["error"]))
            if "return" in r:
                return r["return"]

    def drain(self, seconds):
        """Collect events that arrive within `seconds` (no command sent)."""
        end = time.monotonic() + seconds
        old = self.sock.gettimeout()
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    break
                if b"\n" not in self.buf:
                    self.sock.settimeout(left)
                    try:
                        chunk = self.sock.recv(65536)
                    except socket.timeout:
                        break
                    if not chunk:
                        break
                    self.buf += chunk
                    continue
                r = self._read_msg()
                if "event" in r:
                    self.events.append(r)
        finally:
            self.sock.settimeout(old)

    def event_times(self, name):
        """Host wall-clock times (s) of the events called `name` seen so far."""
        return [e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                for e in self.events if e.get("event") == name and "timestamp" in e]

    def hmp(self, line):
        return self.cmd("human-monitor-command", **{"command-line": line})

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def read_status(qmp):
    """Read the guest status block with HMP `xp`. Returns a dict or None."""
    out = qmp.hmp("xp /%dgx 0x%x" % (STATUS_WORDS, STATUS_GPA))
    words = []
    for ln in out.splitlines():
        if ":" not in ln:
            continue
        for tok in ln.split(":", 1)[1].split():
            words.append(int(tok, 16))
    if len(words) < STATUS_WORDS:
        raise BenchError("cannot parse xp output: %r" % out)
    w = words
    st = {
        "magic_ok": w[0] == STATUS_MAGIC,
        "version": w[1] & 0xFFFFFFFF,
        "phase": (w[1] >> 32) & 0xFFFFFFFF,
        "iterations": w[2],
        "checksum": w[5],
        "passes": w[6],
        "verified": w[7],
        "errors": w[8],
        "fill_bytes": w[11],
    }
    st["phase_name"] = PHASE_NAMES.get(st["phase"], hex(st["phase"]))
    return st


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def warm_host(gib):
    """Touches GIB GiB of 4 KiB pages and frees them, just before a migration is timed.

    This machine is a VM whose kernel hands free memory back to its host
    (free page reporting); memory it has not used lately costs ~10 us a page
    on first write, and which VMM's destination gets the memory still backed
    depends on the page size its source took (docs/BENCHMARKS.md, "First
    touch"). Freed a moment before the migration, this much is backed for
    whichever destination comes next, as memory is on a bare-metal host."""
    if not gib:
        return 0.0
    start = time.monotonic()
    size = int(gib * (1 << 30))
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_NOHUGEPAGE)
    m.madvise(23)  # MADV_POPULATE_WRITE: allocate and back every page
    m.close()
    return time.monotonic() - start


def qemu_cmd(args, tmp, role, incoming=False):
    cmd = [
        args.qemu, "-accel", "kvm", "-m", str(args.memory),
        "-kernel", args.guest, "-append", args.cmdline,
        "-display", "none", "-monitor", "none",
        "-serial", "file:%s/%s-serial.log" % (tmp, role),
        "-qmp", "unix:%s/%s.qmp,server=on,wait=off" % (tmp, role),
        "-no-reboot",
    ]
    prealloc = incoming and args.dst_prealloc
    if args.ram == "memfd":
        # Guest RAM in a memfd, as Tern's: shmem, which this kernel backs with 4 KiB pages only
        # (QEMU's default anonymous RAM gets transparent huge pages: docs/BENCHMARKS.md, "First touch").
        cmd += ["-object", "memory-backend-memfd,id=ram,size=%dM,share=on%s" % (args.memory, ",prealloc=on" if prealloc else ""),
                "-machine", "memory-backend=ram"]
    tls_dir = args.tls_dst_dir if incoming else args.tls_src_dir
    if tls_dir:
        # TLS on the migration channel (QEMU's own docs: docs/devel/migration.rst, "TLS"): x509 credentials
        # with the peer's certificate verified on both ends; the destination is the TLS server.
        cmd += ["-object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s,verify-peer=on%s" % (
            os.path.abspath(tls_dir), "server" if incoming else "client",
            ",priority=" + args.tls_priority if args.tls_priority else "")]
        # Trace events on stderr: the handshakes' outcome, checked after the migration
        # (QEMU reports neither the TLS version nor the cipher through QMP).
        cmd += ["-trace", "qio_channel_tls_handshake_*", "-trace", "qio_channel_tls_credentials_*"]
    if incoming:
        # "defer": the destination listens only after QMP migrate-incoming, so
        # its migration capabilities (multifd, postcopy-ram) and parameters
        # (multifd-channels) can be set first; multifd requires that.
        cmd += ["-incoming", "defer"]
        if prealloc and args.ram == "anon":
            # Guest RAM allocated and touched before the migration starts (tern run --prealloc).
            cmd += ["-mem-prealloc"]
    return cmd


def start_qemu(cmd, tmp, role):
    log("start %s: %s" % (role, " ".join(cmd)))
    err = open(os.path.join(tmp, "%s-stderr.log" % role), "wb")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                         start_new_session=True)
    err.close()
    return p


def stop_qemu(p, qmp):
    if p is None:
        return
    if p.poll() is None:
        if qmp is not None:
            try:
                qmp.sock.settimeout(2)
                qmp.cmd("quit")
            except Exception:
                pass
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    if qmp is not None:
        qmp.close()


def tail(path, n=2000):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


TLS_EVENTS = ("qio_channel_tls_handshake_complete", "qio_channel_tls_handshake_fail",
              "qio_channel_tls_credentials_allow", "qio_channel_tls_credentials_deny")


def tls_check(tmp):
    """What each side's trace said of its TLS sessions (stderr, -trace qio_channel_tls_*): handshakes
    completed and failed, peer certificates allowed and denied. `ok`: on both sides at least one
    handshake completed and the peer's certificate was allowed, and nothing failed or was denied."""
    out = {}
    for role in ("src", "dst"):
        lines = tail(os.path.join(tmp, "%s-stderr.log" % role), 1 << 20).splitlines()
        out[role] = {e[len("qio_channel_tls_"):]: sum(1 for ln in lines if ln.startswith(e + " "))
                     for e in TLS_EVENTS}
    out["ok"] = all(out[r]["handshake_complete"] >= 1 and out[r]["credentials_allow"] >= 1
                    and out[r]["handshake_fail"] == 0 and out[r]["credentials_deny"] == 0 for r in ("src", "dst"))
    return out


def check_alive(p, tmp, role):
    if p.poll() is not None:
        raise BenchError("%s QEMU exited with %s: %s" % (
            role, p.returncode, tail(os.path.join(tmp, "%s-stderr.log" % role))))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guest", required=True, help="Multiboot guest kernel (tern-guest.elf)")
    ap.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    ap.add_argument("--cmdline", default="progress=0", help="guest command line")
    ap.add_argument("--max-downtime-ms", type=int, default=300,
                    help="QEMU downtime-limit in ms (default 300)")
    ap.add_argument("--bandwidth", type=int, default=None,
                    help="max-bandwidth in bytes/s (default: unlimited, i.e. %d)"
                    % UNLIMITED_BANDWIDTH)
    ap.add_argument("--mode", choices=["precopy", "postcopy"], default="precopy")
    ap.add_argument("--postcopy-after-syncs", type=int, default=2,
                    help="postcopy: switch when ram.dirty-sync-count reaches this"
                    " (2 = after the first full pass; 0 = as soon as the migration"
                    " is active; default 2)")
    ap.add_argument("--postcopy-max-delay-s", type=float, default=10.0,
                    help="postcopy: switch after this long at the latest (default 10)")
    ap.add_argument("--auto-converge", action="store_true",
                    help="enable QEMU's auto-converge (vCPU throttling) capability")
    ap.add_argument("--xbzrle-cache-mib", type=int, default=0,
                    help="enable XBZRLE with this cache size in MiB (0 = off)")
    ap.add_argument("--warm-host-gib", type=float, default=0,
                    help="touch and free this much 4 KiB-page memory just before migrating (see warm_host)")
    ap.add_argument("--ram", choices=["anon", "memfd"], default="anon",
                    help="guest RAM: anonymous memory (QEMU's default, with transparent huge pages) or a memfd (Tern's kind)")
    ap.add_argument("--dst-prealloc", action="store_true",
                    help="destination QEMU with -mem-prealloc (RAM touched before the migration)")
    ap.add_argument("--multifd", type=int, default=0,
                    help="enable multifd with N channels (0 = off)")
    ap.add_argument("--warmup-s", type=float, default=2.0,
                    help="seconds to run after the fill finished (default 2)")
    ap.add_argument("--timeout-s", type=float, default=120.0,
                    help="migration timeout in seconds (default 120)")
    ap.add_argument("--boot-timeout-s", type=float, default=120.0,
                    help="timeout for the guest to reach dirty/idle (default 120)")
    ap.add_argument("--tls-src-dir", metavar="DIR",
                    help="TLS: the source's tls-creds-x509 directory (ca-cert.pem, client-cert.pem, client-key.pem); "
                         "with --tls-dst-dir and --tls-hostname")
    ap.add_argument("--tls-dst-dir", metavar="DIR",
                    help="TLS: the destination's directory (ca-cert.pem, server-cert.pem, server-key.pem)")
    ap.add_argument("--tls-hostname", metavar="NAME",
                    help="TLS: the name the destination's certificate must carry (migrate-set-parameters tls-hostname)")
    ap.add_argument("--tls-priority", metavar="STR",
                    help="TLS: GnuTLS priority string for both sides (tls-creds-x509 priority=; default QEMU's, "
                         "\"NORMAL\", under which GnuTLS 3.7 takes TLS 1.3 with AES-256-GCM)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--pretty", action="store_true", help="indent the JSON output")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs)")
    return ap.parse_args()


def main():
    args = parse_args()
    args.guest = os.path.abspath(args.guest)
    if not os.path.isfile(args.guest):
        print(json.dumps({"status": "error", "error": "guest not found: %s" % args.guest}))
        return 2
    if args.mode == "postcopy" and args.multifd:
        # QEMU 7.2 refuses postcopy-ram together with multifd.
        print(json.dumps({"status": "error", "error": "postcopy and multifd are exclusive in QEMU"}))
        return 2

    tls_opts = (args.tls_src_dir, args.tls_dst_dir, args.tls_hostname)
    if any(tls_opts) and not all(tls_opts):
        print(json.dumps({"status": "error", "error": "--tls-src-dir, --tls-dst-dir and --tls-hostname go together"}))
        return 2

    bandwidth = args.bandwidth if args.bandwidth else UNLIMITED_BANDWIDTH
    result = {
        "status": "error",
        "mode": args.mode,
        "memory_mib": args.memory,
        "cmdline": args.cmdline,
        "max_downtime_ms": args.max_downtime_ms,
        "bandwidth_bytes_per_s": args.bandwidth,
        "bandwidth_set_bytes_per_s": bandwidth,
        "xbzrle_cache_mib": args.xbzrle_cache_mib,
        "multifd_channels": args.multifd,
        "auto_converge": args.auto_converge,
        "warmup_s": args.warmup_s,
        "timeout_s": args.timeout_s,
        "guest": args.guest,
        "channel": "tls" if args.tls_src_dir else "plain",
        "tls_priority": args.tls_priority,
    }
    if args.mode == "postcopy":
        result["postcopy_after_syncs"] = args.postcopy_after_syncs
        result["postcopy_max_delay_s"] = args.postcopy_max_delay_s

    tmp = tempfile.mkdtemp(prefix="qemu-migrate-")
    src = dst = None
    sq = dq = None
    rc = 1

    def on_signal(signum, frame):
        raise BenchError("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        dst = start_qemu(qemu_cmd(args, tmp, "dst", incoming=True), tmp, "dst")
        src = start_qemu(qemu_cmd(args, tmp, "src"), tmp, "src")
        dq = QMP(os.path.join(tmp, "dst.qmp"), 20)
        sq = QMP(os.path.join(tmp, "src.qmp"), 20)
        v = sq.version.get("qemu", {})
        result["qemu_version"] = "%s.%s.%s" % (v.get("major"), v.get("minor"), v.get("micro"))
        result["qemu_package"] = sq.version.get("package", "").strip()

        # 3. wait for the steady state
        t0 = time.monotonic()
        deadline = t0 + args.boot_timeout_s
        st = None
        while True:
            check_alive(src, tmp, "src")
            st = read_status(sq)
            if st["magic_ok"] and st["phase"] in (2, 3):
                break
            if st["magic_ok"] and st["phase"] in (0xE, 0xF):
                raise BenchError("guest on source failed: phase %s; serial: %s" % (
                    st["phase_name"], tail(os.path.join(tmp, "src-serial.log"))))
            if time.monotonic() > deadline:
                raise BenchError("guest did not reach dirty/idle in %.0f s (last %r); serial: %s" % (
                    args.boot_timeout_s, st, tail(os.path.join(tmp, "src-serial.log"))))
            time.sleep(0.2)
        result["src_ready_s"] = round(time.monotonic() - t0, 3)
        result["src_phase"] = st["phase_name"]
        result["src_fill_bytes"] = st["fill_bytes"]
        log("guest ready after %.1f s, phase %s; warm-up %.1f s" % (
            result["src_ready_s"], st["phase_name"], args.warmup_s))
        time.sleep(args.warmup_s)
        if args.warm_host_gib:
            log("warmed %g GiB of host memory in %.1f s" % (args.warm_host_gib, warm_host(args.warm_host_gib)))
        check_alive(src, tmp, "src")
        check_alive(dst, tmp, "dst")

        # 4. configure
        # "events": the source emits a MIGRATION event on every status change
        # (used for the timeline: a short post-copy phase can fall between two
        # query-migrate polls) and MIGRATION_PASS on every dirty-bitmap sync.
        caps = [{"capability": "events", "state": True}]
        if args.xbzrle_cache_mib:
            caps.append({"capability": "xbzrle", "state": True})
        if args.multifd:
            caps.append({"capability": "multifd", "state": True})
        if args.mode == "postcopy":
            caps.append({"capability": "postcopy-ram", "state": True})
        if args.auto_converge:
            caps.append({"capability": "auto-converge", "state": True})
        defaults = sq.cmd("query-migrate-parameters")
        result["qemu_default_max_bandwidth"] = defaults.get("max-bandwidth")
        result["qemu_default_downtime_limit"] = defaults.get("downtime-limit")
        sq.cmd("migrate-set-capabilities", capabilities=caps)
        # xbzrle and auto-converge are source-only; multifd and postcopy-ram
        # must be enabled on the destination too.
        dcaps = [c for c in caps if c["capability"] in ("multifd", "postcopy-ram")]
        if dcaps:
            dq.cmd("migrate-set-capabilities", capabilities=dcaps)
        params = {"downtime-limit": args.max_downtime_ms, "max-bandwidth": bandwidth}
        if args.xbzrle_cache_mib:
            params["xbzrle-cache-size"] = args.xbzrle_cache_mib * 1024 * 1024
        if args.multifd:
            params["multifd-channels"] = args.multifd
            dq.cmd("migrate-set-parameters", **{"multifd-channels": args.multifd})
        if args.tls_src_dir:
            params["tls-creds"] = "tls0"
            params["tls-hostname"] = args.tls_hostname
            dq.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
        sq.cmd("migrate-set-parameters", **params)
        # destination starts listening now (free_port() may race with another
        # process grabbing the port: retry a few times)
        for attempt in range(5):
            port = free_port()
            try:
                dq.cmd("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)
                break
            except BenchError as e:
                if attempt == 4:
                    raise
                log("migrate-incoming on port %d failed (%s), retrying" % (port, e))
        result["port"] = port
        qp = sq.cmd("query-migrate-parameters")
        result["qemu_parameters"] = {k: qp.get(k) for k in (
            "downtime-limit", "max-bandwidth", "max-postcopy-bandwidth",
            "xbzrle-cache-size", "multifd-channels", "multifd-compression", "tls-creds", "tls-hostname")}
        result["qemu_parameters_dst"] = {k: v for k, v in dq.cmd("query-migrate-parameters").items()
                                         if k in ("tls-creds", "tls-hostname", "tls-authz")}
        result["qemu_capabilities"] = [c["capability"] for c in
                                       sq.cmd("query-migrate-capabilities") if c["state"]]
        result["qemu_capabilities_dst"] = [c["capability"] for c in
                                           dq.cmd("query-migrate-capabilities") if c["state"]]

        # Other load on the host skews every number here (2 cores: the guest's
        # vCPU takes one, QEMU's migration thread the other): record it.
        result["host_cpus"] = os.cpu_count()
        result["host_loadavg_1m_before"] = round(os.getloadavg()[0], 2)
        st = read_status(sq)
        result["src_iterations_before"] = st["iterations"]
        result["src_errors_before"] = st["errors"]

        # 5. migrate
        t_start = time.monotonic()
        wall_start = time.time()
        sq.cmd("migrate", uri="tcp:127.0.0.1:%d" % port)
        deadline = t_start + args.timeout_s
        postcopy_started = False
        info = {}
        polls = 0
        timeline = []  # one entry per status change (and the postcopy switch)
        last_status = None

        def mark(info, what):
            ram = info.get("ram", {})
            timeline.append({
                "t_ms": round((time.monotonic() - t_start) * 1000, 1),
                "event": what,
                "transferred_bytes": ram.get("transferred"),
                "remaining_bytes": ram.get("remaining"),
                "dirty_sync_count": ram.get("dirty-sync-count"),
            })

        last_active = {}
        while True:
            info = sq.cmd("query-migrate")
            polls += 1
            status = info.get("status")
            if status != last_status:
                mark(info, status)
                last_status = status
            if status == "completed" and not info.get("total-time"):
                # QEMU 7.2 sets the status to completed a moment before it
                # computes total-time and downtime (migration_calculate_complete);
                # a poll in between sees zeros. Poll again.
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
            if status in ("completed", "failed", "cancelled"):
                break
            if "ram" in info:
                last_active = info
            if (args.mode == "postcopy" and not postcopy_started
                    and status == "active"):
                syncs = info.get("ram", {}).get("dirty-sync-count", 0)
                waited = time.monotonic() - t_start
                if syncs >= args.postcopy_after_syncs or waited >= args.postcopy_max_delay_s:
                    sq.cmd("migrate-start-postcopy")
                    mark(info, "migrate-start-postcopy")
                    postcopy_started = True
                    result["postcopy_switch_ms"] = round(waited * 1000, 1)
                    result["postcopy_switch_sync_count"] = syncs
                    result["postcopy_switch_transferred_bytes"] = info.get("ram", {}).get("transferred")
                    log("migrate-start-postcopy at %.0f ms (dirty-sync-count %d)" % (waited * 1000, syncs))
            if time.monotonic() > deadline:
                log("timeout after %.0f s, cancelling" % args.timeout_s)
                try:
                    sq.cmd("migrate_cancel")
                except BenchError:
                    pass
                end = time.monotonic() + 15
                while True:
                    info = sq.cmd("query-migrate")
                    if info.get("status") in ("cancelled", "failed", "completed"):
                        break
                    if time.monotonic() > end:
                        break
                    time.sleep(0.05)
                result["status_after_cancel"] = info.get("status")
                # report the progress made until the timeout (a cancelled
                # migration has no ram statistics); total-time = time so far
                info = dict(last_active or info)
                info["status"] = "timeout"
                info["downtime"] = None
                break
            check_alive(src, tmp, "src")
            # 50 ms polls; 10 ms while waiting for the post-copy switch point
            time.sleep(0.01 if args.mode == "postcopy" and not postcopy_started else 0.05)
        wall_ms = (time.monotonic() - t_start) * 1000
        result["host_loadavg_1m_after"] = round(os.getloadavg()[0], 2)
        if args.mode == "postcopy":
            # Did the guest really run on the destination in post-copy? If
            # pre-copy converged first (or migrate-start-postcopy came while
            # QEMU was already completing), this is a plain pre-copy result.
            result["postcopy_happened"] = any(
                e.get("event") == "MIGRATION" and e["data"].get("status") == "postcopy-active"
                for e in sq.events)

        ram = info.get("ram", {})
        total_ms = info.get("total-time")
        result.update({
            "status": info.get("status"),
            "total_ms": total_ms,
            "downtime_ms": info.get("downtime"),
            "setup_ms": info.get("setup-time"),
            "wall_ms": round(wall_ms, 1),
            "transferred_bytes": ram.get("transferred"),
            "ram_bytes": ram.get("total"),
            "zero_pages": ram.get("duplicate"),
            "normal_pages": ram.get("normal"),
            "normal_bytes": ram.get("normal-bytes"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "postcopy_requests": ram.get("postcopy-requests"),
            "pages_per_second": ram.get("pages-per-second"),
            "mbps_qemu": ram.get("mbps"),
            "xbzrle": None,
            "polls": polls,
            "timeline": timeline,
        })
        sq.drain(0.05)
        result["events"] = [
            {"t_ms": round((e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                            - wall_start) * 1000, 1),
             "event": e["event"],
             "data": e.get("data")}
            for e in sq.events
            if e["event"] in ("MIGRATION", "MIGRATION_PASS", "STOP", "RESUME")]
        if "xbzrle-cache" in info:
            x = info["xbzrle-cache"]
            result["xbzrle"] = {
                "cache_size": x.get("cache-size"),
                "bytes": x.get("bytes"),
                "pages": x.get("pages"),
                "cache_miss": x.get("cache-miss"),
                "cache_miss_rate": x.get("cache-miss-rate"),
                "encoding_rate": x.get("encoding-rate"),
                "overflow": x.get("overflow"),
            }
        if args.multifd and "multifd-bytes" in ram:
            result["multifd_bytes"] = ram.get("multifd-bytes")
        if info.get("error-desc"):
            result["error"] = info["error-desc"]
        if total_ms and ram.get("transferred") is not None:
            result["throughput_mbps"] = round(ram["transferred"] / (total_ms / 1000.0) / 1e6, 1)
        else:
            result["throughput_mbps"] = None

        if args.tls_src_dir:
            # QEMU does not say through QMP whether, or how, the channel was secured: its trace does.
            result["tls_check"] = tls_check(tmp)
            if info.get("status") == "completed" and not result["tls_check"]["ok"]:
                raise BenchError("the migration completed but the TLS trace does not show a verified "
                                 "session on both sides: %r" % result["tls_check"])

        # 6. verify the destination
        if info.get("status") == "completed":
            deadline = time.monotonic() + 10
            while True:
                check_alive(dst, tmp, "dst")
                ds = dq.cmd("query-status")
                if ds.get("running"):
                    break
                if time.monotonic() > deadline:
                    raise BenchError("destination not running after migration: %r" % ds)
                time.sleep(0.05)
            result["dst_run_state"] = ds.get("status")
            # Downtime as seen from outside: the source's STOP event to the
            # destination's RESUME event (QMP event timestamps are host
            # wall-clock, both processes on the same host).
            dq.drain(0.05)
            sq.drain(0.05)
            stops = sq.event_times("STOP")
            resumes = dq.event_times("RESUME")
            if stops and resumes:
                result["downtime_events_ms"] = round((resumes[0] - stops[-1]) * 1000, 1)
            else:
                result["downtime_events_ms"] = None
            a = read_status(dq)
            time.sleep(0.5)
            b = read_status(dq)
            result["dst_magic_ok"] = a["magic_ok"] and b["magic_ok"]
            result["dst_phase"] = b["phase_name"]
            result["dst_iterations_first"] = a["iterations"]
            result["dst_iterations_second"] = b["iterations"]
            result["dst_iterations_advancing"] = b["iterations"] > a["iterations"]
            result["dst_errors"] = b["errors"]
            result["dst_verified"] = b["verified"]
            ok = (result["dst_magic_ok"] and result["dst_iterations_advancing"]
                  and b["errors"] == 0 and b["phase"] in (2, 3)
                  and b["iterations"] >= result["src_iterations_before"])
            result["dst_ok"] = ok
            rc = 0 if ok else 1
        else:
            result["dst_iterations_advancing"] = None
            result["dst_errors"] = None
            result["dst_ok"] = False
            result.setdefault("error", "migration ended with status %s" % info.get("status"))
            result["src_stderr"] = tail(os.path.join(tmp, "src-stderr.log"), 1000)
            result["dst_stderr"] = tail(os.path.join(tmp, "dst-stderr.log"), 1000)
    except Exception as e:  # report every failure as JSON
        # "status" keeps the migration's final status if it got that far
        # (e.g. completed, but the destination check failed), else "error".
        if not result.get("status"):
            result["status"] = "error"
        result["dst_ok"] = False
        result["error"] = "%s: %s" % (type(e).__name__, e)
        for role in ("src", "dst"):
            result["%s_stderr" % role] = tail(os.path.join(tmp, "%s-stderr.log" % role), 1000)
            result["%s_serial" % role] = tail(os.path.join(tmp, "%s-serial.log" % role), 1000)
        rc = 1
    finally:
        stop_qemu(src, sq)
        stop_qemu(dst, dq)
        if args.keep_tmp:
            result["tmp_dir"] = tmp
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(json.dumps(result, indent=2 if args.pretty else None), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
