"""The ICMP echo engine: packets, matching, sockets, fallbacks, name lookups."""

import logging
import os
import socket
import struct
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import worker_monitor as wm  # noqa: E402

# An echo reply from 127.0.0.1 as a raw IPv4 socket reads it (captured with
# ping -c1 127.0.0.1 and a raw socket): IP header, then ICMP id 0x1c46 seq 1.
IPV4_REPLY = bytes.fromhex(
    "4500002c6f3d0000400111b1" "7f0000017f000001"
    "0000" "0000" "1c46" "0001" "0102030405060708" "776f726b65722d6d")
IPV4_REPLY = IPV4_REPLY[:22] + struct.pack("!H", wm.icmp_checksum(
    IPV4_REPLY[20:22] + b"\0\0" + IPV4_REPLY[24:])) + IPV4_REPLY[24:]


def quoted_error(family, kind, code, ident, seq):
    """An ICMP error quoting our echo request, as the kernel forwards it."""
    request = wm.build_echo(family, ident, seq, b"x" * 16)
    if family == socket.AF_INET:
        inner = bytes.fromhex("450000300000400040010000c6120001c6120105") + request
        head = struct.pack("!BBHI", kind, code, 0, 0) + inner
        head = head[:2] + struct.pack("!H", wm.icmp_checksum(head)) + head[4:]
        return bytes.fromhex("450000500000000040010000c6120002c6120001") + head
    inner = bytes(40) + request
    return struct.pack("!BBHI", kind, code, 0, 0) + inner


def icmp_works():
    ok, _ = wm.icmp_available()
    return ok


class Checksum(unittest.TestCase):
    def test_rfc1071_example(self):
        # RFC 1071 section 3: the ones' complement sum of these words is 0xddf2.
        data = bytes.fromhex("0001f203f4f5f6f7")
        self.assertEqual(wm.icmp_checksum(data), ~0xddf2 & 0xffff)

    def test_odd_length_is_padded(self):
        self.assertEqual(wm.icmp_checksum(b"\x01"), wm.icmp_checksum(b"\x01\x00"))

    def test_a_message_with_its_checksum_sums_to_zero(self):
        packet = wm.build_echo(socket.AF_INET, 0xbeef, 7, b"token123payload!")
        self.assertEqual(wm.icmp_checksum(packet), 0)


class Packets(unittest.TestCase):
    def test_echo_request_layout(self):
        packet = wm.build_echo(socket.AF_INET, 0x1234, 0xfffe, b"abcd")
        kind, code, _, ident, seq = struct.unpack("!BBHHH", packet[:8])
        self.assertEqual((kind, code, ident, seq, packet[8:]), (8, 0, 0x1234, 0xfffe, b"abcd"))

    def test_icmpv6_request_leaves_checksum_to_the_kernel(self):
        packet = wm.build_echo(socket.AF_INET6, 1, 2, b"ab")
        self.assertEqual(packet, bytes([128, 0, 0, 0, 0, 1, 0, 2]) + b"ab")

    def test_raw_ipv4_reply(self):
        self.assertEqual(wm.parse_icmp(socket.AF_INET, IPV4_REPLY, True),
                         ("reply", 0x1c46, 1, bytes.fromhex("0102030405060708") + b"worker-m"))

    def test_raw_ipv4_reply_with_a_bad_checksum_is_dropped(self):
        bad = IPV4_REPLY[:-1] + b"X"
        self.assertIsNone(wm.parse_icmp(socket.AF_INET, bad, True))

    def test_datagram_socket_reads_icmp_without_ip_header(self):
        self.assertEqual(wm.parse_icmp(socket.AF_INET, IPV4_REPLY[20:], False)[:3],
                         ("reply", 0x1c46, 1))

    def test_icmpv6_reply(self):
        packet = bytes([129, 0, 0x12, 0x34, 0, 9, 1, 0]) + b"tok"
        self.assertEqual(wm.parse_icmp(socket.AF_INET6, packet, False),
                         ("reply", 9, 256, b"tok"))

    def test_echo_request_seen_on_loopback_is_not_a_reply(self):
        request = wm.build_echo(socket.AF_INET, 1, 1, b"x")
        self.assertIsNone(wm.parse_icmp(socket.AF_INET, request, False))

    def test_unreachable_matches_the_quoted_request(self):
        packet = quoted_error(socket.AF_INET, 3, 1, 0x4242, 77)
        self.assertEqual(wm.parse_icmp(socket.AF_INET, packet, True),
                         ("error", 0x4242, 77, "unreachable (code 1)"))

    def test_icmpv6_time_exceeded(self):
        packet = quoted_error(socket.AF_INET6, 3, 0, 5, 6)
        self.assertEqual(wm.parse_icmp(socket.AF_INET6, packet, False),
                         ("error", 5, 6, "time exceeded (code 0)"))

    def test_truncated_packets(self):
        for data in (b"", b"\x45", IPV4_REPLY[:24]):
            self.assertIsNone(wm.parse_icmp(socket.AF_INET, data, True))
        self.assertIsNone(wm.parse_icmp(socket.AF_INET6, b"\x81\x00", False))

    def test_family_of(self):
        self.assertEqual(wm.family_of("127.0.0.1"), socket.AF_INET)
        self.assertEqual(wm.family_of("::1"), socket.AF_INET6)
        self.assertEqual(wm.family_of("fe80::1%eth0"), socket.AF_INET6)
        self.assertIsNone(wm.family_of("node-1.example"))

    def test_address_order_puts_ipv4_first_then_numeric(self):
        self.assertEqual(sorted(["::1", "10.0.0.10", "10.0.0.9"], key=wm.address_key),
                         ["10.0.0.9", "10.0.0.10", "::1"])


class Phase(unittest.TestCase):
    def test_stable_and_inside_the_interval(self):
        a = wm.round_phase("node-1", 5)
        self.assertEqual(a, wm.round_phase("node-1", 5))
        self.assertTrue(0 <= a < 5)

    def test_a_fleet_spreads_over_the_interval(self):
        phases = [wm.round_phase("worker-%d" % i, 5) for i in range(200)]
        buckets = [sum(1 for p in phases if k <= p < k + 1) for k in range(5)]
        self.assertTrue(all(20 <= b <= 60 for b in buckets), buckets)

    def test_probe_step(self):
        self.assertEqual(wm.probe_step(0.5, 1000), 0.0005)
        self.assertEqual(wm.probe_step(0.5, 3), wm.PROBE_STEP)
        self.assertEqual(wm.probe_step(0.5, 0), 0.0)


class FakeSocket:
    """Stands in for an ICMP socket: records what is sent, plays back replies."""

    def __init__(self, family, replies):
        self.family = family
        self.sent = []
        self.replies = replies      # callable(packet, address) -> [(data, source)]
        self.inbox = []
        self.r, self.w = os.pipe()

    def fileno(self):
        return self.r

    def sendto(self, packet, address):
        self.sent.append((packet, address))
        for item in self.replies(packet, address):
            self.inbox.append(item)
            os.write(self.w, b"x")

    def recv(self, n):
        raise BlockingIOError

    def recvmsg(self, n, anc):
        if not self.inbox:
            raise BlockingIOError
        os.read(self.r, 1)
        data, source = self.inbox.pop(0)
        return data, [], 0, source

    def close(self):
        os.close(self.r)
        os.close(self.w)


def dgram_reply(packet, address, ident=0x9999, token=None, source=None):
    """What a datagram socket reads: the kernel has put its own identifier in."""
    _, _, _, _, seq = struct.unpack("!BBHHH", packet[:8])
    payload = packet[8:] if token is None else token + packet[16:]
    return struct.pack("!BBHHH", 0, 0, 0, ident, seq) + payload, (source or address[0], 0)


class Matching(unittest.TestCase):
    def engine(self, replies, raw=False):
        engine = wm.IcmpEngine(0.3, wm.Faults())
        sock = FakeSocket(socket.AF_INET, replies)
        engine.socks[socket.AF_INET] = (sock, raw)
        self.addCleanup(sock.close)
        return engine, sock

    def test_datagram_socket_matches_on_sequence_and_token(self):
        engine, sock = self.engine(lambda p, a: [dgram_reply(p, a)])
        out = engine.probe(["127.0.0.1", "127.0.0.2"], threading.Event())
        self.assertEqual(set(out), {"127.0.0.1", "127.0.0.2"})
        for rtt, error in out.values():
            self.assertIsNone(error)
            self.assertLess(rtt, 50)
        seqs = [struct.unpack("!H", p[6:8])[0] for p, _ in sock.sent]
        self.assertEqual(len(set(seqs)), 2)

    def test_foreign_token_is_ignored(self):
        engine, _ = self.engine(lambda p, a: [dgram_reply(p, a, token=b"otherapp")])
        self.assertEqual(engine.probe(["127.0.0.1"], threading.Event()),
                         {"127.0.0.1": (None, "timeout")})

    def test_reply_from_another_address_is_ignored(self):
        engine, _ = self.engine(lambda p, a: [dgram_reply(p, a, source="127.0.0.9")])
        self.assertEqual(engine.probe(["127.0.0.1"], threading.Event()),
                         {"127.0.0.1": (None, "timeout")})

    def test_raw_socket_also_checks_the_identifier(self):
        def replies(packet, address):
            data, source = dgram_reply(packet, address, ident=0x9999)
            ip = b"\x45" + bytes(19)
            return [(ip + data[:2] + struct.pack("!H", wm.icmp_checksum(data)) + data[4:],
                     source)]
        engine, _ = self.engine(replies, raw=True)
        engine.ident = 0x1111
        self.assertEqual(engine.probe(["127.0.0.1"], threading.Event()),
                         {"127.0.0.1": (None, "timeout")})
        engine.ident = 0x9999
        rtt, error = engine.probe(["127.0.0.1"], threading.Event())["127.0.0.1"]
        self.assertIsNone(error)
        self.assertIsNotNone(rtt)

    def test_duplicate_reply_counts_once(self):
        engine, _ = self.engine(lambda p, a: [dgram_reply(p, a), dgram_reply(p, a)])
        out = engine.probe(["127.0.0.1"], threading.Event())
        self.assertIsNone(out["127.0.0.1"][1])

    def test_each_round_sends_one_request_per_peer(self):
        engine, sock = self.engine(lambda p, a: [])
        peers = ["127.0.0.%d" % i for i in range(1, 6)]
        started = time.monotonic()
        out = engine.probe(peers, threading.Event())
        self.assertLess(time.monotonic() - started, 0.3 + 0.25)
        self.assertEqual(sorted(a[0] for _, a in sock.sent), peers)
        self.assertEqual(out, {p: (None, "timeout") for p in peers})

    def test_spread_paces_the_sends(self):
        times = []
        engine, _ = self.engine(lambda p, a: times.append(time.monotonic()) or [])
        engine.spread = 0.04
        engine.probe(["127.0.0.%d" % i for i in range(1, 5)], threading.Event())
        self.assertGreaterEqual(times[-1] - times[0], 0.03 - 0.005)

    def test_stop_ends_a_round_at_once(self):
        engine, _ = self.engine(lambda p, a: [])
        engine.timeout = 30
        stop = threading.Event()
        threading.Timer(0.1, stop.set).start()
        started = time.monotonic()
        engine.probe(["127.0.0.1"], stop)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_a_hanging_name_lookup_costs_at_most_the_timeout(self):
        engine, _ = self.engine(lambda p, a: [dgram_reply(p, a)])
        release = threading.Event()
        self.addCleanup(release.set)

        def hang(*a, **k):
            release.wait(10)
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        with mock.patch.object(wm.socket, "getaddrinfo", hang):
            started = time.monotonic()
            out = engine.probe(["slow.example", "127.0.0.1"], threading.Event())
        self.assertLess(time.monotonic() - started, 2 * engine.timeout + 0.2)
        self.assertIsNone(out["127.0.0.1"][1])
        self.assertIsNone(out["slow.example"][0])

    def test_unresolvable_name_is_an_error_not_a_probe(self):
        engine, sock = self.engine(lambda p, a: [])
        engine.resolver = mock.Mock()
        engine.resolver.resolve.return_value = {"nosuch.invalid": (None, "cannot resolve")}
        out = engine.probe(["nosuch.invalid"], threading.Event())
        self.assertEqual(out, {"nosuch.invalid": (None, "cannot resolve")})
        self.assertEqual(sock.sent, [])


@unittest.skipUnless(icmp_works(), "this process can open no ICMP socket "
                     "(needs CAP_NET_RAW or net.ipv4.ping_group_range)")
class Loopback(unittest.TestCase):
    def test_ipv4_and_ipv6_loopback(self):
        engine = wm.IcmpEngine(1.0, wm.Faults())
        self.addCleanup(engine.close)
        stop = threading.Event()
        for _ in range(3):
            out = engine.probe(["127.0.0.1", "127.0.0.2", "::1"], stop)
            for peer in ("127.0.0.1", "127.0.0.2"):
                rtt, error = out[peer]
                self.assertIsNone(error, peer)
                self.assertTrue(0 <= rtt < 20, rtt)
            if out["::1"][1] != "no ICMP socket":
                self.assertIsNotNone(out["::1"][0])
            self.assertTrue(set(engine.sent_at) >= {"127.0.0.1", "127.0.0.2"})

    def test_host_name_is_resolved(self):
        engine = wm.IcmpEngine(1.0, wm.Faults())
        self.addCleanup(engine.close)
        rtt, error = engine.probe(["localhost"], threading.Event())["localhost"]
        self.assertIsNone(error)
        self.assertIsNotNone(rtt)


class Fallback(unittest.TestCase):
    def test_missing_ping_falls_back_to_icmp_with_one_line(self):
        with mock.patch.object(wm, "icmp_available", return_value=(True, "raw")), \
                self.assertLogs("worker-monitor", "WARNING") as logs:
            engine = wm.make_engine("ping", "/nonexistent/ping", 1.0, wm.Faults())
        self.assertEqual(engine.name, "icmp")
        self.assertEqual(len(logs.output), 1)
        self.assertIn("not found", logs.output[0])

    def test_no_icmp_socket_falls_back_to_ping(self):
        with mock.patch.object(wm, "icmp_available", return_value=(False, "EPERM")), \
                self.assertLogs("worker-monitor", "WARNING") as logs:
            engine = wm.make_engine("icmp", sys.executable, 1.0, wm.Faults())
        self.assertEqual(engine.name, "ping")
        self.assertEqual(len(logs.output), 1)
        self.assertIn("icmp engine unavailable", logs.output[0])

    def test_neither_works(self):
        with mock.patch.object(wm, "icmp_available", return_value=(False, "EPERM")), \
                self.assertLogs("worker-monitor", "ERROR"):
            engine = wm.make_engine("ping", "/nonexistent/ping", 1.0, wm.Faults())
        self.assertEqual(engine.name, "ping")

    def test_engine_asked_for_is_kept_when_it_works(self):
        with mock.patch.object(wm, "icmp_available", return_value=(True, "dgram")):
            self.assertEqual(wm.make_engine("icmp", "ping", 1, wm.Faults(), 0.5).name, "icmp")
            engine = wm.make_engine("ping", sys.executable, 1, wm.Faults(), 0.5)
        self.assertEqual((engine.name, engine.spread), ("ping", 0.5))

    def test_open_socket_reports_both_failures(self):
        with mock.patch.object(wm.socket, "socket", side_effect=PermissionError(1, "denied")):
            ok, why = wm.icmp_available()
        self.assertFalse(ok)
        self.assertIn("raw socket", why)
        self.assertIn("dgram socket", why)

    def test_cli_accepts_icmp(self):
        args = wm.build_parser().parse_args(["--probe", "icmp", "--window", "30"])
        self.assertEqual((args.probe, args.window), ("icmp", 30))


class Resolution(unittest.TestCase):
    def test_lookup_time_is_bounded_and_not_repeated(self):
        calls = []
        release = threading.Event()

        def slow(name, *a, **k):
            calls.append(name)
            release.wait(5)
            return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.1", 0))]

        resolver = wm.Resolver(limit=0.3)
        with mock.patch.object(wm.socket, "getaddrinfo", slow):
            started = time.monotonic()
            # Within the limit: still running, ask again.
            self.assertEqual(resolver.resolve(["slow.example"], 0.1)["slow.example"],
                             (None, None))
            out = resolver.resolve(["slow.example"], 5)
            self.assertLess(time.monotonic() - started, 0.6)
            self.assertEqual(out["slow.example"][0], None)
            self.assertIn("timed out", out["slow.example"][1])
            # Past the limit it answers at once, and starts no second lookup.
            started = time.monotonic()
            resolver.resolve(["slow.example"], 5)
            self.assertLess(time.monotonic() - started, 0.1)
            self.assertEqual(calls, ["slow.example"])
            release.set()
            time.sleep(0.05)
            # The late answer serves the next call.
            self.assertEqual(resolver.resolve(["slow.example"], 0)["slow.example"],
                             (["192.0.2.1"], None))

    def test_failure_is_an_error(self):
        def fail(*a, **k):
            raise socket.gaierror(-2, "Name or service not known")
        with mock.patch.object(wm.socket, "getaddrinfo", fail):
            addresses, error = wm.Resolver().resolve(["nosuch.invalid"], 1)["nosuch.invalid"]
        self.assertIsNone(addresses)
        self.assertIn("Name or service not known", error)

    def test_addresses_are_deduplicated_and_sorted(self):
        infos = [(socket.AF_INET6, 2, 17, "", ("fd00::2", 0, 0, 0)),
                 (socket.AF_INET, 2, 17, "", ("10.0.0.2", 0)),
                 (socket.AF_INET, 2, 17, "", ("10.0.0.10", 0)),
                 (socket.AF_INET, 2, 17, "", ("10.0.0.2", 0))]
        with mock.patch.object(wm.socket, "getaddrinfo", return_value=infos):
            self.assertEqual(wm.Resolver().resolve(["svc"], 1)["svc"],
                             (["10.0.0.2", "10.0.0.10", "fd00::2"], None))


class FakeResolver:
    def __init__(self, answers):
        self.answers = answers
        self.asked = []
        self.waits = []

    def resolve(self, names, timeout):
        if not names:
            return {}
        self.asked.append(list(names))
        self.waits.append(timeout)
        return {n: self.answers.get(n, (None, "cannot resolve %s" % n)) for n in names}


class DnsPeers(unittest.TestCase):
    def peer_list(self, text, answers):
        f = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        f.write(text)
        f.close()
        self.addCleanup(os.unlink, f.name)
        resolver = FakeResolver(answers)
        return wm.PeerList(f.name, wm.Faults(), resolver), resolver

    def test_parse_accepts_dns_lines(self):
        peers, problems = wm.parse_peers("dns:svc.ns.svc.cluster.local\ndns:-bad\ndns:\n")
        self.assertEqual(peers, ["dns:svc.ns.svc.cluster.local"])
        self.assertEqual([n for n, _ in problems], [2, 3])

    def test_expands_in_place_each_address_its_own_key(self):
        peers, _ = self.peer_list("127.0.0.1\ndns:svc\n::1\n127.0.0.3\n",
                                  {"svc": (["127.0.0.2", "127.0.0.3"], None)})
        self.assertTrue(peers.refresh())
        self.assertEqual(peers.peers, ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"])
        self.assertEqual(peers.entries, ["127.0.0.1", "dns:svc", "::1", "127.0.0.3"])

    def test_re_resolved_only_when_due(self):
        peers, resolver = self.peer_list("dns:svc\n", {"svc": (["127.0.0.2"], None)})
        peers.refresh()
        self.assertFalse(peers.refresh())
        self.assertEqual(resolver.asked, [["svc"]])
        resolver.answers["svc"] = (["127.0.0.2", "127.0.0.4"], None)
        with mock.patch.object(wm.time, "monotonic", return_value=time.monotonic() + 61):
            self.assertTrue(peers.refresh())
        self.assertEqual(peers.peers, ["127.0.0.2", "127.0.0.4"])

    def test_failed_lookup_keeps_the_last_answer_and_logs_once(self):
        peers, resolver = self.peer_list("dns:svc\n", {"svc": (["127.0.0.2"], None)})
        peers.refresh()
        resolver.answers = {}
        with self.assertLogs("worker-monitor", "WARNING") as logs:
            for later in (61, 61 + 16):
                with mock.patch.object(wm.time, "monotonic",
                                       return_value=time.monotonic() + later):
                    self.assertFalse(peers.refresh())
        self.assertEqual(peers.peers, ["127.0.0.2"])
        self.assertEqual(len(logs.output), 1)
        self.assertEqual(len(resolver.asked), 3)

    def test_slow_re_lookup_keeps_the_old_answer_without_waiting(self):
        peers, resolver = self.peer_list("dns:svc\n", {"svc": (["127.0.0.2"], None)})
        peers.refresh()
        resolver.answers["svc"] = (None, None)          # still running
        with mock.patch.object(wm.time, "monotonic", return_value=time.monotonic() + 61):
            self.assertFalse(peers.refresh())
            self.assertFalse(peers.refresh())
        self.assertEqual(resolver.waits[-2:], [0, 0])
        self.assertEqual(peers.peers, ["127.0.0.2"])

    def test_unresolved_name_has_no_peers_yet(self):
        peers, _ = self.peer_list("dns:nosuch\n127.0.0.1\n", {})
        with self.assertLogs("worker-monitor", "WARNING"):
            peers.refresh()
        self.assertEqual(peers.peers, ["127.0.0.1"])


if __name__ == "__main__":
    logging.disable(logging.NOTSET)
    unittest.main()
