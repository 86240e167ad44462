#!/usr/bin/env python3
"""Functional tests of tools/delay_relay.py on loopback (a few seconds; every wait is bounded).

    python3 tools/test_delay_relay.py [-v]

Each test starts the relay as a subprocess on 127.0.0.1 port 0 (it reports the port through
--ready-file) in front of a small server thread, also on 127.0.0.1.
"""

import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delay_relay.py")
TIMEOUT = 20.0  # on every socket and wait


def recv_all(sock):
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def recv_exact(sock, n):
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += part
    return bytes(data)


class Server:
    """A listening socket on 127.0.0.1 whose connections are given to handler(sock) in threads."""

    def __init__(self, handler):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.handler = handler
        self.errors = []
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            sock.settimeout(TIMEOUT)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock):
        try:
            self.handler(sock)
        except Exception as error:  # reported by the test that looks
            self.errors.append(error)
        finally:
            sock.close()

    def close(self):
        self.listener.close()


class Relay:
    def __init__(self, upstream_port, *arguments):
        self.directory = tempfile.mkdtemp(prefix="relaytest")
        self.ready = os.path.join(self.directory, "ready")
        self.process = subprocess.Popen(
            [sys.executable, RELAY, "--listen", "127.0.0.1:0", "--connect", f"127.0.0.1:{upstream_port}",
             "--ready-file", self.ready, *arguments],
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.ready):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start: {self.process.stderr.read()}")
            time.sleep(0.02)
        with open(self.ready) as f:
            self.port = int(f.read().strip().rpartition(":")[2])

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def finish(self, sig=None):
        """Stops the relay (with sig, or waits for it to exit by itself); returns (status, log)."""
        if sig is not None and self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            _, log = self.process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, log = self.process.communicate()
            return None, log
        return self.process.returncode, log

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)


def echo(sock):
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def count_then_reply(sock):
    """Reads until end of stream, then answers with the byte count and the SHA-256."""
    digest = hashlib.sha256()
    total = 0
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        digest.update(data)
        total += len(data)
    sock.sendall(struct.pack("!Q", total) + digest.digest())


class RelayTests(unittest.TestCase):
    def start(self, handler, *arguments):
        server = Server(handler)
        self.addCleanup(server.close)
        relay = Relay(server.port, *arguments)
        self.addCleanup(relay.close)
        return server, relay

    def test_ready_file_and_rtt(self):
        server, relay = self.start(echo, "--delay-ms", "30")
        with relay.connect() as sock:
            rtts = []
            for _ in range(5):
                start = time.monotonic()
                sock.sendall(b"x")
                self.assertEqual(recv_exact(sock, 1), b"x")
                rtts.append(time.monotonic() - start)
        self.assertGreaterEqual(min(rtts), 0.060)
        self.assertLess(max(rtts), 0.090)

    def test_data_integrity_both_directions_at_once(self):
        server, relay = self.start(echo, "--delay-ms", "5", "--chunk-kib", "64")
        payload = os.urandom(24 * 1024 * 1024)
        with relay.connect() as sock:
            def sender():
                view = memoryview(payload)
                for offset in range(0, len(payload), 100003):  # odd-sized writes
                    sock.sendall(view[offset:offset + 100003])
                sock.shutdown(socket.SHUT_WR)
            thread = threading.Thread(target=sender, daemon=True)
            thread.start()
            received = recv_all(sock)
            thread.join(TIMEOUT)
        self.assertEqual(len(received), len(payload))
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest())
        self.assertEqual(server.errors, [])

    def test_half_close_travels_after_the_data(self):
        server, relay = self.start(count_then_reply, "--delay-ms", "20")
        payload = os.urandom(3_000_000)
        with relay.connect() as sock:
            start = time.monotonic()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the server answers only once it sees end of stream
            reply = recv_all(sock)
            elapsed = time.monotonic() - start
        self.assertEqual(reply, struct.pack("!Q", len(payload)) + hashlib.sha256(payload).digest())
        self.assertGreaterEqual(elapsed, 0.040)

    def test_rate_cap(self):
        server, relay = self.start(count_then_reply, "--delay-ms", "10", "--rate-mbit", "80")
        payload = bytes(5_000_000)  # 0.5 s at 80 Mbit/s
        with relay.connect() as sock:
            start = time.monotonic()
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            reply = recv_all(sock)
            elapsed = time.monotonic() - start
        self.assertEqual(struct.unpack("!Q", reply[:8])[0], len(payload))
        self.assertGreater(elapsed, 0.50)
        self.assertLess(elapsed, 0.60)

    def test_rate_cap_pushes_back_on_the_sender(self):
        # The relay buffers only what a link would (about rate x (delay + --buffer-ms) plus one
        # read): the sender's own socket buffer (at most 4 MB here) holds the rest, so the
        # sender cannot finish writing long before the link has carried the data.
        server, relay = self.start(count_then_reply, "--delay-ms", "10", "--rate-mbit", "80")
        payload = bytes(10_000_000)  # 1.0 s at 80 Mbit/s
        with relay.connect() as sock:
            start = time.monotonic()
            sock.sendall(payload)
            written = time.monotonic() - start
            sock.shutdown(socket.SHUT_WR)
            recv_all(sock)
        self.assertGreater(written, 0.4)

    def test_rate_is_shared_by_connections(self):
        server, relay = self.start(count_then_reply, "--delay-ms", "10", "--rate-mbit", "80")
        payload = bytes(2_500_000)
        results = []

        def client():
            with relay.connect() as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                results.append(struct.unpack("!Q", recv_all(sock)[:8])[0])
        start = time.monotonic()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        elapsed = time.monotonic() - start
        self.assertEqual(results, [len(payload)] * 2)
        self.assertGreater(elapsed, 0.50)  # 5 MB in all at 80 Mbit/s
        self.assertLess(elapsed, 0.65)

    def test_upstream_refused_closes_client(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # nothing listens on port
        relay = Relay(port, "--delay-ms", "5", "--max-connections", "1")
        self.addCleanup(relay.close)
        with relay.connect() as sock:
            start = time.monotonic()
            try:
                data = sock.recv(1)
            except ConnectionResetError:
                data = b""
            self.assertEqual(data, b"")
            self.assertLess(time.monotonic() - start, 2.0)
        status, log = relay.finish()
        self.assertEqual(status, 0)
        self.assertIn("connecting to", log)

    def test_server_reset_closes_client(self):
        def reset_after_some_data(sock):
            sock.sendall(b"hello")
            time.sleep(0.1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
        server, relay = self.start(reset_after_some_data, "--delay-ms", "5", "--max-connections", "1")
        with relay.connect() as sock:
            start = time.monotonic()
            received = b""
            try:
                received = recv_all(sock)
            except ConnectionResetError:
                pass
            self.assertLess(time.monotonic() - start, 2.0)
        self.assertIn(received, (b"", b"hello"))
        status, log = relay.finish()
        self.assertEqual(status, 0)
        self.assertIn("closed on error", log)

    def test_client_abort_closes_server_side(self):
        seen = threading.Event()

        def stream_forever(sock):
            block = bytes(1 << 20)
            try:
                deadline = time.monotonic() + TIMEOUT
                while time.monotonic() < deadline:
                    sock.sendall(block)
            except OSError:
                seen.set()
        server, relay = self.start(stream_forever, "--delay-ms", "5", "--max-connections", "1")
        sock = relay.connect()
        recv_exact(sock, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        self.assertTrue(seen.wait(5.0), "the server side was not closed")
        status, _ = relay.finish()
        self.assertEqual(status, 0)

    def test_exits_after_max_connections(self):
        server, relay = self.start(echo, "--delay-ms", "1", "--max-connections", "2")
        for _ in range(2):
            with relay.connect() as sock:
                sock.sendall(b"abc")
                self.assertEqual(recv_exact(sock, 3), b"abc")
        status, log = relay.finish()
        self.assertEqual(status, 0)
        self.assertEqual(log.count(" up "), 2)
        self.assertFalse(os.path.exists(relay.ready))

    def test_sigterm_exits_cleanly_with_open_connection(self):
        server, relay = self.start(echo, "--delay-ms", "1")
        with relay.connect() as sock:
            sock.sendall(b"abc")
            self.assertEqual(recv_exact(sock, 3), b"abc")
            start = time.monotonic()
            status, log = relay.finish(signal.SIGTERM)
            self.assertLess(time.monotonic() - start, 3.0)
            self.assertEqual(sock.recv(1), b"")  # the relay closed the client side
        self.assertEqual(status, 0)
        self.assertIn("SIGTERM", log)
        self.assertNotIn("Traceback", log)
        self.assertFalse(os.path.exists(relay.ready))


if __name__ == "__main__":
    unittest.main()
