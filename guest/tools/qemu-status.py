#!/usr/bin/env python3
"""Read the Tern test guest's status block from a running QEMU through QMP.

    qemu-system-x86_64 ... -qmp unix:/tmp/qmp.sock,server,nowait
    guest/tools/qemu-status.py /tmp/qmp.sock [--json]

Uses the monitor's `xp` to dump guest-physical memory at 0x102000 and decodes
it with the layout documented in docs/GUEST.md. Standard library only.
"""
import json
import re
import socket
import struct
import sys

STATUS_GPA = 0x102000
STATUS_MAGIC = 0x544154534E524554  # "TERNSTAT"
FIELDS = [  # (offset, format, name)
    (0x00, "Q", "magic"), (0x08, "I", "version"), (0x0C, "I", "phase"),
    (0x10, "Q", "iterations"), (0x18, "Q", "tsc"), (0x20, "Q", "tsc_khz"),
    (0x28, "Q", "checksum"), (0x30, "Q", "passes"), (0x38, "Q", "verified"),
    (0x40, "Q", "errors"), (0x48, "Q", "work_base"), (0x50, "Q", "work_bytes"),
    (0x58, "Q", "fill_bytes"), (0x60, "Q", "ram_bytes"), (0x68, "I", "pattern"),
    (0x6C, "I", "bytes_per_page"), (0x70, "Q", "rate_mbps"), (0x78, "Q", "boot_tsc"),
    (0x80, "Q", "exception"), (0x88, "Q", "exception_rip"),
    (0x90, "Q", "exception_err"), (0x98, "Q", "exception_cr2"),
    # version 2: devices
    (0xA0, "Q", "disk_ops"), (0xA8, "Q", "disk_errors"), (0xB0, "Q", "disk_verified"),
    (0xB8, "Q", "net_rx"), (0xC0, "Q", "net_tx"), (0xC8, "Q", "disk_writes"),
    (0xD0, "Q", "disk_reads"), (0xD8, "Q", "disk_flushes"), (0xE0, "Q", "disk_bytes"),
    (0xE8, "Q", "disk_capacity"), (0xF0, "I", "disk_state"), (0xF4, "I", "net_state"),
    (0xF8, "Q", "net_announces"), (0x100, "Q", "notifies"), (0x108, "Q", "notify_ticks"),
    # version 3: the guest's own stall measure, TCP echo
    (0x110, "Q", "max_stall_ticks"), (0x118, "Q", "max_stall_end_tsc"),
    (0x120, "Q", "tcp_rx"), (0x128, "Q", "tcp_tx"), (0x130, "Q", "tcp_retransmits"),
    (0x138, "Q", "tcp_accepted"), (0x140, "Q", "tcp_resets"), (0x148, "Q", "tcp_dropped"),
]
SIZE = 0x150
V1_SIZE = 0xA0  # a version-1 guest's block ends here; the rest reads as zeros
V2_SIZE = 0x110  # a version-2 guest's block ends here


def qmp(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rw")

    def call(cmd, **args):
        f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        f.flush()
        while True:
            msg = json.loads(f.readline())
            if "return" in msg or "error" in msg:
                return msg

    json.loads(f.readline())  # greeting
    call("qmp_capabilities")
    return call


def read_status(call):
    out = call("human-monitor-command",
               **{"command-line": "xp /%dxb 0x%x" % (SIZE, STATUS_GPA)})["return"]
    # lines look like "0000000000102000: 0x54 0x45 ...": drop the address
    body = re.sub(r"^[0-9a-f]+:", "", out, flags=re.M)
    raw = bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", body))
    raw = raw[:SIZE]
    st = {name: struct.unpack_from("<" + fmt, raw, off)[0] for off, fmt, name in FIELDS}
    end = V1_SIZE if st["version"] < 2 else V2_SIZE if st["version"] < 3 else SIZE
    st = {k: v for (off, _, k), v in zip(FIELDS, st.values()) if off < end}
    if "max_stall_ticks" in st and st["tsc_khz"]:
        st["max_stall_ms"] = round(st["max_stall_ticks"] / st["tsc_khz"], 3)
    return st


def main():
    st = read_status(qmp(sys.argv[1]))
    if "--json" in sys.argv:
        print(json.dumps(st))
        return
    for k, v in st.items():
        print("%-15s %#x (%d)" % (k, v, v) if k in ("magic", "checksum", "exception_rip") else "%-15s %d" % (k, v))
    if st["magic"] != STATUS_MAGIC:
        print("(magic not set: block not valid yet)")


if __name__ == "__main__":
    main()
