"""The agent as a real process: known-rate /proc trees, real ping, peers.txt, CLI, signals."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

from harness import AGENT, Agent, FakeHost, free_port, write_script, worker_monitor as wm

PING = shutil.which("ping")


class KnownRates(unittest.TestCase):
    """A --procfs/--sysfs tree whose counters advance at known rates gives those rates."""

    def setUp(self):
        self.host = FakeHost(busy_share=0.25, rx_bps=10_000_000, tx_bps=2_500_000,
                             mem_total=8_000_000, mem_available=2_000_000)
        self.addCleanup(self.host.close)
        self.agent = Agent("--procfs", self.host.procfs, "--sysfs", self.host.sysfs,
                           "--node-name", "node-under-test", peers="")
        self.addCleanup(self.agent.close)
        self.agent.wait_ready()

    def test_exact_values(self):
        time.sleep(1.2)
        for _ in range(3):
            doc = self.agent.stats()
            self.assertEqual(doc["nodeName"], "node-under-test")
            self.assertAlmostEqual(doc["timestamp"], time.time(), delta=3)
            self.assertIsInstance(doc["timestamp"], int)
            self.assertEqual(doc["cpu"], 0.25)
            self.assertEqual(doc["mem"], 0.75)
            # eth0 only: br0 and veth0 carry the same bytes, lo five times as many.
            # Rates divide by the agent's own measured interval; the tree is
            # rewritten every 5 ms, so allow 2 %.
            self.assertAlmostEqual(doc["net"]["rx"], 80.0, delta=1.6)
            self.assertAlmostEqual(doc["net"]["tx"], 20.0, delta=0.4)
            self.assertEqual(doc["latency"], {})
            time.sleep(1.0)

    def test_broken_file_nulls_one_value_everything_else_goes_on(self):
        self.host.missing.add("meminfo")
        doc = self.agent.wait_for(lambda d: d["mem"] is None, what="mem null")
        self.assertEqual(doc["cpu"], 0.25)
        self.assertAlmostEqual(doc["net"]["rx"], 80.0, delta=1.6)
        time.sleep(2.5)
        self.host.missing.discard("meminfo")
        doc = self.agent.wait_for(lambda d: d["mem"] == 0.75, what="mem back")
        log = self.agent.log()
        self.assertEqual(log.count("cannot read"), 1, log)
        self.assertIn("meminfo", log)
        self.assertEqual(log.count("readable again"), 1, log)

    def test_missing_net_dev_nulls_rates(self):
        self.host.missing.add("net/dev")
        doc = self.agent.wait_for(lambda d: d["net"]["rx"] is None, what="rx null")
        self.assertEqual(doc["net"], {"rx": None, "tx": None})
        self.assertEqual(doc["cpu"], 0.25)

    def test_stalled_counters_give_zero_rates_and_null_cpu(self):
        self.host.frozen = True
        self.agent.wait_for(lambda d: d["cpu"] is None, what="cpu null")
        # The interval in which the tree froze may still have seen the last
        # write of net/dev (it is written after stat); the next one sees none.
        time.sleep(1.1)
        doc = self.agent.stats()
        self.assertIsNone(doc["cpu"])
        self.assertEqual(doc["net"], {"rx": 0.0, "tx": 0.0})
        self.assertEqual(doc["mem"], 0.75)
        time.sleep(2)
        self.host.frozen = False
        self.agent.wait_for(lambda d: d["cpu"] == 0.25, what="cpu back")
        log = self.agent.log()
        self.assertEqual(log.count("did not advance: cpu is null"), 1, log)
        self.assertEqual(log.count("advances again"), 1, log)


@unittest.skipUnless(PING, "needs the ping program (apt-get install iputils-ping)")
class RealPing(unittest.TestCase):
    def test_latency_to_loopback(self):
        with Agent(peers="127.0.0.1\n::1\n") as agent:
            agent.wait_ready()
            doc = agent.wait_for(lambda d: d["latency"]["127.0.0.1"] is not None, timeout=8,
                                 what="latency to 127.0.0.1")
            self.assertEqual(list(doc["latency"]), ["127.0.0.1", "::1"])
            self.assertGreater(doc["latency"]["127.0.0.1"], 0)
            self.assertLess(doc["latency"]["127.0.0.1"], 100)
            if socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"):
                self.assertIsInstance(doc["latency"]["::1"], float)

    def test_first_latency_within_two_seconds_of_start(self):
        with Agent(peers="127.0.0.1\n") as agent:
            t0 = time.monotonic()
            agent.wait_ready()
            agent.wait_for(lambda d: d["latency"]["127.0.0.1"] is not None, timeout=5)
            self.assertLess(time.monotonic() - t0, 4)


class ProbeFaults(unittest.TestCase):
    """Stand-ins for ping that hang, fail or are missing, next to the real one."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="wm-ping-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.calls = os.path.join(self.dir, "calls")

    def fake_ping(self, body):
        # Every call is logged with its time and arguments.
        return write_script(self.dir, "ping", 'echo "$(date +%%s.%%N) LC_ALL=$LC_ALL $*" >> %s\n%s'
                            % (self.calls, body))

    def calls_for(self, peer):
        try:
            with open(self.calls) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        return [float(l.split()[0]) for l in lines if l.split()[-1] == peer]

    @unittest.skipUnless(PING, "needs the ping program")
    def test_hung_peer_is_killed_and_never_delays_others(self):
        # GNU sleep adds up its arguments: "30 0PID" sleeps 30 s and makes the
        # hung child findable by its command line.
        ping = self.fake_ping('for last; do :; done\n'
                              'if [ "$last" = 127.0.0.2 ]; then exec sleep 30 0%d; fi\n'
                              'exec %s "$@"\n' % (os.getpid(), PING))
        with Agent("--ping", ping, "--probe-interval", "2", "--probe-timeout", "1",
                   peers="127.0.0.2\n127.0.0.1\n") as agent:
            agent.wait_ready()
            time.sleep(7.5)
            doc = agent.stats()
            self.assertIsNone(doc["latency"]["127.0.0.2"])
            self.assertIsInstance(doc["latency"]["127.0.0.1"], float)
            live, dead = self.calls_for("127.0.0.1"), self.calls_for("127.0.0.2")
            # One probe per peer per round, rounds on a 2 s grid.
            self.assertGreaterEqual(len(live), 4)
            self.assertLessEqual(len(live), 5)
            self.assertEqual(len(dead), len(live))
            gaps = [b - a for a, b in zip(live, live[1:])]
            for gap in gaps:
                self.assertAlmostEqual(gap, 2.0, delta=0.3)
            # Killed at timeout + margin: at most the current round's sleep is left.
            out = subprocess.run(["pgrep", "-f", "sleep 30 0%d" % os.getpid()],
                                 capture_output=True, text=True).stdout.split()
            self.assertLessEqual(len(out), 1)
            self.assertIn("peer 127.0.0.2: timeout", agent.log())
            self.assertEqual(agent.log().count("peer 127.0.0.2"), 1)

    def test_ping_missing_is_logged_once(self):
        # A program not on PATH is a fault at run time (a path naming no
        # executable is a usage error, exit 2).
        with Agent("--ping", "no-such-ping-program", "--probe-interval", "0.5", "--probe-timeout", "0.3",
                   peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            time.sleep(2.5)
            log = agent.log()
            self.assertEqual(log.count("no-such-ping-program"), 1, log)
            if "probing with the icmp engine" in log:
                # Issue 4: without ping the agent sends echo requests itself.
                self.assertIsInstance(agent.stats()["latency"]["127.0.0.1"], float)
            else:
                self.assertEqual(agent.stats()["latency"], {"127.0.0.1": None})
            self.assertEqual(agent.proc.poll(), None)

    def test_not_permitted_is_logged_once(self):
        ping = self.fake_ping('echo "ping: socket: Operation not permitted" >&2\nexit 2\n')
        with Agent("--ping", ping, "--probe-interval", "0.5", "--probe-timeout", "0.3", peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            time.sleep(3)
            self.assertGreaterEqual(len(self.calls_for("127.0.0.1")), 4)
            self.assertEqual(agent.stats()["latency"], {"127.0.0.1": None})
            log = agent.log()
            self.assertEqual(len([l for l in log.splitlines() if "not permitted" in l]), 1, log)
            self.assertNotIn("peer 127.0.0.1", log)

    def test_run_with_c_locale_and_safe_arguments(self):
        ping = self.fake_ping(
            'for last; do :; done\n'
            'if [ "$LC_ALL" = C ]; then echo "64 bytes from $last: icmp_seq=1 ttl=64 time=3.25 ms"\n'
            'else echo "64 比特，来自 $last: icmp_seq=1 ttl=64 时间=37.6 毫秒"; fi\n')
        with Agent("--ping", ping, "--probe-timeout", "2", peers="127.0.0.1\n::1\nlocalhost\n") as agent:
            agent.wait_ready()
            doc = agent.wait_for(lambda d: None not in d["latency"].values(), timeout=8)
            self.assertEqual(doc["latency"], {"127.0.0.1": 3.25, "::1": 3.25, "localhost": 3.25})
            with open(self.calls) as f:
                lines = f.read().splitlines()
            args = {l.split()[-1]: l.split(None, 2)[2] for l in lines}
            self.assertEqual(args["127.0.0.1"], "-n -c1 -W2 127.0.0.1")
            self.assertEqual(args["::1"], "-n -c1 -W2 -6 ::1")
            self.assertEqual(args["localhost"], "-n -c1 -W2 localhost")

    def test_wrapper_children_are_killed_and_a_held_pipe_does_not_hide_the_reply(self):
        marker = "77%d" % os.getpid()
        # A wrapper that leaves a child holding its stdout: the reply is
        # still read, and the child dies with the probe's process group.
        ping = self.fake_ping('for last; do :; done\n'
                              '(exec sleep %s) &\n'
                              'echo "64 bytes from $last: icmp_seq=1 ttl=64 time=0.050 ms"\n' % marker)
        hang = write_script(self.dir, "hang", "exec sleep 1%s\n" % marker)
        with Agent("--ping", ping, "--probe-interval", "1", "--probe-timeout", "0.5",
                   peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            doc = agent.wait_for(lambda d: d["latency"]["127.0.0.1"] is not None, timeout=5)
            self.assertEqual(doc["latency"]["127.0.0.1"], 0.05)
            time.sleep(2.5)
            self.assertEqual(agent.stats()["latency"]["127.0.0.1"], 0.05)
            self.assertNotIn("timeout", agent.log())
        with Agent("--ping", hang, "--probe-interval", "1", "--probe-timeout", "0.5",
                   peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            time.sleep(3)
        time.sleep(0.3)
        left = subprocess.run(["pgrep", "-f", "sleep 1?%s" % marker], capture_output=True,
                              text=True).stdout.split()
        self.assertEqual(left, [])

    def test_rtt_past_timeout_is_null(self):
        ping = self.fake_ping('for last; do :; done\n'
                              'echo "64 bytes from $last: icmp_seq=1 ttl=64 time=1500 ms"\n')
        with Agent("--ping", ping, "--probe-timeout", "1", peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            agent.wait_for(lambda d: len(self.calls_for("127.0.0.1")) >= 1, timeout=5)
            time.sleep(0.5)
            self.assertEqual(agent.stats()["latency"], {"127.0.0.1": None})


class PeersFile(unittest.TestCase):
    def setUp(self):
        # A stand-in for ping that answers every peer in 1.5 ms.
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.ping = write_script(d, "ping", 'for last; do :; done\n'
                                 'echo "64 bytes from $last: icmp_seq=1 ttl=64 time=1.5 ms"\n')

    def test_bad_lines_warned_by_number_good_ones_probed(self):
        text = "\ufeff127.0.0.1\r\n-c100 127.0.0.1\r\n\r\nnode a\r\n127.0.0.3 # ok\r\n$(id)\r\n"
        with Agent("--ping", self.ping, peers=text) as agent:
            agent.wait_ready()
            doc = agent.wait_for(lambda d: d["latency"].get("127.0.0.1") is not None)
            self.assertEqual(doc["latency"], {"127.0.0.1": 1.5, "127.0.0.3": 1.5})
            log = agent.log()
            for number in (2, 4, 6):
                self.assertIn("peers.txt:%d: skipped" % number, log)
            self.assertEqual(log.count("skipped"), 3)

    def test_change_is_picked_up_next_round_and_on_sighup(self):
        with Agent("--ping", self.ping, "--probe-interval", "1", "--probe-timeout", "0.5",
                   peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            agent.wait_for(lambda d: d["latency"] == {"127.0.0.1": 1.5})
            with open(agent.peers, "w") as f:
                f.write("127.0.0.2\n127.0.0.1\n")
            agent.wait_for(lambda d: d["latency"] == {"127.0.0.2": 1.5, "127.0.0.1": 1.5},
                           timeout=5, what="new peer probed")
        with Agent("--ping", self.ping, "--probe-interval", "60",
                   peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            agent.wait_for(lambda d: d["latency"] == {"127.0.0.1": 1.5})
            with open(agent.peers, "w") as f:
                f.write("127.0.0.4\n127.0.0.1\n")
            agent.proc.send_signal(signal.SIGHUP)
            # The next round is a minute away: only SIGHUP can show the new list.
            doc = agent.wait_for(lambda d: list(d["latency"]) == ["127.0.0.4", "127.0.0.1"],
                                 timeout=3, what="SIGHUP re-read")
            self.assertEqual(doc["latency"], {"127.0.0.4": None, "127.0.0.1": 1.5})
            latency = json.loads(agent.get("/latency")[2])["peers"]
            self.assertEqual(list(latency), ["127.0.0.4", "127.0.0.1"])
            self.assertEqual(latency["127.0.0.4"]["sent"], 0)

    def test_unreadable_file_keeps_last_good_list(self):
        with Agent("--ping", self.ping, "--probe-interval", "0.5", "--probe-timeout", "0.3",
                   peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            agent.wait_for(lambda d: d["latency"] == {"127.0.0.1": 1.5})
            os.unlink(agent.peers)
            os.mkdir(agent.peers)           # now unreadable as a file, even for root
            time.sleep(2)
            self.assertEqual(agent.stats()["latency"], {"127.0.0.1": 1.5})
            os.rmdir(agent.peers)
            time.sleep(1.5)
            self.assertEqual(agent.stats()["latency"], {"127.0.0.1": 1.5})
            log = agent.log()
            self.assertEqual(log.count("keeping 1 peers"), 1, log)
            with open(agent.peers, "w") as f:
                f.write("127.0.0.5\n")
            agent.wait_for(lambda d: d["latency"] == {"127.0.0.5": 1.5}, timeout=4)

    def test_fifo_device_huge_and_binary_files_are_refused_not_read(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        fifo = os.path.join(d, "fifo")
        os.mkfifo(fifo)
        huge = os.path.join(d, "huge")
        with open(huge, "w") as f:
            f.write("127.0.0.1\n" * 200_000)
        binary = os.path.join(d, "binary")
        with open(binary, "wb") as f:
            f.write(b"127.0.0.1\n\x00\x01\x02ELF\n")
        for path, reason in [(fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                             (huge, "larger than"), (binary, "binary")]:
            agent = Agent("--peers", path)
            try:
                agent.wait_ready(timeout=5)
                self.assertEqual(agent.stats()["latency"], {})
                log = agent.log()
                self.assertIn(reason, log)
                self.assertLess(len(log), 2000)
                status, took = agent.stop()
                self.assertEqual(status, 0)
            finally:
                agent.close()

    def test_many_bad_lines_give_bounded_short_warnings(self):
        text = "".join("-bad-%d %s\n" % (i, "x" * 1000) for i in range(500)) + "127.0.0.1\n"
        with Agent("--probe-interval", "60", peers=text) as agent:
            agent.wait_ready()
            self.assertEqual(list(agent.stats()["latency"]), ["127.0.0.1"])
            log = agent.log()
            self.assertEqual(log.count(": skipped: "), 20)
            self.assertIn("480 more lines skipped", log)
            self.assertLess(max(len(l) for l in log.splitlines()), 300)

    def test_missing_file_means_no_peers_one_warning(self):
        with Agent("--probe-interval", "0.5", "--probe-timeout", "0.3") as agent:     # no peers file written
            agent.wait_ready()
            time.sleep(1.5)
            self.assertEqual(agent.stats()["latency"], {})
            self.assertEqual(agent.log().count("not found"), 1, agent.log())


class CommandLine(unittest.TestCase):
    def run_agent(self, *args, env=None):
        return subprocess.run([sys.executable, AGENT] + list(args), capture_output=True,
                              text=True, timeout=10, stdin=subprocess.DEVNULL,
                              env=dict(os.environ, **(env or {})))

    def test_bad_options_exit_2_with_one_line(self):
        port = free_port()
        cases = [["--port", "http"], ["--port", "70000"], ["--port", "-1"],
                 ["--interval", "0"], ["--interval", "-1"], ["--interval", "nan"],
                 ["--interval", "inf"], ["--probe-interval", "x"], ["--probe-timeout", "0"],
                 ["--bind", "localhost"], ["--bind", "1.2.3"], ["--log-level", "loud"],
                 ["--procfs", "/no/such/dir"], ["--sysfs", "/no/such/dir"],
                 ["--probe", "carrier-pigeon"], ["--bogus"], ["extra"],
                 ["--probe-timeout", "5"], ["--interval", "1e-9"], ["--interval", "0.001"],
                 ["--interval", "1e9"], ["--bind", "::1%lo"], ["--port", " 80"],
                 ["--port", "\u0668\u0660\u0668\u0660"], ["--port", "0x10"], ["--ping", ""],
                 ["--ping", "/tmp"], ["--ping", "/no/such/ping"], ["--node-name", "a\x01b"],
                 ["--node-name", ""], ["--history", "0"]]
        for case in cases:
            r = self.run_agent("--port", str(port), *case)
            self.assertEqual(r.returncode, 2, (case, r.stderr))
            self.assertEqual(r.stdout, "")
            self.assertEqual(len(r.stderr.splitlines()), 1, (case, r.stderr))
            self.assertIn("error:", r.stderr)

    def test_version_and_help(self):
        r = self.run_agent("--version")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "worker-monitor " + wm.__version__))
        r = self.run_agent("--help")
        self.assertEqual(r.returncode, 0)
        for default in ("8080", "0.0.0.0", "peers.txt", "/proc", "/sys", "info"):
            self.assertIn(default, r.stdout)
        for option in ("--port", "--bind", "--peers", "--interval", "--probe-interval",
                       "--probe-timeout", "--ping", "--probe", "--node-name", "--procfs",
                       "--sysfs", "--log-level", "--version"):
            self.assertIn(option, r.stdout)

    def test_port_taken(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            r = self.run_agent("--bind", "127.0.0.1", "--port", str(port))
        self.assertEqual(r.returncode, 1)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
        self.assertIn("cannot listen on 127.0.0.1 port %d: Address already in use" % port,
                      r.stderr)

    def test_node_name_from_environment_then_flag(self):
        with Agent(env={"NODE_NAME": "from-env"}, peers="") as agent:
            self.assertEqual(agent.wait_ready().stats()["nodeName"], "from-env")
        with Agent("--node-name", "from-flag", env={"NODE_NAME": "from-env"}, peers="") as agent:
            self.assertEqual(agent.wait_ready().stats()["nodeName"], "from-flag")
        with Agent(env={"NODE_NAME": ""}, peers="") as agent:
            self.assertEqual(agent.wait_ready().stats()["nodeName"], socket.gethostname())

    def test_503_with_retry_after_before_first_interval(self):
        with Agent("--interval", "3", peers="") as agent:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    status, headers, body = agent.get("/stats", timeout=1)
                    break
                except OSError:
                    time.sleep(0.02)
            self.assertEqual(status, 503)
            self.assertEqual(headers["Retry-After"], "1")
            self.assertEqual(json.loads(body)["error"], "no sample yet")
            agent.wait_ready(timeout=6)

    @unittest.skipUnless(socket.has_ipv6 and os.path.exists("/proc/net/if_inet6"), "no IPv6")
    def test_ipv6_bind(self):
        port = free_port()
        p = subprocess.Popen([sys.executable, AGENT, "--bind", "::1", "--port", str(port),
                              "--peers", "/dev/null"], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("::1", port), timeout=1) as s:
                        s.sendall(b"GET /stats HTTP/1.0\r\n\r\n")
                        data = s.recv(4096)
                    if b" 200 " in data.split(b"\r\n")[0]:
                        break
                except OSError:
                    pass
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.1)
        finally:
            p.terminate()
            self.assertEqual(p.wait(5), 0)
            p.stderr.close()


class Signals(unittest.TestCase):
    def test_sighup_storm_then_sigterm(self):
        # Signal handlers that took a lock deadlocked under a burst of SIGHUPs.
        with Agent("--probe-interval", "2", peers="127.0.0.1\n") as agent:
            agent.wait_ready()
            for _ in range(2000):
                agent.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            self.assertEqual(agent.get("/stats")[0], 200)
            with open(agent.peers, "w") as f:
                f.write("127.0.0.9\n")
            agent.proc.send_signal(signal.SIGHUP)
            agent.wait_for(lambda d: list(d["latency"]) == ["127.0.0.9"], timeout=3,
                           what="re-read after the storm")
            status, took = agent.stop()
            self.assertEqual(status, 0, agent.log())
            self.assertLess(took, 2.0)
            self.assertNotIn("Traceback", agent.log())

    def test_sigterm_and_sigint_exit_0_within_2s_even_mid_probe(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        ping = write_script(d, "ping", "exec sleep 20\n")
        for sig in (signal.SIGTERM, signal.SIGINT):
            with Agent("--ping", ping, "--probe-timeout", "4", peers="127.0.0.1\n") as agent:
                agent.wait_ready()
                time.sleep(0.5)                 # a probe is in flight now
                status, took = agent.stop(sig)
                self.assertEqual(status, 0, agent.log())
                self.assertLess(took, 2.0)
                self.assertNotIn("Traceback", agent.log())

    def test_sd_notify_ready_watchdog_stopping(self):
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.settimeout(5)
        with Agent(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, peers="") as agent:
            messages = [sock.recv(4096).decode() for _ in range(3)]
            self.assertTrue(messages[0].startswith("READY=1"), messages)
            self.assertEqual(agent.get("/stats")[0], 200)   # ready means serving
            self.assertEqual(messages[1:], ["WATCHDOG=1", "WATCHDOG=1"])
            agent.stop()
            rest = []
            while True:
                msg = sock.recv(4096).decode()
                rest.append(msg)
                if msg != "WATCHDOG=1":
                    break
            self.assertEqual(rest[-1], "STOPPING=1")

    def test_no_notify_socket_is_a_no_op(self):
        from unittest import mock
        with mock.patch.dict(os.environ):
            os.environ.pop("NOTIFY_SOCKET", None)
            self.assertFalse(wm.sd_notify("READY=1"))
            os.environ["NOTIFY_SOCKET"] = "relative/path"     # not a socket address
            self.assertFalse(wm.sd_notify("READY=1"))
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        path = os.path.join(d, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            with mock.patch.dict(os.environ, {"NOTIFY_SOCKET": path}):
                self.assertTrue(wm.sd_notify("STATUS=x"))
            self.assertEqual(sock.recv(64), b"STATUS=x")


class OldestPython(unittest.TestCase):
    """The product runs on Python 3.8 (CI also checks with vermin)."""

    def test_runs_on_python_3_8(self):
        candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3"))) + \
            [p for p in (shutil.which("python3.8"),) if p]
        if not candidates:
            self.skipTest("no Python 3.8 interpreter here")
        port = free_port()
        p = subprocess.Popen([candidates[0], AGENT, "--bind", "127.0.0.1", "--port", str(port),
                              "--peers", "/dev/null"], stderr=subprocess.PIPE)
        try:
            import urllib.request
            deadline = time.monotonic() + 10
            while True:
                try:
                    doc = json.loads(urllib.request.urlopen(
                        "http://127.0.0.1:%d/stats" % port, timeout=1).read())
                    break
                except OSError:
                    self.assertIsNone(p.poll(), p.stderr.read() if p.poll() is not None else "")
                    self.assertLess(time.monotonic(), deadline)
                    time.sleep(0.1)
            self.assertIsInstance(doc["cpu"], float)
        finally:
            p.terminate()
            self.assertEqual(p.wait(5), 0)
            p.stderr.close()


if __name__ == "__main__":
    unittest.main()
