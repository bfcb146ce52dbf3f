#!/usr/bin/env python3
"""worker-monitor: a per-node agent for Kubernetes worker nodes.

Every second it samples CPU usage, memory usage and network receive/transmit
rates from /proc; every five seconds it measures the round-trip time to each
peer in peers.txt; it serves the latest state as JSON at ``GET /stats``.

One file, Python 3.8+, the standard library only.
"""

__version__ = "0.1.0"

import argparse
import collections
import http
import ipaddress
import json
import logging
import math
import os
import re
import selectors
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

log = logging.getLogger("worker-monitor")


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEERS = os.path.join(HERE, "peers.txt")

# /proc/stat "cpu" line, see proc(5). iowait, irq, softirq came with 2.5.41,
# steal with 2.6.11, guest with 2.6.24, guest_nice with 2.6.33; a column an
# old kernel lacks counts as 0.
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq",
              "steal", "guest", "guest_nice")
# guest and guest_nice are already counted in user and nice (kernel/sched/
# cputime.c account_guest_time), so they are not part of the total.
CPU_TOTAL_FIELDS = CPU_FIELDS[:8]
CPU_IDLE_FIELDS = ("idle", "iowait")

# /proc/net/dev columns after "name:", see proc(5).
NET_DEV_FIELDS = (
    "rx_bytes", "rx_packets", "rx_errs", "rx_drop", "rx_fifo", "rx_frame",
    "rx_compressed", "rx_multicast",
    "tx_bytes", "tx_packets", "tx_errs", "tx_drop", "tx_fifo", "tx_colls",
    "tx_carrier", "tx_compressed")

# peers.txt: 10,000 peers take about 200 KB.
MAX_PEERS_BYTES = 1 << 20
MAX_PEER_WARNINGS = 20

# How long past --probe-timeout a probe may run (fork, exec, name lookup)
# before its child is killed.
PROBE_MARGIN = 1.0
# Output of one ping kept for parsing; the rest is read and dropped.
PING_MAX_OUTPUT = 65536
# Most probes in flight at once in one round.
PROBE_MAX_INFLIGHT = 256
# One round's probes start spread over at most this long (and a tenth of the
# interval), at most PROBE_STEP apart: no burst of a thousand packets at once.
PROBE_SPREAD = 0.5
PROBE_STEP = 0.01
# Rounds kept per peer for /latency (12 x 5 s = one minute).
DEFAULT_WINDOW = 12
# Name lookups: how long a round waits for one, how often dns:NAME lines are
# asked again, and how soon after a failed lookup.
DNS_TIMEOUT = 2.0
DNS_REFRESH = 60.0
DNS_RETRY = 15.0

# Seconds the threads get to finish after SIGTERM (systemd and the SPEC allow 2).
STOP_GRACE = 1.2

# HTTP limits.
MAX_REQUEST_LINE = 8190
MAX_HEADER_LINE = 8190
MAX_HEADERS = 100
MAX_HEAD = 65536
MAX_CONNECTIONS = 512
IDLE_TIMEOUT = 30.0     # for a keep-alive connection between requests
HEAD_TIMEOUT = 10.0     # for a request head, from its first byte to its end

# A DNS host name (RFC 1123): dot-separated labels of letters, digits and
# inner hyphens, 253 characters at most, an optional final dot; the last
# label is not all digits (RFC 3696 2), so "300.1.1.1" is no name.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
HOSTNAME_RE = re.compile(r"^(?=.{1,253}\.?$)(?:%s\.)*(?![0-9]+\.?$)%s\.?$" % (_LABEL, _LABEL))

# iputils: "64 bytes from 127.0.0.1: icmp_seq=1 ttl=64 time=0.045 ms";
# busybox: "64 bytes from 127.0.0.1: seq=0 ttl=64 time=1.398 ms".
# Only a reply line counts: the summary's "time 0ms" is not an RTT.
PING_REPLY_RE = re.compile(
    r"bytes from .*?\btime[=]\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|us|usec|s)\b")
PING_UNIT = {"ms": 1.0, "us": 0.001, "usec": 0.001, "s": 1000.0}


class MonitorError(Exception):
    """A fault the agent reports as one line and a non-zero exit."""


# ---------------------------------------------------------------------------
# Parsing (pure: text in, values out)
# ---------------------------------------------------------------------------

def parse_stat(text):
    """Return the aggregate CPU times of /proc/stat as {field: ticks}."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:1 + len(CPU_FIELDS)]]
            values += [0] * (len(CPU_FIELDS) - len(values))
            return dict(zip(CPU_FIELDS, values))
    raise ValueError("no aggregate cpu line")


def parse_meminfo(text):
    """Return /proc/meminfo as {name: kB}; lines that do not parse are left out."""
    out = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and fields:
            try:
                out[name.strip()] = int(fields[0])
            except ValueError:
                continue
    return out


def parse_net_dev(text):
    """Return /proc/net/dev as {interface: {column: count}}.

    The name is everything before the last colon: names may hold a colon
    (aliases such as "team0:1"), and kernels before 3.x print no space after
    the colon once the receive byte counter is wide ("eth0:68210035552 ...").
    A line that does not parse is left out; it never fails the others.
    """
    out = {}
    for line in text.splitlines():
        name, sep, rest = line.rpartition(":")
        name = name.strip()
        fields = rest.split()
        if not sep or not name or "|" in name or len(fields) < len(NET_DEV_FIELDS):
            continue
        try:
            values = [int(v) for v in fields[:len(NET_DEV_FIELDS)]]
        except ValueError:
            continue
        out[name] = dict(zip(NET_DEV_FIELDS, values))
    return out


def parse_ping(text):
    """Return the RTT in ms of the first reply line of ping's output, or None."""
    for line in text.splitlines():
        m = PING_REPLY_RE.search(line)
        if m:
            return float(m.group(1)) * PING_UNIT[m.group(2)]
    return None


def valid_peer(name):
    """True for an IPv4 or IPv6 literal, a DNS host name or dns:NAME, nothing else."""
    if name.startswith("dns:"):
        return bool(HOSTNAME_RE.match(name[4:]))
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return bool(HOSTNAME_RE.match(name))


def parse_peers(text):
    """Return (peers, problems) from peers.txt text.

    peers keeps file order without duplicates; problems is a list of
    (line number, message) for the lines that were skipped.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    peers, seen, problems = [], set(), []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not valid_peer(entry):
            shown = entry if len(entry) <= 60 else entry[:60] + "..."
            problems.append((number, "not an IP address or host name: %r" % shown))
            continue
        if entry not in seen:
            seen.add(entry)
            peers.append(entry)
    return peers, problems


# ---------------------------------------------------------------------------
# Rates (pure: two snapshots in, one value out)
# ---------------------------------------------------------------------------

def clamp01(x):
    return min(1.0, max(0.0, x))


def cpu_usage(prev, cur):
    """Busy share of all CPUs between two parse_stat() results, or None."""
    # A field that went backwards (iowait does on some kernels) counts as 0.
    delta = {f: max(0, cur[f] - prev[f]) for f in CPU_TOTAL_FIELDS}
    total = sum(delta.values())
    if total <= 0:
        return None
    busy = total - sum(delta[f] for f in CPU_IDLE_FIELDS)
    return round(clamp01(busy / total), 4)


def mem_usage(meminfo):
    """1 - MemAvailable/MemTotal from parse_meminfo(), or None."""
    total = meminfo.get("MemTotal")
    if not total or total <= 0:
        return None
    available = meminfo.get("MemAvailable")
    if available is None:
        # Kernels before 3.14 have no MemAvailable; estimate it as free(1) did.
        if "MemFree" not in meminfo:
            return None
        available = sum(meminfo.get(k, 0) for k in
                        ("MemFree", "Buffers", "Cached", "SReclaimable"))
    return round(clamp01(1.0 - available / total), 4)


def net_bytes(prev, cur, names):
    """(rx, tx) bytes moved over names between two parse_net_dev() results."""
    rx = tx = 0
    for name in names:
        before, after = prev.get(name), cur.get(name)
        if before is None or after is None:
            continue            # seen only once: contributes 0
        # A counter that went down (device recreated, 32-bit wrap) gives 0.
        rx += max(0, after["rx_bytes"] - before["rx_bytes"])
        tx += max(0, after["tx_bytes"] - before["tx_bytes"])
    return rx, tx


def mbit_per_s(moved, elapsed):
    """(rx, tx) bytes moved in elapsed seconds as Mbit/s, 3 decimals."""
    if elapsed is None or elapsed <= 0:
        return None, None
    scale = 8 / 1e6 / elapsed
    return round(moved[0] * scale, 3), round(moved[1] * scale, 3)


def net_rates(prev, cur, elapsed, names):
    """(rx, tx) in Mbit/s over names between two parse_net_dev() results."""
    return mbit_per_s(net_bytes(prev, cur, names), elapsed)


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------

class Faults:
    """Logs a persistent fault when it starts and when it ends, not each time."""

    def __init__(self):
        self._active = set()
        self._lock = threading.Lock()

    def start(self, key, message, level=logging.WARNING):
        with self._lock:
            if key in self._active:
                return
            self._active.add(key)
        log.log(level, "%s", message)

    def end(self, key, message):
        with self._lock:
            if key not in self._active:
                return
            self._active.discard(key)
        log.info("%s", message)

    def active(self, key):
        with self._lock:
            return key in self._active


def read_text(root, name):
    with open(os.path.join(root, name), encoding="ascii", errors="replace") as f:
        return f.read()


def select_interfaces(names, sysfs):
    """Physical interfaces (with a device link in sysfs); else all but lo.

    Virtual devices (veth, bridges, tunnels, VLANs, aliases) are left out:
    their traffic is already counted on the physical ones.
    """
    net = os.path.join(sysfs, "class", "net")
    physical = [n for n in names if os.path.exists(os.path.join(net, n, "device"))]
    return physical or [n for n in names if n != "lo"]


class Sampler:
    """Reads /proc once per interval and publishes rates to the State."""

    def __init__(self, state, procfs, sysfs, interval, faults, on_sample=None):
        self.state = state
        self.procfs = procfs
        self.sysfs = sysfs
        self.interval = interval
        self.faults = faults
        self.on_sample = on_sample
        self.prev = None
        self.net_total = None       # (rx, tx) bytes of the selected interfaces

    def _read(self, name, parse):
        try:
            value = parse(read_text(self.procfs, name))
        except (OSError, ValueError, UnicodeError) as e:
            self.faults.start("read " + name, "cannot read %s: %s" % (
                os.path.join(self.procfs, name), e))
            return None
        self.faults.end("read " + name, "%s readable again" % os.path.join(self.procfs, name))
        return value

    def read(self):
        """Return one raw snapshot: the time and the parsed files (None when unreadable)."""
        return {
            "mono": time.monotonic(),
            "time": time.time(),
            "stat": self._read("stat", parse_stat),
            "meminfo": self._read("meminfo", parse_meminfo),
            "netdev": self._read("net/dev", parse_net_dev),
        }

    def sample(self):
        """Take a snapshot; publish the rates against the previous one."""
        cur = self.read()
        prev, self.prev = self.prev, cur
        if prev is None:
            return False
        cpu = rx = tx = None
        if prev["stat"] and cur["stat"]:
            cpu = cpu_usage(prev["stat"], cur["stat"])
            # Every CPU ticks (busy or idle) 100 times a second: counters that
            # stand still mean a stale file (a frozen or stuck mount).
            path = os.path.join(self.procfs, "stat")
            if cpu is None:
                self.faults.start("frozen stat", "%s did not advance: cpu is null" % path)
            else:
                self.faults.end("frozen stat", "%s advances again" % path)
        mem = mem_usage(cur["meminfo"]) if cur["meminfo"] is not None else None
        if prev["netdev"] is not None and cur["netdev"] is not None:
            names = select_interfaces(list(cur["netdev"]), self.sysfs)
            moved = net_bytes(prev["netdev"], cur["netdev"], names)
            rx, tx = mbit_per_s(moved, cur["mono"] - prev["mono"])
            self.net_total = self.count_bytes(cur["netdev"], names, moved)
        self.state.set_sample(int(cur["time"]), cpu, mem, rx, tx, net_total=self.net_total)
        return True

    def count_bytes(self, cur, names, moved):
        """Byte counters that start at the kernel's sum and only ever grow.

        Summing the kernel's counters directly would go down when a device
        goes away or wraps, which Prometheus takes for a restart of the whole
        counter; adding the same clamped deltas as the rates avoids that.
        """
        if self.net_total is None:
            return (sum(cur[n]["rx_bytes"] for n in names if n in cur),
                    sum(cur[n]["tx_bytes"] for n in names if n in cur))
        return self.net_total[0] + moved[0], self.net_total[1] + moved[1]

    def run(self, stop):
        start = time.monotonic()
        tick = 0
        while not stop.is_set():
            try:
                published = self.sample()
                self.faults.end("sampler", "sampler recovered")
            except Exception as e:  # a bug must cost one sample, not the loop
                log.debug("sampler failed", exc_info=True)
                self.faults.start("sampler", "sampler failed: %r" % e, logging.ERROR)
                published = False
            if published and self.on_sample:
                self.on_sample()
            # Next point of a fixed grid: no drift; missed ticks are skipped.
            tick = max(tick + 1, math.floor((time.monotonic() - start) / self.interval) + 1)
            stop.wait(max(0.0, start + tick * self.interval - time.monotonic()))


# ---------------------------------------------------------------------------
# Probing
# ---------------------------------------------------------------------------

def read_peers_file(path):
    """The text of a peers file: a regular file of at most MAX_PEERS_BYTES, not binary."""
    # O_NONBLOCK: a FIFO put in the file's place must not block the agent.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = f.read(MAX_PEERS_BYTES + 1)
    if len(data) > MAX_PEERS_BYTES:
        raise ValueError("larger than %d bytes" % MAX_PEERS_BYTES)
    if b"\0" in data:
        raise ValueError("binary data (a NUL byte)")
    return data.decode("utf-8", "replace")


class PeerList:
    """peers.txt, re-read when it changes; the last good list stays in force.

    entries are the file's lines; peers are the keys probed, with each
    dns:NAME line standing for every address NAME resolves to.
    """

    def __init__(self, path, faults, resolver=None):
        self.path = path
        self.faults = faults
        self.entries = []
        self.peers = []
        self.resolver = resolver or Resolver()
        self._dns = {}              # name -> (monotonic time of the answer, [addresses])
        self._stamp = None
        self._lock = threading.Lock()

    def refresh(self, force=False):
        """Re-read the file if it changed (or force), re-resolve dns: lines when due;
        return True if the list of peers changed."""
        self._reread(force)
        with self._lock:
            return self._expand()

    def _reread(self, force):
        with self._lock:
            try:
                st = os.stat(self.path)
                stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                if stamp == self._stamp and not force:
                    return False
                text = read_peers_file(self.path)
            except FileNotFoundError:
                self.faults.start("peers", "peers file %s not found: %s" % (
                    self.path, "keeping %d peers" % len(self.peers) if self._stamp
                    else "no peers to probe"))
                return False
            except (OSError, ValueError) as e:
                self.faults.start("peers", "cannot read peers file %s: %s (keeping %d peers)" % (
                    self.path, getattr(e, "strerror", None) or e, len(self.peers)))
                return False
            self.faults.end("peers", "peers file %s readable again" % self.path)
            self._stamp = stamp
            peers, problems = parse_peers(text)
            for number, message in problems[:MAX_PEER_WARNINGS]:
                log.warning("%s:%d: skipped: %s", self.path, number, message)
            if len(problems) > MAX_PEER_WARNINGS:
                log.warning("%s: %d more lines skipped", self.path,
                            len(problems) - MAX_PEER_WARNINGS)
            changed = peers != self.entries
            if changed:
                log.info("%d peers from %s", len(peers), self.path)
            self.entries = peers
            return changed

    def _expand(self):
        names = [e[4:] for e in self.entries if e.startswith("dns:")]
        self._dns = {n: self._dns[n] for n in names if n in self._dns}
        now = time.monotonic()
        due = [n for n in names if n not in self._dns or now - self._dns[n][0] >= DNS_REFRESH]
        if due:
            # Wait only for names never answered; the others keep their last answer.
            answers = self.resolver.resolve([n for n in due if n in self._dns], 0)
            answers.update(self.resolver.resolve([n for n in due if n not in self._dns],
                                                 DNS_TIMEOUT))
            for name, (addresses, error) in answers.items():
                old = self._dns.get(name, (0.0, []))[1]
                if addresses is None and error is None and name in self._dns:
                    continue            # still running: look again next round
                if addresses:
                    self._dns[name] = (now, addresses)
                    self.faults.end("dns " + name, "dns:%s resolves again (%d addresses)" % (
                        name, len(addresses)))
                    continue
                # Keep the last good answer; ask again sooner than a full refresh.
                self._dns[name] = (now - DNS_REFRESH + DNS_RETRY, old)
                self.faults.start("dns " + name, "dns:%s: %s (keeping %d addresses)" % (
                    name, error or "no addresses", len(old)))
        peers, seen = [], set()
        for entry in self.entries:
            keys = self._dns.get(entry[4:], (0.0, []))[1] if entry.startswith("dns:") else [entry]
            for key in keys:
                if key not in seen:
                    seen.add(key)
                    peers.append(key)
        changed = peers != self.peers
        self.peers = peers
        return changed


class PingEngine:
    """Runs the ping program once per peer, concurrently, each with a deadline."""

    name = "ping"
    spread = 0.0                    # seconds over which one round's probes start

    def __init__(self, command, timeout, faults, margin=PROBE_MARGIN):
        self.argv0 = shlex.split(command) or ["ping"]
        self.timeout = timeout
        self.margin = margin
        self.faults = faults
        self.env = dict(os.environ, LC_ALL="C", LANG="C")

    def argv(self, peer):
        argv = list(self.argv0) + ["-n", "-c1", "-W%d" % max(1, math.ceil(self.timeout))]
        if ":" in peer:
            argv.append("-6")
        return argv + [peer]

    def probe(self, peers, stop):
        """Probe every peer once; return {peer: (rtt_ms or None, error or None)}."""
        results = {}
        pending = list(peers)
        inflight = {}
        sel = selectors.DefaultSelector()
        step, t0, started = probe_step(self.spread, len(peers)), time.monotonic(), 0
        next_exit_check = t0 + 0.1
        try:
            while (pending or inflight) and not stop.is_set():
                while pending and len(inflight) < PROBE_MAX_INFLIGHT and \
                        time.monotonic() >= t0 + started * step:
                    peer = pending.pop(0)
                    started += 1
                    try:
                        # A session of its own: a wrapper's children die with it.
                        proc = subprocess.Popen(
                            self.argv(peer), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=self.env, close_fds=True,
                            start_new_session=True)
                    except OSError as e:
                        self.faults.start("ping", "cannot run %s: %s; latency will be null" % (
                            self.argv0[0], e.strerror or e), logging.ERROR)
                        results[peer] = (None, "cannot run ping")
                        continue
                    os.set_blocking(proc.stdout.fileno(), False)
                    deadline = time.monotonic() + self.timeout + self.margin
                    inflight[proc.stdout.fileno()] = [peer, proc, deadline, []]
                    sel.register(proc.stdout.fileno(), selectors.EVENT_READ)
                now = time.monotonic()
                wait = 0.2
                if pending and len(inflight) < PROBE_MAX_INFLIGHT:
                    wait = min(wait, max(0.0, t0 + started * step - now))
                if not inflight:
                    stop.wait(wait)
                    continue
                wait = min(wait, max(0.0, min(p[2] for p in inflight.values()) - now))
                for key, _ in sel.select(wait):
                    entry = inflight[key.fd]
                    try:
                        chunk = os.read(key.fd, 65536)
                    except BlockingIOError:
                        continue
                    if chunk:
                        if sum(map(len, entry[3])) < PING_MAX_OUTPUT:
                            entry[3].append(chunk)
                        continue
                    sel.unregister(key.fd)
                    del inflight[key.fd]
                    results[entry[0]] = self._finish(entry)
                now = time.monotonic()
                check_exits = now >= next_exit_check
                if check_exits:
                    next_exit_check = now + 0.1
                for fd, entry in list(inflight.items()):
                    # A child that exited while something it started holds the
                    # pipe open never gives EOF: its answer is complete anyway.
                    if now < entry[2] and not (check_exits and self._exited(entry[1])):
                        continue
                    sel.unregister(fd)
                    del inflight[fd]
                    if now < entry[2]:
                        entry[3].append(self._drain(fd))
                        results[entry[0]] = self._finish(entry)
                    else:
                        self._reap(entry[1])
                        results[entry[0]] = (None, "timeout")
        finally:
            for fd, entry in inflight.items():
                self._reap(entry[1])
            sel.close()
        return results

    @staticmethod
    def _exited(proc):
        """True once the child has exited, without reaping it (its pid stays reserved)."""
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    @staticmethod
    def _drain(fd):
        try:
            return os.read(fd, PING_MAX_OUTPUT)
        except OSError:
            return b""

    @staticmethod
    def _reap(proc):
        """Kill the probe's whole process group, then reap the child."""
        try:
            # Not yet reaped, so the group id cannot belong to anyone else.
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
        proc.stdout.close()

    def _finish(self, entry):
        peer, proc, _, chunks = entry
        self._reap(proc)
        out = b"".join(chunks)[:PING_MAX_OUTPUT].decode("utf-8", "replace")
        rtt = parse_ping(out)
        if rtt is not None:
            self.faults.end("ping", "%s works again" % self.argv0[0])
            if rtt > self.timeout * 1000:
                return None, "timeout"
            return round(rtt, 3), None
        lowered = out.lower()
        if "not permitted" in lowered or "permission denied" in lowered:
            self.faults.start("ping", "%s is not permitted to send ICMP (needs CAP_NET_RAW or "
                              "net.ipv4.ping_group_range): %s" % (self.argv0[0], out.strip()
                                                                  .splitlines()[0]),
                              logging.ERROR)
            return None, "not permitted"
        if proc.returncode == 1 or not out.strip() or "packet loss" in lowered:
            return None, "no reply"
        return None, out.strip().splitlines()[-1][:200]


# Errors of probes the agent could not attempt at all (engine-wide faults,
# logged once as such): they count neither as sent nor as lost.
NOT_SENT = frozenset(("cannot run ping", "not permitted", "no ICMP socket"))


class Prober:
    """Probes every peer once per round on a fixed schedule."""

    def __init__(self, state, peers, engine, interval, faults, window=DEFAULT_WINDOW):
        self.state = state
        self.peers = peers
        self.engine = engine
        self.interval = interval
        self.faults = faults
        self.rounds = 0
        self.probes = {}            # peer: (sent, answered) since start
        self.window = LatencyWindow(window)
        self._window_lock = threading.Lock()    # SIGHUP publishes from the main thread
        self.publish_window(list(getattr(peers, "peers", [])))

    def publish_window(self, peers, results=None, sent_at=None, probed_at=None):
        """Record a round's results (if given) and publish /latency for peers."""
        with self._window_lock:
            if results is not None:
                self.window.record(peers, results, sent_at, probed_at)
            doc = self.window.document(peers, getattr(self.engine, "name", None),
                                       self.interval, getattr(self.engine, "timeout", None))
        self.state.set_latency_doc(doc)

    def set_peers(self, peers):
        """Publish a new peer list at once, before the next round probes it."""
        self.state.set_peers(peers)
        self.publish_window(peers)

    def round(self, stop):
        if self.peers.refresh():
            self.set_peers(self.peers.peers)
        peers = list(self.peers.peers)
        probed_at = time.time()
        results = self.engine.probe(peers, stop) if peers else {}
        if stop.is_set():
            return
        self.publish_window(peers, results, getattr(self.engine, "sent_at", {}), probed_at)
        latency = {}
        probes = {}
        for peer in peers:
            rtt, error = results.get(peer, (None, "not probed"))
            latency[peer] = rtt
            sent, answered = self.probes.get(peer, (0, 0))
            if error not in NOT_SENT:
                sent += 1
            probes[peer] = (sent, answered + (rtt is not None))
            if rtt is None and error not in NOT_SENT:
                self.faults.start("peer " + peer, "peer %s: %s" % (peer, error))
            elif rtt is not None:
                self.faults.end("peer " + peer, "peer %s: replying again (%.3f ms)" % (peer, rtt))
        self.probes = probes
        self.state.set_latency(peers, latency, probes=probes)
        self.rounds += 1

    def run(self, stop):
        # The first round runs at once; the later ones at a phase of the
        # interval that is the node's own, so a fleet started together spreads.
        start = time.monotonic() + round_phase(self.state.node_name, self.interval)
        tick = 0
        while not stop.is_set():
            try:
                self.round(stop)
            except Exception as e:  # a bug must cost one round, not the loop
                log.debug("probe round failed", exc_info=True)
                self.faults.start("prober", "probe round failed: %r" % e, logging.ERROR)
            tick = max(tick + 1, math.floor((time.monotonic() - start) / self.interval) + 1)
            stop.wait(max(0.0, start + tick * self.interval - time.monotonic()))


# ---------------------------------------------------------------------------
# ICMP echo engine and windowed latency statistics
# ---------------------------------------------------------------------------

ICMP_ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ICMP_ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}
# Errors that quote our echo request back: destination unreachable and time
# exceeded (RFC 792 types 3 and 11, RFC 4443 types 1 and 3).
ICMP_ERRORS = {socket.AF_INET: {3: "unreachable", 11: "time exceeded"},
               socket.AF_INET6: {1: "unreachable", 3: "time exceeded"}}
ICMP_HEADER = struct.Struct("!BBHHH")      # type, code, checksum, identifier, sequence
ICMP_TOKEN_LEN = 8
# Socket options the socket module may not name (linux/icmp.h, icmpv6.h, socket.h).
SOL_RAW = 255
ICMP_FILTER = 1
ICMP6_FILTER = 1
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@ll")


def probe_step(spread, count):
    """Seconds between the starts of two probes of one round."""
    return min(PROBE_STEP, spread / count) if count else 0.0


def round_phase(node_name, interval):
    """A stable offset in [0, interval) from the node name (CRC-32, not random)."""
    return zlib.crc32(node_name.encode("utf-8", "replace")) / 2 ** 32 * interval


def icmp_checksum(data):
    """The Internet checksum (RFC 1071) of data."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xffff)
    total += total >> 16
    return ~total & 0xffff


def build_echo(family, ident, seq, payload):
    """An ICMP or ICMPv6 echo request (the kernel sums ICMPv6 itself, RFC 3542 3.1)."""
    head = ICMP_HEADER.pack(ICMP_ECHO_REQUEST[family], 0, 0, ident, seq)
    if family == socket.AF_INET:
        head = ICMP_HEADER.pack(ICMP_ECHO_REQUEST[family], 0,
                                icmp_checksum(head + payload), ident, seq)
    return head + payload


def parse_icmp(family, packet, ip_header):
    """Return ("reply", ident, seq, payload), ("error", ident, seq, what) or None.

    A raw IPv4 socket reads the IP header too (ip_header=True); IPv6 and
    datagram sockets read the ICMP message alone (raw(7), icmp(7)). An error
    is matched by the echo request it quotes after the offending IP header.
    """
    if ip_header:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0f) * 4:]
        if icmp_checksum(packet):
            return None
    if len(packet) < ICMP_HEADER.size:
        return None
    kind, code, _, ident, seq = ICMP_HEADER.unpack_from(packet)
    if kind == ICMP_ECHO_REPLY[family]:
        return "reply", ident, seq, packet[ICMP_HEADER.size:]
    what = ICMP_ERRORS[family].get(kind)
    if what is None:
        return None
    inner = packet[ICMP_HEADER.size:]
    if family == socket.AF_INET:
        if len(inner) < 20:
            return None
        inner = inner[(inner[0] & 0x0f) * 4:]
    else:
        inner = inner[40:]
    if len(inner) < ICMP_HEADER.size:
        return None
    kind, _, _, ident, seq = ICMP_HEADER.unpack_from(inner)
    if kind != ICMP_ECHO_REQUEST[family]:
        return None
    return "error", ident, seq, "%s (code %d)" % (what, code)


def family_of(address):
    """socket.AF_INET or AF_INET6 for an IP literal, None for anything else."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address.split("%", 1)[0])
            return family
        except (OSError, ValueError):
            continue
    return None


def address_key(address):
    """Sort key: IPv4 before IPv6, then numerically."""
    family = family_of(address)
    return (family != socket.AF_INET,
            socket.inet_pton(family, address.split("%", 1)[0]) if family else b"", address)


class Resolver:
    """getaddrinfo with a bounded wait, each lookup in a daemon thread.

    The C library's resolver cannot be interrupted: a lookup that outlives the
    wait goes on, no second lookup of the same name starts meanwhile, and its
    answer serves a later call. A caller that still has an old answer asks
    with wait 0 and keeps using it: a slow DNS server never holds up a round.
    """

    def __init__(self, limit=DNS_TIMEOUT):
        self.limit = limit          # a lookup running longer than this has failed
        self._lock = threading.Lock()
        self._jobs = {}             # name -> [done Event, addresses, error, started]

    def resolve(self, names, wait):
        """Return {name: (sorted addresses or None, error or None)} within wait seconds.

        (None, None) means the lookup is still running, within the limit: ask again.
        """
        jobs = {}
        with self._lock:
            for name in names:
                job = self._jobs.get(name)
                if job is None:
                    job = self._jobs[name] = [threading.Event(), None, None, time.monotonic()]
                    threading.Thread(target=self._lookup, args=(name, job),
                                     name="resolve", daemon=True).start()
                jobs[name] = job
        deadline = time.monotonic() + wait
        out = {}
        for name, job in jobs.items():
            until = min(deadline, job[3] + self.limit)
            if job[0].wait(max(0.0, until - time.monotonic())):
                with self._lock:
                    if self._jobs.get(name) is job:
                        del self._jobs[name]
                out[name] = (job[1], job[2])
            elif time.monotonic() - job[3] >= self.limit:
                out[name] = (None, "name lookup timed out after %gs" % self.limit)
            else:
                out[name] = (None, None)
        return out

    @staticmethod
    def _lookup(name, job):
        try:
            infos = socket.getaddrinfo(name, None, socket.AF_UNSPEC, socket.SOCK_DGRAM)
            job[1] = sorted({info[4][0] for info in infos
                             if info[0] in (socket.AF_INET, socket.AF_INET6)},
                            key=address_key) or None
            if job[1] is None:
                job[2] = "no IPv4 or IPv6 address for %s" % name
        except (OSError, UnicodeError) as e:
            job[2] = "cannot resolve %s: %s" % (name, getattr(e, "strerror", None) or e)
        job[0].set()


def open_icmp_socket(family, kind=None):
    """Return (socket, raw) for ICMP echo: raw if allowed, else an ICMP datagram socket.

    A raw socket needs CAP_NET_RAW; a datagram ("ping") socket needs the
    group in net.ipv4.ping_group_range, which covers ICMPv6 too (icmp(7)).
    kind forces "raw" or "dgram".
    """
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    errors = []
    for k in (kind,) if kind else ("raw", "dgram"):
        try:
            sock = socket.socket(family, socket.SOCK_RAW if k == "raw" else socket.SOCK_DGRAM,
                                 proto)
        except OSError as e:
            errors.append("%s socket: %s" % (k, e.strerror or e))
            continue
        try:
            if k == "raw" and family == socket.AF_INET:
                # Bit n set drops ICMP type n before it reaches us (raw(7) ICMP_FILTER).
                keep = (1 << 0) | (1 << 3) | (1 << 11)
                sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("I", ~keep & 0xffffffff))
            elif k == "raw":
                # struct icmp6_filter: 256 bits, a set bit blocks that type (RFC 3542 3.2).
                words = [0xffffffff] * 8
                for t in (1, 3, 129):
                    words[t >> 5] &= ~(1 << (t & 31))
                sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError as e:
            log.debug("ICMP socket option: %s", e)
        sock.setblocking(False)
        return sock, k == "raw"
    raise OSError("no ICMP%s socket (%s)" % ("" if family == socket.AF_INET else "v6",
                                             "; ".join(errors)))


def icmp_available(kind=None):
    """(True, "raw"/"dgram") if this process can open an ICMP socket, else (False, why)."""
    try:
        sock, raw = open_icmp_socket(socket.AF_INET, kind)
    except OSError as e:
        return False, str(e)
    sock.close()
    return True, "raw" if raw else "dgram"


class IcmpEngine:
    """Sends ICMP echo requests itself: one socket per family for all peers.

    Requests carry our identifier, a sequence number and a random token; a
    reply counts when its sequence is in flight, its payload starts with the
    token, it comes from the probed address and (raw sockets) carries our
    identifier: a datagram socket's identifier is set by the kernel.
    """

    name = "icmp"
    spread = 0.0

    def __init__(self, timeout, faults, kind=None, resolver=None):
        self.timeout = timeout
        self.faults = faults
        self.kind = kind
        self.resolver = resolver or Resolver()
        self.token = os.urandom(ICMP_TOKEN_LEN)
        self.payload = self.token + b"worker-m"
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.seq = int.from_bytes(os.urandom(2), "big")
        self.socks = {}             # family -> (socket, raw)
        self.names = {}             # host name -> (monotonic time, address)
        self.sent_at = {}           # peer -> wall time its request left, last round

    def close(self):
        for sock, _ in self.socks.values():
            sock.close()
        self.socks = {}

    def _socket(self, family):
        if family not in self.socks:
            key = "icmp socket %d" % family
            try:
                self.socks[family] = open_icmp_socket(family, self.kind)
            except OSError as e:
                self.faults.start(key, "icmp engine: %s; those peers will be null" % e,
                                  logging.ERROR)
                return None
            self.faults.end(key, "icmp engine: socket open again")
        return self.socks[family]

    def _targets(self, peers, results):
        """[(peer, family, address)], with host names resolved in bounded time."""
        now = time.monotonic()
        due = [p for p in peers if family_of(p) is None and
               (p not in self.names or now - self.names[p][0] >= DNS_REFRESH)]
        if due:
            answers = self.resolver.resolve([p for p in due if p in self.names], 0)
            answers.update(self.resolver.resolve([p for p in due if p not in self.names],
                                                 min(DNS_TIMEOUT, self.timeout)))
            for name, (addresses, error) in answers.items():
                if addresses:
                    self.names[name] = (now, addresses[0])
                elif error is None and name in self.names:
                    continue            # still running: the old address serves
                elif name in self.names:
                    self.names[name] = (now - DNS_REFRESH + DNS_RETRY, self.names[name][1])
                else:
                    results[name] = (None, error or "name lookup still running")
        self.names = {p: self.names[p] for p in peers if p in self.names}
        targets = []
        for peer in peers:
            address = self.names[peer][1] if peer in self.names else peer
            family = family_of(address)
            if family is not None and peer not in results:
                targets.append((peer, family, address))
        return targets

    def _drain(self):
        """Drop replies that came after their deadline."""
        for sock, _ in self.socks.values():
            try:
                while sock.recv(4096):
                    pass
            except OSError:
                pass

    def probe(self, peers, stop):
        """Probe every peer once; return {peer: (rtt_ms or None, error or None)}."""
        results = {}
        sent_at = self.sent_at = {}
        targets = self._targets(peers, results)
        self._drain()
        sel = selectors.DefaultSelector()
        inflight = {}               # seq -> [peer, family, packed address, mono, wall, deadline]
        step, t0, i = probe_step(self.spread, len(targets)), time.monotonic(), 0
        try:
            while (i < len(targets) or inflight) and not stop.is_set():
                now = time.monotonic()
                while i < len(targets) and now >= t0 + i * step:
                    self._send(targets[i], inflight, results, sent_at, sel)
                    i += 1
                    now = time.monotonic()
                if i < len(targets):
                    # While sending, wake once a tick and read what came: the
                    # kernel's receive timestamp keeps each RTT exact meanwhile.
                    stop.wait(max(PROBE_STEP, t0 + i * step - now))
                    for sock, raw in list(self.socks.values()):
                        self._receive(sock, raw, inflight, results)
                else:
                    # Insertion order is send order, so the first deadline is the next.
                    wait = next(iter(inflight.values()))[5] - now if inflight else 0.0
                    for key, _ in sel.select(min(0.2, max(PROBE_STEP, wait) if wait > 0 else 0)):
                        self._receive(key.fileobj, key.data, inflight, results)
                now = time.monotonic()
                while inflight:
                    seq, entry = next(iter(inflight.items()))
                    if entry[5] > now:
                        break
                    del inflight[seq]
                    results[entry[0]] = (None, "timeout")
        finally:
            sel.close()
        return results

    def _send(self, target, inflight, results, sent_at, sel):
        peer, family, address = target
        opened = self._socket(family)
        if opened is None:
            results[peer] = (None, "no ICMP socket")
            return
        sock, raw = opened
        if sock.fileno() not in sel.get_map():
            sel.register(sock, selectors.EVENT_READ, raw)
        self.seq = (self.seq + 1) & 0xffff
        packet = build_echo(family, self.ident, self.seq, self.payload)
        host = address.split("%", 1)[0]
        if family == socket.AF_INET:
            sockaddr = (address, 0)
        elif "%" in address:        # a link-local address names its interface
            sockaddr = socket.getaddrinfo(address, None, family, socket.SOCK_DGRAM)[0][4]
        else:
            sockaddr = (address, 0, 0, 0)
        mono, wall = time.monotonic(), time.time()
        try:
            sock.sendto(packet, sockaddr)
        except OSError as e:
            results[peer] = (None, e.strerror or str(e))
            if e.errno in (1, 13):      # EPERM, EACCES
                self.faults.start("icmp send", "icmp engine: not permitted to send: %s" % e,
                                  logging.ERROR)
            return
        sent_at[peer] = wall
        inflight[self.seq] = [peer, family, socket.inet_pton(family, host), mono, wall,
                              mono + self.timeout]

    def _receive(self, sock, raw, inflight, results):
        family = sock.family
        while True:
            try:
                data, ancdata, _, source = sock.recvmsg(4096, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("icmp receive: %s", e)
                return
            mono = time.monotonic()
            parsed = parse_icmp(family, data, raw and family == socket.AF_INET)
            if parsed is None:
                continue
            what, ident, seq, rest = parsed
            entry = inflight.get(seq)
            if entry is None or entry[1] != family or (raw and ident != self.ident):
                continue
            if what == "error":
                del inflight[seq]
                results[entry[0]] = (None, rest)
                continue
            try:
                from_peer = socket.inet_pton(family, source[0].split("%", 1)[0]) == entry[2]
            except (OSError, ValueError):
                from_peer = False
            if not rest.startswith(self.token) or not from_peer:
                continue
            del inflight[seq]
            rtt = (mono - entry[3]) * 1000
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and \
                        len(value) >= TIMESPEC.size:
                    sec, nsec = TIMESPEC.unpack_from(value)
                    kernel = (sec + nsec / 1e9 - entry[4]) * 1000
                    # The kernel's receive time, unless the wall clock stepped.
                    if 0 <= kernel <= rtt + 1:
                        rtt = kernel
            if rtt > self.timeout * 1000:
                results[entry[0]] = (None, "timeout")
            else:
                results[entry[0]] = (round(rtt, 3), None)


def make_engine(probe, ping, timeout, faults, spread=0.0, kind=None, margin=PROBE_MARGIN):
    """The engine asked for, or the other one when it cannot work here (one log line)."""
    ping_path = shutil.which(shlex.split(ping)[0] if ping.strip() else "ping")
    if probe == "icmp":
        ok, why = icmp_available(kind)
        if not ok:
            log.warning("icmp engine unavailable (%s): probing with %s instead", why, ping)
            probe = "ping"
    elif ping_path is None:
        ok, why = icmp_available(kind)
        if ok:
            log.warning("ping program %r not found: probing with the icmp engine (%s socket)",
                        ping, why)
            probe = "icmp"
    if probe == "icmp":
        engine = IcmpEngine(timeout, faults, kind)
    else:
        if ping_path is None:
            faults.start("ping", "ping program %r not found; latency will be null" % ping,
                         logging.ERROR)
        engine = PingEngine(ping, timeout, faults, margin)
    engine.spread = spread
    return engine


def number(x):
    """x as an int when it is whole (5, not 5.0), for JSON."""
    return int(x) if x is not None and float(x).is_integer() else x


class LatencyWindow:
    """Each peer's results over the last N rounds, and the /latency document."""

    def __init__(self, size):
        self.size = size
        self.peers = {}             # peer -> [deque of rtt or None, last error, probedAt]

    def record(self, peers, results, sent_at, probed_at):
        """Add one round; peers no longer listed are forgotten."""
        self.peers = {p: self.peers[p] for p in peers if p in self.peers}
        for peer in peers:
            rtt, error = results.get(peer, (None, "not probed"))
            entry = self.peers.setdefault(
                peer, [collections.deque(maxlen=self.size), None, None])
            entry[1] = error if rtt is None else None
            if error in NOT_SENT:
                continue            # no probe left the host: no sample, no loss
            entry[0].append(rtt)
            entry[2] = round(sent_at.get(peer, probed_at), 3)

    def stats(self, peer):
        """{last, min, avg, max, mdev, loss, sent, received, error, probedAt} of one peer."""
        samples, error, probed_at = self.peers.get(peer, ((), None, None))
        got = [x for x in samples if x is not None]
        out = {"last": samples[-1] if samples else None,
               "min": None, "avg": None, "max": None, "mdev": None,
               "loss": round(1 - len(got) / len(samples), 4) if samples else None,
               "sent": len(samples), "received": len(got),
               "error": error, "probedAt": probed_at}
        if got:
            avg = sum(got) / len(got)
            # ping(8)'s mdev: the population standard deviation of the RTTs.
            var = max(0.0, sum(x * x for x in got) / len(got) - avg * avg)
            out.update(min=min(got), avg=round(avg, 3), max=max(got),
                       mdev=round(math.sqrt(var), 3))
        return out

    def document(self, peers, engine, interval, timeout):
        return {"engine": engine, "interval": number(interval), "timeout": number(timeout),
                "window": self.size, "peers": {p: self.stats(p) for p in peers}}


# ---------------------------------------------------------------------------
# Shared state
# ---------------------------------------------------------------------------

def json_bytes(obj):
    return json.dumps(obj, separators=(", ", ": "), allow_nan=False).encode()


def prom_escape(value):
    """A label value for the text format: backslash, double quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prom_number(value):
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def metrics_text(node_name, sample, latency, probes, net_total):
    """The /metrics body (Prometheus text format 0.0.4) of one snapshot.

    A value the snapshot does not have (null in /stats) is left out rather
    than exported as NaN, so that queries and alerts see it as absent.
    """
    timestamp, cpu, mem, rx, tx = sample or (None,) * 5
    rx_total, tx_total = net_total or (None, None)

    def per_second(mbit):       # Mbit/s (10^6 bit/s) to bytes/s
        return None if mbit is None else round(mbit * 125000, 3)

    def per_peer(value):        # lazy: not evaluated when the lines are kept
        return (((("peer", p),), value(p)) for p in latency)

    families = (
        ("cpu_usage_ratio", "gauge",
         "Busy share of all CPUs over the last sampling interval (0..1).", [((), cpu)]),
        ("memory_usage_ratio", "gauge",
         "Share of memory in use, 1 - MemAvailable/MemTotal (0..1).", [((), mem)]),
        ("network_receive_bytes_per_second", "gauge",
         "Bytes received per second over the last sampling interval, selected interfaces.",
         [((), per_second(rx))]),
        ("network_transmit_bytes_per_second", "gauge",
         "Bytes sent per second over the last sampling interval, selected interfaces.",
         [((), per_second(tx))]),
        ("network_receive_bytes_total", "counter",
         "Bytes received on the selected interfaces (kernel counters, never decreasing).",
         [((), rx_total)]),
        ("network_transmit_bytes_total", "counter",
         "Bytes sent on the selected interfaces (kernel counters, never decreasing).",
         [((), tx_total)]),
        ("peer_rtt_seconds", "gauge",
         "Round-trip time to the peer in the latest probe round; absent without a reply.",
         per_peer(lambda p: None if latency[p] is None else round(latency[p] / 1000, 6))),
        ("peer_up", "gauge",
         "1 if the peer answered its probe in the latest round, else 0.",
         per_peer(lambda p: int(latency[p] is not None))),
        ("peer_probes_sent_total", "counter",
         "Probes sent to the peer since the agent started.",
         per_peer(lambda p: probes.get(p, (0, 0))[0])),
        ("peer_probes_answered_total", "counter",
         "Probes the peer answered in time since the agent started.",
         per_peer(lambda p: probes.get(p, (0, 0))[1])),
        ("last_sample_timestamp_seconds", "gauge",
         "Unix time of the latest sample.", [((), timestamp)]),
        ("node_info", "gauge",
         "Always 1; the node label is the nodeName of /stats.",
         [(((("node", node_name),)), 1)]),
        ("build_info", "gauge",
         "Always 1; the labels name the agent's version and Python's.",
         [((("version", __version__), ("python", "%d.%d.%d" % sys.version_info[:3])), 1)]),
    )
    global _peer_lines
    # The peer families change once a round but the sample every second: at
    # 1000 peers formatting them each time cost ~6 ms a sample, so they are
    # kept while latency and probes are unchanged.
    key = (tuple(latency.items()), tuple(probes.get(p) for p in latency))
    cached = _peer_lines[1] if _peer_lines[0] == key else None
    peer_lines = {}
    lines = []
    for name, kind, text, samples in families:
        name = "worker_monitor_" + name
        lines.append("# HELP %s %s" % (name, text))
        lines.append("# TYPE %s %s" % (name, kind))
        if cached is not None and name in cached:
            lines.extend(cached[name])
            continue
        start = len(lines)
        for labels, value in samples:
            if value is None:
                continue
            if labels:
                name_labels = "%s{%s}" % (name, ",".join(
                    '%s="%s"' % (k, prom_escape(v)) for k, v in labels))
            else:
                name_labels = name
            lines.append("%s %s" % (name_labels, prom_number(value)))
        if name.startswith("worker_monitor_peer_"):
            peer_lines[name] = lines[start:]
    if cached is None:
        _peer_lines = (key, peer_lines)
    return ("\n".join(lines) + "\n").encode("utf-8")


_peer_lines = (None, None)      # (latency and probes, {family: lines}) of the last call


class State:
    """The latest sample and latency, with the /stats body built once per change."""

    def __init__(self, node_name, interval=1.0, probe_interval=5.0, history=300.0):
        self.node_name = node_name
        self.interval = interval
        self.probe_interval = probe_interval
        self._lock = threading.Lock()
        self._sample = None
        self._latency = {}
        self._probes = {}
        self._net_total = None
        self.stats_body = None      # bytes, swapped whole; None before the first sample
        self.sample_mono = None
        self.latency_body = None    # bytes of /latency, swapped whole
        self.fresh_mono = None      # the latest sample whose CPU counters advanced
        self.round_mono = None      # the latest completed probe round
        self.started_mono = time.monotonic()
        # One JSON object (bytes) per sample, oldest first.
        self.history = collections.deque(maxlen=max(1, math.ceil(history / interval)))
        self.metrics_body = metrics_text(node_name, None, {}, {}, None)

    def set_sample(self, timestamp, cpu, mem, rx, tx, net_total=None):
        with self._lock:
            self._sample = (timestamp, cpu, mem, rx, tx)
            self.sample_mono = time.monotonic()
            # The kernel's CPU counters advance every tick: no CPU reading means
            # the procfs is unreadable or frozen, which /healthz reports.
            if cpu is not None:
                self.fresh_mono = self.sample_mono
            if net_total is not None:
                self._net_total = net_total
            self.history.append(json_bytes(
                {"timestamp": timestamp, "cpu": cpu, "mem": mem, "rx": rx, "tx": tx}))
            self._rebuild()

    def set_peers(self, peers):
        """Take a new peer list: new peers are null until probed, removed ones go."""
        with self._lock:
            self._latency = {p: self._latency.get(p) for p in peers}
            self._rebuild()

    def set_latency_doc(self, doc):
        body = json_bytes(doc)
        with self._lock:
            self.latency_body = body

    def set_latency(self, peers, latency, probes=None):
        """Take a completed probe round; probes is {peer: (sent, answered)}."""
        with self._lock:
            self._latency = {p: latency.get(p) for p in peers}
            if probes is not None:
                self._probes = dict(probes)
            self.round_mono = time.monotonic()
            self._rebuild()

    def _rebuild(self):
        self.metrics_body = metrics_text(self.node_name, self._sample, self._latency,
                                         self._probes, self._net_total)
        if self._sample is None:
            return
        timestamp, cpu, mem, rx, tx = self._sample
        self.stats_body = json_bytes({
            "nodeName": self.node_name, "timestamp": timestamp, "cpu": cpu, "mem": mem,
            "net": {"rx": rx, "tx": tx}, "latency": self._latency,
        })

    def stats(self):
        """A dict of the latest /stats document, or None before the first sample."""
        body = self.stats_body
        return None if body is None else json.loads(body)

    def history_body(self, count):
        """The /history document with the latest count samples, oldest first."""
        with self._lock:
            samples = list(self.history)
        return b'{"nodeName": %s, "interval": %s, "samples": [%s]}' % (
            json_bytes(self.node_name), json_bytes(self.interval),
            b", ".join(samples[-count:] if count > 0 else []))

    def health(self, now=None):
        """None when healthy, else the reason (for /healthz)."""
        now = time.monotonic() if now is None else now
        reasons = []
        if self.fresh_mono is None:
            reasons.append("no sample yet" if self.sample_mono is None else
                           "no sample yet with readable, advancing CPU counters")
        elif now - self.fresh_mono > 3 * self.interval:
            reasons.append("last sample with readable, advancing CPU counters is %.1f s old "
                           "(limit %g s)" % (now - self.fresh_mono, 3 * self.interval))
        # Before the first round completes the agent's start stands in for it.
        last_round = self.started_mono if self.round_mono is None else self.round_mono
        if now - last_round > 3 * self.probe_interval:
            reasons.append("no probe round completed for %.1f s (limit %g s)" % (
                now - last_round, 3 * self.probe_interval))
        return "; ".join(reasons) or None


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = ("/stats", "/latency", "/metrics", "/history", "/healthz")
HEALTHY_BODY = json_bytes({"status": "ok"})
ALLOWED = "GET, HEAD"


def error_body(status, message, **extra):
    return json_bytes(dict({"error": message, "status": status}, **extra))


def history_count(target, state):
    """(samples, None) for /history?seconds=N, or (None, problem); N is capped."""
    retention = state.history.maxlen
    try:
        query = urllib.parse.parse_qs(target.partition("?")[2], keep_blank_values=True,
                                      strict_parsing=False, max_num_fields=10)
    except ValueError:
        return None, "too many query parameters"
    values = query.get("seconds")
    if values is None:
        return retention, None
    text = values[0] if len(values) == 1 else ""
    if not (text.isascii() and text.isdigit() and text.strip("0")):
        return None, "seconds must be one positive integer, got %r" % ",".join(values)[:40]
    if len(text) > 9:           # more than any retention; int() of it may be refused
        return retention, None
    return min(retention, math.ceil(int(text) / state.interval)), None


def _json(status, body, *headers):
    return status, [("Content-Type", JSON_TYPE)] + list(headers), body


def _fresh(body, content_type=JSON_TYPE):
    return 200, [("Content-Type", content_type), ("Cache-Control", "no-store")], body


def _not_yet(message):
    return _json(503, error_body(503, message), ("Retry-After", "1"))


def render(state, method, target):
    """Answer one request without a socket: (status, [(header, value)], body)."""
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _json(405, error_body(405, "method not allowed", allow=ALLOWED),
                     ("Allow", ALLOWED))
    if path == "/stats":
        body = state.stats_body
        return _not_yet("no sample yet") if body is None else _fresh(body)
    if path == "/latency":
        body = state.latency_body
        return _not_yet("no probe round yet") if body is None else _fresh(body)
    if path == "/metrics":
        return _fresh(state.metrics_body, METRICS_TYPE)
    if path == "/healthz":
        reason = state.health()
        if reason is None:
            return _fresh(HEALTHY_BODY)
        status, headers, body = _fresh(json_bytes({"status": "unhealthy", "reason": reason}))
        return 503, headers, body
    if path == "/history":
        count, problem = history_count(target, state)
        if problem:
            return _json(400, error_body(400, problem))
        return _fresh(state.history_body(count))
    return _json(404, error_body(404, "not found", endpoints=list(ENDPOINTS)))


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date_cache = [0, ""]


def http_date():
    """The Date header (RFC 9110 IMF-fixdate), formatted once per second."""
    now = int(time.time())
    if _date_cache[0] != now:
        t = time.gmtime(now)
        _date_cache[:] = [now, "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
            _WEEKDAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year,
            t.tm_hour, t.tm_min, t.tm_sec)]
    return _date_cache[1]


class Handler(socketserver.StreamRequestHandler):
    """Reads a request, asks render(), writes the answer in one send.

    This is http.server's model (socketserver, a thread per connection)
    without http.server itself: its parse_request runs the email package over
    every request's headers, its send_response writes head and body in two
    sends (with Nagle's algorithm and the client's delayed ACK a keep-alive
    client then waits ~40 ms per request), and importing it loads ssl and
    email, 4 MB of RSS the agent never uses. Here the head is parsed by hand
    and the whole response goes out in one sendall on a TCP_NODELAY socket.
    """

    server_version = "worker-monitor/" + __version__
    timeout = None          # see set_timeout()
    disable_nagle_algorithm = True

    def handle(self):
        self.close_connection = False
        self.buffer = b""
        self.sock_timeout = None
        try:
            while not self.close_connection:
                self.handle_one_request()
        except (OSError, ValueError):
            # The client went away, stalled or stopped reading: nothing to tell it.
            self.close_connection = True

    def setup(self):
        super().setup()
        self.set_timeout(socket.SO_SNDTIMEO, IDLE_TIMEOUT)  # a client that never reads

    def set_timeout(self, option, seconds):
        # The kernel's own socket timeouts: a Python socket timeout would put
        # a poll() before every recv() and send(), doubling the system calls
        # of each request. An expired one raises BlockingIOError (EAGAIN).
        usec = max(1000, int(seconds * 1e6))      # a zero timeval means "no timeout"
        self.connection.setsockopt(socket.SOL_SOCKET, option,
                                   struct.pack("ll", usec // 1000000, usec % 1000000))

    def recv(self, timeout):
        if timeout != self.sock_timeout:
            self.set_timeout(socket.SO_RCVTIMEO, timeout)
            self.sock_timeout = timeout
        return self.connection.recv(65536)

    def read_head(self):
        """The next request head as a list of lines, [] when the client is done.

        A keep-alive client may idle IDLE_TIMEOUT between requests; once a
        request has begun, its whole head must arrive within HEAD_TIMEOUT,
        so a client that trickles bytes cannot hold its thread for long.
        """
        buf = self.buffer.lstrip(b"\r\n")     # empty lines before a request are ignored
        deadline = time.monotonic() + HEAD_TIMEOUT if buf else None
        while True:
            end = buf.find(b"\n\r\n")
            end2 = buf.find(b"\n\n")
            if end2 >= 0 and (end < 0 or end2 < end):
                end, skip = end2, 2
            else:
                skip = 3
            if end >= 0:
                self.buffer = buf[end + skip:]
                return buf[:end].decode("latin-1").split("\n")
            if b"\n" not in buf and len(buf) > MAX_REQUEST_LINE:
                self.reply_error(414, "request line too long")
                return []
            if len(buf) > MAX_HEAD:
                self.reply_error(431, "request head larger than %d bytes" % MAX_HEAD)
                return []
            if deadline is None:
                chunk = self.recv(IDLE_TIMEOUT)     # an idle client is closed silently
            else:
                try:
                    chunk = self.recv(max(0.001, deadline - time.monotonic()))
                except BlockingIOError:
                    self.reply_error(408, "request head not received in %g s" % HEAD_TIMEOUT)
                    return []
            if not chunk:
                return []
            buf = (buf + chunk).lstrip(b"\r\n")
            if deadline is None and buf:
                deadline = time.monotonic() + HEAD_TIMEOUT

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass

    def handle_one_request(self):
        lines = self.read_head()
        if not lines:
            self.close_connection = True
            return
        if len(lines[0]) > MAX_REQUEST_LINE:
            return self.reply_error(414, "request line too long")
        if len(lines) > MAX_HEADERS + 1:
            return self.reply_error(431, "too many header lines")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self.reply_error(400, "bad request line")
        method, target, version = parts
        keep_alive = version == "HTTP/1.1"
        has_body = False
        for header in lines[1:]:
            if len(header) > MAX_HEADER_LINE:
                return self.reply_error(431, "header line too long")
            name, _, value = header.partition(":")
            name = name.strip().lower()
            if name == "connection":
                value = value.strip().lower()
                if "close" in value:
                    keep_alive = False
                elif "keep-alive" in value:
                    keep_alive = True
            elif name in ("content-length", "transfer-encoding") and \
                    value.strip() not in ("0", ""):
                has_body = True
        if target.startswith(("http://", "https://")):
            # The absolute form (RFC 9112 3.2.2): the path follows the authority.
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        status, headers, body = render(self.server.state, method, target)
        # A body we do not read would be taken for the next request.
        self.close_connection = not keep_alive or has_body or status == 405
        self.write_response(status, headers, b"" if method == "HEAD" else body, len(body))
        if self.server.access_log:
            log.info('%s "%s %s %s" %d %d', self.client_address[0], method, target, version,
                     status, len(body))

    def reply_error(self, status, message):
        self.close_connection = True
        self.write_response(status, [("Content-Type", JSON_TYPE)],
                            error_body(status, message))

    def write_response(self, status, headers, body, length=None):
        head = ["HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase),
                "Server: " + self.server_version, "Date: " + http_date()]
        head += ["%s: %s" % h for h in headers]
        head.append("Content-Length: %d" % (len(body) if length is None else length))
        if self.close_connection:
            head.append("Connection: close")
        self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A thread per connection, a bounded number of connections."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # socketserver's default backlog of 5 overflows under a burst of new
    # connections, and each overflow costs the client a 1 s SYN retransmit.
    request_queue_size = 128

    def __init__(self, address, state, access_log=False):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.state = state
        self.access_log = access_log
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            log.debug("%d connections open: refusing %s", MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        log.debug("error serving %s", client_address, exc_info=True)


# ---------------------------------------------------------------------------
# systemd notification (sd_notify(3) without libsystemd)
# ---------------------------------------------------------------------------

def sd_notify(message):
    """Send message to $NOTIFY_SOCKET; a no-op when systemd did not set it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in ("/", "@"):
        return False
    if address[0] == "@":
        address = "\0" + address[1:]   # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as e:
        log.debug("sd_notify %s: %s", message, e)
        return False


class Watchdog:
    """READY=1 after the first sample, then WATCHDOG=1 at half of WatchdogSec."""

    def __init__(self):
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        enabled = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.period = int(usec) / 2e6 if enabled else None
        self.ready = False
        self.last = 0.0

    def on_sample(self):
        if not self.ready:
            self.ready = True
            sd_notify("READY=1\nSTATUS=serving")
        now = time.monotonic()
        if self.period is not None and now - self.last >= min(self.period, 1.0):
            self.last = now
            sd_notify("WATCHDOG=1")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

class SignalPipe:
    """Signals delivered as bytes on a pipe, read by the main loop.

    A Python signal handler runs on the main thread between two bytecodes,
    possibly while that thread holds a lock (an Event's, logging's): a
    handler that takes a lock itself can deadlock. Here the handlers do
    nothing; the interpreter's C handler writes each signal number to the
    wakeup pipe, and wait() reads them outside any lock.
    """

    def __init__(self, signums):
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for signum in signums:
            signal.signal(signum, self._ignore)

    @staticmethod
    def _ignore(signum, frame):
        pass

    def wait(self):
        """Block until signals arrive; return the set of their numbers."""
        return set(os.read(self._read, 512))


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, "%s: error: %s (see --help)\n" % (self.prog, message))


def seconds(low, high):
    """An argparse type: a number of seconds from low to high."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text)
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError("%r must be a number of seconds from %g to %g"
                                             % (text, low, high))
        return value
    return parse


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("%r must be at least 1" % text)
    return value


def port_number(text):
    if not re.fullmatch(r"[0-9]{1,5}", text) or int(text) > 65535:
        raise argparse.ArgumentTypeError("%r is not a port number (0-65535)" % text)
    return int(text)


def ip_literal(text):
    if "%" in text:
        raise argparse.ArgumentTypeError("%r: scoped (zone id) addresses are not supported" % text)
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not an IPv4 or IPv6 address" % text)


def program(text):
    argv = shlex.split(text) if text.strip() else []
    if not argv:
        raise argparse.ArgumentTypeError("an empty command")
    if os.sep in argv[0] and not (os.path.isfile(argv[0]) and os.access(argv[0], os.X_OK)):
        # A missing program on PATH is a runtime fault (logged, latency null);
        # a path that names no executable file is a typo.
        raise argparse.ArgumentTypeError("%r is not an executable file" % argv[0])
    return text


def node_name(text):
    if not text or len(text) > 253 or not text.isprintable():
        raise argparse.ArgumentTypeError("%r: 1-253 printable characters" % text)
    return text


def directory(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError("%r is not a directory" % text)
    return text


def build_parser():
    p = ArgumentParser(
        prog="worker_monitor.py",
        description="Serve this node's CPU, memory, network rates and peer latency as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--port", type=port_number, default=8080, help="HTTP port")
    p.add_argument("--bind", type=ip_literal, default="0.0.0.0",
                   help="listen address (IPv4 or IPv6 literal)")
    p.add_argument("--peers", default=DEFAULT_PEERS, metavar="PATH",
                   help="peer list, one address or host name per line")
    # /proc/stat advances in clock ticks (10 ms at USER_HZ=100): a shorter
    # interval measures the tick, not the load.
    p.add_argument("--interval", type=seconds(0.1, 3600), default=1.0, metavar="S",
                   help="sampling period, seconds (0.1-3600)")
    p.add_argument("--probe-interval", type=seconds(0.2, 3600), default=5.0, metavar="S",
                   help="latency round period, seconds (0.2-3600)")
    p.add_argument("--probe-timeout", type=seconds(0.01, 60), default=1.0, metavar="S",
                   help="per-probe reply timeout, seconds (ping -W; below --probe-interval)")
    p.add_argument("--ping", type=program, default="ping", metavar="CMD",
                   help="the ping program to run")
    p.add_argument("--probe", choices=("ping", "icmp"), default="ping", metavar="ENGINE",
                   help="probe engine: ping runs the ping program, icmp sends echo requests "
                   "from the process itself (ping, icmp)")
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW, metavar="N",
                   help="rounds per peer over which /latency reports min, avg, max, mdev, loss")
    p.add_argument("--node-name", type=node_name,
                   default=os.environ.get("NODE_NAME") or socket.gethostname(),
                   metavar="NAME", help="nodeName in the output ($NODE_NAME, else the hostname)")
    p.add_argument("--procfs", type=directory, default="/proc", metavar="DIR",
                   help="where to read stat, meminfo and net/dev")
    p.add_argument("--sysfs", type=directory, default="/sys", metavar="DIR",
                   help="where to read class/net/*")
    p.add_argument("--history", type=seconds(1, 86400), default=300.0, metavar="S",
                   help="how many seconds of samples GET /history keeps (1-86400)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"), help="log level")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--version", action="version", version="worker-monitor " + __version__)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.probe_timeout >= args.probe_interval:
        parser.error("--probe-timeout (%g) must be less than --probe-interval (%g)"
                     % (args.probe_timeout, args.probe_interval))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(levelname)s: %(message)s")

    faults = Faults()
    state = State(args.node_name, interval=args.interval, probe_interval=args.probe_interval,
                  history=args.history)
    try:
        server = Server((args.bind, args.port), state, access_log=args.access_log)
    except OSError as e:
        log.error("cannot listen on %s port %d: %s", args.bind, args.port, e.strerror or e)
        return 1

    stop = threading.Event()
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))

    peers = PeerList(args.peers, faults)
    peers.refresh()
    state.set_peers(peers.peers)
    # The hard deadline leaves the round time to end before the next one starts.
    margin = min(PROBE_MARGIN, (args.probe_interval - args.probe_timeout) / 2)
    engine = make_engine(args.probe, args.ping, args.probe_timeout, faults,
                         spread=min(PROBE_SPREAD, args.probe_interval / 10), margin=margin)
    watchdog = Watchdog()
    sampler = Sampler(state, args.procfs, args.sysfs, args.interval, faults, watchdog.on_sample)
    prober = Prober(state, peers, engine, args.probe_interval, faults, window=args.window)

    threads = [
        threading.Thread(target=server.serve_forever, args=(0.5,), name="http", daemon=True),
        threading.Thread(target=sampler.run, args=(stop,), name="sampler", daemon=True),
        threading.Thread(target=prober.run, args=(stop,), name="prober", daemon=True),
    ]
    for t in threads:
        t.start()
    host, port = server.server_address[:2]
    log.info("worker-monitor %s serving http://%s:%d/stats (node %s, %d peers)",
             __version__, "[%s]" % host if ":" in host else host, port,
             args.node_name, len(peers.peers))

    while True:
        received = signals.wait()
        if signal.SIGTERM in received or signal.SIGINT in received:
            break
        if signal.SIGHUP in received:      # a burst of SIGHUPs is one re-read
            log.info("SIGHUP: re-reading %s", args.peers)
            if peers.refresh(force=True):
                prober.set_peers(peers.peers)

    stop.set()
    sd_notify("STOPPING=1")
    log.info("stopping")
    # Everything stops in parallel under one deadline; the threads are
    # daemons, so one that is still busy does not hold the exit.
    deadline = time.monotonic() + STOP_GRACE
    closer = threading.Thread(target=server.shutdown, name="http-stop", daemon=True)
    closer.start()
    for t in [closer] + threads[1:]:
        t.join(max(0.0, deadline - time.monotonic()))
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
