#!/usr/bin/env python3
"""TCP echo stream client: checks that every byte comes back, in order, and how long the stream stalled.

    python3 tools/tcp_stream.py HOST [--port 7] [--duration 10] [--rate 1M] [--chunk 1024]
        [--window 65536] [--stall-timeout 30] [--report-stalls-ms 100]

Connects to an echo server (the test guest's TCP port 7), streams a pattern for --duration
seconds at --rate bytes/s (k, M, G suffixes; 0 = as fast as the echo comes back) in sends of
--chunk bytes (TCP_NODELAY: about one segment each), keeping at most --window bytes sent but
not yet echoed, then half-closes and reads until the server's FIN.
Every echoed byte is checked against what was sent: the pattern is the sequence of 64-bit
little-endian word numbers (byte i belongs to word i // 8), so a byte lost, duplicated or out
of order shows at its offset.

A stall is a time with bytes outstanding (sent, not yet echoed) and none arriving: from the
later of the last receive and the send that made the outstanding count non-zero, to the next
receive. The longest one is reported with its start and end in Unix time (time.time()), to be
set beside a migration's own timestamps; stalls over --report-stalls-ms are listed.

Prints one JSON object and exits 0 if the stream came through whole (every byte echoed and
matching, the server's FIN after the last one, no reset or other error), 1 otherwise. Run it
in the client's namespace: ip netns exec PREFIX-cl python3 tools/tcp_stream.py 10.240.0.10
"""

import argparse
import array
import errno
import json
import selectors
import socket
import sys
import time

MAX_LISTED_STALLS = 100


def parse_rate(text):
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}
    t = text.strip().lower()
    unit = t[-1] if t and t[-1] in "kmg" else ""
    try:
        value = float(t[:-1] if unit else t) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes per second such as 500k or 2M, not {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError("rate must be >= 0")
    return value


def pattern(offset, length):
    """The stream's bytes [offset, offset + length)."""
    first = offset // 8
    last = (offset + length + 7) // 8
    words = array.array("Q", range(first, last))
    if sys.byteorder != "little":
        words.byteswap()
    start = offset - first * 8
    return words.tobytes()[start:start + length]


class Stalls:
    def __init__(self, report_over):
        self.report_over = report_over
        self.waiting_since = None  # monotonic time bytes became outstanding without a receive since
        self.longest = 0.0
        self.longest_end = None  # (monotonic, unix)
        self.listed = []

    def sent(self, now, outstanding_before):
        if outstanding_before == 0:
            self.waiting_since = now

    def received(self, now, unix, outstanding_after):
        if self.waiting_since is not None:
            gap = now - self.waiting_since
            if gap > self.longest:
                self.longest = gap
                self.longest_end = unix
            if gap * 1000 >= self.report_over and len(self.listed) < MAX_LISTED_STALLS:
                self.listed.append({"start_unix": round(unix - gap, 6), "seconds": round(gap, 6)})
        self.waiting_since = now if outstanding_after > 0 else None

    def still_waiting(self, now):
        return 0.0 if self.waiting_since is None else now - self.waiting_since


def run(args):
    result = {
        "host": args.host, "port": args.port, "duration_s": args.duration, "rate_Bps": args.rate,
        "connected": False, "sent_bytes": 0, "received_bytes": 0, "verified_bytes": 0,
        "mismatches": 0, "first_mismatch_offset": None, "resets": 0, "eof": False, "errors": [],
    }
    stalls = Stalls(args.report_stalls_ms)
    t_start = time.monotonic()
    try:
        sock = socket.create_connection((args.host, args.port), timeout=args.connect_timeout)
    except OSError as error:
        result["errors"].append(f"connect: {error}")
        return finish(result, stalls, t_start, None)
    result["connected"] = True
    result["connect_s"] = round(time.monotonic() - t_start, 6)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sent = received = 0
    began = time.monotonic()
    stop_sending_at = began + args.duration
    half_closed = False
    writing = False
    ended = None
    try:
        while True:
            now = time.monotonic()
            # what may be sent now: the pace, the window, the duration
            if not half_closed and now >= stop_sending_at:
                sock.shutdown(socket.SHUT_WR)
                half_closed = True
            # whole chunks only, so a paced stream is not a storm of tiny segments
            want = 0
            if not half_closed:
                budget = args.window - (sent - received)
                if args.rate:
                    budget = min(budget, int(args.rate * (now - began)) - sent)
                want = args.chunk if budget >= args.chunk else 0
            if want > 0:
                try:
                    n = sock.send(pattern(sent, want))
                except BlockingIOError:  # the socket buffer is full: wait until it is writable
                    n = 0
                if n:
                    stalls.sent(now, sent - received)
                    sent += n
            need_write = want > 0 and not half_closed
            if need_write != writing:
                sel.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if need_write else 0))
                writing = need_write
            # how long to wait: until the next byte is allowed, or a bounded while
            timeout = 0.05
            if not half_closed and args.rate and want <= 0 and sent - received + args.chunk <= args.window:
                timeout = min(timeout, max(0.0, (sent + args.chunk) / args.rate - (now - began)))
            if not half_closed:
                timeout = min(timeout, max(0.0, stop_sending_at - now))
            events = sel.select(timeout)
            now = time.monotonic()
            for _, mask in events:
                if not mask & selectors.EVENT_READ:
                    continue
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    result["eof"] = True
                    ended = now
                    break
                expected = pattern(received, len(data))
                if data != expected:
                    result["mismatches"] += 1
                    if result["first_mismatch_offset"] is None:
                        i = next(i for i in range(len(data)) if data[i] != expected[i])
                        result["first_mismatch_offset"] = received + i
                else:
                    result["verified_bytes"] += len(data)
                received += len(data)
                if received > sent:
                    result["errors"].append(f"received {received - sent} bytes more than were sent")
                    ended = now
                    break
                stalls.received(now, time.time(), sent - received)
            if ended is not None:
                break
            if stalls.still_waiting(now) > args.stall_timeout:
                result["errors"].append(f"nothing echoed for {args.stall_timeout} s with "
                                        f"{sent - received} bytes outstanding")
                break
            if half_closed and received == sent and now - stop_sending_at > args.stall_timeout:
                result["errors"].append(f"no FIN from the server {args.stall_timeout} s after the last byte")
                break
    except ConnectionResetError:
        result["resets"] += 1
        result["errors"].append("connection reset by the server")
    except OSError as error:
        if error.errno in (errno.ECONNRESET, errno.EPIPE):
            result["resets"] += 1
        result["errors"].append(f"socket: {error}")
    finally:
        sel.close()
        sock.close()
    result["sent_bytes"] = sent
    result["received_bytes"] = received
    if result["eof"] and received != sent:
        result["errors"].append(f"FIN after {received} of {sent} bytes")
    return finish(result, stalls, began, ended)


def finish(result, stalls, began, ended):
    elapsed = (ended or time.monotonic()) - began
    result["elapsed_s"] = round(elapsed, 6)
    result["throughput_Bps"] = round(result["received_bytes"] / elapsed) if elapsed > 0 else None
    result["longest_stall_s"] = round(stalls.longest, 6)
    result["longest_stall_end_unix"] = round(stalls.longest_end, 6) if stalls.longest_end else None
    result["longest_stall_start_unix"] = (round(stalls.longest_end - stalls.longest, 6)
                                          if stalls.longest_end else None)
    result["stalls"] = stalls.listed
    result["ok"] = (result["connected"] and not result["errors"] and result["mismatches"] == 0
                    and result["eof"] and result["verified_bytes"] == result["sent_bytes"])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("--port", type=int, default=7)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--rate", type=parse_rate, default=parse_rate("1M"),
                        help="bytes per second (k, M, G suffixes), 0 = flat out (default 1M)")
    parser.add_argument("--chunk", type=int, default=1024, help="bytes per send (default 1024)")
    parser.add_argument("--window", type=int, default=65536,
                        help="bytes sent and not yet echoed, at most (default 65536)")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--stall-timeout", type=float, default=30.0,
                        help="give up after this many seconds without an echo (default 30)")
    parser.add_argument("--report-stalls-ms", type=float, default=100.0,
                        help="list every stall at least this long (default 100)")
    args = parser.parse_args()
    if args.chunk < 1 or args.window < 1 or args.duration < 0:
        parser.error("--chunk and --window must be positive, --duration >= 0")
    result = run(args)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
