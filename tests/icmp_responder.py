#!/usr/bin/env python3
"""A test host's ICMP echo responder with a set delay, jitter and loss per address.

Runs inside a network namespace whose kernel does not answer echo requests
itself (net.ipv4.icmp_echo_ignore_all=1, net.ipv6.icmp.echo_ignore_all=1):
one raw socket bound to each configured address receives the requests to it
and answers each after delay +/- jitter ms (alternating, so the standard
deviation of the answers is exactly the jitter), dropping the share `loss`
of the requests in an even pattern. Addresses not configured get no answer.

usage: icmp_responder.py CONFIG.json COUNTS.json
CONFIG: {"198.18.1.1": {"delay": 5, "jitter": 0, "loss": 0}, ...}
On SIGTERM it writes {"counts": {address: requests received}, "applied":
{address: {n: ms}}} to COUNTS and exits: "applied" is the delay each
answered request n really got, from the kernel's receive timestamp to the
reply's send, so a test can tell its host stalling from a probe's error.
"""

import heapq
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

ICMP6_FILTER = 1
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xffff)
    total += total >> 16
    return ~total & 0xffff


def open_socket(address):
    if ":" in address:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        words = [0xffffffff] * 8
        words[128 >> 5] &= ~(1 << (128 & 31))          # pass echo requests only
        sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("8I", *words))
        sock.bind((address, 0, 0, 0))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.bind((address, 0))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.setblocking(False)
    return sock


def reply_for(address, packet):
    """The echo reply to a request read from a raw socket, or None."""
    if ":" in address:
        if len(packet) < 8 or packet[0] != 128:
            return None
        return bytes([129, 0, 0, 0]) + packet[4:]           # the kernel sums ICMPv6
    ihl = (packet[0] & 0x0f) * 4
    icmp = packet[ihl:]
    if len(icmp) < 8 or icmp[0] != 8:
        return None
    body = bytes([0, 0, 0, 0]) + icmp[4:]
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def main(argv):
    config = json.load(open(argv[1]))
    counts = {a: 0 for a in config}
    sel = selectors.DefaultSelector()
    for address in config:
        sel.register(open_socket(address), selectors.EVENT_READ, address)
    try:
        # Ahead of whatever else runs on a busy test machine: the delays are ours.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (AttributeError, OSError):
        pass
    running = [True]
    signal.signal(signal.SIGTERM, lambda *a: running.__setitem__(0, False))
    applied = {a: {} for a in config}
    queue = []          # (due, n, socket, reply, source, address, k, arrived)
    n = 0
    print("ready", flush=True)
    while running[0]:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, sock, reply, source, address, k, arrived = heapq.heappop(queue)
            sent = time.monotonic()
            try:
                sock.sendto(reply, source)
                applied[address][k] = round((sent - arrived) * 1000, 3)
            except OSError:
                pass
            now = time.monotonic()
        # Sleep to a millisecond before the next answer is due, then poll:
        # a timer's wake-up slack would add to every delay.
        wait = min(0.2, queue[0][0] - now - 0.001) if queue else 0.2
        for key, _ in sel.select(max(0.0, wait)):
            arrived = time.monotonic()
            address, sock = key.data, key.fileobj
            while True:
                try:
                    packet, ancdata, _, source = sock.recvmsg(4096, 64)
                except (BlockingIOError, InterruptedError):
                    break
                for level, kind, value in ancdata:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack_from("@ll", value)
                        # The kernel's receive time, on the monotonic clock.
                        arrived = time.monotonic() - (time.time() - (sec + nsec / 1e9))
                reply = reply_for(address, packet)
                if reply is None:
                    continue
                k = counts[address]
                counts[address] += 1
                c = config[address]
                loss = c.get("loss", 0)
                if int((k + 1) * loss) > int(k * loss):
                    continue
                jitter = c.get("jitter", 0) * (1 if k % 2 else -1)
                delay = max(0.0, c.get("delay", 0) + jitter) / 1000
                n += 1
                heapq.heappush(queue, (arrived + delay, n, sock, reply, source, address, k,
                                       arrived))
    with open(argv[2], "w") as f:
        json.dump({"counts": counts, "applied": applied}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
