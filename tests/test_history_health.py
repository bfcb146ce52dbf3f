"""GET /history and GET /healthz: render() contract and the real process."""

import json
import os
import shutil
import sys
import tempfile
import threading
import tracemalloc
import unittest

from live_agent import Agent, FakeProcfs, Ticker

import worker_monitor as wm


def state_with(samples, interval=1.0, history=300.0):
    state = wm.State("node-1", interval=interval, history=history)
    for i in range(samples):
        state.set_sample(1700000000 + i, 0.5, 0.25, 1.5, 2.5, net_total=(i, i))
    return state


def history(state, query=""):
    status, headers, body = wm.render(state, "GET", "/history" + query)
    return status, dict(headers), json.loads(body)


class HistoryRender(unittest.TestCase):
    def test_last_n_oldest_first(self):
        status, headers, doc = history(state_with(10), "?seconds=3")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(doc["nodeName"], "node-1")
        self.assertEqual([s["timestamp"] for s in doc["samples"]],
                         [1700000007, 1700000008, 1700000009])
        self.assertEqual(doc["samples"][0],
                         {"timestamp": 1700000007, "cpu": 0.5, "mem": 0.25, "rx": 1.5, "tx": 2.5})
        self.assertEqual(list(doc["samples"][0]), ["timestamp", "cpu", "mem", "rx", "tx"])

    def test_without_seconds_gives_all_retained(self):
        _, _, doc = history(state_with(7))
        self.assertEqual(len(doc["samples"]), 7)

    def test_n_is_capped_at_retention(self):
        state = state_with(20, history=5)
        for query in ("?seconds=6", "?seconds=300", "?seconds=99999999999999999999999"):
            status, _, doc = history(state, query)
            self.assertEqual(status, 200)
            self.assertEqual([s["timestamp"] for s in doc["samples"]],
                             list(range(1700000015, 1700000020)))

    def test_ring_buffer_stays_bounded(self):
        state = state_with(1000, history=300)
        self.assertEqual(len(state.history), 300)
        self.assertEqual(json.loads(state.history[0])["timestamp"], 1700000700)

    def test_seconds_count_samples_of_the_interval(self):
        state = state_with(100, interval=2.0, history=60)
        self.assertEqual(state.history.maxlen, 30)
        _, _, doc = history(state, "?seconds=10")
        self.assertEqual(len(doc["samples"]), 5)
        self.assertEqual(doc["interval"], 2.0)

    def test_null_values_stay_null(self):
        state = wm.State("n")
        state.set_sample(5, None, None, None, None)
        _, _, doc = history(state, "?seconds=1")
        self.assertEqual(doc["samples"], [{"timestamp": 5, "cpu": None, "mem": None,
                                           "rx": None, "tx": None}])

    def test_before_first_sample_is_empty(self):
        status, _, doc = history(wm.State("n"), "?seconds=5")
        self.assertEqual((status, doc["samples"]), (200, []))

    def test_bad_seconds_is_400_json(self):
        state = state_with(3)
        for query in ("?seconds=", "?seconds=0", "?seconds=000", "?seconds=-1", "?seconds=1.5",
                      "?seconds=abc", "?seconds=%EF%BC%91", "?seconds=1&seconds=2",
                      "?seconds=+1", "?seconds=1e3"):
            status, headers, doc = history(state, query)
            self.assertEqual(status, 400, query)
            self.assertEqual(headers["Content-Type"], "application/json")
            self.assertEqual(doc["status"], 400)
            self.assertIn("seconds", doc["error"])

    def test_other_parameters_are_ignored(self):
        status, _, doc = history(state_with(4), "?x=1&seconds=2&y")
        self.assertEqual((status, len(doc["samples"])), (200, 2))

    def test_memory_of_300_seconds(self):
        """300 one-second samples cost well under 100 KB (measured, see README)."""
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        state = wm.State("node-1")
        for i in range(300):
            # Realistic widths: 4-decimal ratios, 3-decimal Mbit/s.
            state.set_sample(1700000000 + i, 0.1234 + i / 1e4, 0.7234, 941.123 + i, 12.345,
                             net_total=(10 ** 12 + i, 10 ** 11 + i))
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        used = sum(s.size_diff for s in after.compare_to(before, "filename")
                   if s.traceback[0].filename == wm.__file__)
        history_bytes = sys.getsizeof(state.history) + sum(sys.getsizeof(b) for b in state.history)
        self.assertLess(history_bytes, 100 * 1024)
        self.assertLess(used, 200 * 1024)


class HealthRender(unittest.TestCase):
    def test_ok(self):
        state = state_with(1)
        state.set_latency([], {})
        status, headers, body = wm.render(state, "GET", "/healthz")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertIn(("Content-Type", "application/json"), headers)

    def test_no_sample_yet(self):
        state = wm.State("n")
        status, _, body = wm.render(state, "GET", "/healthz")
        self.assertEqual(status, 503)
        self.assertEqual(json.loads(body), {"status": "unhealthy", "reason": "no sample yet"})

    def test_stale_sample(self):
        state = state_with(1, interval=1.0)
        state.set_latency([], {})
        now = state.fresh_mono
        self.assertIsNone(state.health(now + 3.0))
        reason = state.health(now + 3.5)
        self.assertIn("3.5 s old (limit 3 s)", reason)

    def test_frozen_procfs_is_not_fresh(self):
        """Samples keep coming, but without advancing CPU counters they are not fresh."""
        state = state_with(1)
        state.set_latency([], {})
        fresh = state.fresh_mono
        state.set_sample(1700000009, None, 0.25, 0.0, 0.0)
        self.assertEqual(state.fresh_mono, fresh)
        self.assertIn("advancing CPU counters", state.health(fresh + 4))
        self.assertEqual(wm.render(state, "GET", "/stats")[0], 200)

    def test_prober_stalled(self):
        state = wm.State("n", interval=1.0, probe_interval=5.0)
        state.set_sample(1, 0.1, 0.1, 0.0, 0.0)
        start = state.started_mono
        self.assertIsNone(state.health(start + 1))     # first round still has time
        self.assertIn("no probe round completed for 16.0 s (limit 15 s)",
                      state.health(start + 16))
        state.set_latency(["127.0.0.1"], {"127.0.0.1": 0.05})
        self.assertNotIn("probe round", state.health(state.round_mono + 15))
        self.assertIn("probe round", state.health(state.round_mono + 15.1))

    def test_both_reasons(self):
        state = state_with(1)
        reason = state.health(state.fresh_mono + 100)
        self.assertIn("sample", reason)
        self.assertIn("probe round", reason)

    def test_round_without_peers_completes(self):
        state = state_with(1)
        peers = wm.PeerList(os.path.join(tempfile.gettempdir(), "wm-no-such-peers.txt"),
                            wm.Faults())
        prober = wm.Prober(state, peers, engine=None, interval=5.0, faults=wm.Faults())
        with self.assertLogs("worker-monitor", "WARNING"):
            prober.round(threading.Event())
        self.assertIsNotNone(state.round_mono)
        self.assertIsNone(state.health())


class HistoryHealthProcess(unittest.TestCase):
    """The real agent on 127.0.0.1, reading a --procfs tree the test controls."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="wm-procfs-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.procfs = FakeProcfs(os.path.join(self.tmp, "proc"))
        self.sysfs = os.path.join(self.tmp, "sys")
        os.makedirs(os.path.join(self.sysfs, "class", "net"))
        self.ticker = Ticker(self.procfs).start()
        self.addCleanup(self.ticker.stop)

    def agent(self, *extra):
        agent = Agent(["--procfs", self.procfs.root, "--sysfs", self.sysfs,
                       "--interval", "0.5", "--probe-interval", "1", "--probe-timeout", "0.5", "--history", "3", *extra])
        agent.start()
        self.addCleanup(agent.stop)
        return agent

    def test_history_over_http(self):
        agent = self.agent()
        agent.wait_for("/healthz", 200)
        deadline_doc = None
        for _ in range(40):
            status, headers, body = agent.get("/history?seconds=100")
            deadline_doc = json.loads(body)
            if len(deadline_doc["samples"]) == 6:
                break
            threading.Event().wait(0.25)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json")
        samples = deadline_doc["samples"]
        self.assertEqual(len(samples), 6)       # 3 s of 0.5 s samples
        stamps = [s["timestamp"] for s in samples]
        self.assertEqual(stamps, sorted(stamps))
        for s in samples:
            self.assertEqual(s["cpu"], 0.25)    # the FakeProcfs's busy share
            self.assertGreater(s["rx"], 0)
        status, _, body = agent.get("/history?seconds=1")
        self.assertEqual((status, len(json.loads(body)["samples"])), (200, 2))
        status, _, body = agent.get("/history?seconds=x")
        self.assertEqual((status, json.loads(body)["status"]), (400, 400))

    def test_frozen_procfs_turns_healthz_503_while_stats_answers(self):
        agent = self.agent()
        agent.wait_for("/healthz", 200)
        self.ticker.stop()
        status, _, body = agent.wait_for("/healthz", 503, timeout=6)
        self.assertIn("advancing CPU counters", json.loads(body)["reason"])
        status, _, body = agent.get("/stats")
        self.assertEqual(status, 200)
        self.assertIsNone(json.loads(body)["cpu"])
        # It recovers when the counters move again.
        self.addCleanup(Ticker(self.procfs).start().stop)
        agent.wait_for("/healthz", 200, timeout=6)

    def test_vanished_procfs_turns_healthz_503_while_stats_answers(self):
        agent = self.agent()
        agent.wait_for("/healthz", 200)
        self.ticker.stop()
        shutil.rmtree(self.procfs.root)
        status, _, body = agent.wait_for("/healthz", 503, timeout=6)
        self.assertEqual(json.loads(body)["status"], "unhealthy")
        status, _, body = agent.get("/stats")
        self.assertEqual(status, 200)
        doc = json.loads(body)
        self.assertEqual((doc["cpu"], doc["mem"]), (None, None))
        self.assertIn("cannot read", agent.log())


if __name__ == "__main__":
    unittest.main()
