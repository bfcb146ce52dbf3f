"""Shared helpers for the tests: fixtures, a fake /proc tree, the agent as a real process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
AGENT = os.path.join(ROOT, "worker_monitor.py")
FIXTURES = os.path.join(TESTS, "fixtures")

sys.path.insert(0, ROOT)
import worker_monitor  # noqa: E402  (the module under test, from the checkout)


def fixture(name):
    with open(os.path.join(FIXTURES, name), encoding="utf-8") as f:
        return f.read()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_atomic(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def net_dev_text(counters):
    """A /proc/net/dev text for {name: (rx_bytes, tx_bytes)}, laid out as Linux 6.x prints it."""
    lines = [
        "Inter-|   Receive                                                |  Transmit",
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets "
        "errs drop fifo colls carrier compressed",
    ]
    for name, (rx, tx) in counters.items():
        lines.append("%6s: %8d %7d    0    0    0     0          0         0 %8d %7d    0    0"
                     "    0     0       0          0" % (name, rx, rx // 1000, tx, tx // 1000))
    return "\n".join(lines) + "\n"


def stat_text(user, system, idle, iowait=0):
    """A /proc/stat text with the given aggregate ticks (two CPUs, the rest of the file real)."""
    return ("cpu  %d 0 %d %d %d 0 0 0 0 0\n"
            "cpu0 %d 0 %d %d %d 0 0 0 0 0\n"
            "cpu1 0 0 0 0 0 0 0 0 0 0\n"
            "intr 0\nctxt 0\nbtime 1700000000\nprocesses 1\nprocs_running 1\n"
            "procs_blocked 0\nsoftirq 0 0 0 0 0 0 0 0 0 0 0\n") % (
                user, system, idle, iowait, user, system, idle, iowait)


def meminfo_text(total_kb, available_kb):
    real = fixture("proc_meminfo_linux_6.18.txt").splitlines()
    out = []
    for line in real:
        if line.startswith("MemTotal:"):
            line = "MemTotal:       %d kB" % total_kb
        elif line.startswith("MemAvailable:"):
            line = "MemAvailable:   %d kB" % available_kb
        out.append(line)
    return "\n".join(out) + "\n"


class FakeHost:
    """A --procfs/--sysfs tree whose counters advance at known rates, rewritten every 5 ms.

    cpu: busy_share of every tick is user, the rest idle; rx/tx: bytes per second on
    the physical interface eth0; br0 and veth0 (virtual) carry the same traffic and
    must not be counted.
    """

    def __init__(self, busy_share=0.25, rx_bps=10_000_000, tx_bps=2_500_000,
                 mem_total=8_000_000, mem_available=2_000_000):
        self.dir = tempfile.mkdtemp(prefix="wm-host-")
        self.procfs = os.path.join(self.dir, "proc")
        self.sysfs = os.path.join(self.dir, "sys")
        for name in ("eth0", "br0", "veth0", "lo"):
            os.makedirs(os.path.join(self.sysfs, "class", "net", name))
        os.makedirs(os.path.join(self.sysfs, "class", "net", "eth0", "device"))
        self.busy_share, self.rx_bps, self.tx_bps = busy_share, rx_bps, tx_bps
        self.mem = (mem_total, mem_available)
        self.frozen = False
        self.missing = set()        # files to delete instead of writing: "stat", "meminfo", "net/dev"
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self.write()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def write(self):
        t = time.monotonic() - self._t0
        ticks = int(t * 1_000_000) + 1_000_000
        user = int(ticks * self.busy_share)
        rx, tx = int(t * self.rx_bps) + 10 ** 9, int(t * self.tx_bps) + 10 ** 9
        files = {
            "stat": stat_text(user, 0, ticks - user),
            "meminfo": meminfo_text(*self.mem),
            "net/dev": net_dev_text({"lo": (5 * rx, 5 * tx), "eth0": (rx, tx),
                                     "br0": (rx, tx), "veth0": (rx, tx)}),
        }
        for name, text in files.items():
            path = os.path.join(self.procfs, name)
            if name in self.missing:
                if os.path.exists(path):
                    os.unlink(path)
            else:
                write_atomic(path, text)

    def _run(self):
        while not self._stop.wait(0.005):
            if not self.frozen:
                self.write()

    def close(self):
        self._stop.set()
        self._thread.join()
        shutil.rmtree(self.dir, ignore_errors=True)


class Agent:
    """worker_monitor.py as a real process on 127.0.0.1 and a free port."""

    def __init__(self, *args, peers=None, env=None, port=None):
        self.dir = tempfile.mkdtemp(prefix="wm-agent-")
        self.port = port or free_port()
        self.peers = os.path.join(self.dir, "peers.txt")
        if peers is not None:
            with open(self.peers, "w") as f:
                f.write(peers)
        argv = [sys.executable, AGENT, "--bind", "127.0.0.1", "--port", str(self.port),
                "--peers", self.peers] + list(args)
        self.stderr_path = os.path.join(self.dir, "stderr")
        self._stderr = open(self.stderr_path, "wb")
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._stderr, env=full_env)

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def get(self, path, timeout=5):
        """(status, headers, body bytes) of GET path."""
        try:
            with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def stats(self):
        status, _, body = self.get("/stats")
        assert status == 200, (status, body)
        return json.loads(body)

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("agent exited %s: %s" % (self.proc.returncode, self.log()))
            try:
                if self.get("/stats", timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("agent not ready in %ss: %s" % (timeout, self.log()))

    def wait_for(self, predicate, timeout=15, what="condition"):
        """Poll /stats until predicate(stats) is true; return those stats."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.stats()
            if predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError("%s not met in %ss; last /stats %s; log:\n%s" % (
            what, timeout, last, self.log()))

    def log(self):
        self._stderr.flush()
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stop(self, sig=None):
        """Stop the agent with SIGTERM (or sig); return (exit status, seconds taken)."""
        import signal
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None, time.monotonic() - t0
            return self.proc.returncode, time.monotonic() - t0
        return self.proc.returncode, 0.0

    def close(self):
        self.stop()
        self._stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_script(directory, name, body):
    """An executable shell script, e.g. a stand-in for ping."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path
