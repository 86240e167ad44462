#!/usr/bin/env python3
"""Live-migrate the Tern test guest between two local QEMU processes and check
that it keeps running correctly on the destination: a baseline for Tern's own
migration numbers and a check of the guest's self-verification.

    guest/tools/qemu-migrate.py [--append "fill=256 dirty=64 pattern=random rate=100"]
                                [--memory 512] [--warmup 6] [--after 5] [--port 4446]

Prints QEMU's query-migrate summary (total-time, downtime, bytes) and both
serial logs. Exits non-zero unless the destination printed progress lines
with more verified self-checks than the source reached, and no mismatch.
Standard library only; needs qemu-system-x86_64 and /dev/kvm (--accel tcg works too).
"""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL = os.path.join(HERE, "..", "build", "tern-guest.elf")


def start(tmp, name, a, extra):
    sock = os.path.join(tmp, name + ".qmp")
    serial = os.path.join(tmp, name + ".serial")
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", a.accel, "-m", str(a.memory), "-kernel", KERNEL,
         "-append", a.append, "-serial", "file:" + serial, "-display", "none",
         "-no-reboot", "-qmp", "unix:%s,server,nowait" % sock] + extra,
        stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    f = s.makefile("rw")
    f.readline()  # greeting

    def call(cmd, **args):
        f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                return msg

    call("qmp_capabilities")
    return proc, call, serial


def verified(text):
    counts = [int(v) for v in re.findall(r"verified=(\d+)", text)]
    return max(counts) if counts else -1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--append", default="fill=256 dirty=64 pattern=random rate=100 progress=1")
    p.add_argument("--memory", type=int, default=512)
    p.add_argument("--accel", default="kvm")
    p.add_argument("--warmup", type=float, default=6, help="seconds before migrating")
    p.add_argument("--after", type=float, default=5, help="seconds to watch the destination")
    p.add_argument("--port", type=int, default=4446)
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        src, scall, sserial = start(tmp, "src", a, [])
        dst, dcall, dserial = start(tmp, "dst", a, ["-incoming", "tcp:127.0.0.1:%d" % a.port])
        try:
            time.sleep(a.warmup)
            scall("migrate", uri="tcp:127.0.0.1:%d" % a.port)
            while True:
                st = scall("query-migrate")["return"]
                if st.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            ram = st.get("ram", {})
            print("migration: status=%s total-time=%sms downtime=%sms transferred=%s dirty-sync-count=%s"
                  % (st.get("status"), st.get("total-time"), st.get("downtime"),
                     ram.get("transferred"), ram.get("dirty-sync-count")))
            time.sleep(a.after)
        finally:
            for proc in (src, dst):
                proc.terminate()
                proc.wait()
        src_log, dst_log = open(sserial).read(), open(dserial).read()

    print("--- source serial\n" + src_log + "--- destination serial\n" + dst_log, end="")
    ok = (st.get("status") == "completed" and "MISMATCH" not in src_log + dst_log
          and verified(dst_log) > verified(src_log) and "errors=0" in dst_log.splitlines()[-1])
    print("RESULT:", "ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
