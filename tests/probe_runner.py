#!/usr/bin/env python3
"""Runs the agent's Prober for a number of rounds and prints what it saw, as JSON.

Started by the accuracy tests inside a namespace they made:
probe_runner.py CONFIG.json, CONFIG = {"engine": "icmp", "kind": "raw", "peers": [...],
"rounds": 8, "interval": 1.2, "timeout": 1, "window": 8}
"""

import json
import logging
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import worker_monitor as wm  # noqa: E402


def main(argv):
    cfg = json.load(open(argv[1]))
    logging.basicConfig(level=logging.ERROR, format="runner: %(message)s")
    faults = wm.Faults()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(cfg["peers"]) + "\n")
    try:
        state = wm.State("runner")
        peers = wm.PeerList(f.name, faults)
        peers.refresh()
        engine = wm.make_engine(cfg["engine"], "ping", cfg["timeout"], faults,
                                spread=cfg.get("spread", 0.1), kind=cfg.get("kind"))
        prober = wm.Prober(state, peers, engine, cfg["interval"], faults, window=cfg["window"])
        stop = threading.Event()
        rounds, durations = [], []
        probe = engine.probe

        def recording_probe(peer_list, stop):
            t = time.monotonic()
            results = probe(peer_list, stop)
            durations.append(time.monotonic() - t)
            rounds.append({p: list(v) for p, v in results.items()})
            return results

        engine.probe = recording_probe
        start = time.monotonic()
        for n in range(cfg["rounds"]):
            stop.wait(max(0.0, start + n * cfg["interval"] - time.monotonic()))
            prober.round(stop)
        json.dump({"engine": engine.name, "rounds": rounds, "durations": durations,
                   "latency": json.loads(state.latency_body)}, sys.stdout)
    finally:
        os.unlink(f.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
