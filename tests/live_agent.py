"""Run worker_monitor.py as a real process on 127.0.0.1 for the tests (not a test module)."""

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "worker_monitor.py")
sys.path.insert(0, ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, timeout=5.0):
    """(status, {header: value}, body) of one GET to the agent on 127.0.0.1."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def loopback_peers(path, lines=("127.0.0.1",)):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


class Agent:
    """worker_monitor.py in its own process; argv[0] may be replaced (setpriv, …)."""

    def __init__(self, args=(), env=None, prefix=(), argv=None, port=None):
        self.port = port or free_port()
        self.tmp = tempfile.mkdtemp(prefix="wm-agent-")
        if argv is None:
            if "--peers" not in args:
                args = list(args) + ["--peers", loopback_peers(os.path.join(self.tmp, "peers.txt"))]
            argv = [sys.executable, SCRIPT, *args]
        self.argv = list(prefix) + list(argv) + ["--bind", "127.0.0.1", "--port", str(self.port)]
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        self.stderr_path = os.path.join(self.tmp, "stderr")
        self.proc = None

    def start(self, ready="/stats", timeout=10.0):
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("agent exited %s: %s" % (self.proc.returncode, self.log()))
            try:
                if get(self.port, ready, timeout=1.0)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("agent not ready in %.0f s: %s" % (timeout, self.log()))

    def get(self, path):
        return get(self.port, path)

    def wait_for(self, path, status, timeout=10.0):
        """Poll path until it answers status; return the last answer."""
        deadline = time.monotonic() + timeout
        answer = None
        while time.monotonic() < deadline:
            answer = get(self.port, path)
            if answer[0] == status:
                return answer
            time.sleep(0.2)
        raise AssertionError("%s stayed %r, wanted %d" % (path, answer, status))

    def log(self):
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.proc.returncode if self.proc else None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class FakeProcfs:
    """A --procfs tree the test owns: copies of this host's files, advanced on demand.

    advance() adds ticks to every CPU field and bytes to every interface, as a
    live kernel would; not calling it leaves the tree frozen.
    """

    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "net"), exist_ok=True)
        with open("/proc/stat") as f:
            self.stat = f.read()
        with open("/proc/meminfo") as f:
            self.meminfo = f.read()
        self.ticks = 0
        self.rx = 1000
        self.tx = 2000
        self.write()

    def write(self):
        lines = []
        for line in self.stat.splitlines():
            parts = line.split()
            if parts and parts[0] == "cpu":
                # user, idle grow; a quarter of the time is busy
                parts[1] = str(int(parts[1]) + self.ticks)
                parts[4] = str(int(parts[4]) + 3 * self.ticks)
                line = " ".join(parts)
            lines.append(line)
        self._put("stat", "\n".join(lines) + "\n")
        self._put("meminfo", self.meminfo)
        self._put("net/dev", (
            "Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    "
            "packets errs drop fifo colls carrier compressed\n"
            "    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n"
            "  eth0: %d 10 0 0 0 0 0 0 %d 20 0 0 0 0 0 0\n") % (self.rx, self.tx))

    def _put(self, name, text):
        path = os.path.join(self.root, name)
        with open(path + ".new", "w") as f:
            f.write(text)
        os.replace(path + ".new", path)

    def advance(self, ticks=100, rx=125000, tx=250000):
        self.ticks += ticks
        self.rx += rx
        self.tx += tx
        self.write()


class Ticker:
    """Advances a FakeProcfs every period seconds in a thread until stopped."""

    def __init__(self, procfs, period=0.2):
        import threading
        self.procfs = procfs
        self.period = period
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop_event.wait(self.period):
            self.procfs.advance()

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        self.thread.join()
