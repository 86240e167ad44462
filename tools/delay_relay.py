#!/usr/bin/env python3
"""A TCP relay that emulates a WAN link in user space: fixed one-way delay, optional rate.

    python3 tools/delay_relay.py --listen HOST:PORT --connect HOST:PORT --delay-ms D
        [--rate-mbit R] [--max-connections N] [--ready-file PATH]

Each accepted connection gets its own connection to --connect, and bytes are forwarded both
ways. Every chunk read from one side is written to the other side D ms after it was read
(RTT through the relay = 2*D plus the real latency). With --rate-mbit, each direction is
also a link of R Mbit/s: a chunk is first serialized at R (queued behind the chunks before
it, all connections sharing the link) and then delayed by D. End of stream (a half-close)
travels the same way, after the data before it; an error on either socket closes both sides.

Design: two threads per direction. A reader does large blocking recv()s (up to 1 MiB) and
appends (due time, bytes) to a deque; a writer sleeps until the head of the deque is due
and sendall()s it. Blocking socket calls release the GIL, so the two directions and the
reader/writer of one direction overlap; a chunk costs two syscalls and a few microseconds
of Python, negligible at 1 MiB. The deque holds the bandwidth-delay product (3 MB at
1 Gbit/s and 25 ms) and is bounded, so a fast sender is slowed by TCP flow control rather
than by unbounded memory:
  - without a rate: at most --max-queue-mb per direction (like a TCP window: throughput is
    at most max-queue / delay, 2.7 GB/s with the defaults at 25 ms);
  - with a rate: the reader stops reading while more than --buffer-ms of serialization
    is queued (a lossless bottleneck buffer; it adds at most that much queueing delay), and
    the relay's receive buffers are one read, so a sender sees about what a real path would
    absorb (its own send buffer, the bandwidth-delay product and the bottleneck buffer).

Logs one line per connection to stderr: bytes each way and the effective rate (bytes over
the time from the first byte read to the last byte written, so it includes one delay).
Exits after --max-connections connections have finished; SIGTERM and SIGINT exit cleanly
(closing the open connections). --ready-file is written (HOST:PORT actually listened on,
useful with port 0) once the relay listens, and removed when it exits.
"""

import argparse
import collections
import os
import signal
import socket
import sys
import threading
import time

monotonic = time.monotonic


def parse_address(text):
    """HOST:PORT or [V6HOST]:PORT -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_rate(nbytes, seconds):
    if seconds <= 0 or nbytes == 0:
        return "-"
    bps = nbytes / seconds
    return f"{bps / 1e6:.1f} MB/s = {bps * 8 / 1e6:.0f} Mbit/s"


def read_size(options):
    """Largest read. Paced links read smaller chunks (2 ms of link time, at least 64 KiB) so that
    what leaves the relay is smooth rather than 8 ms bursts of 1 MiB at 1 Gbit/s."""
    chunk = options.chunk_kib * 1024
    if options.rate_mbit:
        chunk = min(chunk, max(64 * 1024, int(options.rate_mbit * 1e6 / 8 * 0.002)))
    return chunk


def configure_buffers(sock, options):
    """Socket buffer sizes, set before listen() or connect() so that the window scale fits.
    With a rate, the receive buffer is one read: otherwise kernel autotuning grows it to
    tens of MB at loopback speed, and the sender would see that much data leave at once,
    as if the emulated link had a huge buffer in front of it."""
    if options.sock_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, options.sock_buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, options.sock_buffer)
    elif options.rate_mbit:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, read_size(options))


def connect_upstream(options):
    host, port = options.connect
    error = OSError(f"cannot resolve {host}")
    for family, kind, protocol, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, kind, protocol)
        try:
            configure_buffers(sock, options)
            sock.settimeout(options.connect_timeout)
            sock.connect(address)
            sock.settimeout(None)
            return sock
        except OSError as failure:
            sock.close()
            error = failure
    raise error


def log(message):
    sys.stderr.write(f"delay_relay: {message}\n")
    sys.stderr.flush()


class Link:
    """The emulated link of one direction (client to server, or back), shared by all
    connections: with a rate, chunks of every connection are serialized one after another."""

    def __init__(self, options):
        self.byte_time = 8.0 / (options.rate_mbit * 1e6) if options.rate_mbit else 0.0
        self.free = 0.0  # when the link finishes serializing what it was given
        self.lock = threading.Lock()

    def transmit(self, nbytes, now):
        """Queues nbytes read at `now`; returns when they have been serialized."""
        with self.lock:
            start = self.free if self.free > now else now
            self.free = start + nbytes * self.byte_time
            return self.free


class Direction:
    """One direction of a connection: src -> deque -> dst."""

    def __init__(self, connection, src, dst, link, options):
        self.connection = connection
        self.src = src
        self.dst = dst
        self.link = link
        self.delay = options.delay_ms / 1000.0
        self.byte_time = link.byte_time
        self.buffer = options.buffer_ms / 1000.0
        self.max_queue = int(options.max_queue_mb * 1024 * 1024)
        self.chunk = read_size(options)
        self.cond = threading.Condition()
        self.queue = collections.deque()  # (due, bytes), or (due, None) for end of stream
        self.queued = 0
        self.bytes = 0
        self.first_read = None
        self.last_write = None
        self.eof = False  # end of stream delivered (dst shut down for writing)

    def _room(self):
        """Seconds to wait before reading more, 0 if there is room now."""
        if self.byte_time:
            return max(0.0, self.link.free - monotonic() - self.buffer)
        return 0.0 if self.queued < self.max_queue else None

    def read_loop(self):
        src, chunk, cond = self.src, self.chunk, self.cond
        try:
            while True:
                with cond:
                    while not self.connection.aborted:
                        wait = self._room()
                        if wait == 0.0:
                            break
                        cond.wait(wait)
                    if self.connection.aborted:
                        return
                data = src.recv(chunk)
                now = monotonic()
                if self.first_read is None:
                    self.first_read = now
                if self.byte_time:
                    due = self.link.transmit(len(data), now) + self.delay
                else:
                    due = now + self.delay
                with cond:
                    self.queue.append((due, data or None))
                    self.queued += len(data)
                    cond.notify_all()
                if not data:
                    return
        except OSError as error:
            self.connection.abort(error, "reading")

    def write_loop(self):
        dst, cond, queue = self.dst, self.cond, self.queue
        try:
            while True:
                with cond:
                    while not queue and not self.connection.aborted:
                        cond.wait()
                    if self.connection.aborted:
                        return
                    due, data = queue[0]
                wait = due - monotonic()
                if wait > 0:
                    time.sleep(wait)
                if self.connection.aborted:
                    return
                if data is None:
                    dst.shutdown(socket.SHUT_WR)
                    self.eof = True
                    return
                dst.sendall(data)
                self.last_write = monotonic()
                self.bytes += len(data)
                with cond:
                    queue.popleft()
                    self.queued -= len(data)
                    cond.notify_all()
        except OSError as error:
            self.connection.abort(error, "writing")

    def describe(self):
        if self.bytes < 1000000:
            return f"{self.bytes} B"
        span = (self.last_write - self.first_read) if self.last_write and self.first_read else 0.0
        return f"{self.bytes} B ({format_rate(self.bytes, span)})"


class Connection:
    def __init__(self, number, client, peer, options, links, on_done):
        self.number = number
        self.client = client
        self.peer = peer
        self.options = options
        self.links = links
        self.on_done = on_done
        self.upstream = None
        self.aborted = False
        self.reason = None
        self.lock = threading.Lock()
        self.started = monotonic()
        self.directions = []

    def abort(self, error=None, what=""):
        with self.lock:
            if self.aborted:
                return
            self.aborted = True
            if error is not None:
                self.reason = f"{what}: {error.strerror or error}" if what else str(error)
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for direction in self.directions:
            with direction.cond:
                direction.cond.notify_all()

    def run(self):
        options = self.options
        try:
            try:
                self.upstream = connect_upstream(options)
            except OSError as error:
                self.reason = f"connecting to {options.connect[0]}:{options.connect[1]}: {error.strerror or error}"
                self.aborted = True
                return
            for sock in (self.client, self.upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up = Direction(self, self.client, self.upstream, self.links[0], options)
            down = Direction(self, self.upstream, self.client, self.links[1], options)
            self.directions = [up, down]
            threads = []
            for direction in self.directions:
                for target in (direction.read_loop, direction.write_loop):
                    thread = threading.Thread(target=target, daemon=True)
                    thread.start()
                    threads.append(thread)
            for thread in threads:
                thread.join()
        finally:
            for sock in (self.client, self.upstream):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            self.report()
            self.on_done()

    def report(self):
        elapsed = monotonic() - self.started
        text = f"#{self.number} {self.peer} -> {self.options.connect[0]}:{self.options.connect[1]} {elapsed:.2f} s"
        if len(self.directions) == 2:
            up, down = self.directions
            text += f", up {up.describe()}, down {down.describe()}"
        if self.reason:
            text += f", closed on error ({self.reason})"
        log(text)


class Terminate(Exception):
    pass


def main():
    parser = argparse.ArgumentParser(description="TCP relay with fixed delay and optional rate (WAN emulation).")
    parser.add_argument("--listen", type=parse_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--connect", type=parse_address, required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added in each direction")
    parser.add_argument("--rate-mbit", type=float, default=0.0,
                        help="link rate per direction, shared by all connections (default: no cap)")
    parser.add_argument("--max-connections", type=int, default=0,
                        help="exit after this many connections have finished (default: run until killed)")
    parser.add_argument("--ready-file", help="written (HOST:PORT) once listening, removed on exit")
    parser.add_argument("--buffer-ms", type=float, default=10.0,
                        help="with --rate-mbit: bottleneck buffer in ms of link time (default 10)")
    parser.add_argument("--max-queue-mb", type=float, default=64.0,
                        help="without --rate-mbit: most bytes in flight per direction, MiB (default 64)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="largest read, KiB (default 1024)")
    parser.add_argument("--sock-buffer", type=int, default=0,
                        help="SO_SNDBUF and SO_RCVBUF, bytes (default: with a rate, SO_RCVBUF of one "
                             "read; otherwise kernel autotuning)")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--quiet", action="store_true", help="no per-connection log lines")
    options = parser.parse_args()
    if options.delay_ms < 0 or options.rate_mbit < 0 or options.max_connections < 0:
        parser.error("negative values are not allowed")

    def terminate(signum, frame):
        raise Terminate(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)

    host, port = options.listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    configure_buffers(listener, options)  # accepted sockets inherit the sizes
    listener.bind((host, port))
    listener.listen(128)
    bound = listener.getsockname()
    bound_text = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
    if options.ready_file:
        temporary = options.ready_file + ".tmp"
        with open(temporary, "w") as f:
            f.write(bound_text + "\n")
        os.replace(temporary, options.ready_file)
    rate = f", {options.rate_mbit:g} Mbit/s" if options.rate_mbit else ""
    if not options.quiet:
        log(f"listening on {bound_text} -> {options.connect[0]}:{options.connect[1]}, delay {options.delay_ms:g} ms each way{rate}")
    if options.quiet:
        Connection.report = lambda self: None

    links = (Link(options), Link(options))  # client -> server, server -> client
    active = set()
    state = {"finished": 0}
    state_lock = threading.Lock()
    all_done = threading.Event()
    limit = options.max_connections

    def on_done(connection):
        with state_lock:
            active.discard(connection)
            state["finished"] += 1
            if limit and state["finished"] >= limit:
                all_done.set()

    accepted = 0
    status = 0
    try:
        while not limit or accepted < limit:
            client, peer = listener.accept()
            accepted += 1
            peer_text = f"{peer[0]}:{peer[1]}"
            connection = Connection(accepted, client, peer_text, options, links, None)
            connection.on_done = lambda c=connection: on_done(c)
            with state_lock:
                active.add(connection)
            threading.Thread(target=connection.run, daemon=True).start()
        listener.close()
        while not all_done.wait(0.5):
            pass
    except Terminate as signal_name:
        if not options.quiet:
            log(f"{signal_name}: closing {len(active)} open connection(s)")
    except OSError as error:
        log(f"accept failed: {error}")
        status = 1
    finally:
        try:
            listener.close()
        except OSError:
            pass
        with state_lock:
            remaining = list(active)
        for connection in remaining:
            connection.abort()
        deadline = monotonic() + 2.0  # let the aborted connections log their line
        while remaining and monotonic() < deadline:
            with state_lock:
                if not active:
                    break
            time.sleep(0.02)
        if options.ready_file:
            try:
                os.unlink(options.ready_file)
            except OSError:
                pass
    return status


if __name__ == "__main__":
    sys.exit(main())
