"""Pure parsing and rate functions against texts captured from real kernels and real ping."""

import os
import shutil
import tempfile
import unittest

from harness import fixture, worker_monitor as wm


class ParseStat(unittest.TestCase):
    def test_linux_6_18_capture(self):
        cpu = wm.parse_stat(fixture("proc_stat_linux_6.18_2cpu.txt"))
        first = fixture("proc_stat_linux_6.18_2cpu.txt").splitlines()[0].split()[1:]
        self.assertEqual([cpu[f] for f in wm.CPU_FIELDS], [int(v) for v in first])

    def test_2_6_18_has_eight_columns_missing_count_as_zero(self):
        cpu = wm.parse_stat(fixture("proc_stat_linux_2.6.18_8col.txt"))
        self.assertEqual(cpu, {"user": 2011087, "nice": 1368, "system": 1149652,
                               "idle": 328633032, "iowait": 151302, "irq": 0, "softirq": 0,
                               "steal": 0, "guest": 0, "guest_nice": 0})

    def test_2_6_32_has_nine_columns(self):
        cpu = wm.parse_stat(fixture("proc_stat_linux_2.6.32_9col.txt"))
        self.assertEqual(cpu["guest"], 0)
        self.assertEqual(cpu["guest_nice"], 0)
        self.assertEqual(cpu["idle"], 328633032)

    def test_four_column_kernel_2_4(self):
        cpu = wm.parse_stat("cpu  100 0 50 850\n")
        self.assertEqual((cpu["user"], cpu["idle"], cpu["iowait"], cpu["steal"]), (100, 850, 0, 0))

    def test_no_cpu_line_is_an_error(self):
        with self.assertRaises(ValueError):
            wm.parse_stat("intr 1 2 3\n")


class CpuUsage(unittest.TestCase):
    def stat(self, **fields):
        return dict(dict.fromkeys(wm.CPU_FIELDS, 0), **fields)

    def test_busy_share(self):
        prev = self.stat(user=100, system=100, idle=800)
        cur = self.stat(user=150, system=110, idle=840, iowait=0)
        self.assertEqual(wm.cpu_usage(prev, cur), 0.6)

    def test_iowait_is_idle(self):
        prev = self.stat()
        cur = self.stat(user=25, idle=50, iowait=25)
        self.assertEqual(wm.cpu_usage(prev, cur), 0.25)

    def test_guest_already_inside_user(self):
        prev = self.stat(user=1000, guest=500, idle=5000)
        cur = self.stat(user=1100, guest=600, idle=5000)
        self.assertEqual(wm.cpu_usage(prev, cur), 1.0)

    def test_steal_irq_softirq_are_busy(self):
        prev = self.stat()
        cur = self.stat(irq=10, softirq=10, steal=20, idle=60)
        self.assertEqual(wm.cpu_usage(prev, cur), 0.4)

    def test_field_going_backwards_counts_zero(self):
        # iowait is known to go backwards on some kernels (NO_HZ accounting).
        prev = self.stat(user=100, idle=100, iowait=500)
        cur = self.stat(user=150, idle=150, iowait=400)
        self.assertEqual(wm.cpu_usage(prev, cur), 0.5)

    def test_nothing_elapsed_is_none(self):
        s = self.stat(user=5, idle=5)
        self.assertIsNone(wm.cpu_usage(s, s))

    def test_real_8_column_capture_over_an_interval(self):
        prev = wm.parse_stat(fixture("proc_stat_linux_2.6.18_8col.txt"))
        cur = dict(prev, user=prev["user"] + 30, idle=prev["idle"] + 70)
        self.assertEqual(wm.cpu_usage(prev, cur), 0.3)

    def test_four_decimals(self):
        prev = self.stat()
        cur = self.stat(user=1, idle=2)
        self.assertEqual(wm.cpu_usage(prev, cur), 0.3333)


class Meminfo(unittest.TestCase):
    def test_linux_6_18_capture(self):
        mem = wm.parse_meminfo(fixture("proc_meminfo_linux_6.18.txt"))
        self.assertEqual(mem["MemTotal"], 24683664)
        self.assertEqual(mem["MemAvailable"], 24277388)
        self.assertEqual(wm.mem_usage(mem), round(1 - 24277388 / 24683664, 4))

    def test_no_memavailable_before_3_14(self):
        mem = wm.parse_meminfo(fixture("proc_meminfo_linux_2.6_no_memavailable.txt"))
        self.assertNotIn("MemAvailable", mem)
        self.assertEqual(wm.mem_usage(mem), 0.0249)

    def test_sreclaimable_counts_as_available_without_memavailable(self):
        mem = {"MemTotal": 1000, "MemFree": 100, "Buffers": 100, "Cached": 100,
               "SReclaimable": 100}
        self.assertEqual(wm.mem_usage(mem), 0.6)

    def test_memtotal_zero_or_missing_is_null(self):
        self.assertIsNone(wm.mem_usage({"MemTotal": 0, "MemAvailable": 0}))
        self.assertIsNone(wm.mem_usage({"MemFree": 10}))
        self.assertIsNone(wm.mem_usage(wm.parse_meminfo("")))

    def test_garbage_lines_are_skipped(self):
        mem = wm.parse_meminfo("MemTotal: 1000 kB\nnonsense\nMemAvailable: x kB\nMemFree: 250 kB\n")
        self.assertEqual(mem, {"MemTotal": 1000, "MemFree": 250})
        self.assertEqual(wm.mem_usage(mem), 0.75)

    def test_clamped(self):
        self.assertEqual(wm.mem_usage({"MemTotal": 100, "MemAvailable": 150}), 0.0)


class NetDev(unittest.TestCase):
    def test_linux_6_18_capture(self):
        dev = wm.parse_net_dev(fixture("proc_net_dev_linux_6.18.txt"))
        self.assertIn("lo", dev)
        self.assertIn("eth0", dev)
        line = [l for l in fixture("proc_net_dev_linux_6.18.txt").splitlines()
                if l.strip().startswith("eth0:")][0]
        cols = line.split(":", 1)[1].split()
        self.assertEqual(dev["eth0"]["rx_bytes"], int(cols[0]))
        self.assertEqual(dev["eth0"]["tx_bytes"], int(cols[8]))
        self.assertEqual(dev["eth0"]["tx_packets"], int(cols[9]))

    def test_old_kernel_no_space_after_colon(self):
        dev = wm.parse_net_dev(fixture("proc_net_dev_linux_2.6_wide_counter.txt"))
        self.assertEqual(dev["eth0"]["rx_bytes"], 68210035552)
        self.assertEqual(dev["eth0"]["rx_packets"], 520993275)
        self.assertEqual(dev["eth0"]["tx_bytes"], 9315587528)
        self.assertEqual(dev["lo"]["rx_bytes"], 123456)

    def test_name_with_colon_and_an_odd_line(self):
        dev = wm.parse_net_dev(fixture("proc_net_dev_team_alias.txt"))
        self.assertEqual(sorted(dev), ["eth0", "lo", "team0:1"])
        self.assertEqual(dev["team0:1"]["rx_bytes"], 0)
        self.assertEqual(dev["eth0"]["rx_bytes"], 82136411)

    def test_headers_only(self):
        text = "\n".join(fixture("proc_net_dev_linux_6.18.txt").splitlines()[:2])
        self.assertEqual(wm.parse_net_dev(text), {})


def dev(**counters):
    return {name: dict(dict.fromkeys(wm.NET_DEV_FIELDS, 0), rx_bytes=rx, tx_bytes=tx)
            for name, (rx, tx) in counters.items()}


class NetRates(unittest.TestCase):
    def test_megabits_per_second(self):
        rx, tx = wm.net_rates(dev(eth0=(0, 0)), dev(eth0=(1_250_000, 500_000)), 1.0, ["eth0"])
        self.assertEqual((rx, tx), (10.0, 4.0))

    def test_divides_by_measured_elapsed(self):
        rx, tx = wm.net_rates(dev(eth0=(0, 0)), dev(eth0=(1_000_000, 0)), 1.25, ["eth0"])
        self.assertEqual((rx, tx), (6.4, 0.0))

    def test_three_decimals(self):
        rx, _ = wm.net_rates(dev(eth0=(0, 0)), dev(eth0=(1, 0)), 1.0, ["eth0"])
        self.assertEqual(rx, 0.0)
        rx, _ = wm.net_rates(dev(eth0=(0, 0)), dev(eth0=(1234, 0)), 1.0, ["eth0"])
        self.assertEqual(rx, 0.01)

    def test_counter_going_down_contributes_zero(self):
        prev = dev(eth0=(4_294_967_000, 100), eth1=(0, 0))
        cur = dev(eth0=(500, 200), eth1=(125_000, 0))
        self.assertEqual(wm.net_rates(prev, cur, 1.0, ["eth0", "eth1"]), (1.0, 0.001))

    def test_interface_seen_once_contributes_zero(self):
        prev = dev(eth0=(0, 0))
        cur = dev(eth0=(125_000, 0), eth1=(10 ** 12, 10 ** 12))
        self.assertEqual(wm.net_rates(prev, cur, 1.0, ["eth0", "eth1"]), (1.0, 0.0))

    def test_nothing_elapsed(self):
        self.assertEqual(wm.net_rates(dev(eth0=(0, 0)), dev(eth0=(1, 1)), 0.0, ["eth0"]),
                         (None, None))


class InterfaceSelection(unittest.TestCase):
    def setUp(self):
        self.sysfs = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.sysfs)

    def iface(self, name, physical):
        os.makedirs(os.path.join(self.sysfs, "class", "net", name))
        if physical:
            os.makedirs(os.path.join(self.sysfs, "class", "net", name, "device"))

    def test_physical_only(self):
        for name, physical in [("lo", False), ("eth0", True), ("br0", False),
                               ("veth1a2b", False), ("docker0", False), ("cni0", False),
                               ("eth0.100", False), ("wlan0", True)]:
            self.iface(name, physical)
        names = ["lo", "eth0", "br0", "veth1a2b", "docker0", "cni0", "eth0.100", "wlan0",
                 "team0:1"]
        self.assertEqual(wm.select_interfaces(names, self.sysfs), ["eth0", "wlan0"])

    def test_no_physical_means_all_but_lo(self):
        self.iface("lo", False)
        self.iface("eth0", False)
        self.assertEqual(wm.select_interfaces(["lo", "eth0", "tun0"], self.sysfs),
                         ["eth0", "tun0"])

    def test_bridge_over_eth0_is_not_counted_twice(self):
        # eth0 and br0 over it each gain 10 MB in one second: 80 Mbps, not 160.
        self.iface("eth0", True)
        self.iface("br0", False)
        prev = dev(eth0=(0, 0), br0=(0, 0), lo=(0, 0))
        cur = dev(eth0=(10_000_000, 0), br0=(10_000_000, 0), lo=(10_000_000, 0))
        names = wm.select_interfaces(list(cur), self.sysfs)
        self.assertEqual(wm.net_rates(prev, cur, 1.0, names), (80.0, 0.0))

    def test_real_sysfs(self):
        if not os.path.isdir("/sys/class/net/lo"):
            self.skipTest("no /sys/class/net here")
        names = os.listdir("/sys/class/net")
        chosen = wm.select_interfaces(names, "/sys")
        self.assertNotIn("lo", chosen)


class Ping(unittest.TestCase):
    def test_iputils_reply_capture(self):
        self.assertEqual(wm.parse_ping(fixture("ping_iputils_reply.txt")), 0.032)

    def test_iputils_ipv6_reply_capture(self):
        self.assertEqual(wm.parse_ping(fixture("ping_iputils_ipv6_reply.txt")), 0.119)

    def test_busybox_reply_capture(self):
        self.assertEqual(wm.parse_ping(fixture("ping_busybox_reply.txt")), 0.032)

    def test_busybox_reply_line(self):
        self.assertEqual(wm.parse_ping("64 bytes from 127.0.0.1: seq=0 ttl=64 time=1.398 ms"),
                         1.398)

    def test_iputils_variants(self):
        self.assertEqual(wm.parse_ping("64 bytes from 192.0.2.1: icmp_req=1 ttl=58 time=9.66 ms"),
                         9.66)
        self.assertEqual(wm.parse_ping("64 bytes from 192.0.2.1: icmp_seq=2 ttl=64 time=130 ms"),
                         130.0)
        self.assertEqual(wm.parse_ping(
            "64 bytes from peer-a.example.net (192.0.2.10): icmp_seq=1 ttl=116 time=18.6 ms"), 18.6)

    def test_no_reply_is_null_never_the_summary_time(self):
        self.assertIsNone(wm.parse_ping(fixture("ping_iputils_no_reply.txt")))
        self.assertIsNone(wm.parse_ping(
            "1 packets transmitted, 0 received, 100% packet loss, time 0ms"))
        self.assertIsNone(wm.parse_ping(fixture("ping_busybox_no_reply.txt")))

    def test_errors_are_null(self):
        for name in ("ping_iputils_not_permitted.txt", "ping_busybox_not_permitted.txt",
                     "ping_iputils_unknown_host.txt"):
            self.assertIsNone(wm.parse_ping(fixture(name)), name)

    def test_localized_output_is_not_read(self):
        # Why the engine runs ping with LC_ALL=C: zh_CN prints 时间=37.6 毫秒.
        self.assertIsNone(wm.parse_ping(fixture("ping_iputils_zh_CN.txt")))

    def test_unreachable_line_is_null(self):
        self.assertIsNone(wm.parse_ping(
            "From 192.0.2.1 icmp_seq=1 Destination Host Unreachable\n"))


class Peers(unittest.TestCase):
    def test_addresses_names_comments(self):
        text = ("\ufeff# cluster peers\r\n"
                "  127.0.0.1  \r\n"
                "\r\n"
                "::1 # loopback v6\r\n"
                "node-2.cluster.local\r\n"
                "127.0.0.1\r\n"
                "localhost.\r\n")
        self.assertEqual(wm.parse_peers(text),
                         (["127.0.0.1", "::1", "node-2.cluster.local", "localhost."], []))

    def test_bad_lines_are_skipped_with_their_number(self):
        text = "127.0.0.1\n-c 100\nfoo bar\n$(reboot)\n;ls\n127.0.0.2\nhost_name\n-f\n300.1.1.1\n"
        peers, problems = wm.parse_peers(text)
        self.assertEqual(peers, ["127.0.0.1", "127.0.0.2"])
        self.assertEqual([n for n, _ in problems], [2, 3, 4, 5, 7, 8, 9])
        self.assertIn("'-c 100'", problems[0][1])

    def test_valid_peer(self):
        for ok in ("127.0.0.1", "::1", "fe80::1", "a", "node-1", "x.y.z", "a" * 63 + ".com"):
            self.assertTrue(wm.valid_peer(ok), ok)
        for bad in ("-1", "a-", "-a", "a..b", "a" * 64, "a b", "a;b", "a|b", "`a`", "", "*",
                    "a/b", "1.2.3.4:80"):
            self.assertFalse(wm.valid_peer(bad), bad)

    def test_empty(self):
        self.assertEqual(wm.parse_peers(""), ([], []))
        self.assertEqual(wm.parse_peers("# only comments\n\n   \n"), ([], []))


if __name__ == "__main__":
    unittest.main()
