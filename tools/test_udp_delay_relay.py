#!/usr/bin/env python3
"""Functional tests of tools/udp_delay_relay.py on loopback (a few seconds; every wait is bounded).

    python3 tools/test_udp_delay_relay.py [-v]

Each test starts the relay as a subprocess on 127.0.0.1 with port 0 (it reports the bound
ports through --ready-file). The mesh tests give the peers their own loopback addresses
(127.0.0.2, 127.0.0.3, ...), which Linux answers without any set-up.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "udp_delay_relay.py")
TIMEOUT = 10.0


def peer(host):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.settimeout(TIMEOUT)
    return s


class Relay:
    """The relay as a subprocess; .bound is the list of (host, port) it reported."""

    def __init__(self, *args):
        self.dir = tempfile.TemporaryDirectory()
        self.ready = os.path.join(self.dir.name, "ready")
        self.proc = subprocess.Popen([sys.executable, RELAY, "--ready-file", self.ready, *args],
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.ready):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("relay did not start: " + self.proc.stderr.read())
            time.sleep(0.01)
        with open(self.ready) as f:
            self.bound = [(h, int(p)) for h, p in (line.rsplit(":", 1) for line in f.read().split())]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=TIMEOUT)
        self.dir.cleanup()
        return self.proc.returncode, err


class MeshTests(unittest.TestCase):
    def start_mesh(self, delay_ms, hosts):
        """Peers on the given hosts and a relay with one proxy for each."""
        peers = [peer(h) for h in hosts]
        args = ["--delay-ms", str(delay_ms)]
        for p in peers:
            args += ["--endpoint", "127.0.0.1:0=%s:%d" % p.getsockname()]
        relay = Relay(*args)
        self.addCleanup(lambda: [p.close() for p in peers])
        return relay, peers

    def test_forwards_through_proxies_with_delay(self):
        relay, (a, b) = self.start_mesh(50, ["127.0.0.2", "127.0.0.3"])
        pa, pb = relay.bound
        t0 = time.monotonic()
        a.sendto(b"to b", pb)
        data, source = b.recvfrom(2048)
        elapsed = time.monotonic() - t0
        self.assertEqual(data, b"to b")
        self.assertEqual(source, pa, "b must see a at a's proxy")
        self.assertGreaterEqual(elapsed, 0.050)
        self.assertLess(elapsed, 0.050 + 0.2)
        b.sendto(b"to a", source)  # answering the address seen
        data, source = a.recvfrom(2048)
        self.assertEqual((data, source), (b"to a", pb))
        rc, err = relay.stop()
        self.assertEqual(rc, 0)
        self.assertIn("2 sent", err)

    def test_three_peers_see_distinct_addresses(self):
        relay, (a, b, c) = self.start_mesh(0, ["127.0.0.2", "127.0.0.3", "127.0.0.4"])
        pa, pb, pc = relay.bound
        a.sendto(b"a->c", pc)
        b.sendto(b"b->c", pc)
        seen = dict((c.recvfrom(2048)) for _ in range(2))
        self.assertEqual(seen, {b"a->c": pa, b"b->c": pb})
        relay.stop()

    def test_any_source_port_of_a_peer_is_accepted(self):
        relay, (a, b) = self.start_mesh(0, ["127.0.0.2", "127.0.0.3"])
        other = peer("127.0.0.2")  # same host as a, another port (as a VXLAN source port)
        self.addCleanup(other.close)
        other.sendto(b"x", relay.bound[1])
        self.assertEqual(b.recvfrom(2048), (b"x", relay.bound[0]))
        relay.stop()

    def test_unknown_source_dropped(self):
        relay, (a, b) = self.start_mesh(0, ["127.0.0.2", "127.0.0.3"])
        stranger = peer("127.0.0.9")
        self.addCleanup(stranger.close)
        stranger.sendto(b"no", relay.bound[1])
        a.sendto(b"yes", relay.bound[1])
        self.assertEqual(b.recvfrom(2048)[0], b"yes")
        rc, err = relay.stop()
        self.assertIn("dropped 1 unknown source", err)

    def test_order_and_delay_of_a_burst(self):
        relay, (a, b) = self.start_mesh(30, ["127.0.0.2", "127.0.0.3"])
        sent = {}
        for i in range(500):
            sent[i] = time.monotonic()
            a.sendto(i.to_bytes(4, "big") + bytes(1000), relay.bound[1])
        order, late = [], []
        for _ in range(500):
            data, _ = b.recvfrom(2048)
            i = int.from_bytes(data[:4], "big")
            order.append(i)
            late.append(time.monotonic() - sent[i])
        self.assertEqual(order, list(range(500)))
        self.assertGreaterEqual(min(late), 0.030)
        self.assertLess(sorted(late)[len(late) // 2], 0.030 + 0.05)
        relay.stop()


class ClientModeTests(unittest.TestCase):
    def test_echo_round_trip_is_twice_the_delay(self):
        server = peer("127.0.0.1")
        self.addCleanup(server.close)
        relay = Relay("--delay-ms", "40", "--listen", "127.0.0.1:0", "--connect", "%s:%d" % server.getsockname())
        client = peer("127.0.0.1")
        self.addCleanup(client.close)
        t0 = time.monotonic()
        client.sendto(b"ping", relay.bound[0])
        data, up = server.recvfrom(2048)
        self.assertEqual(data, b"ping")
        server.sendto(b"pong", up)
        data, source = client.recvfrom(2048)
        rtt = time.monotonic() - t0
        self.assertEqual((data, source), (b"pong", relay.bound[0]))
        self.assertGreaterEqual(rtt, 0.080)
        self.assertLess(rtt, 0.080 + 0.3)
        # a second client gets its own upstream address
        other = peer("127.0.0.1")
        self.addCleanup(other.close)
        other.sendto(b"hi", relay.bound[0])
        data, up2 = server.recvfrom(2048)
        self.assertNotEqual(up, up2)
        rc, err = relay.stop()
        self.assertEqual(rc, 0)


class UsageTests(unittest.TestCase):
    def test_bad_arguments(self):
        for args in (["--delay-ms", "1"], ["--delay-ms", "1", "--endpoint", "127.0.0.1:0=127.0.0.2:1"],
                     ["--delay-ms", "-1", "--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9"],
                     ["--delay-ms", "1", "--endpoint", "nonsense"]):
            p = subprocess.run([sys.executable, RELAY, *args], capture_output=True, timeout=TIMEOUT)
            self.assertEqual(p.returncode, 2, args)


if __name__ == "__main__":
    unittest.main()
