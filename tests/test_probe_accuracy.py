"""Accuracy of both probe engines against a test host with set delays, jitter and loss.

The kernel here has no netem, so the delay is made by a responder: a test
host in its own network namespace that does not answer echo requests itself
(icmp_echo_ignore_all) and a raw-socket responder that answers each address
after a set delay, with alternating jitter and an even pattern of loss.
Needs root for the namespaces; probes only the addresses inside them.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_host  # noqa: E402

ROUNDS = 8
INTERVAL = 1.3
TIMEOUT = 1
# address -> responder settings; loss 1.0 is a dead peer the responder still counts.
HOST = {
    "198.18.1.1": {"delay": 3},
    "198.18.1.2": {"delay": 50, "jitter": 10},
    "198.18.1.3": {"delay": 300},
    "198.18.1.4": {"delay": 20, "loss": 0.25},
    "198.18.1.5": {"delay": 1500},              # answers, but past the timeout
    "fd77:1::1": {"delay": 10, "jitter": 3},
    "fd77:1::2": {"delay": 100, "loss": 0.5},
}
DEAD = ["198.18.1.%d" % i for i in range(6, 16)] + ["fd77:1::3", "fd77:1::4"]
HOST.update({a: {"delay": 0, "loss": 1.0} for a in DEAD})
PEERS = list(HOST)

SKIP = netns_host.why_no_netns()


@unittest.skipIf(SKIP, SKIP)
class ProbeAccuracy(unittest.TestCase):
    """One run of ROUNDS rounds per engine; every assertion reads that run."""

    runs = {}

    @classmethod
    def setUpClass(cls):
        cls.host = netns_host.NetnsHost(count=15, v6_count=4, kernel_replies=False)
        cls.host.__enter__()

    @classmethod
    def tearDownClass(cls):
        cls.host.close()

    def run_engine(self, engine, kind=None):
        key = (engine, kind)
        if key not in self.runs:
            if engine == "ping" and shutil.which("ping") is None:
                self.skipTest("no ping program")
            self.host.start_responder(HOST)
            cfg = {"engine": engine, "kind": kind, "peers": PEERS, "rounds": ROUNDS,
                   "interval": INTERVAL, "timeout": TIMEOUT, "window": ROUNDS, "spread": 0.1}
            path = os.path.join(self.host.tmp, "runner.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            try:
                out = self.host.run_near(
                    [sys.executable, os.path.join(netns_host.HERE, "probe_runner.py"), path],
                    stdout=subprocess.PIPE, timeout=ROUNDS * INTERVAL + 30).stdout
            finally:
                host = self.host.stop_responder()
            run = json.loads(out)
            self.assertEqual(run["engine"], engine)
            run["counts"] = host["counts"]
            # Round n of a peer is its nth request: the delay it really got.
            run["applied"] = {a: [d.get(str(n)) for n in range(ROUNDS)]
                              for a, d in host["applied"].items()}
            self.runs[key] = run
        return self.runs[key]

    def samples(self, run, peer):
        return [r[peer][0] for r in run["rounds"]]

    def check(self, engine, kind=None):
        run = self.run_engine(engine, kind)
        stats = run["latency"]["peers"]
        self.assertEqual(list(stats), PEERS)
        # Each RTT against the delay the host really applied to that request:
        # the probe's own error, whatever the test machine's load did to the host.
        for peer, setting in HOST.items():
            off = []
            for n, (rtt, applied) in enumerate(zip(self.samples(run, peer), run["applied"][peer])):
                if applied is None or applied > TIMEOUT * 1000:
                    self.assertIsNone(rtt, "%s round %d" % (peer, n))
                    continue
                self.assertIsNotNone(rtt, "%s round %d" % (peer, n))
                # "Within a millisecond or two" (the issue); iputils prints an
                # RTT of 100 ms or more in whole milliseconds, half a ms more.
                resolution = 1.0 if engine == "ping" and applied >= 100 else 0.0
                if abs(rtt - applied) > 2.0 + resolution / 2:
                    off.append((n, rtt, applied))
                # Never a wild value, even in a stall of the machine.
                self.assertAlmostEqual(rtt, applied, delta=10.0, msg="%s round %d" % (peer, n))
            # A 2-core machine running the agent, the host and a ping per peer may
            # stall one reader for a few ms: one probe per peer may miss the bound.
            self.assertLessEqual(len(off), 1, "%s: %s" % (peer, off))
        # Set delays from 3 ms to 300 ms, IPv4 and IPv6: within a millisecond or two
        # (the median: a rare stall of a loaded machine may delay one answer).
        for peer in ("198.18.1.1", "198.18.1.3", "fd77:1::1", "198.18.1.4", "fd77:1::2"):
            rtts = [x for x in self.samples(run, peer) if x is not None]
            self.assertAlmostEqual(statistics.median(rtts), HOST[peer]["delay"], delta=2.0,
                                   msg="%s %s" % (peer, rtts))
        for peer in ("198.18.1.1", "198.18.1.3"):
            near = [x for x in self.samples(run, peer) if abs(x - HOST[peer]["delay"]) <= 2.0]
            self.assertGreaterEqual(len(near), ROUNDS - 2, "%s %s" % (peer, run["applied"][peer]))
        # Jitter: the host alternates delay -/+ jitter, a standard deviation of jitter.
        for peer in ("198.18.1.2", "fd77:1::1"):
            applied = run["applied"][peer]
            mean = sum(applied) / len(applied)
            sd = (sum((x - mean) ** 2 for x in applied) / len(applied)) ** 0.5
            self.assertAlmostEqual(stats[peer]["mdev"], sd, delta=0.5, msg=peer)
            self.assertAlmostEqual(stats[peer]["avg"], mean, delta=1.0, msg=peer)
            low = sorted(self.samples(run, peer))[:ROUNDS // 2]
            high = sorted(self.samples(run, peer))[ROUNDS // 2:]
            setting = HOST[peer]
            self.assertAlmostEqual(statistics.median(low), setting["delay"] - setting["jitter"],
                                   delta=2.0, msg=peer)
            self.assertAlmostEqual(statistics.median(high), setting["delay"] + setting["jitter"],
                                   delta=2.0, msg=peer)
            # And to the set jitter itself, unless a stall of the host skewed a delay.
            expected = [setting["delay"] + setting["jitter"] * (1 if n % 2 else -1)
                        for n in range(ROUNDS)]
            if all(abs(a - e) <= 1.0 for a, e in zip(applied, expected)):
                self.assertAlmostEqual(stats[peer]["mdev"], setting["jitter"], delta=1.0,
                                       msg="%s %s" % (peer, stats[peer]))
        self.assertLess(stats["198.18.1.1"]["mdev"], 1.5)
        # Loss over the window.
        for peer in ("198.18.1.4", "fd77:1::2"):
            self.assertAlmostEqual(stats[peer]["loss"], HOST[peer]["loss"], delta=0.13, msg=peer)
            self.assertEqual(stats[peer]["sent"], ROUNDS)
            got = [x for x in self.samples(run, peer) if x is not None]
            self.assertEqual(stats[peer]["received"], len(got))
        # Past the timeout: null every round, the late answers matched to nothing.
        self.assertEqual(self.samples(run, "198.18.1.5"), [None] * ROUNDS)
        self.assertEqual(stats["198.18.1.5"]["loss"], 1.0)
        self.assertIsNotNone(stats["198.18.1.5"]["error"])
        for peer in DEAD:
            self.assertEqual(self.samples(run, peer), [None] * ROUNDS, peer)
            self.assertEqual((stats[peer]["loss"], stats[peer]["received"]), (1.0, 0))
        # Exactly one request per peer per round reached the host.
        self.assertEqual(run["counts"], {p: ROUNDS for p in PEERS})
        for peer in PEERS:
            self.assertEqual(stats[peer]["sent"], ROUNDS)
        # Twelve dead peers cost one timeout per round, not twelve.
        for duration in run["durations"]:
            self.assertLess(duration, TIMEOUT + 1.0)

    def test_icmp_engine_raw_socket(self):
        self.check("icmp", "raw")

    def test_icmp_engine_datagram_socket(self):
        self.check("icmp", "dgram")

    def test_ping_engine(self):
        self.check("ping")


if __name__ == "__main__":
    unittest.main()
