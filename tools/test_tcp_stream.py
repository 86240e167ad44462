#!/usr/bin/env python3
"""Tests of tools/tcp_stream.py against echo servers on loopback (about 10 s; every wait is bounded).

    python3 tools/test_tcp_stream.py [-v]

Each test runs the client as a subprocess against a server thread on 127.0.0.1 that echoes
faithfully or misbehaves on purpose (corrupts, drops, duplicates, pauses, resets, never closes).
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tcp_stream.py")
sys.path.insert(0, os.path.dirname(CLIENT))
import tcp_stream  # noqa: E402

TIMEOUT = 20.0


class EchoServer:
    """One connection; transform(data, total_so_far) -> bytes to send back (or raise to stop)."""

    def __init__(self, transform=None, close_at_eof=True):
        self.transform = transform or (lambda data, total: data)
        self.close_at_eof = close_at_eof
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        total = 0
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                out = self.transform(data, total)
                total += len(data)
                if out is None:  # reset
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    return
                conn.sendall(out)
            if not self.close_at_eof:
                time.sleep(TIMEOUT)
        except OSError:
            pass
        conn.close()
        self.listener.close()


def run_client(port, *args):
    p = subprocess.run([sys.executable, CLIENT, "127.0.0.1", "--port", str(port), *args],
                       capture_output=True, text=True, timeout=TIMEOUT + 10)
    return p.returncode, json.loads(p.stdout)


class PatternTests(unittest.TestCase):
    def test_pattern_is_word_numbers_and_slices_agree(self):
        self.assertEqual(tcp_stream.pattern(0, 16), struct.pack("<QQ", 0, 1))
        whole = tcp_stream.pattern(0, 1000)
        for off, n in ((3, 5), (7, 9), (8, 8), (999, 1), (13, 500)):
            self.assertEqual(tcp_stream.pattern(off, n), whole[off:off + n])

    def test_rates(self):
        self.assertEqual(tcp_stream.parse_rate("500k"), 500e3)
        self.assertEqual(tcp_stream.parse_rate("2M"), 2e6)
        self.assertEqual(tcp_stream.parse_rate("0"), 0)


class StreamTests(unittest.TestCase):
    def test_faithful_echo(self):
        server = EchoServer()
        rc, r = run_client(server.port, "--duration", "1", "--rate", "2M")
        self.assertEqual(rc, 0, r)
        self.assertTrue(r["ok"] and r["eof"])
        self.assertEqual(r["verified_bytes"], r["sent_bytes"])
        self.assertGreater(r["sent_bytes"], 1.5e6)  # paced at 2 MB/s for 1 s
        self.assertLess(r["sent_bytes"], 2.2e6)
        self.assertEqual((r["mismatches"], r["resets"], r["errors"]), (0, 0, []))
        self.assertLess(r["longest_stall_s"], 0.5)

    def test_flat_out(self):
        server = EchoServer()
        rc, r = run_client(server.port, "--duration", "0.5", "--rate", "0")
        self.assertEqual(rc, 0, r)
        self.assertGreater(r["sent_bytes"], 1e6)

    def test_corrupted_byte_found_at_its_offset(self):
        def corrupt(data, total):
            b = bytearray(data)
            if total <= 5000 < total + len(b):
                b[5000 - total] ^= 0xFF
            return bytes(b)
        rc, r = run_client(EchoServer(corrupt).port, "--duration", "0.5", "--rate", "100k")
        self.assertEqual(rc, 1)
        self.assertFalse(r["ok"])
        self.assertEqual(r["first_mismatch_offset"], 5000)

    def test_lost_bytes_found(self):
        def drop(data, total):
            return data[8:] if total == 0 and len(data) > 8 else data
        rc, r = run_client(EchoServer(drop).port, "--duration", "0.5", "--rate", "100k")
        self.assertEqual(rc, 1)
        self.assertEqual(r["first_mismatch_offset"], 0)
        self.assertTrue(r["errors"])  # the FIN came before all bytes

    def test_duplicated_bytes_found(self):
        def dup(data, total):
            return data + data[-16:] if total == 0 else data
        rc, r = run_client(EchoServer(dup).port, "--duration", "0.5", "--rate", "100k")
        self.assertEqual(rc, 1)
        self.assertIsNotNone(r["first_mismatch_offset"])

    def test_pause_is_the_longest_stall(self):
        paused = []

        def pause(data, total):
            if total > 20000 and not paused:
                paused.append(time.time())
                time.sleep(0.6)
            return data
        rc, r = run_client(EchoServer(pause).port, "--duration", "1.5", "--rate", "100k")
        self.assertEqual(rc, 0, r)
        self.assertGreaterEqual(r["longest_stall_s"], 0.55)
        self.assertLess(r["longest_stall_s"], 1.0)
        self.assertLess(abs(r["longest_stall_start_unix"] - paused[0]), 0.2)
        self.assertEqual(len([s for s in r["stalls"] if s["seconds"] > 0.5]), 1)

    def test_reset_reported(self):
        def reset(data, total):
            return None if total > 10000 else data
        rc, r = run_client(EchoServer(reset).port, "--duration", "1", "--rate", "100k")
        self.assertEqual(rc, 1)
        self.assertEqual(r["resets"], 1)
        self.assertFalse(r["ok"])

    def test_missing_fin_times_out(self):
        server = EchoServer(close_at_eof=False)
        rc, r = run_client(server.port, "--duration", "0.3", "--rate", "100k", "--stall-timeout", "1")
        self.assertEqual(rc, 1)
        self.assertFalse(r["eof"])
        self.assertIn("no FIN", " ".join(r["errors"]))

    def test_refused(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()  # nothing listens there now
        rc, r = run_client(port, "--duration", "0.1")
        self.assertEqual(rc, 1)
        self.assertFalse(r["connected"])
        self.assertIn("connect", r["errors"][0])


if __name__ == "__main__":
    unittest.main()
