"""GET /metrics: text format, values from the /stats snapshot, promtool, a real Prometheus."""

import builtins
import sys
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request

from live_agent import Agent, free_port

import worker_monitor as wm

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
FAMILIES = (
    "cpu_usage_ratio", "memory_usage_ratio",
    "network_receive_bytes_per_second", "network_transmit_bytes_per_second",
    "network_receive_bytes_total", "network_transmit_bytes_total",
    "peer_rtt_seconds", "peer_up", "peer_probes_sent_total", "peer_probes_answered_total",
    "last_sample_timestamp_seconds", "node_info", "build_info")
# One sample line of the text format: name, optional labels, value (no timestamps).
SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def unescape(value):
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_text(text):
    """{(name, ((label, value), ...)): float} and {name: (type, help)} of a text body."""
    samples, meta = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            meta.setdefault(name, [None, None])[1] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            meta.setdefault(name, [None, None])[0] = kind
        elif line:
            m = SAMPLE_RE.match(line)
            assert m, "not a sample line: %r" % line
            labels = tuple((k, unescape(v)) for k, v, _ in LABEL_RE.findall(m.group(3) or ""))
            samples[(m.group(1), labels)] = float(m.group(4))
    return samples, {k: tuple(v) for k, v in meta.items()}


def snapshot_state():
    state = wm.State('node "a"\\b\nc')
    state.set_peers(["127.0.0.1", "::1", "127.0.0.2"])
    state.set_sample(1712640000, 0.35, 0.72, 5.8, 3.2, net_total=(123456789012, 42))
    state.set_latency(["127.0.0.1", "::1", "127.0.0.2"],
                      {"127.0.0.1": 0.8, "::1": None, "127.0.0.2": 12.345},
                      probes={"127.0.0.1": (10, 10), "::1": (10, 3), "127.0.0.2": (1, 1)})
    return state


class MetricsRender(unittest.TestCase):
    def setUp(self):
        self.state = snapshot_state()
        status, self.headers, body = wm.render(self.state, "GET", "/metrics")
        self.assertEqual(status, 200)
        self.text = body.decode("utf-8")
        self.samples, self.meta = parse_text(self.text)

    def test_content_type(self):
        self.assertIn(("Content-Type", "text/plain; version=0.0.4; charset=utf-8"), self.headers)

    def test_every_family_has_help_and_type(self):
        for family in FAMILIES:
            kind, help_text = self.meta["worker_monitor_" + family]
            self.assertEqual(kind, "counter" if family.endswith("_total") else "gauge", family)
            self.assertTrue(help_text)
        self.assertEqual(len(self.meta), len(FAMILIES))

    def test_values_are_the_stats_snapshot_in_base_units(self):
        stats = json.loads(wm.render(self.state, "GET", "/stats")[2])
        s = self.samples
        self.assertEqual(s[("worker_monitor_cpu_usage_ratio", ())], stats["cpu"])
        self.assertEqual(s[("worker_monitor_memory_usage_ratio", ())], stats["mem"])
        # Mbit/s (10^6 bit/s) -> bytes/s
        self.assertEqual(s[("worker_monitor_network_receive_bytes_per_second", ())], 725000.0)
        self.assertEqual(s[("worker_monitor_network_transmit_bytes_per_second", ())], 400000.0)
        self.assertEqual(s[("worker_monitor_network_receive_bytes_total", ())], 123456789012)
        self.assertEqual(s[("worker_monitor_network_transmit_bytes_total", ())], 42)
        self.assertEqual(s[("worker_monitor_last_sample_timestamp_seconds", ())], 1712640000)
        peer = (("peer", "127.0.0.1"),)
        self.assertEqual(s[("worker_monitor_peer_rtt_seconds", peer)], 0.0008)
        self.assertEqual(s[("worker_monitor_peer_rtt_seconds", (("peer", "127.0.0.2"),))],
                         0.012345)
        self.assertEqual(s[("worker_monitor_peer_up", peer)], 1)
        self.assertEqual(s[("worker_monitor_peer_up", (("peer", "::1"),))], 0)
        self.assertEqual(s[("worker_monitor_peer_probes_sent_total", (("peer", "::1"),))], 10)
        self.assertEqual(s[("worker_monitor_peer_probes_answered_total", (("peer", "::1"),))], 3)
        self.assertEqual(s[("worker_monitor_build_info", (("version", wm.__version__),
                                                          ("python", "%d.%d.%d" % sys.version_info[:3])))], 1)

    def test_null_is_absent_not_nan(self):
        self.assertNotIn(("worker_monitor_peer_rtt_seconds", (("peer", "::1"),)), self.samples)
        self.assertNotIn("NaN", self.text)

    def test_label_values_escaped(self):
        self.assertIn('worker_monitor_node_info{node="node \\"a\\"\\\\b\\nc"} 1\n', self.text)
        self.assertEqual(self.samples[("worker_monitor_node_info",
                                       (("node", 'node "a"\\b\nc'),))], 1)

    def test_families_are_contiguous_and_end_with_newline(self):
        self.assertTrue(self.text.endswith("\n"))
        seen, last = [], None
        for line in self.text.splitlines():
            name = line.split()[2] if line.startswith("#") else SAMPLE_RE.match(line).group(1)
            if name != last:
                self.assertNotIn(name, seen)
                seen.append(name)
                last = name

    def test_before_first_sample(self):
        state = wm.State("n")
        status, _, body = wm.render(state, "GET", "/metrics")
        samples, meta = parse_text(body.decode())
        self.assertEqual(status, 200)
        self.assertEqual(len(meta), len(FAMILIES))
        self.assertEqual({name for name, _ in samples},
                         {"worker_monitor_node_info", "worker_monitor_build_info"})

    def test_request_reads_nothing_and_builds_nothing(self):
        """The body is built once per state change; a request only hands it out."""
        real_open = builtins.open

        def no_open(*a, **k):
            raise AssertionError("file opened in the request path: %r" % (a,))

        calls = []
        real_metrics_text = wm.metrics_text
        wm.metrics_text = lambda *a: calls.append(a) or real_metrics_text(*a)
        builtins.open = no_open
        try:
            first = wm.render(self.state, "GET", "/metrics")[2]
            second = wm.render(self.state, "GET", "/metrics")[2]
        finally:
            builtins.open = real_open
            wm.metrics_text = real_metrics_text
        self.assertIs(first, second)
        self.assertEqual(calls, [])

    def test_head(self):
        status, headers, body = wm.render(self.state, "HEAD", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(body)       # the handler sends only the length for HEAD


class Counters(unittest.TestCase):
    """Byte counters carried by the sampler and probe counters kept by the prober."""

    def net_dev(self, rows):
        head = ("Inter-|   Receive |  Transmit\n"
                " face |bytes    packets errs drop fifo frame compressed multicast|bytes\n")
        return head + "".join("%s: %d 0 0 0 0 0 0 0 %d 0 0 0 0 0 0 0\n" % r for r in rows)

    def test_byte_counters_start_at_kernel_sum_and_never_go_down(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        os.makedirs(os.path.join(tmp, "proc", "net"))
        os.makedirs(os.path.join(tmp, "sys", "class", "net"))
        state = wm.State("n")
        sampler = wm.Sampler(state, os.path.join(tmp, "proc"), os.path.join(tmp, "sys"), 1.0,
                             wm.Faults())
        steps = [
            [("eth0", 1000, 10), ("eth1", 500, 5)],
            [("eth0", 1100, 20), ("eth1", 600, 5)],     # first total: the kernel's sum
            [("eth0", 1200, 30)],                       # eth1 gone: +100, +10
            [("eth0", 50, 31), ("eth1", 0, 0)],         # eth0 recreated, eth1 back: 0, +1
            [("eth0", 150, 32), ("eth1", 7, 1)],        # +107, +2
        ]
        totals = []
        for rows in steps:
            with open(os.path.join(tmp, "proc", "net", "dev"), "w") as f:
                f.write(self.net_dev(rows))
            for name, text in (("stat", "cpu 1 0 0 1\n"), ("meminfo", "MemTotal: 1 kB\n")):
                with open(os.path.join(tmp, "proc", name), "w") as f:
                    f.write(text)
            with _nolog():
                sampler.sample()
            totals.append(state._net_total)
        self.assertEqual(totals, [None, (1700, 25), (1800, 35), (1800, 36), (1907, 38)])
        samples, _ = parse_text(state.metrics_body.decode())
        self.assertEqual(samples[("worker_monitor_network_receive_bytes_total", ())], 1907)

    def test_prober_counts_sent_and_answered(self):
        class Engine:
            answers = [{"127.0.0.1": (0.05, None), "127.0.0.2": (None, "no reply")},
                       {"127.0.0.1": (None, "timeout"), "127.0.0.2": (None, "not permitted")},
                       {"127.0.0.1": (0.07, None), "127.0.0.2": (1.5, None)}]

            def probe(self, peers, stop):
                return self.answers.pop(0)

        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "peers.txt")
        with open(path, "w") as f:
            f.write("127.0.0.1\n127.0.0.2\n")
        state = wm.State("n")
        state.set_sample(1, 0.1, 0.1, 0.0, 0.0)
        faults = wm.Faults()
        prober = wm.Prober(state, wm.PeerList(path, faults), Engine(), 5.0, faults)
        with _nolog():
            for _ in range(3):
                prober.round(threading.Event())
        self.assertEqual(prober.probes, {"127.0.0.1": (3, 2), "127.0.0.2": (2, 1)})
        samples, _ = parse_text(state.metrics_body.decode())
        self.assertEqual(samples[("worker_monitor_peer_probes_sent_total",
                                  (("peer", "127.0.0.2"),))], 2)
        self.assertEqual(samples[("worker_monitor_peer_probes_answered_total",
                                  (("peer", "127.0.0.1"),))], 2)
        self.assertEqual(samples[("worker_monitor_peer_rtt_seconds",
                                  (("peer", "127.0.0.2"),))], 0.0015)


class _nolog:
    """Silence the agent's logger for a block."""

    def __enter__(self):
        self.logger = wm.log
        self.level = self.logger.level
        self.logger.setLevel(100)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


@unittest.skipUnless(PROMTOOL, "promtool not installed (Debian package prometheus)")
class Promtool(unittest.TestCase):
    def test_real_metrics_pass_promtool_with_no_findings(self):
        with Agent(["--probe-interval", "1", "--probe-timeout", "0.5"]) as agent:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status, headers, body = agent.get("/metrics")
                if b'peer_rtt_seconds{peer="127.0.0.1"}' in body:
                    break
                time.sleep(0.2)
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        for family in FAMILIES:
            self.assertIn(b"\nworker_monitor_" + family.encode(), body)
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=body,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        self.assertEqual((out.returncode, out.stdout.decode()), (0, ""))

    def test_nulls_and_escaped_labels_pass_promtool(self):
        body = wm.render(snapshot_state(), "GET", "/metrics")[2]
        self.assertIn(b'{peer="::1"} 0', body)
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=body,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        self.assertEqual((out.returncode, out.stdout.decode()), (0, ""))

    def test_promtool_notices_a_broken_body(self):
        """The check above means something: promtool does flag a bad exposition."""
        bad = b"# TYPE worker_monitor_x_seconds counter\nworker_monitor_x_seconds 1\n"
        out = subprocess.run([PROMTOOL, "check", "metrics"], input=bad,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        self.assertTrue(out.returncode != 0 or out.stdout.strip(), out)


@unittest.skipUnless(PROMETHEUS, "prometheus not installed (Debian package prometheus)")
class PrometheusScrape(unittest.TestCase):
    """A real Prometheus on 127.0.0.1 scrapes the agent; PromQL answers with its values."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="wm-prom-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        # Rounds off the sampler's grid, so that the test sees each body the agent serves.
        self.agent = Agent(["--probe-interval", "1.5"]).start()
        self.addCleanup(self.agent.stop)
        self.prom_port = free_port()
        config = os.path.join(self.tmp, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "scrape_configs:\n- job_name: worker-monitor\n"
                    "  static_configs:\n  - targets: ['127.0.0.1:%d']\n" % self.agent.port)
        self.prom_log = open(os.path.join(self.tmp, "prometheus.log"), "wb")
        self.addCleanup(self.prom_log.close)
        self.prom = subprocess.Popen(
            [PROMETHEUS, "--config.file=" + config,
             "--storage.tsdb.path=" + os.path.join(self.tmp, "data"),
             "--web.listen-address=127.0.0.1:%d" % self.prom_port,
             "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self.prom_log, stderr=subprocess.STDOUT,
            cwd=self.tmp)
        self.addCleanup(self._stop_prometheus)

    def _stop_prometheus(self):
        self.prom.terminate()
        try:
            self.prom.wait(10)
        except subprocess.TimeoutExpired:
            self.prom.kill()
            self.prom.wait()

    def query(self, promql, at=None):
        params = {"query": promql}
        if at is not None:
            params["time"] = "%.3f" % at
        url = "http://127.0.0.1:%d/api/v1/query?%s" % (self.prom_port,
                                                       urllib.parse.urlencode(params))
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = json.load(resp)
        self.assertEqual(doc["status"], "success", doc)
        return doc["data"]

    def test_promql_answers_each_family_with_the_agents_values(self):
        # Record every /metrics body the agent serves while Prometheus scrapes it.
        bodies = []
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline:
            body = self.agent.get("/metrics")[2].decode()
            if not bodies or bodies[-1] != body:
                bodies.append(body)
            if not ready:
                try:
                    ready = bool(self.query("worker_monitor_build_info")["result"])
                except (OSError, ValueError):
                    pass
                if ready:
                    stop_at = time.monotonic() + 6
            elif time.monotonic() > stop_at:
                break
            time.sleep(0.05)
        self.assertTrue(ready, "Prometheus never scraped the agent: %s" % self._prom_log())
        at = time.time()
        observed = [parse_text(b)[0] for b in bodies]

        # One PromQL query per family: its raw samples of the last 20 s.
        scrapes = {}
        for family in FAMILIES:
            data = self.query("worker_monitor_%s[20s]" % family, at)
            self.assertEqual(data["resultType"], "matrix")
            self.assertTrue(data["result"], "no series for %s" % family)
            for series in data["result"]:
                metric = dict(series["metric"])
                name = metric.pop("__name__")
                self.assertEqual(metric.pop("job"), "worker-monitor")
                self.assertEqual(metric.pop("instance"), "127.0.0.1:%d" % self.agent.port)
                key = (name, tuple(sorted(metric.items())))
                for ts, value in series["values"]:
                    scrapes.setdefault(ts, {})[key] = float(value)

        # Every scrape Prometheus stored must be exactly one body the agent served.
        normalized = [{(n, tuple(sorted(l))): v for (n, l), v in o.items()} for o in observed]
        matched = [ts for ts, values in scrapes.items() if values in normalized]
        self.assertGreaterEqual(len(matched), 3, "scrapes: %d, matched: %d" % (
            len(scrapes), len(matched)))
        # A body replaced within the 50 ms between two looks may go unseen, once.
        self.assertLessEqual(len(scrapes) - len(matched), 1,
                             "scrapes that match no body the agent served")

        # And an instant query of each family gives the agent's latest values.
        latest = self.query("worker_monitor_peer_up")["result"]
        self.assertEqual([(r["metric"]["peer"], r["value"][1]) for r in latest],
                         [("127.0.0.1", "1")])
        info = self.query("worker_monitor_build_info")["result"][0]["metric"]
        self.assertEqual(info["version"], wm.__version__)

    def _prom_log(self):
        self.prom_log.flush()
        with open(self.prom_log.name, errors="replace") as f:
            return f.read()[-2000:]


if __name__ == "__main__":
    unittest.main()
