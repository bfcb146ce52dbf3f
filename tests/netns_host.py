"""Test hosts in network namespaces that the tests make and remove again.

Two namespaces joined by a veth pair: "near" runs the probes, "far" holds
the test addresses (198.18.1.0/24 from the benchmarking range of RFC 2544,
and fd77:1::/64) on its loopback, routed through the far veth end. Nothing
is added to the namespace the tests run in.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def why_no_netns():
    """None if this process can make namespaces, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None:
        return "needs ip (iproute2)"
    name = "wm4chk-%s" % uuid.uuid4().hex[:8]
    r = subprocess.run(["ip", "netns", "add", name], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
    if r.returncode:
        return "cannot make a network namespace: %s" % r.stderr.decode().strip()
    subprocess.run(["ip", "netns", "del", name])
    return None


def sh(*argv, ns=None, check=True, **kw):
    if ns:
        argv = ("ip", "netns", "exec", ns) + argv
    return subprocess.run(argv, check=check, stdin=subprocess.DEVNULL, **kw)


class NetnsHost:
    """near <-veth-> far, with count IPv4 (and v6_count IPv6) addresses on far's lo."""

    def __init__(self, count=0, v6_count=0, kernel_replies=True):
        tag = uuid.uuid4().hex[:6]
        self.near = "wm4n-%s" % tag
        self.far = "wm4f-%s" % tag
        self.v4 = ["198.18.%d.%d" % (1 + i // 250, 1 + i % 250) for i in range(count)]
        self.v6 = ["fd77:1::%x" % (i + 1) for i in range(v6_count)]
        self.kernel_replies = kernel_replies
        self.tmp = tempfile.mkdtemp(prefix="wm4-")
        self.procs = []

    def __enter__(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _build(self):
        sh("ip", "netns", "add", self.near)
        sh("ip", "netns", "add", self.far)
        sh("ip", "link", "add", "wm4a", "type", "veth", "peer", "name", "wm4b", ns=self.near)
        sh("ip", "link", "set", "wm4b", "netns", self.far, ns=self.near)
        batch_near = ["link set lo up", "link set wm4a up",
                      "addr add 198.18.0.1/24 dev wm4a",
                      "addr add fd77::1/64 dev wm4a nodad",
                      "route add 198.18.0.0/15 via 198.18.0.2",
                      "route add fd77:1::/64 via fd77::2"]
        batch_far = ["link set lo up", "link set wm4b up",
                     "addr add 198.18.0.2/24 dev wm4b",
                     "addr add fd77::2/64 dev wm4b nodad"]
        batch_far += ["addr add %s/32 dev lo" % a for a in self.v4]
        batch_far += ["addr add %s/128 dev lo nodad" % a for a in self.v6]
        for ns, batch in ((self.near, batch_near), (self.far, batch_far)):
            path = os.path.join(self.tmp, ns + ".batch")
            with open(path, "w") as f:
                f.write("\n".join(batch) + "\n")
            sh("ip", "-batch", path, ns=ns)
        # Let IPv6 neighbour discovery settle before the first probe.
        for _ in range(20):
            if sh("ping", "-6", "-n", "-c1", "-W1", "fd77::2", ns=self.near, check=False,
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)
        self.sysctl(self.near, "net/ipv4/ping_group_range", "0 2147483647")
        if not self.kernel_replies:
            self.sysctl(self.far, "net/ipv4/icmp_echo_ignore_all", "1")
            self.sysctl(self.far, "net/ipv6/icmp/echo_ignore_all", "1")

    def sysctl(self, ns, key, value):
        """Set a per-namespace sysctl without procps' sysctl(8)."""
        sh("sh", "-c", 'echo "$1" > "/proc/sys/$2"', "sysctl", value, key, ns=ns)

    def start_responder(self, config):
        """Answer per address in far as config says; returns the counts file path."""
        cfg = os.path.join(self.tmp, "responder.json")
        counts = os.path.join(self.tmp, "counts.json")
        with open(cfg, "w") as f:
            json.dump(config, f)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.far, sys.executable,
             os.path.join(HERE, "icmp_responder.py"), cfg, counts],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self.procs.append(proc)
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError("responder did not start")
        self.responder, self.counts_path = proc, counts
        return counts

    def stop_responder(self):
        """Stop the responder; return {"counts": {address: requests}, "applied": ...}."""
        self.responder.terminate()
        self.responder.wait(5)
        with open(self.counts_path) as f:
            return json.load(f)

    def run_near(self, argv, **kw):
        return sh(*argv, ns=self.near, **kw)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        for ns in (self.near, self.far):
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        shutil.rmtree(self.tmp, ignore_errors=True)
