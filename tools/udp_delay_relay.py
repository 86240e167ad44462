#!/usr/bin/env python3
"""A UDP relay that emulates a WAN path in user space: every datagram is sent on D ms after it came.

    python3 tools/udp_delay_relay.py --delay-ms D --endpoint PROXY=REAL [--endpoint PROXY=REAL ...]
        [--max-queue N] [--ready-file PATH] [--quiet]
    python3 tools/udp_delay_relay.py --delay-ms D --listen HOST:PORT --connect HOST:PORT [...]

Mesh mode (--endpoint, two or more): the relay stands in for each REAL peer (HOST:PORT) at its
PROXY address (HOST:PORT, bound by the relay). A datagram that arrives at PROXY_j from the host
of REAL_i (any source port) is sent D ms later from PROXY_i to REAL_j; so every peer talks to
the others through their proxies and sees each of them at a distinct address. This is what a
VXLAN underlay needs: each VTEP's remotes are the proxies, and its fdb learns a MAC behind the
proxy of the VTEP that sent the frame (scripts/lan.sh wan-up uses it). Datagrams from any
other host are dropped and counted.

Client mode (--listen/--connect): like tools/delay_relay.py for TCP. Each client address that
sends to --listen gets its own socket towards --connect; datagrams go up D ms after they came,
answers come back D ms after they came (RTT through the relay = 2*D plus the real latency).
A client silent for 60 s is forgotten.

The delay is the same for every datagram, so order is kept. At most --max-queue datagrams
(default 100000) wait at a time; more are dropped and counted, as a router's full buffer would.
There is no rate limit here: put a tc tbf on the links (scripts/lan.sh RATE=). SIGTERM and
SIGINT exit with status 0 after one line of counts on stderr; --ready-file is written once every
socket is bound (one bound HOST:PORT a line: the proxies in order, or the listening address),
and removed on exit.

Design: one thread reads every socket (select) and stamps datagrams with their due time into a
deque; another sleeps until the head is due and sends it. Python forwards tens of thousands of
datagrams a second this way, enough for probes and a test stream, not for a 1 Gbit/s flood.
"""

import argparse
import collections
import os
import select
import signal
import socket
import sys
import threading
import time

monotonic = time.monotonic
IDLE_CLIENT_S = 60.0


def parse_address(text):
    """HOST:PORT -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


def parse_endpoint(text):
    proxy, sep, real = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected PROXY=REAL (each HOST:PORT), not {text!r}")
    return parse_address(proxy), parse_address(real)


def udp_socket(bind=None):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if bind:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(bind)
    sock.setblocking(False)
    return sock


class Relay:
    def __init__(self, options):
        self.delay = options.delay_ms / 1000.0
        self.max_queue = options.max_queue
        self.queue = collections.deque()  # (due, socket, data, destination)
        self.ready = threading.Condition()
        self.stopping = False
        self.counts = collections.Counter()
        self.sockets = []  # all sockets the reader watches
        self.routes = {}  # mesh: socket -> (index of the proxy, i.e. the destination peer)
        self.clients = {}  # client mode: client address -> [upstream socket, last heard]
        self.upstream_of = {}  # client mode: upstream socket -> client address
        if options.endpoint:
            self.mode = "mesh"
            self.reals = [real for _, real in options.endpoint]
            self.real_hosts = {}
            for i, (_, (host, _)) in enumerate(options.endpoint):
                self.real_hosts[socket.gethostbyname(host)] = i
            self.proxies = []
            for i, (proxy, _) in enumerate(options.endpoint):
                sock = udp_socket(proxy)
                self.proxies.append(sock)
                self.routes[sock] = i
                self.sockets.append(sock)
            self.bound = [s.getsockname() for s in self.proxies]
        else:
            self.mode = "client"
            self.upstream = options.connect
            self.listener = udp_socket(options.listen)
            self.sockets.append(self.listener)
            self.bound = [self.listener.getsockname()]

    # ---- reading ----
    def enqueue(self, sock, data, destination, now):
        with self.ready:
            if len(self.queue) >= self.max_queue:
                self.counts["dropped_queue_full"] += 1
                return
            self.queue.append((now + self.delay, sock, data, destination))
            self.counts["queued"] += 1
            self.counts["bytes"] += len(data)
            if len(self.queue) == 1:
                self.ready.notify()

    def handle(self, sock, data, source, now):
        if self.mode == "mesh":
            j = self.routes[sock]
            i = self.real_hosts.get(source[0])
            if i is None:
                self.counts["dropped_unknown_source"] += 1
                return
            self.enqueue(self.proxies[i], data, self.reals[j], now)
        elif sock is self.listener:
            entry = self.clients.get(source)
            if entry is None:
                up = udp_socket()
                up.connect(self.upstream)
                entry = self.clients[source] = [up, now]
                self.upstream_of[up] = source
                self.sockets.append(up)
                self.counts["clients"] += 1
            entry[1] = now
            self.enqueue(entry[0], data, None, now)
        else:
            client = self.upstream_of.get(sock)
            if client is not None:
                self.clients[client][1] = now
                self.enqueue(self.listener, data, client, now)

    def forget_idle_clients(self, now):
        for client, (up, heard) in list(self.clients.items()):
            if now - heard > IDLE_CLIENT_S:
                del self.clients[client]
                del self.upstream_of[up]
                self.sockets.remove(up)
                up.close()

    def read_loop(self):
        last_sweep = monotonic()
        while not self.stopping:
            readable, _, _ = select.select(self.sockets, [], [], 0.2)
            now = monotonic()
            for sock in readable:
                for _ in range(64):  # drain, but let the other sockets in
                    try:
                        data, source = sock.recvfrom(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # e.g. ICMP port unreachable from a connected upstream
                        self.counts["receive_errors"] += 1
                        break
                    self.handle(sock, data, source, now)
            if self.mode == "client" and now - last_sweep > 5:
                self.forget_idle_clients(now)
                last_sweep = now

    # ---- writing ----
    def write_loop(self):
        while True:
            with self.ready:
                while not self.queue and not self.stopping:
                    self.ready.wait(0.5)
                if self.stopping:
                    return
                due, sock, data, destination = self.queue[0]
            wait = due - monotonic()
            if wait > 0:
                time.sleep(wait)
            with self.ready:
                self.queue.popleft()
            try:
                if destination is None:
                    sock.send(data)
                else:
                    sock.sendto(data, destination)
                self.counts["sent"] += 1
            except (BlockingIOError, InterruptedError):
                self.counts["dropped_send_buffer_full"] += 1
            except OSError:
                self.counts["send_errors"] += 1

    def stop(self):
        with self.ready:
            self.stopping = True
            self.ready.notify_all()


class Terminate(Exception):
    pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each datagram")
    parser.add_argument("--endpoint", type=parse_endpoint, action="append",
                        help="PROXY=REAL (HOST:PORT each), repeat for every peer of the mesh")
    parser.add_argument("--listen", type=parse_address, help="client mode: where clients send")
    parser.add_argument("--connect", type=parse_address, help="client mode: the server")
    parser.add_argument("--max-queue", type=int, default=100000, help="datagrams waiting at most")
    parser.add_argument("--ready-file", help="written (the bound HOST:PORTs) once listening, removed on exit")
    parser.add_argument("--quiet", action="store_true", help="no counts line on exit")
    options = parser.parse_args()
    if options.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    if options.endpoint and (options.listen or options.connect):
        parser.error("use either --endpoint (mesh mode) or --listen/--connect (client mode)")
    if options.endpoint and len(options.endpoint) < 2:
        parser.error("mesh mode needs at least two --endpoint")
    if not options.endpoint and not (options.listen and options.connect):
        parser.error("give --endpoint twice or more, or --listen and --connect")

    def terminate(signum, frame):
        raise Terminate(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    relay = None
    try:
        try:
            relay = Relay(options)
        except OSError as error:
            print(f"udp_delay_relay: cannot bind: {error}", file=sys.stderr)
            return 1
        if options.ready_file:
            temporary = options.ready_file + ".tmp"
            with open(temporary, "w") as f:
                f.write("".join(f"{host}:{port}\n" for host, port in relay.bound))
            os.replace(temporary, options.ready_file)
        writer = threading.Thread(target=relay.write_loop, daemon=True)
        writer.start()
        relay.read_loop()
    except Terminate:
        pass
    finally:
        if relay:
            relay.stop()
            if not options.quiet:
                c = relay.counts
                print(f"udp_delay_relay: {relay.mode}, delay {options.delay_ms:g} ms: "
                      f"{c['sent']} sent ({c['bytes']} B queued), "
                      f"dropped {c['dropped_unknown_source']} unknown source, "
                      f"{c['dropped_queue_full']} queue full, {c['dropped_send_buffer_full']} send buffer full, "
                      f"{c['send_errors']} send errors", file=sys.stderr)
        if options.ready_file:
            try:
                os.unlink(options.ready_file)
            except FileNotFoundError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
