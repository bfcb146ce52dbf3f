"""install_monitor.sh, worker-monitor.service and uninstall_monitor.sh, proven on a booted node.

ScriptTest runs anywhere (shellcheck where installed). NodeTest needs root, debootstrap,
systemd-nspawn and nsenter: it builds a Debian bookworm rootfs once (cached under
/var/cache/worker-monitor-test, never in the checkout), boots it with systemd-nspawn on an overlay
so the cache stays clean, serves the checkout over 127.0.0.1 with http.server and runs the README's
one-line install inside. The container shares this machine's network; the only peer is 127.0.0.1.
"""

import glob
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
INSTALL = os.path.join(ROOT, "install_monitor.sh")
UNINSTALL = os.path.join(ROOT, "uninstall_monitor.sh")
SERVED = ("install_monitor.sh", "uninstall_monitor.sh", "worker_monitor.py", "peers.txt",
          "worker-monitor.service")
DEFAULT_BASE_URL = "https://raw.githubusercontent.com/tjkkking/worker-monitor/main"

CACHE = os.environ.get("WORKER_MONITOR_TEST_CACHE", "/var/cache/worker-monitor-test")
ROOTFS = os.path.join(CACHE, "bookworm")
INCLUDE = "systemd,systemd-sysv,dbus,python3-minimal,curl,iputils-ping"
MAX_EXPOSURE = 2.0
PROGRAM = "/opt/worker-monitor/worker_monitor.py"
CAP_NET_RAW = 1 << 13
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def log(message):
    sys.stderr.write("[node] %s\n" % message)
    sys.stderr.flush()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(port, path="/stats", timeout=3):
    """(status, body) from 127.0.0.1:port, or (None, error text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError as e:
        return None, str(e)
    finally:
        conn.close()


def port_open(port):
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout, interval=0.5):
    """Poll predicate until it returns a true value; return the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def apt_mirror():
    """The Debian mirror this machine's apt uses for bookworm (one-line and deb822 formats)."""
    candidates = []
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and "bookworm" in fields.get("Suites", "").split():
                    candidates.extend(fields.get("URIs", "").split())
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    candidates.append(words[1])
    for uri in candidates:
        if "security" not in uri:
            return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def build_rootfs():
    """Debootstrap the cached rootfs once; later runs reuse it."""
    if os.path.exists(os.path.join(ROOTFS, "usr/lib/systemd/systemd")):
        return
    os.makedirs(CACHE, exist_ok=True)
    partial = ROOTFS + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    mirror = apt_mirror()
    log("building %s from %s (once)" % (ROOTFS, mirror))
    with open(os.path.join(CACHE, "debootstrap.log"), "wb") as out:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=" + INCLUDE, "bookworm",
                        partial, mirror], stdin=subprocess.DEVNULL, stdout=out,
                       stderr=subprocess.STDOUT, check=True, timeout=1800)
    os.rename(partial, ROOTFS)


def container_init(nspawn_pid):
    """PID (in our namespace) of the container's systemd: nspawn's child that is PID 1 inside."""
    for stat in glob.glob("/proc/[0-9]*/status"):
        try:
            with open(stat) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        nspid = fields.get("NSpid", "").split()
        if fields.get("PPid", "").strip() == str(nspawn_pid) and len(nspid) > 1 and nspid[-1] == "1":
            return int(nspid[0])
    return None


def skip_reason():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn, nsenter)"
    missing = [tool for tool in ("debootstrap", "systemd-nspawn", "nsenter") if not shutil.which(tool)]
    if missing:
        return "needs %s (apt-get install debootstrap systemd-container util-linux)" % ", ".join(missing)
    if not os.path.exists(os.path.join(ROOT, "worker_monitor.py")):
        return "worker_monitor.py is not in the checkout yet"
    return None


def readme_install_line():
    """The one-line install command exactly as the README gives it."""
    for name in ("README.md", "docs-install-section.md"):
        try:
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("curl ") and "/install_monitor.sh" in line and "| bash" in line:
                return line
    raise AssertionError("no `curl ... install_monitor.sh | bash` line in README.md")


class Node:
    """A booted Debian container on an overlay over the cached rootfs."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.root = os.path.join(workdir, "root")
        self.name = "wm-test-%d" % os.getpid()
        self.proc = None
        self.pid = None
        self.state = None
        self.mounted = False
        self.host_systemd = os.path.isdir("/run/systemd/system")

    def mount(self):
        for sub in ("upper", "work", "root"):
            os.makedirs(os.path.join(self.workdir, sub), exist_ok=True)
        options = "lowerdir=%s,upperdir=%s/upper,workdir=%s/work" % (ROOTFS, self.workdir, self.workdir)
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, self.root],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if result.returncode == 0:
            self.mounted = True
        else:
            log("overlay failed (%s); copying the rootfs instead" % result.stderr.strip())
            os.rmdir(self.root)
            subprocess.run(["cp", "-a", ROOTFS, self.root], check=True, stdin=subprocess.DEVNULL)

    def boot(self):
        command = ["systemd-nspawn", "--quiet", "-D", self.root, "-b", "-M", self.name,
                   "--console=passive"]
        if not self.host_systemd:
            # No systemd on this machine to register with or to make a scope for us.
            command += ["--register=no", "--keep-unit"]
        self.log = open(os.path.join(self.workdir, "nspawn.log"), "ab")
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = wait_for(lambda: self.proc.poll() is None and container_init(self.proc.pid), 30)
        if not self.pid:
            raise AssertionError("container did not start: %s" % self.nspawn_log())
        self.state = wait_for(self.system_state, 120, interval=1)
        if not self.state:
            raise AssertionError("container did not finish booting: %s"
                                 % self.sh("systemctl is-system-running; systemctl --failed").stdout)
        log("booted %s (init pid %d): system %s" % (self.name, self.pid, self.state))

    def system_state(self):
        state = self.sh("systemctl is-system-running", timeout=10).stdout.strip()
        return state if state in ("running", "degraded") else None

    def nspawn_log(self):
        with open(os.path.join(self.workdir, "nspawn.log"), "rb") as f:
            return f.read().decode(errors="replace")[-2000:]

    def sh(self, script, timeout=120, env=None):
        """Run a shell script inside the container with a clean environment."""
        variables = ["PATH=" + PATH, "LANG=C.UTF-8", "HOME=/root"]
        variables += ["%s=%s" % item for item in (env or {}).items()]
        command = ["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "--",
                   "env", "-i"] + variables + ["/bin/bash", "-c", script]
        try:
            return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(command, -1, e.stdout or "", "timeout: %s" % e)

    def reboot(self):
        self.sh("systemctl reboot --no-block")
        try:
            code = self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError("container did not go down for reboot")
        log("container went down for reboot (nspawn exit %d)" % code)
        self.log.close()
        self.boot()

    def stop(self):
        """Power off, then kill whatever is left; never raises."""
        if self.proc is not None and self.proc.poll() is None:
            if self.host_systemd:
                subprocess.run(["machinectl", "terminate", self.name], stdin=subprocess.DEVNULL,
                               capture_output=True)
            try:
                self.proc.send_signal(signal.SIGTERM)   # nspawn powers the container off
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc is not None and self.proc.poll() is None:
            for pid in (self.pid, self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)   # killing PID 1 of a namespace kills all of it
                except (OSError, TypeError):
                    pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.mounted:
            if subprocess.run(["umount", self.root], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", self.root], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


class ScriptTest(unittest.TestCase):
    """The installer scripts' shape, wherever the tests run."""

    def test_shellcheck(self):
        if not shutil.which("shellcheck"):
            self.skipTest("shellcheck is not installed (apt-get install shellcheck)")
        result = subprocess.run(["shellcheck", INSTALL, UNINSTALL], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_structure(self):
        for path in (INSTALL, UNINSTALL):
            with open(path) as f:
                text = f.read()
            lines = text.rstrip("\n").splitlines()
            with self.subTest(script=os.path.basename(path)):
                self.assertEqual(lines[-1], 'main "$@"')
                self.assertIn("\nset -eu\n", text)
                self.assertTrue(os.access(path, os.X_OK))
                for line in lines:
                    # `read` only ever from a here-document, never from stdin.
                    if re.search(r"(^\s*|[;|&]\s*)read\b", line):
                        self.assertIn("<<", line)
                # Without its last line the script only sets options and variables.
                trace = subprocess.run(["bash", "-x"], input="\n".join(lines[:-1]) + "\n",
                                       capture_output=True, text=True)
                self.assertEqual(trace.returncode, 0, trace.stderr)
                self.assertEqual(trace.stdout, "")
                for line in trace.stderr.splitlines():
                    self.assertRegex(line, r"^\+ (set -eu|[A-Z_]+=.*)$")

    def test_truncated_script_runs_nothing(self):
        """`curl | bash` cut short: every prefix of the script does nothing at all."""
        with open(INSTALL, "rb") as f:
            text = f.read()
        cuts = sorted(set(range(0, len(text) - len(b'main "$@"\n'), max(1, len(text) // 40))))
        for cut in cuts:
            result = subprocess.run(["bash"], input=text[:cut], capture_output=True,
                                    env={"PATH": os.environ.get("PATH", PATH),
                                         "WORKER_MONITOR_BASE_URL": "http://127.0.0.1:9/"})
            self.assertNotIn(b"worker-monitor:", result.stdout + result.stderr, cut)

    def test_unit_has_the_required_directives(self):
        with open(os.path.join(ROOT, "worker-monitor.service")) as f:
            unit = f.read()
        for directive in ("Type=notify", "Restart=on-failure", "DynamicUser=yes",
                          "CapabilityBoundingSet=CAP_NET_RAW", "AmbientCapabilities=CAP_NET_RAW",
                          "NoNewPrivileges=yes",
                          "ProtectSystem=strict", "WantedBy=multi-user.target"):
            self.assertRegex(unit, r"(?m)^%s$" % re.escape(directive))
        self.assertRegex(unit, r"(?m)^WatchdogSec=\d+")
        self.assertRegex(unit, r"(?m)^ExecReload=.*\bkill -HUP \$\{?MAINPID\}?")


@unittest.skipIf(skip_reason(), skip_reason())
class NodeTest(unittest.TestCase):
    """The README's install line on a booted Debian bookworm, then upgrade, faults, uninstall."""

    @classmethod
    def setUpClass(cls):
        build_rootfs()
        cls.port = free_port()
        cls.workdir = tempfile.mkdtemp(prefix="run-", dir=CACHE)
        cls.node = Node(os.path.join(cls.workdir, "node"))
        cls.addClassCleanup(cls.cleanup)
        cls.served = os.path.join(cls.workdir, "served")
        os.makedirs(cls.served)
        cls.serve_checkout()
        cls.server_port = free_port()
        cls.server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(cls.server_port), "--bind", "127.0.0.1",
             "--directory", cls.served], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        cls.base_url = "http://127.0.0.1:%d" % cls.server_port
        if not wait_for(lambda: http_get(cls.server_port, "/peers.txt")[0] == 200, 10):
            raise AssertionError("http.server did not come up")
        cls.node.mount()
        cls.node.boot()

    @classmethod
    def cleanup(cls):
        server = getattr(cls, "server", None)
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        cls.node.stop()
        shutil.rmtree(cls.workdir, ignore_errors=True)

    @classmethod
    def serve_checkout(cls):
        for name in SERVED:
            shutil.copyfile(os.path.join(ROOT, name), os.path.join(cls.served, name))

    def install(self, env=None):
        """The README's exact line, pointed at the loopback server."""
        line = readme_install_line().replace(DEFAULT_BASE_URL, self.base_url)
        variables = {"WORKER_MONITOR_BASE_URL": self.base_url, "WORKER_MONITOR_PORT": str(self.port)}
        variables.update(env or {})
        return self.node.sh(line, timeout=600, env=variables)

    def sh(self, script, **kwargs):
        return self.node.sh(script, **kwargs).stdout.strip()

    def main_pid(self):
        return int(self.sh("systemctl show -p MainPID --value worker-monitor") or 0)

    def stats(self):
        status, body = http_get(self.port)
        return json.loads(body) if status == 200 else None

    def latency(self, timeout=20):
        """The first numeric latency to 127.0.0.1 within timeout, else None."""
        return wait_for(lambda: (self.stats() or {}).get("latency", {}).get("127.0.0.1"), timeout)

    def agent_processes(self):
        script = ("for d in /proc/[0-9]*; do tr '\\0' ' ' <$d/cmdline 2>/dev/null; echo; done"
                  " | grep -c '^[^ ]*python3[^ ]* %s' || true" % PROGRAM)
        return int(self.sh(script))

    def assertRunning(self):
        self.assertEqual(self.sh("systemctl is-active worker-monitor"), "active")
        self.assertIsNotNone(wait_for(self.stats, 20), "no /stats on port %d" % self.port)

    def test_00_checks_refuse_non_root_and_old_python(self):
        result = self.node.sh("setpriv --reuid=65534 --regid=65534 --clear-groups bash -c %s"
                              % shlex.quote(readme_install_line().replace(DEFAULT_BASE_URL, self.base_url)),
                              env={"WORKER_MONITOR_BASE_URL": self.base_url})
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("must run as root", result.stderr)
        # An old python3 first on PATH (CentOS 7's 3.6): one clear line, nothing installed.
        self.sh("mkdir -p /root/oldpy && printf '#!/bin/sh\\n[ \"$1\" = -V ] && echo Python 3.6.8\\n"
                "exit 1\\n' > /root/oldpy/python3 && chmod +x /root/oldpy/python3")
        result = self.node.sh("PATH=/root/oldpy:$PATH; " + readme_install_line().replace(
            DEFAULT_BASE_URL, self.base_url), env={"WORKER_MONITOR_BASE_URL": self.base_url})
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("need python3 >= 3.8, found Python 3.6.8", result.stderr)
        self.assertEqual(self.sh("test -e /etc/systemd/system/worker-monitor.service; echo $?"), "1")

    def test_01_install(self):
        log("system state: %s" % self.node.state)
        result = self.install()
        log("install exit %d; its messages:\n%s" % (result.returncode, result.stderr.strip()))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("listening on port %d" % self.port, result.stderr)
        self.assertEqual(self.sh("systemctl is-active worker-monitor"), "active")
        self.assertEqual(self.sh("systemctl is-enabled worker-monitor"), "enabled")
        self.assertIn('--port %d ' % self.port, self.sh("cat /etc/default/worker-monitor"))
        self.assertEqual(self.sh("stat -c %a /opt/worker-monitor/worker_monitor.py"), "644")

    def test_02_stats_on_port(self):
        stats = wait_for(self.stats, 20)
        self.assertIsNotNone(stats)
        self.assertEqual(list(stats), ["nodeName", "timestamp", "cpu", "mem", "net", "latency"])
        self.assertEqual(stats["nodeName"], self.sh("hostname"))
        self.assertIsInstance(stats["cpu"], float)
        self.assertIsInstance(stats["mem"], float)
        log("/stats on port %d: %s" % (self.port, json.dumps(stats)))

    def test_03_agent_is_unprivileged(self):
        status = self.sh("cat /proc/%d/status" % self.main_pid())
        fields = dict(line.split(":", 1) for line in status.splitlines())
        uids = fields["Uid"].split()
        self.assertNotIn("0", uids, "agent runs as root")
        self.assertEqual(int(fields["CapEff"], 16), CAP_NET_RAW)
        self.assertEqual(int(fields["CapBnd"], 16), CAP_NET_RAW)
        self.assertEqual(int(fields["CapAmb"], 16), CAP_NET_RAW)
        self.assertEqual(fields["NoNewPrivs"].strip(), "1")
        log("agent uid %s, user %s, CapEff %s" % (uids[0], self.sh("systemctl show -p User --value worker-monitor")
                                                  or "(dynamic)", fields["CapEff"].strip()))

    def test_04_latency_under_the_unit(self):
        latency = self.latency()
        self.assertIsInstance(latency, float, "no latency to 127.0.0.1: %s" % self.stats())
        self.assertGreater(latency, 0)
        self.assertLess(latency, 1000)
        log("latency to 127.0.0.1 under the unit: %s ms" % latency)

    def test_05_notify_and_watchdog(self):
        """Type=notify got READY=1 (the unit is active) and WATCHDOG=1 keeps arriving."""
        show = "systemctl show -p WatchdogTimestampMonotonic --value worker-monitor"
        self.assertEqual(self.sh("systemctl show -p Type --value worker-monitor"), "notify")
        first = int(self.sh(show) or 0)
        later = wait_for(lambda: int(self.sh(show) or 0) > first and int(self.sh(show)), 15)
        self.assertTrue(first and later, "no WATCHDOG=1 from the agent")
        self.assertEqual(self.sh("systemctl show -p WatchdogUSec --value worker-monitor"), "10s")
        log("watchdog pinged at %d then %d (monotonic usec); status: %s"
            % (first, later, self.sh("systemctl show -p StatusText --value worker-monitor")))

    def test_06_exposure(self):
        output = self.sh("systemd-analyze security --no-pager worker-monitor.service")
        match = re.search(r"Overall exposure level for worker-monitor\.service: ([0-9.]+)", output)
        self.assertIsNotNone(match, output)
        exposure = float(match.group(1))
        log("systemd-analyze security worker-monitor.service: exposure %.1f" % exposure)
        log("still exposed:\n" + "\n".join(line for line in output.splitlines() if line.startswith("✗")))
        self.assertLessEqual(exposure, MAX_EXPOSURE)

    def test_07_directives_left_out_break_the_agent(self):
        """Each directive the unit leaves out, added as a drop-in, breaks what the comment says."""
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            range_ = f.read().split()
        cases = [
            ("PrivateUsers=yes", "latency"),
            ("ProcSubset=pid", "cpu"),
            ("PrivateNetwork=yes", "port"),
            ("SystemCallFilter=~capset setuid", "latency"),
        ]
        if int(range_[0]) > int(range_[1]):
            # ICMP datagram sockets are off on this kernel, so ping depends on CAP_NET_RAW alone.
            cases.append(("AmbientCapabilities=", "latency"))
        dropin = "/etc/systemd/system/worker-monitor.service.d"
        try:
            for directive, broken in cases:
                with self.subTest(directive=directive):
                    self.sh("mkdir -p %s && printf '[Service]\\n%s\\n' > %s/zz-test.conf && "
                            "systemctl daemon-reload && systemctl restart worker-monitor"
                            % (dropin, directive, dropin))
                    if broken == "port":
                        time.sleep(3)
                        self.assertEqual(self.sh("systemctl is-active worker-monitor"), "active")
                        self.assertIsNone(self.stats())
                    else:
                        self.assertIsNotNone(wait_for(self.stats, 20))
                        time.sleep(7)   # one full probe round (5 s) and its timeout
                        stats = self.stats()
                        self.assertIsNone(stats[broken] if broken == "cpu" else stats["latency"]["127.0.0.1"],
                                          "%s did not break %s: %s" % (directive, broken, stats))
                    log("%s breaks %s, as documented" % (directive, broken))
        finally:
            self.sh("rm -rf %s && systemctl daemon-reload && systemctl restart worker-monitor" % dropin)
        self.assertIsInstance(self.latency(), float)

    def test_08_reload_rereads_peers(self):
        pid = self.main_pid()
        peers = "/etc/worker-monitor/peers.txt"
        reload = self.node.sh("cp %s /root/peers.saved && echo '# no peers' > %s && "
                              "systemctl reload worker-monitor" % (peers, peers))
        self.assertEqual(reload.returncode, 0, reload.stderr)
        self.assertTrue(wait_for(lambda: (self.stats() or {}).get("latency") == {}, 15), self.stats())
        reload = self.node.sh("cp /root/peers.saved %s && systemctl reload worker-monitor" % peers)
        self.assertEqual(reload.returncode, 0, reload.stderr)
        self.assertIsInstance(self.latency(), float)
        self.assertEqual(self.main_pid(), pid, "reload restarted the agent")
        self.assertIn("SIGHUP", self.sh("journalctl -u worker-monitor -o cat --no-pager"))

    def test_09_reinstall_keeps_edited_peers(self):
        self.sh("printf '# edited by the operator\\n127.0.0.1\\n' > /etc/worker-monitor/peers.txt")
        old_pid = self.main_pid()
        result = self.install()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("kept your /etc/worker-monitor/peers.txt", result.stderr)
        self.assertEqual(self.sh("head -1 /etc/worker-monitor/peers.txt"), "# edited by the operator")
        with open(os.path.join(ROOT, "peers.txt")) as f:
            self.assertEqual(self.sh("cat /etc/worker-monitor/peers.txt.new"), f.read().strip())
        self.assertRunning()
        self.assertNotEqual(self.main_pid(), old_pid)
        self.assertEqual(self.agent_processes(), 1)
        self.assertEqual(self.sh("systemctl list-unit-files --no-legend 'worker-monitor*' | wc -l"), "1")

    def test_10_install_from_a_checkout(self):
        self.sh("mkdir -p /root/checkout && cd /root/checkout && for f in %s; do "
                "curl -fsSO %s/$f; done && chmod +x install_monitor.sh" % (" ".join(SERVED), self.base_url))
        result = self.node.sh("cd /root/checkout && ./install_monitor.sh",
                              env={"WORKER_MONITOR_BASE_URL": "http://127.0.0.1:9"})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("installing from /root/checkout", result.stderr)
        self.assertIn("listening on port %d" % self.port, result.stderr)
        self.assertRunning()
        self.assertEqual(self.agent_processes(), 1)
        self.assertEqual(self.sh("head -1 /etc/worker-monitor/peers.txt"), "# edited by the operator")

    def test_11_kill_9_restarts(self):
        old_pid = self.main_pid()
        self.sh("kill -9 %d" % old_pid)
        new_pid = wait_for(lambda: self.sh("systemctl is-active worker-monitor") == "active"
                           and self.main_pid() not in (0, old_pid) and self.main_pid(), 30)
        self.assertTrue(new_pid, "not restarted after kill -9")
        self.assertRunning()
        self.assertGreaterEqual(int(self.sh("systemctl show -p NRestarts --value worker-monitor")), 1)
        log("kill -9 %d: systemd restarted it as %d" % (old_pid, new_pid))

    def test_12_truncated_download_changes_nothing(self):
        with open(os.path.join(ROOT, "worker_monitor.py"), "rb") as f:
            program = f.read()
        lines = program.splitlines(keepends=True)
        cuts = {
            "half the bytes": program[:len(program) // 2],
            "whole lines, last two missing": b"".join(lines[:-2]),
        }
        before = self.sh("sha256sum %s /etc/systemd/system/worker-monitor.service" % PROGRAM)
        pid = self.main_pid()
        served = os.path.join(self.served, "worker_monitor.py")
        try:
            for what, text in cuts.items():
                with self.subTest(cut=what):
                    with open(served, "wb") as f:
                        f.write(text)
                    result = self.install()
                    self.assertNotEqual(result.returncode, 0, result.stderr)
                    self.assertIn("nothing was changed", result.stderr)
                    self.assertEqual(self.sh("sha256sum %s /etc/systemd/system/worker-monitor.service"
                                             % PROGRAM), before)
                    self.assertEqual(self.main_pid(), pid)
                    self.assertRunning()
                    log("served worker_monitor.py cut (%s): %s" % (what, result.stderr.strip().splitlines()[-1]))
        finally:
            self.serve_checkout()

    def test_13_reboot(self):
        self.node.reboot()
        self.assertEqual(self.sh("systemctl is-enabled worker-monitor"), "enabled")
        self.assertRunning()
        self.assertIsInstance(self.latency(), float)
        log("after reboot: %s" % self.stats())

    def test_14_uninstall(self):
        line = "curl -fsSL %s/uninstall_monitor.sh | bash" % self.base_url
        result = self.node.sh(line)
        self.assertEqual(result.returncode, 0, result.stderr)
        for path in ("/etc/systemd/system/worker-monitor.service", "/opt/worker-monitor",
                     "/etc/default/worker-monitor"):
            self.assertEqual(self.sh("test -e %s; echo $?" % path), "1", path)
        self.assertEqual(self.sh("systemctl list-unit-files --no-legend 'worker-monitor*' | wc -l"), "0")
        self.assertIn(self.sh("systemctl is-active worker-monitor"), ("inactive", "unknown"))
        self.assertEqual(self.agent_processes(), 0)
        self.assertFalse(port_open(self.port), "port %d still open" % self.port)
        self.assertEqual(self.sh("test -f /etc/worker-monitor/peers.txt; echo $?"), "0")
        again = self.node.sh(line)
        self.assertEqual(again.returncode, 0, again.stderr)
        purge = self.node.sh("curl -fsSL %s/uninstall_monitor.sh | bash -s -- --purge" % self.base_url)
        self.assertEqual(purge.returncode, 0, purge.stderr)
        self.assertEqual(self.sh("test -e /etc/worker-monitor; echo $?"), "1")
        log("uninstall: %s" % result.stderr.strip().replace("\n", "; "))

    def test_15_missing_ping(self):
        """No ping: WORKER_MONITOR_NO_PKG=1 says so and goes on; otherwise apt-get installs it."""
        self.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq iputils-ping")
        self.assertEqual(self.sh("command -v ping; echo $?"), "1")
        try:
            result = self.install({"WORKER_MONITOR_NO_PKG": "1"})
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("could not install ping", result.stderr)
            self.assertRunning()
            time.sleep(7)
            # Issue 4: without ping the agent falls back to its own ICMP engine
            # (the unit grants CAP_NET_RAW).
            self.assertIsInstance(self.stats()["latency"]["127.0.0.1"], float)
            result = self.install()
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("ping not found; installing it", result.stderr)
            self.assertEqual(self.sh("command -v ping"), "/usr/bin/ping")
            self.assertIsInstance(self.latency(), float)
        finally:
            self.node.sh("curl -fsSL %s/uninstall_monitor.sh | bash -s -- --purge" % self.base_url)


if __name__ == "__main__":
    unittest.main()
