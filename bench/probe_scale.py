#!/usr/bin/env python3
"""Probe scale benchmark: the agent with each engine against 1000 peers, and fping.

Root only. Builds a test host in network namespaces made here (near <-veth->
far, 1000 addresses in 198.18.0.0/15 on far's loopback, answered by far's
kernel), runs in near: the agent with --probe icmp, then with --probe ping,
then fping over the same targets every 5 s; prints CPU seconds per 30 s of
each and the share of probes answered. Removes the namespaces at the end.
Probes nothing outside them.

usage: sudo python3 bench/probe_scale.py [--peers 1000] [--seconds 30] [--json FILE]
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import netns_host  # noqa: E402

INTERVAL = 5
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of pid and of its reaped children (ping processes), seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def fetch(host, port, path):
    code = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
            "'http://127.0.0.1:%d%s', timeout=5).read().decode())" % (port, path))
    out = host.run_near([sys.executable, "-c", code], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, check=False).stdout
    return json.loads(out) if out else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_agent(host, engine, peers_file, seconds):
    port = free_port()
    log = open(os.path.join(host.tmp, "agent-%s.log" % engine), "w+")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", host.near, sys.executable, "-X", "faulthandler",
         os.path.join(ROOT, "worker_monitor.py"),
         "--bind", "127.0.0.1", "--port", str(port), "--peers", peers_file,
         "--probe", engine, "--probe-interval", str(INTERVAL), "--probe-timeout", "1",
         "--window", "1000", "--node-name", "bench"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    host.procs.append(proc)
    try:
        # Warm up: wait for the first round to finish.
        deadline = time.monotonic() + 60
        doc = None
        while time.monotonic() < deadline:
            doc = fetch(host, port, "/latency")
            if doc and (not doc["peers"] or min(p["sent"] for p in doc["peers"].values())):
                break
            time.sleep(0.5)
        # Measure from 2 s after a round started (it has ended by then) for
        # whole intervals, so the window holds seconds/INTERVAL rounds exactly.
        started = min([p["probedAt"] for p in doc["peers"].values()] or [time.time()])
        time.sleep(max(0.0, started + INTERVAL + 2.0 - time.time()))
        before, cpu0, t0 = fetch(host, port, "/latency"), cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        after = fetch(host, port, "/latency")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            # SIGTERM must stop the agent within 2 s: show where it hangs.
            proc.send_signal(signal.SIGABRT)
            proc.wait(10)
            log.seek(0)
            sys.stderr.write("agent --probe %s did not stop on SIGTERM:\n%s\n" % (
                engine, log.read()[-8000:]))
            raise
    sent = received = full = 0
    rounds = set()
    for peer, b in before["peers"].items():
        a = after["peers"][peer]
        s, r = a["sent"] - b["sent"], a["received"] - b["received"]
        sent, received = sent + s, received + r
        full += s > 0 and s == r
        rounds.add(s)
    log.seek(0)
    warnings = [line for line in log if not line.startswith("INFO")]
    return {"tool": "agent --probe %s" % after["engine"], "cpu": (cpu1 - cpu0) * 30 / (t1 - t0),
            "sent": sent, "received": received, "peers_all_answered": full,
            "rounds": sorted(rounds), "log": warnings[:5]}


def run_fping(host, targets_file, seconds):
    """fping over the targets once every INTERVAL; its CPU from the children's rusage."""
    argv = ["ip", "netns", "exec", host.near, "fping", "-q", "-C1", "-t1000", "-r0",
            "-i", "0.5", "-f", targets_file]
    sent = received = 0
    full = {}
    rounds = int(round(seconds / INTERVAL))
    before = os.times()
    start = time.monotonic()
    for n in range(rounds):
        time.sleep(max(0.0, start + n * INTERVAL - time.monotonic()))
        err = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE).stderr
        for line in err.decode().splitlines():
            name, sep, value = line.partition(" : ")
            if sep:
                sent += 1
                ok = value.strip() != "-"
                received += ok
                full[name.strip()] = full.get(name.strip(), True) and ok
    after = os.times()
    cpu = (after.children_user - before.children_user) + \
        (after.children_system - before.children_system)
    return {"tool": "fping -i0.5 every %ds" % INTERVAL, "cpu": cpu * 30 / (rounds * INTERVAL),
            "sent": sent, "received": received,
            "peers_all_answered": sum(full.values()), "rounds": [rounds], "log": []}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", type=int, default=1000)
    p.add_argument("--seconds", type=int, default=30)
    p.add_argument("--engines", default="icmp,ping")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    why = netns_host.why_no_netns()
    if why:
        sys.exit("probe_scale: %s" % why)
    if shutil.which("fping") is None:
        sys.exit("probe_scale: needs fping")
    results = []
    with netns_host.NetnsHost(count=args.peers) as host:
        peers_file = os.path.join(host.tmp, "peers.txt")
        with open(peers_file, "w") as f:
            f.write("\n".join(host.v4) + "\n")
        results.append(run_fping(host, peers_file, args.seconds))
        for engine in args.engines.split(","):
            results.append(run_agent(host, engine, peers_file, args.seconds))
        # The agent's own cost without peers: sampling, HTTP, an empty round.
        empty = os.path.join(host.tmp, "empty.txt")
        open(empty, "w").close()
        results.append(run_agent(host, "icmp", empty, args.seconds))
        results[-1]["tool"] = "agent, no peers"
    base = results[0]["cpu"]
    print("%d peers, rounds every %d s, %d s measured; CPU seconds per 30 s (user+sys, "
          "children included)" % (args.peers, INTERVAL, args.seconds))
    print("%-22s %10s %8s %12s %18s %8s" % ("", "CPU s/30s", "x fping", "answered",
                                             "peers all rounds", "rounds"))
    for r in results:
        if not r["sent"]:
            print("%-22s %10.3f %8.2f" % (r["tool"], r["cpu"], r["cpu"] / base if base else 0))
            continue
        print("%-22s %10.3f %8.2f %11.2f%% %13d/%d %8s" % (
            r["tool"], r["cpu"], r["cpu"] / base if base else float("nan"),
            100.0 * r["received"] / r["sent"] if r["sent"] else 0.0,
            r["peers_all_answered"], args.peers, ",".join(map(str, r["rounds"]))))
        for line in r["log"]:
            print("    log: %s" % line.rstrip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
