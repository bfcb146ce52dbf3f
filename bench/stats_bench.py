#!/usr/bin/env python3
"""Benchmark worker-monitor: /stats throughput and latency, RSS, idle CPU.

Starts the agent as a real process on 127.0.0.1 (a free port) with a
temporary peers file of three loopback peers, waits for GET /stats to answer
200, then measures:

  (a) /stats requests/s and p50/p99 latency with 10 keep-alive connections
      (wrk -t2 -c10 --latency when installed, else a built-in client of
      10 threads on http.client);
  (b) the agent's RSS (VmRSS) after the load and at idle, and its peak (VmHWM);
  (c) its CPU share of one core at 1 request/s with the three peers probed,
      from utime+stime in /proc/PID/stat, agent alone and with its reaped
      children (the ping processes, cutime+cstime).

Targets from issue 2 are printed beside the figures with PASS or MISS. It is a
benchmark, not a test: it exits 0 whatever the figures (non-zero only when it
could not measure at all). The agent is always stopped at the end.

    python3 bench/stats_bench.py [--duration 10] [--idle-seconds 60]
                                 [--agent PATH] [--client auto|wrk|builtin] [--json]

Only loopback addresses are ever probed or contacted. Standard library only.
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_AGENT = os.path.join(os.path.dirname(HERE), "worker_monitor.py")
HOST = "127.0.0.1"
PEERS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")   # loopback only, never anything else
CONNECTIONS = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGET_RPS = 10000.0        # requests/s at 10 connections, at least
TARGET_P99_MS = 5.0         # p99 latency, at most
TARGET_RSS_MB = 22.0        # resident set size, at most (MB = 2^20 bytes)
TARGET_IDLE_CPU = 0.3       # percent of one core at 1 request/s, at most


def progress(message):
    print("# " + message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# The agent process
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def interpreter(python):
    """(version, VmRSS kB) of the interpreter doing nothing: RSS no agent change can remove."""
    code = ("import sys; print(sys.version.split()[0], [l.split()[1] for l in "
            "open('/proc/self/status') if l.startswith('VmRSS:')][0])")
    try:
        out = subprocess.run([python, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
        version, rss = out.stdout.split()
        return version, int(rss)
    except (OSError, ValueError, subprocess.SubprocessError):
        return "?", None


def get(port, path="/stats", timeout=2.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Agent:
    """The agent as a child process, its stderr in a temp file."""

    def __init__(self, agent_path, workdir, python):
        self.path = agent_path
        self.python = python
        self.workdir = workdir
        self.peers = os.path.join(workdir, "peers.txt")
        with open(self.peers, "w") as f:
            f.write("# worker-monitor benchmark: loopback peers only\n")
            f.write("".join(p + "\n" for p in PEERS))
        self.log_path = os.path.join(workdir, "agent.log")
        self.proc = None
        self.port = None
        self.exit_code = None
        self.stop_seconds = None

    def start(self, timeout=20.0):
        """Start on a free port; return seconds until the first /stats 200."""
        for attempt in range(3):      # a free port can be taken between probe and bind
            self.port = free_port()
            argv = [self.python, self.path, "--bind", HOST, "--port", str(self.port),
                    "--peers", self.peers]
            self.log = open(self.log_path, "ab")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=self.log, stderr=self.log, cwd=self.workdir)
            deadline = t0 + timeout
            last = None
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    status, _ = get(self.port, timeout=1.0)
                    last = status
                    if status == 200:
                        return time.monotonic() - t0
                except OSError as e:
                    last = e
                time.sleep(0.05)
            code = self.proc.poll()
            if code is None:
                self.stop()
                raise RuntimeError("agent gave no /stats 200 within %.0f s (last: %r)"
                                   % (timeout, last))
            progress("agent exited with status %d on port %d (attempt %d); retrying"
                     % (code, self.port, attempt + 1))
        raise RuntimeError("agent would not start; its log:\n" + self.log_text())

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None and self.exit_code is None:
                self.exit_code = self.proc.returncode
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(5.0)
            self.stop_seconds = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.exit_code = "killed after SIGTERM was ignored for 5 s"
        self.log.close()

    def log_text(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # /proc readings --------------------------------------------------------

    def status(self):
        """VmRSS, VmHWM (kB) and Threads from /proc/PID/status."""
        out = {}
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(value.split()[0])
        return out

    def cpu_ticks(self):
        """(utime+stime, cutime+cstime) in clock ticks from /proc/PID/stat."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rpartition(")")[2].split()
        # after "(comm)": state is field 3, utime 14, stime 15, cutime 16, cstime 17
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        return utime + stime, cutime + cstime

    def thread_ticks(self):
        """{tid: utime+stime} for every thread of the agent."""
        out = {}
        base = "/proc/%d/task" % self.proc.pid
        for tid in os.listdir(base):
            try:
                with open(os.path.join(base, tid, "stat")) as f:
                    fields = f.read().rpartition(")")[2].split()
                out[int(tid)] = int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass   # the thread ended between listdir and open
        return out


# ---------------------------------------------------------------------------
# Load: wrk or a built-in keep-alive client
# ---------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def run_wrk(wrk, port, duration):
    argv = [wrk, "-t2", "-c%d" % CONNECTIONS, "-d%ds" % max(1, round(duration)), "--latency",
            "http://%s:%d/stats" % (HOST, port)]
    progress("load: " + " ".join(argv))
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=duration + 60).stdout
    res = {"client": "wrk -t2 -c%d --latency" % CONNECTIONS, "raw": out,
           "rps": None, "p50_ms": None, "p99_ms": None, "requests": None, "errors": 0,
           "non_2xx": 0}
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(r"^\s*%s(?:\.0+)?%%\s+(\S+)" % pct, out, re.M)
        if m:
            res[key] = _ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    return res


def run_builtin(port, duration):
    progress("load: built-in client, %d threads x 1 keep-alive http.client connection, %.0f s"
             % (CONNECTIONS, duration))
    start = threading.Event()
    deadline = [0.0]
    per_thread = []

    def worker(out):
        lat, errors, non200, reconnects = [], 0, 0, 0
        conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
        start.wait()
        clock = time.perf_counter
        while True:
            t0 = clock()
            if t0 >= deadline[0]:
                break
            try:
                conn.request("GET", "/stats")
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    non200 += 1
                if resp.will_close:
                    conn.close()
                    reconnects += 1
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                reconnects += 1
                continue
            lat.append(clock() - t0)
        conn.close()
        out.update(lat=lat, errors=errors, non200=non200, reconnects=reconnects)

    threads = []
    for _ in range(CONNECTIONS):
        out = {}
        per_thread.append(out)
        threads.append(threading.Thread(target=worker, args=(out,), daemon=True))
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + duration
    start.set()
    for t in threads:
        t.join(duration + 30)
    elapsed = time.perf_counter() - t0
    lat = sorted(x for out in per_thread for x in out.get("lat", ()))

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100.0 * (len(lat) - 1))))] * 1e3 if lat else None

    return {"client": "built-in (%d threads, http.client keep-alive)" % CONNECTIONS,
            "raw": None, "rps": len(lat) / elapsed if elapsed else None, "requests": len(lat),
            "p50_ms": pct(50), "p99_ms": pct(99),
            "errors": sum(out.get("errors", 0) for out in per_thread),
            "non_2xx": sum(out.get("non200", 0) for out in per_thread),
            "reconnects": sum(out.get("reconnects", 0) for out in per_thread)}


# ---------------------------------------------------------------------------
# Idle: 1 request/s, CPU from /proc/PID/stat
# ---------------------------------------------------------------------------

def idle_phase(agent, seconds):
    progress("idle: %d s at 1 request/s over one keep-alive connection, %d peers probed"
             % (seconds, len(PEERS)))
    conn = http.client.HTTPConnection(HOST, agent.port, timeout=5.0)
    bodies, failures = [], 0
    threads0 = agent.thread_ticks()
    own0, kids0 = agent.cpu_ticks()
    t0 = time.monotonic()
    for i in range(int(seconds)):
        try:
            conn.request("GET", "/stats")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200:
                bodies.append(body)
            else:
                failures += 1
            if resp.will_close:
                conn.close()
        except (OSError, http.client.HTTPException):
            failures += 1
            conn.close()
        time.sleep(max(0.0, t0 + i + 1 - time.monotonic()))
    own1, kids1 = agent.cpu_ticks()
    elapsed = time.monotonic() - t0
    threads1 = agent.thread_ticks()
    conn.close()
    own = (own1 - own0) / CLK_TCK
    kids = (kids1 - kids0) / CLK_TCK
    per_thread = sorted(((tid, (ticks - threads0.get(tid, 0)) / CLK_TCK)
                         for tid, ticks in threads1.items()), key=lambda x: -x[1])
    last = json.loads(bodies[-1]) if bodies else None
    return {"seconds": elapsed, "requests": len(bodies), "failures": failures,
            "agent_cpu_s": own, "children_cpu_s": kids,
            "agent_pct": 100.0 * own / elapsed, "with_children_pct": 100.0 * (own + kids) / elapsed,
            "threads": per_thread, "last_stats": last}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def verdict(value, target, at_least):
    if value is None:
        return "MISS (not measured)"
    return "PASS" if (value >= target if at_least else value <= target) else "MISS"


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="load duration, seconds")
    p.add_argument("--idle-seconds", type=float, default=60.0,
                   help="idle measurement at 1 request/s, seconds")
    p.add_argument("--agent", default=DEFAULT_AGENT, help="path of worker_monitor.py")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter to run the agent with (the unit uses /usr/bin/python3)")
    p.add_argument("--client", choices=("auto", "wrk", "builtin"), default="auto",
                   help="load generator: wrk when installed (auto), or the built-in one")
    p.add_argument("--json", action="store_true",
                   help="print a machine-readable summary on stdout instead of the report")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.idle_seconds < 1:
        p.error("--duration must be > 0 and --idle-seconds >= 1")
    if not os.path.isfile(args.agent):
        p.error("no agent at %s" % args.agent)
    wrk = shutil.which("wrk") if args.client != "builtin" else None
    if args.client == "wrk" and wrk is None:
        p.error("--client wrk: wrk is not installed")

    # Stop the agent even when the benchmark itself is interrupted.
    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)

    workdir = tempfile.mkdtemp(prefix="wm-bench-")
    agent = Agent(os.path.abspath(args.agent), workdir, args.python)
    r = {"agent": agent.path, "python": args.python, "cpus": os.cpu_count(),
         "peers": list(PEERS)}
    r["python_version"], r["baseline_rss_kb"] = interpreter(args.python)
    try:
        r["startup_s"] = agent.start()
        r["pid"], r["port"] = agent.proc.pid, agent.port
        progress("agent pid %d on %s:%d answered 200 after %.2f s"
                 % (agent.proc.pid, HOST, agent.port, r["startup_s"]))
        r["status_start"] = agent.status()
        # Let the first probe round finish so the load runs against the steady state.
        time.sleep(2.0)

        load = run_wrk(wrk, agent.port, args.duration) if wrk else \
            run_builtin(agent.port, args.duration)
        r["load"] = load
        time.sleep(0.5)   # let the connection threads end
        r["status_after_load"] = agent.status()

        r["idle"] = idle_phase(agent, args.idle_seconds)
        r["status_idle"] = agent.status()
    except KeyboardInterrupt:
        progress("interrupted")
        r["error"] = "interrupted"
    except Exception as e:
        r["error"] = "%s: %s" % (type(e).__name__, e)
        progress("benchmark failed: " + r["error"])
    finally:
        agent.stop()
        r["agent_exit"] = agent.exit_code
        r["agent_stop_s"] = agent.stop_seconds
        r["agent_log"] = agent.log_text().splitlines()
        shutil.rmtree(workdir, ignore_errors=True)

    load = r.get("load", {})
    idle = r.get("idle", {})
    rss_load = r.get("status_after_load", {}).get("VmRSS")
    rss_idle = r.get("status_idle", {}).get("VmRSS")
    hwm = r.get("status_idle", r.get("status_after_load", {})).get("VmHWM")
    mb = lambda kb: None if kb is None else kb / 1024.0   # noqa: E731
    rss_worst = max((x for x in (rss_load, rss_idle) if x is not None), default=None)
    r["targets"] = {
        "rps": {"value": load.get("rps"), "target": ">= %d" % TARGET_RPS,
                "result": verdict(load.get("rps"), TARGET_RPS, True)},
        "p99_ms": {"value": load.get("p99_ms"), "target": "<= %g" % TARGET_P99_MS,
                   "result": verdict(load.get("p99_ms"), TARGET_P99_MS, False)},
        "rss_mb": {"value": mb(rss_worst), "target": "<= %g" % TARGET_RSS_MB,
                   "result": verdict(mb(rss_worst), TARGET_RSS_MB, False)},
        "idle_cpu_pct": {"value": idle.get("agent_pct"), "target": "<= %g" % TARGET_IDLE_CPU,
                         "result": verdict(idle.get("agent_pct"), TARGET_IDLE_CPU, False)},
    }

    if args.json:
        out = dict(r)
        if "load" in out:
            out["load"] = {k: v for k, v in load.items() if k != "raw"}
        print(json.dumps(out, indent=2, default=str))
        return 0 if "error" not in r else 1

    t = r["targets"]
    print("worker-monitor /stats benchmark")
    print("  agent     %s, pid %s on %s:%s" % (r["agent"], r.get("pid"), HOST, r.get("port")))
    print("  python    %s (%s), %d CPUs" % (r["python"], r["python_version"], r["cpus"]))
    print("  peers     %s (loopback)" % ", ".join(PEERS))
    if "startup_s" in r:
        print("  startup   first /stats 200 after %.2f s" % r["startup_s"])
    if load:
        print()
        print("(a) load: %s, %.0f s" % (load["client"], args.duration))
        if load.get("raw"):
            print("    " + load["raw"].rstrip().replace("\n", "\n    "))
        print("    requests      %s  (socket errors %d, non-2xx %d%s)"
              % (load.get("requests"), load.get("errors", 0), load.get("non_2xx", 0),
                 ", reconnects %d" % load["reconnects"] if "reconnects" in load else ""))
        print("    requests/s    %10s    target %-8s %s"
              % (fmt(load.get("rps"), ".0f"), t["rps"]["target"], t["rps"]["result"]))
        print("    p50 latency   %10s ms" % fmt(load.get("p50_ms"), ".3f"))
        print("    p99 latency   %10s ms  target %-8s %s"
              % (fmt(load.get("p99_ms"), ".3f"), t["p99_ms"]["target"], t["p99_ms"]["result"]))
        if not load.get("raw"):
            print("    note: the built-in client is Python too and shares the %d CPUs with the "
                  "agent; its figures are a lower bound (install wrk for the real ones)"
                  % r["cpus"])
    if rss_load is not None:
        print()
        print("(b) memory (MB = 2^20 bytes)")
        print("    at start      VmRSS %6.1f MB  (threads %d)"
              % (mb(r["status_start"]["VmRSS"]), r["status_start"]["Threads"]))
        print("    after load    VmRSS %6.1f MB  (threads %d)"
              % (mb(rss_load), r["status_after_load"]["Threads"]))
        if rss_idle is not None:
            print("    at idle       VmRSS %6.1f MB  (threads %d)"
                  % (mb(rss_idle), r["status_idle"]["Threads"]))
        print("    peak          VmHWM %6.1f MB" % mb(hwm))
        if r["baseline_rss_kb"]:
            print("    interpreter   VmRSS %6.1f MB  (same python running nothing; the agent "
                  "adds %.1f MB)" % (mb(r["baseline_rss_kb"]), mb(rss_worst - r["baseline_rss_kb"])))
        print("    RSS (worst)         %6.1f MB  target %-8s %s"
              % (mb(rss_worst), t["rss_mb"]["target"], t["rss_mb"]["result"]))
    if idle:
        print()
        print("(c) CPU at 1 request/s with %d peers, %.1f s (%d requests, %d failed; "
              "clock tick %d Hz)" % (len(PEERS), idle["seconds"], idle["requests"],
                                     idle["failures"], CLK_TCK))
        print("    agent only      %6.3f %% of one core (%.2f s CPU)  target %-6s %s"
              % (idle["agent_pct"], idle["agent_cpu_s"], t["idle_cpu_pct"]["target"],
                 t["idle_cpu_pct"]["result"]))
        print("    with children   %6.3f %% of one core (+%.2f s CPU in ping processes)"
              % (idle["with_children_pct"], idle["children_cpu_s"]))
        busy = [(tid, s) for tid, s in idle["threads"] if s > 0]
        print("    by thread       " + (", ".join(
            "%s %.2f s" % ("main" if tid == r["pid"] else "tid %d" % tid, s) for tid, s in busy[:6])
                                        if busy else "all below one clock tick"))
        if idle.get("last_stats"):
            print("    last /stats     " + json.dumps(idle["last_stats"]))
    print()
    print("agent stopped: exit %s%s" % (r["agent_exit"], "" if r["agent_stop_s"] is None
                                         else " after %.2f s on SIGTERM" % r["agent_stop_s"]))
    if r["agent_log"]:
        print("agent log (%d lines):" % len(r["agent_log"]))
        for line in r["agent_log"][:20]:
            print("    " + line)
        if len(r["agent_log"]) > 20:
            print("    ...")
    if "error" in r:
        print("benchmark incomplete: " + r["error"])
        return 1
    print("summary: " + ", ".join("%s %s" % (k, v["result"]) for k, v in t.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
