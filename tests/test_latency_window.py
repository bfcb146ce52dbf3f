"""Windowed per-peer statistics and GET /latency."""

import json
import logging
import math
import os
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import worker_monitor as wm  # noqa: E402


class Window(unittest.TestCase):
    def fill(self, size, rounds, peers=("a",)):
        window = wm.LatencyWindow(size)
        for n, round_results in enumerate(rounds):
            window.record(list(peers), round_results, {}, 1000.0 + n)
        return window

    def test_probes_that_could_not_be_attempted_are_no_loss(self):
        # ping missing or not permitted: nothing left the host, so no sample and no loss.
        window = self.fill(12, [{"a": (1.0, None)}, {"a": (None, "cannot run ping")},
                                {"a": (None, "not permitted")}])
        s = window.stats("a")
        self.assertEqual((s["sent"], s["received"], s["loss"], s["last"], s["error"]),
                         (1, 1, 0.0, 1.0, "not permitted"))
        window = self.fill(12, [{"a": (None, "no ICMP socket")}])
        s = window.stats("a")
        self.assertEqual((s["sent"], s["loss"], s["error"]), (0, None, "no ICMP socket"))

    def test_statistics_over_the_window(self):
        rtts = [10.0, 12.0, None, 14.0]
        window = self.fill(12, [{"a": (r, None if r else "timeout")} for r in rtts])
        s = window.stats("a")
        got = [10.0, 12.0, 14.0]
        mdev = math.sqrt(sum(x * x for x in got) / 3 - (sum(got) / 3) ** 2)
        self.assertEqual(s, {"last": 14.0, "min": 10.0, "avg": 12.0, "max": 14.0,
                             "mdev": round(mdev, 3), "loss": 0.25, "sent": 4, "received": 3,
                             "error": None, "probedAt": 1003.0})
        self.assertEqual(list(s), ["last", "min", "avg", "max", "mdev", "loss", "sent",
                                   "received", "error", "probedAt"])

    def test_oldest_rounds_leave_the_window(self):
        rounds = [{"a": (None, "timeout")}] * 3 + [{"a": (5.0, None)}] * 4
        s = self.fill(4, rounds).stats("a")
        self.assertEqual((s["sent"], s["received"], s["loss"], s["mdev"]), (4, 4, 0.0, 0.0))

    def test_last_failure_gives_null_last_and_its_error(self):
        s = self.fill(12, [{"a": (1.0, None)}, {"a": (None, "no reply")}]).stats("a")
        self.assertEqual((s["last"], s["error"], s["min"], s["loss"]),
                         (None, "no reply", 1.0, 0.5))

    def test_all_lost(self):
        s = self.fill(12, [{"a": (None, "timeout")}] * 3).stats("a")
        self.assertEqual((s["min"], s["avg"], s["max"], s["mdev"], s["loss"], s["received"]),
                         (None, None, None, None, 1.0, 0))

    def test_peer_not_probed_yet(self):
        s = wm.LatencyWindow(12).stats("new")
        self.assertEqual((s["sent"], s["loss"], s["last"], s["probedAt"]), (0, None, None, None))

    def test_removed_peer_is_forgotten_and_missing_result_is_a_loss(self):
        window = self.fill(12, [{"a": (1.0, None), "b": (2.0, None)}], peers=("a", "b"))
        window.record(["b", "c"], {"b": (3.0, None)}, {"b": 2000.5}, 2000.0)
        self.assertEqual(list(window.peers), ["b", "c"])
        self.assertEqual(window.stats("b")["probedAt"], 2000.5)
        self.assertEqual(window.stats("c")["error"], "not probed")

    def test_mdev_is_never_nan_for_equal_values(self):
        s = self.fill(12, [{"a": (0.1, None)}] * 12).stats("a")
        self.assertEqual(s["mdev"], 0.0)

    def test_document(self):
        window = self.fill(12, [{"a": (1.0, None)}], peers=("b", "a"))
        doc = window.document(["b", "a"], "icmp", 5.0, 1.0)
        self.assertEqual(list(doc), ["engine", "interval", "timeout", "window", "peers"])
        self.assertEqual((doc["engine"], doc["interval"], doc["timeout"], doc["window"]),
                         ("icmp", 5, 1, 12))
        self.assertEqual(list(doc["peers"]), ["b", "a"])
        self.assertEqual(wm.LatencyWindow(3).document([], "ping", 2.5, 1)["interval"], 2.5)


class FakeEngine:
    name = "fake"
    timeout = 1.0

    def __init__(self, script):
        self.script = list(script)
        self.sent_at = {}
        self.calls = []

    def probe(self, peers, stop):
        self.calls.append(list(peers))
        return self.script.pop(0)


class Endpoint(unittest.TestCase):
    def setUp(self):
        # Peer faults are logged by design; the values are what is checked here.
        logging.disable(logging.WARNING)
        self.addCleanup(logging.disable, logging.NOTSET)

    def prober(self, script, peers_text="127.0.0.1\n::1\n", window=3, resolver=None):
        f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        f.write(peers_text)
        f.close()
        self.addCleanup(os.unlink, f.name)
        faults = wm.Faults()
        state = wm.State("node-1")
        peers = wm.PeerList(f.name, faults, resolver)
        peers.refresh()
        engine = FakeEngine(script)
        return wm.Prober(state, peers, engine, 5, faults, window=window), state, engine

    def test_latency_served_before_the_first_round(self):
        _, state, _ = self.prober([])
        status, headers, body = wm.render(state, "GET", "/latency")
        self.assertEqual(status, 200)
        self.assertIn(("Content-Type", "application/json"), headers)
        doc = json.loads(body)
        self.assertEqual(doc["engine"], "fake")
        self.assertEqual(doc["peers"]["127.0.0.1"]["sent"], 0)

    def test_rounds_fill_the_window_and_stats_stays_as_it_was(self):
        script = [{"127.0.0.1": (1.0, None), "::1": (None, "timeout")},
                  {"127.0.0.1": (3.0, None), "::1": (2.0, None)}]
        prober, state, _ = self.prober(script)
        state.set_sample(1712640000, 0.5, 0.25, 1.0, 2.0)
        stop = threading.Event()
        prober.round(stop)
        prober.round(stop)
        doc = json.loads(wm.render(state, "GET", "/latency")[2])
        self.assertEqual(doc["window"], 3)
        self.assertEqual(list(doc["peers"]), ["127.0.0.1", "::1"])
        a, b = doc["peers"]["127.0.0.1"], doc["peers"]["::1"]
        self.assertEqual((a["last"], a["min"], a["avg"], a["max"], a["mdev"]),
                         (3.0, 1.0, 2.0, 3.0, 1.0))
        self.assertEqual((b["loss"], b["sent"], b["received"], b["error"]), (0.5, 2, 1, None))
        stats = json.loads(state.stats_body)
        self.assertEqual(list(stats), ["nodeName", "timestamp", "cpu", "mem", "net", "latency"])
        self.assertEqual(stats["latency"], {"127.0.0.1": 3.0, "::1": 2.0})

    def test_head_and_unknown_path(self):
        _, state, _ = self.prober([])
        self.assertEqual(wm.render(state, "HEAD", "/latency")[0], 200)
        status, _, body = wm.render(state, "GET", "/nope")
        self.assertEqual(status, 404)
        self.assertIn("/latency", json.loads(body)["endpoints"])

    def test_no_prober_yet_is_503(self):
        self.assertEqual(wm.render(wm.State("n"), "GET", "/latency")[0], 503)

    def test_dns_peers_are_probed_as_addresses(self):
        resolver = type("R", (), {"resolve": staticmethod(
            lambda names, timeout: {"svc": (["127.0.0.2", "127.0.0.3"], None)})})()
        prober, state, engine = self.prober(
            [{"127.0.0.2": (1.0, None), "127.0.0.3": (None, "timeout")}], "dns:svc\n",
            resolver=resolver)
        prober.round(threading.Event())
        self.assertEqual(engine.calls, [["127.0.0.2", "127.0.0.3"]])
        self.assertEqual(json.loads(state.latency_body)["peers"]["127.0.0.3"]["loss"], 1.0)


class Schedule(unittest.TestCase):
    def test_rounds_are_offset_by_the_node_phase(self):
        times = []
        state = wm.State("node-7")
        interval = 0.4
        phase = wm.round_phase("node-7", interval)

        class Peers:
            peers = []

            def refresh(self):
                return False

        prober = wm.Prober(state, Peers(), FakeEngine([]), interval, wm.Faults())
        stop = threading.Event()
        prober.round = lambda stop: times.append(wm.time.monotonic())
        started = wm.time.monotonic()
        t = threading.Thread(target=prober.run, args=(stop,))
        t.start()
        stop.wait(3 * interval + phase + 0.1)
        stop.set()
        t.join(2)
        self.assertLess(times[0] - started, 0.05)
        for k, when in enumerate(times[1:], 1):
            self.assertAlmostEqual(when - started, phase + k * interval, delta=0.05)


if __name__ == "__main__":
    unittest.main()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@unittest.skipUnless(wm.icmp_available()[0], "this process can open no ICMP socket")
class AgentProcess(unittest.TestCase):
    """The agent itself, probing loopback only."""

    def run_agent(self, *extra):
        import subprocess
        import time
        import urllib.request
        f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        f.write("127.0.0.1\n::1\n")
        f.close()
        self.addCleanup(os.unlink, f.name)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, wm.__file__, "--port", str(port), "--bind", "127.0.0.1",
             "--peers", f.name, "--probe-interval", "0.3", "--probe-timeout", "0.2",
             "--window", "4"] + list(extra),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            doc = None
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen("http://127.0.0.1:%d/latency" % port,
                                                timeout=2) as r:
                        doc = json.loads(r.read())
                    if doc["peers"]["127.0.0.1"]["sent"] >= 4:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
        finally:
            proc.terminate()
            err = proc.communicate(5)[1].decode()
        self.assertEqual(proc.returncode, 0)
        return doc, err

    def test_icmp_engine_serves_latency(self):
        doc, _ = self.run_agent("--probe", "icmp")
        self.assertEqual((doc["engine"], doc["window"]), ("icmp", 4))
        a = doc["peers"]["127.0.0.1"]
        self.assertEqual((a["sent"], a["received"], a["loss"], a["error"]), (4, 4, 0.0, None))
        self.assertLess(a["max"], 50)

    def test_missing_ping_program_falls_back_to_icmp(self):
        doc, err = self.run_agent("--ping", "no-such-ping-program")
        self.assertEqual(doc["engine"], "icmp")
        self.assertEqual(doc["peers"]["127.0.0.1"]["received"], 4)
        self.assertEqual(err.count("probing with the icmp engine"), 1, err)
