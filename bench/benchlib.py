"""What the bench scripts share: logging, the processes they start (each in its own session,
stopped in order on errors, Ctrl-C and SIGTERM), the tern binary and the machine's facts, JSON
lines and the Markdown file's marked sections; and, at the end (used by bench/network.py so far),
a script's frame: its common options, its inputs staged, the runs' alternating order, its report's
opening, and the steps of one run (a process exiting, a status polled, a tern destination, a tern
migrate).

Python 3 standard library only. Each script calls set_prog() first, for its log prefix.
"""

import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

PROG = ["bench"]  # the log prefix and the name in error messages: set_prog()


def set_prog(name):
    PROG[0] = name


def log(*a):
    print("[%s]" % PROG[0], *a, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    """SIGTERM, handled like Ctrl-C (KeyboardInterrupt)."""


def raise_on_sigterm():
    def on_term(signum, frame):
        raise Interrupted("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_term)


class blocked_signals:
    """Defers SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot leave processes behind."""

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    def __exit__(self, *exc):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False


# ---------------------------------------------------------------- processes

LIVE = {}  # pid -> (Popen, name): everything started here and not yet reaped


def spawn(name, cmd, stdout=None, stderr=None):
    """Starts a process in its own session (Ctrl-C on the terminal reaches only this script,
    which then stops its children in order). stdout: a path, or None to inherit; stderr: a path,
    subprocess.STDOUT (into stdout's file), or None to inherit."""
    log("start %s: %s" % (name, shlex.join(cmd)))
    out = open(stdout, "wb") if stdout else None
    err = open(stderr, "wb") if isinstance(stderr, str) else stderr
    try:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True, cwd=REPO)
    finally:
        if out:
            out.close()
        if isinstance(stderr, str):
            err.close()
    LIVE[p.pid] = (p, name)
    return p


def reap(p, timeout):
    """Waits up to `timeout` s; True if the process has exited."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    LIVE.pop(p.pid, None)
    return True


def signal_proc(p, sig):
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def kill_hard(p, name):
    if p.poll() is None:
        log("killing %s (pid %d)" % (name, p.pid))
        signal_proc(p, signal.SIGKILL)
    reap(p, 10)


def terminate(p, name, wait_s):
    """Waits `wait_s` for the process to end by itself (after a quit), then SIGTERM, then SIGKILL;
    all bounded. Returns its exit status."""
    if not reap(p, wait_s):
        signal_proc(p, signal.SIGTERM)
        if not reap(p, 10):
            kill_hard(p, name)
    LIVE.pop(p.pid, None)
    return p.returncode


def kill_leftovers(stop):
    """stop(p, name) for every process started here that still runs (on the way out)."""
    for pid, (p, name) in list(LIVE.items()):
        if p.poll() is None:
            stop(p, name)
        LIVE.pop(pid, None)


def processes():
    """(pid, the fields of /proc/PID/stat after the command's name: state, ppid, ...) of every
    process that is there as it is read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        yield int(entry), stat[stat.rindex(")") + 2:].split()


def tern_quit(tern, sock, timeout=10):
    """`tern quit` on the API socket; True if it answered with success. A destination still
    waiting for its migration answers "the VM is still being created" (exit 1): SIGTERM ends that."""
    if not sock or not os.path.exists(sock):
        return False
    try:
        return subprocess.run([tern, "quit", "--api-socket", sock], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def tail(path, n=1500):
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data[-n:].decode("utf-8", "replace").strip()
    except OSError:
        return ""


def sh(cmd, timeout=15, check=True):
    """Runs a short admin command (ip ...); raises BenchError if it fails and check is set."""
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError("%s did not finish within %d s" % (shlex.join(cmd), timeout))
    if check and r.returncode != 0:
        raise BenchError("%s failed (exit %d): %s" % (shlex.join(cmd), r.returncode,
                                                      r.stderr.decode("utf-8", "replace").strip()))
    return r


def run_out(cmd, timeout=15):
    """stdout of a short command run in the repository, or None if it failed."""
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, cwd=REPO)
        return r.stdout.decode("utf-8", "replace").strip() if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---------------------------------------------------------------- the binary and the machine

def pick_tern(path):
    """--tern PATH, else .build/release/tern (a warning if the debug build is newer), else the debug build."""
    if path:
        p = os.path.abspath(path)
        if not os.access(p, os.X_OK):
            sys.exit("%s.py: --tern %s is not an executable" % (PROG[0], path))
        return p
    rel = os.path.join(REPO, ".build", "release", "tern")
    dbg = os.path.join(REPO, ".build", "debug", "tern")
    if os.access(rel, os.X_OK):
        if os.access(dbg, os.X_OK) and os.path.getmtime(dbg) > os.path.getmtime(rel):
            log("warning: .build/release/tern is older than .build/debug/tern; using release anyway "
                "(pass --tern .build/debug/tern to use the newer one)")
        return rel
    if os.access(dbg, os.X_OK):
        log("warning: no .build/release/tern; using the debug build (slower)")
        return dbg
    sys.exit("%s.py: no tern binary (.build/release/tern or .build/debug/tern); give --tern PATH" % PROG[0])


def tern_binary_info(path):
    """Which tern binary (relative to the repository where it is inside), its build and mtime."""
    st = os.stat(path)
    return {
        "path": os.path.relpath(path, REPO) if path.startswith(REPO + os.sep) else path,
        "build": "debug" if "/debug/" in path else ("release" if "/release/" in path else "unknown"),
        "mtime": datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_facts(qemu, tern_info):
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    cpu = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    qv = run_out([qemu, "--version"])
    # Only what the binary is built from: a benchmark that writes its results into
    # docs/ must not mark the next benchmark's identical build as modified.
    status = run_out(["git", "status", "--porcelain", "--untracked-files=no", "--", "Sources", "Package.swift", "guest"])
    return {
        "nproc": run_out(["nproc"]) or os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "loadavg": "%.2f" % os.getloadavg()[0],
        "qemu_version": qv.splitlines()[0] if qv else "not found",
        "tern_commit": run_out(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        "tern_tree_dirty": bool(status),
        "tern": tern_info,
    }


# ---------------------------------------------------------------- results

def append_jsonl(path, rec):
    """One JSON line, appended as soon as a run ends (an interrupted run keeps what finished)."""
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def last_run(path, bench, what):
    """The records of `bench` in the JSON-lines file with the last run_id there; exits, saying
    there are no `what` records, if it holds none."""
    with open(path) as f:
        records = [json.loads(ln) for ln in f if ln.strip()]
    records = [r for r in records if r.get("bench") == bench]
    if not records:
        sys.exit("%s.py: no %s records in %s" % (PROG[0], what, path))
    run_id = records[-1]["run_id"]
    return [r for r in records if r["run_id"] == run_id]


def write_markdown_file(path, section, start, end):
    """Replaces what is between the markers `start` and `end` in the file, else appends the section
    (the file is created if absent)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = None
    if text is None:
        new = "# Benchmarks\n\n" + section
    elif start in text and end in text and text.index(start) < text.index(end):
        i = text.index(start)
        j = text.index(end) + len(end)
        rest = text[j:]
        if rest.startswith("\n"):
            rest = rest[1:]
        new = text[:i] + section + rest
    else:
        new = text + ("" if text.endswith("\n") else "\n") + "\n" + section
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def emit_report(section, markdown, start, end):
    """The report on stdout and, with --markdown FILE, into FILE between the markers."""
    sys.stdout.write(section)
    sys.stdout.flush()
    if markdown:
        write_markdown_file(markdown, section, start, end)
        log("report written to %s" % markdown)


def vmm_names(ap, text):
    """--vmms: tern, qemu or both, in the order given."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    for v in names:
        if v not in ("tern", "qemu"):
            ap.error("unknown VMM %r (tern, qemu)" % v)
    return names


def med(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def ratio(a, b):
    return None if a is None or not b else a / b


# ---------------------------------------------------------------- a script's frame (bench/network.py uses these)

def common_args(ap, name, marks, repeat=1):
    """The options every VMM-against-VMM script takes: runs, binaries, output and the report again."""
    ap.add_argument("--repeat", type=int, default=repeat, help="runs per case and VMM (default %d)" % repeat)
    ap.add_argument("--vmms", default="tern,qemu", help="tern, qemu or both (default tern,qemu)")
    ap.add_argument("--tern", help="tern binary (default .build/release/tern, else .build/debug/tern)")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--guest", default=os.path.join(REPO, "guest", "build", "tern-guest.elf"))
    out = os.path.join("bench", "results", name + ".jsonl")
    ap.add_argument("--out", default=os.path.join(REPO, out), help="JSON lines, appended (default %s)" % out)
    ap.add_argument("--markdown", metavar="FILE", help="also write the report into FILE between %s and %s" % marks)
    ap.add_argument("--keep-tmp", action="store_true", help="keep the runs' logs, sockets and reports")
    ap.add_argument("--summarize", metavar="JSONL",
                    help="no runs: print (and with --markdown write) the report of the last run_id in JSONL")


def checked_common_args(ap, args, known_cases):
    """--cases as a list of known names, --vmms as a list, --repeat at least 1."""
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in args.case_list:
        if c not in known_cases:
            ap.error("unknown case %r (known: %s)" % (c, ", ".join(known_cases)))
    args.vmm_list = vmm_names(ap, args.vmms)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")


def stage_inputs(args, tmp, need_tern=True):
    """The guest and the tern binary copied into `tmp`, so a rebuild during the run cannot change them
    halfway; exits if one is missing. Returns {guest, guest_src, guest_sha256, tern, tern_info}."""
    guest_src = os.path.abspath(args.guest)
    if not os.path.isfile(guest_src):
        sys.exit("%s.py: guest not found: %s (make -C guest)" % (PROG[0], guest_src))
    if "qemu" in args.vmm_list and not shutil.which(args.qemu):
        sys.exit("%s.py: %s not found (apt-get install qemu-system-x86)" % (PROG[0], args.qemu))
    out = {"guest_src": guest_src, "guest": os.path.join(tmp, os.path.basename(guest_src)), "tern": None,
           "tern_info": None}
    shutil.copy2(guest_src, out["guest"])
    with open(out["guest"], "rb") as f:
        out["guest_sha256"] = hashlib.sha256(f.read()).hexdigest()
    if need_tern:
        path = pick_tern(args.tern)
        out["tern"] = os.path.join(tmp, "tern")
        shutil.copy2(path, out["tern"])
        out["tern_info"] = tern_binary_info(path)
    return out


def new_run_id():
    """(the time now, a run id: that time and this process's pid)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now, now.strftime("%Y%m%dT%H%M%SZ") + "-%d" % os.getpid()


def alternating(repeat, cases, vmms):
    """(repetition, case, position, vmm) for every run: the VMMs of each case in an order that alternates
    from case to case and from repetition to repetition."""
    for rep in range(repeat):
        for ci, case in enumerate(cases):
            order = vmms if (rep + ci) % 2 == 0 else list(reversed(vmms))
            for pos, vmm in enumerate(order):
                yield rep, case, pos, vmm


def report_opening(script, meta, start, title):
    """The first lines of a report: its markers and title, where it comes from, the command, the date, the machine."""
    m = meta.get("machine", {})
    return [start, title, "", "Generated by `bench/%s` (see `bench/README.md`)." % script, "",
            "- command: `%s`" % meta.get("command"), "- date: %s" % meta.get("date"),
            "- machine: %s CPUs (`nproc`), %s, kernel %s, load average %s at the start" % (
                m.get("nproc"), m.get("cpu_model") or "unknown CPU", m.get("kernel"), m.get("loadavg"))]


# ---------------------------------------------------------------- processes of one run

def check_alive(procs):
    """procs: (Popen, what, log path). Raises BenchError for the first that has exited, with its log's tail."""
    for p, what, path in procs:
        if p.poll() is not None:
            LIVE.pop(p.pid, None)
            raise BenchError("%s exited with %s: %s" % (what, p.returncode, tail(path, 800)))


def wait_for(read, alive, timeout, ready, what, errors=(OSError, BenchError)):
    """Polls read() every 0.1 s until ready(value) is true and returns that value. read() returning None or
    raising one of `errors` means not yet; ready() may raise to give up; alive() runs between polls."""
    deadline = time.monotonic() + timeout
    value = None
    while True:
        alive()
        try:
            value = read()
        except errors:
            value = None
        if value is not None and ready(value):
            return value
        if time.monotonic() > deadline:
            raise BenchError("%s within %.0f s" % (what, timeout))
        time.sleep(0.1)


def wait_line(p, path, needle, timeout):
    """Until `needle` appears in the file `path`: 'ok', 'exited' (p ended first) or 'timeout'."""
    deadline = time.monotonic() + timeout
    while needle not in tail(path, 20000):
        if p.poll() is not None:
            return "exited"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.05)
    return "ok"


def spawn_tern_destination(cmd, errlog, timeout=60):
    """`tern run --incoming ...`, ready once its log says it waits; raises BenchError if it exits or is not
    listening in time (the port is not probed: a connection would be taken as the migration)."""
    p = spawn("tern destination", cmd, stderr=errlog)
    state = wait_line(p, errlog, "waiting for an incoming migration", timeout)
    if state != "ok":
        LIVE.pop(p.pid, None)
        raise BenchError("tern destination %s: %s" % ("exited with %s" % p.returncode if state == "exited"
                                                      else "not listening after %d s" % timeout, tail(errlog, 800)))
    return p


def run_tern_migrate(cmd, stdout, stderr, timeout):
    """`tern migrate ... --json` to its end, cancelled (SIGINT: the VM stays on the source) after `timeout`
    s. Returns (its report, the report's text, its stderr's tail, whether it was cancelled); raises
    BenchError if it printed no report."""
    p = spawn("tern migrate", cmd, stdout=stdout, stderr=stderr)
    cancelled = False
    try:
        if not reap(p, timeout):
            log("tern migrate still running after %.0f s: cancelling (SIGINT)" % timeout)
            cancelled = True
            signal_proc(p, signal.SIGINT)
            if not reap(p, 60):
                kill_hard(p, "tern migrate")
    finally:
        with blocked_signals():
            if p.poll() is None:
                signal_proc(p, signal.SIGINT)
                if not reap(p, 30):
                    kill_hard(p, "tern migrate")
            LIVE.pop(p.pid, None)
    err = tail(stderr, 2000)
    try:
        with open(stdout) as f:
            text = f.read().strip()
        return json.loads(text), text, err, cancelled
    except (OSError, ValueError) as e:
        raise BenchError("tern migrate printed no JSON report (exit %s, %s): %s" % (p.returncode, e, err))


def summarize(args, bench, render, marks):
    """--summarize FILE: the report of the last run in FILE again, no runs. Returns the exit status (0)."""
    records = last_run(args.summarize, bench, bench)
    emit_report(render(records, records[0].get("meta", {})), args.markdown, *marks)
    return 0


def run_all(runs, run_one, out, meta, cleanup):
    """run_one(n, repetition, case, position, vmm) -> its record, for each of `runs` (alternating()), each
    record appended to `out` as it ends; then cleanup(), also after an error, Ctrl-C or SIGTERM. Returns
    (the records, the exit status: 0 if every run completed, 1 otherwise, 130 when interrupted)."""
    records, rc = [], 0
    try:
        for n, (rep, case, pos, vmm) in enumerate(runs):
            rec = run_one(n, rep, case, pos, vmm)
            rec["meta"] = meta
            records.append(rec)
            append_jsonl(out, rec)
            if rec["status"] != "completed":
                rc = 1
            if rec["status"] == "interrupted":
                raise Interrupted("interrupted during a run")
    except (KeyboardInterrupt, Interrupted):
        rc = 130
        log("interrupted: stopping; the report covers the runs that finished")
    except BenchError as e:
        log("error: %s" % e)
        rc = 1
    finally:
        with blocked_signals():
            cleanup()
    return records, rc
