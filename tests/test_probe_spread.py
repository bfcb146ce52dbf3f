"""One round's probes start spread over a short span, for both engines, without spinning."""

import os
import stat
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import worker_monitor as wm  # noqa: E402

# Stands in for ping: notes when it started, then prints an iputils reply line.
FAKE_PING = """#!/bin/sh
for last; do :; done
date +%s.%N >> "$STARTS"
echo "64 bytes from $last: icmp_seq=1 ttl=64 time=0.5 ms"
"""


class PingSpread(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="wm4-")
        self.ping = os.path.join(self.dir, "fake-ping")
        with open(self.ping, "w") as f:
            f.write(FAKE_PING)
        os.chmod(self.ping, stat.S_IRWXU)
        self.starts = os.path.join(self.dir, "starts")
        os.environ["STARTS"] = self.starts

    def tearDown(self):
        os.environ.pop("STARTS", None)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def probe(self, spread, peers):
        engine = wm.PingEngine(self.ping, 1.0, wm.Faults())
        engine.spread = spread
        cpu = time.process_time()
        out = engine.probe(peers, threading.Event())
        cpu = time.process_time() - cpu
        with open(self.starts) as f:
            starts = sorted(float(x) for x in f.read().split())
        return out, starts, cpu

    def test_starts_are_paced_and_the_loop_sleeps(self):
        peers = ["127.0.0.%d" % i for i in range(1, 9)]
        out, starts, cpu = self.probe(0.4, peers)
        self.assertEqual(out, {p: (0.5, None) for p in peers})
        # 8 peers PROBE_STEP (10 ms) apart: about 70 ms from the first to the last
        # (less the spread of fork and exec times).
        self.assertGreaterEqual(starts[-1] - starts[0], 5 * wm.PROBE_STEP)
        self.assertLess(cpu, 0.5)

    def test_no_spread_starts_at_once(self):
        peers = ["127.0.0.%d" % i for i in range(1, 5)]
        out, starts, _ = self.probe(0.0, peers)
        self.assertEqual(len(out), 4)
        self.assertLess(starts[-1] - starts[0], 0.5)


class IcmpSpread(unittest.TestCase):
    @unittest.skipUnless(wm.icmp_available()[0], "no ICMP socket")
    def test_round_of_loopback_peers_is_spread(self):
        engine = wm.IcmpEngine(1.0, wm.Faults())
        self.addCleanup(engine.close)
        engine.spread = 0.2
        peers = ["127.0.0.%d" % i for i in range(1, 11)]
        out = engine.probe(peers, threading.Event())
        self.assertEqual({p: e for p, (_, e) in out.items()}, {p: None for p in peers})
        sent = sorted(engine.sent_at.values())
        self.assertGreaterEqual(sent[-1] - sent[0], 9 * wm.PROBE_STEP - 0.005)
        self.assertLess(sent[-1] - sent[0], 0.2 + 0.05)


if __name__ == "__main__":
    unittest.main()
