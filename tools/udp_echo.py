#!/usr/bin/env python3
"""UDP echo client for the test guest's network responder (port 7).

Sends COUNT datagrams of SIZE bytes to HOST:PORT one at a time, each waiting
for its echo, and prints one JSON line: packets sent and answered, round-trip
times (microseconds: min, median, p99, max) and the packet rate achieved.
Used by the device tests and bench/devices.py; run it inside the network
namespace that holds the guest's TAP (ip netns exec NS python3 ...).
"""
import argparse
import json
import socket
import statistics
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("--port", type=int, default=7)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="payload bytes (at most 1472)")
    parser.add_argument("--timeout", type=float, default=0.5, help="seconds to wait for each echo")
    parser.add_argument("--warmup", type=int, default=5, help="echoes sent first and not counted")
    args = parser.parse_args()
    if not 1 <= args.size <= 1472:
        parser.error("--size must be 1..1472")

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    sock.connect((args.host, args.port))
    rtts = []
    lost = 0
    wrong = 0
    started = None
    for i in range(args.warmup + args.count):
        if i == args.warmup:
            started = time.perf_counter()
        payload = i.to_bytes(8, "little") + bytes((i + j) & 0xFF for j in range(args.size - 8)) if args.size >= 8 else bytes(args.size)
        sent = time.perf_counter()
        sock.send(payload)
        try:
            while True:
                reply = sock.recv(2048)
                if reply == payload:
                    break
                wrong += 1  # a late echo of an earlier datagram
        except socket.timeout:
            if i >= args.warmup:
                lost += 1
            continue
        if i >= args.warmup:
            rtts.append((time.perf_counter() - sent) * 1e6)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    rtts.sort()
    result = {
        "sent": args.count,
        "answered": len(rtts),
        "lost": lost,
        "stale": wrong,
        "size": args.size,
        "rtt_us": None if not rtts else {
            "min": round(rtts[0], 1),
            "median": round(statistics.median(rtts), 1),
            "p99": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 1),
            "max": round(rtts[-1], 1),
        },
        "packets_per_s": round(len(rtts) / elapsed, 1) if elapsed > 0 else None,
    }
    print(json.dumps(result))
    return 0 if rtts else 1


if __name__ == "__main__":
    sys.exit(main())
