#!/usr/bin/env python3
"""Tiny TCP sink/source/echo for measuring RTT and throughput (through tools/delay_relay.py).

    python3 tools/netbench.py serve --listen HOST:PORT [--ready-file F] [--max-connections N] [--timeout S]
    python3 tools/netbench.py ping --connect HOST:PORT [--count N]      1-byte ping-pong RTT
    python3 tools/netbench.py send --connect HOST:PORT --bytes N        client -> server bulk
    python3 tools/netbench.py recv --connect HOST:PORT --bytes N        server -> client bulk

The first byte of a connection picks the server's behaviour: P echoes, S counts bytes until
end of stream and answers with the count and the time between its first and last byte
(so `send` also exercises half-close), G sends the number of bytes asked for and closes.
Sizes accept suffixes K, M, G (decimal) and KiB, MiB, GiB. Every socket has a timeout
(--timeout, default 120 s), and the server exits after --timeout seconds in any case.
Results are one line on stdout, key=value, rates in MB/s (1e6 bytes) and Mbit/s.
"""

import argparse
import os
import socket
import statistics
import struct
import sys
import threading
import time

BUFFER = 4 * 1024 * 1024
REPLY = struct.Struct("!QQ")  # byte count, nanoseconds from first to last byte


def parse_address(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def parse_size(text):
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower().removesuffix("b") if not text.lower().endswith("ib") else text.strip().lower()
    digits = len(t) - len(t.lstrip("0123456789."))
    number, unit = t[:digits], t[digits:]
    if not number or unit not in units:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(float(number) * units[unit])


def rates(nbytes, seconds):
    if seconds <= 0:
        return "inf", "inf"
    return f"{nbytes / seconds / 1e6:.1f}", f"{nbytes * 8 / seconds / 1e6:.0f}"


def recv_exact(sock, n):
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += part
    return bytes(data)


def send_bytes(sock, total):
    block = memoryview(bytes(BUFFER))
    left = total
    while left > 0:
        n = min(left, BUFFER)
        sock.sendall(block[:n])
        left -= n


def serve_connection(sock, timeout):
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        mode = recv_exact(sock, 1)
        if mode == b"P":
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                sock.sendall(data)
        elif mode == b"S":
            buffer = bytearray(BUFFER)
            total, first, last = 0, None, None
            while True:
                n = sock.recv_into(buffer)
                if n == 0:
                    break
                last = time.monotonic_ns()
                if first is None:
                    first = last
                total += n
            sock.sendall(REPLY.pack(total, (last - first) if first else 0))
        elif mode == b"G":
            (count,) = struct.unpack("!Q", recv_exact(sock, 8))
            send_bytes(sock, count)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # wait for the client to close: no reset on unread data
    except OSError as error:
        print(f"netbench serve: {error}", file=sys.stderr)
    finally:
        sock.close()


def serve(args):
    host, port = args.listen
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(f"{listener.getsockname()[0]}:{listener.getsockname()[1]}\n")
        os.replace(args.ready_file + ".tmp", args.ready_file)
    deadline = time.monotonic() + args.timeout
    threads = []
    try:
        while not args.max_connections or len(threads) < args.max_connections:
            left = deadline - time.monotonic()
            if left <= 0:
                print("netbench serve: --timeout reached", file=sys.stderr)
                return 1
            listener.settimeout(left)
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            thread = threading.Thread(target=serve_connection, args=(sock, args.timeout), daemon=True)
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        listener.close()
        if args.ready_file:
            try:
                os.unlink(args.ready_file)
            except OSError:
                pass
    return 0


def connect(args):
    sock = socket.create_connection(args.connect, timeout=args.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ping(args):
    with connect(args) as sock:
        sock.sendall(b"P")
        rtts = []
        for _ in range(args.count):
            start = time.perf_counter()
            sock.sendall(b"x")
            recv_exact(sock, 1)
            rtts.append((time.perf_counter() - start) * 1000)
            if args.interval:
                time.sleep(args.interval / 1000)
    print(f"ping count={len(rtts)} min_ms={min(rtts):.2f} median_ms={statistics.median(rtts):.2f} "
          f"mean_ms={statistics.mean(rtts):.2f} max_ms={max(rtts):.2f}")
    return 0


def send(args):
    with connect(args) as sock:
        start = time.monotonic()
        sock.sendall(b"S")
        send_bytes(sock, args.bytes)
        sent = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        count, nanoseconds = REPLY.unpack(recv_exact(sock, REPLY.size))
        done = time.monotonic()
    if count != args.bytes:
        print(f"netbench send: server received {count} bytes, not {args.bytes}", file=sys.stderr)
        return 1
    client = rates(count, done - start)
    server = rates(count, nanoseconds / 1e9)
    print(f"send bytes={count} seconds={done - start:.3f} rate_MBps={client[0]} rate_Mbit={client[1]} "
          f"server_seconds={nanoseconds / 1e9:.3f} server_rate_MBps={server[0]} server_rate_Mbit={server[1]} "
          f"sendall_seconds={sent - start:.3f}")
    return 0


def recv(args):
    with connect(args) as sock:
        start = time.monotonic()
        sock.sendall(b"G" + struct.pack("!Q", args.bytes))
        buffer = bytearray(BUFFER)
        total, first = 0, None
        while True:
            n = sock.recv_into(buffer)
            if n == 0:
                break
            if first is None:
                first = time.monotonic()
            total += n
        done = time.monotonic()
    if total != args.bytes:
        print(f"netbench recv: received {total} bytes, not {args.bytes}", file=sys.stderr)
        return 1
    client = rates(total, done - start)
    stream = rates(total, done - first) if first else ("-", "-")
    print(f"recv bytes={total} seconds={done - start:.3f} rate_MBps={client[0]} rate_Mbit={client[1]} "
          f"first_byte_ms={(first - start) * 1000 if first else 0:.1f} stream_rate_MBps={stream[0]} stream_rate_Mbit={stream[1]}")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--listen", type=parse_address, required=True)
    p.add_argument("--ready-file")
    p.add_argument("--max-connections", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="server lifetime and socket timeout, s")
    for name in ("ping", "send", "recv"):
        p = sub.add_parser(name)
        p.add_argument("--connect", type=parse_address, required=True)
        p.add_argument("--timeout", type=float, default=120.0, help="socket timeout, s")
        if name == "ping":
            p.add_argument("--count", type=int, default=20)
            p.add_argument("--interval", type=float, default=0.0, help="ms between pings")
        else:
            p.add_argument("--bytes", type=parse_size, required=True)
    args = parser.parse_args()
    try:
        return {"serve": serve, "ping": ping, "send": send, "recv": recv}[args.command](args)
    except (OSError, ConnectionError) as error:
        print(f"netbench {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
