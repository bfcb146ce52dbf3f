"""The HTTP contract: render() without a socket, then the real agent with real clients."""

import http.client
import json
import re
import select
import socket
import struct
import threading
import time
import unittest

from harness import Agent, worker_monitor as wm


def raw_request(port, data, timeout=5, read=True):
    """Send raw bytes, return everything the server sends until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


class Render(unittest.TestCase):
    def setUp(self):
        self.state = wm.State("node-1")
        self.state.set_peers(["192.0.2.11", "192.0.2.12"])

    def test_503_before_the_first_sample(self):
        status, headers, body = wm.render(self.state, "GET", "/stats")
        self.assertEqual(status, 503)
        self.assertIn(("Retry-After", "1"), headers)
        self.assertIn(("Content-Type", "application/json"), headers)
        self.assertEqual(json.loads(body)["error"], "no sample yet")

    def test_stats_document_exactly(self):
        self.state.set_sample(1712640000, 0.35, 0.72, 5.8, 3.2)
        self.state.set_latency(["192.0.2.11", "192.0.2.12"], {"192.0.2.11": 0.8, "192.0.2.12": None})
        status, headers, body = wm.render(self.state, "GET", "/stats?x=1")
        self.assertEqual(status, 200)
        self.assertIn(("Content-Type", "application/json"), headers)
        self.assertEqual(body, b'{"nodeName": "node-1", "timestamp": 1712640000, "cpu": 0.35, '
                               b'"mem": 0.72, "net": {"rx": 5.8, "tx": 3.2}, '
                               b'"latency": {"192.0.2.11": 0.8, "192.0.2.12": null}}')
        doc = json.loads(body)
        self.assertEqual(list(doc), ["nodeName", "timestamp", "cpu", "mem", "net", "latency"])

    def test_peers_not_probed_yet_are_null_in_file_order(self):
        self.state.set_sample(1, None, None, None, None)
        self.state.set_latency(["192.0.2.11", "192.0.2.12"], {"192.0.2.12": 1.5})
        self.state.set_peers(["192.0.2.13", "192.0.2.12"])
        doc = json.loads(wm.render(self.state, "GET", "/stats")[2])
        self.assertEqual(list(doc["latency"].items()), [("192.0.2.13", None), ("192.0.2.12", 1.5)])
        self.assertEqual((doc["cpu"], doc["mem"], doc["net"]), (None, None, {"rx": None, "tx": None}))

    def test_unknown_path_404_json(self):
        status, headers, body = wm.render(self.state, "GET", "/nope")
        self.assertEqual(status, 404)
        self.assertEqual(json.loads(body)["error"], "not found")

    def test_other_methods_405_with_allow(self):
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
            status, headers, body = wm.render(self.state, method, "/stats")
            self.assertEqual(status, 405)
            self.assertIn(("Allow", "GET, HEAD"), headers)

    def test_request_path_does_no_encoding(self):
        self.state.set_sample(1, 0.1, 0.2, 0.3, 0.4)
        first = wm.render(self.state, "GET", "/stats")[2]
        self.assertIs(wm.render(self.state, "GET", "/stats")[2], first)


class Server(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.agent = Agent(peers="127.0.0.1\n").wait_ready()

    @classmethod
    def tearDownClass(cls):
        cls.agent.close()

    def tearDown(self):
        self.assertNotIn("Traceback", self.agent.log())

    def test_keep_alive_many_requests_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.agent.port, timeout=5)
        conn.connect()
        sock = conn.sock
        for _ in range(50):
            conn.request("GET", "/stats")
            r = conn.getresponse()
            self.assertEqual(r.status, 200)
            self.assertEqual(r.getheader("Content-Type"), "application/json")
            doc = json.loads(r.read())
            self.assertEqual(list(doc), ["nodeName", "timestamp", "cpu", "mem", "net", "latency"])
        self.assertIs(conn.sock, sock)
        conn.close()

    def test_pipelined_requests_answered_in_order(self):
        data = b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n" \
               b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        out = raw_request(self.agent.port, data)
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", out)
        self.assertEqual(statuses, [b"200", b"404", b"200"])

    def test_head_has_headers_and_no_body(self):
        out = raw_request(self.agent.port, b"HEAD /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, _, body = out.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK"))
        length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0]
                     .split(b":")[1])
        self.assertGreater(length, 50)
        self.assertEqual(body, b"")

    def test_http_1_0_closes(self):
        out = raw_request(self.agent.port, b"GET /stats HTTP/1.0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Connection: close", out)

    def test_405_closes_and_allows(self):
        out = raw_request(self.agent.port, b"POST /stats HTTP/1.1\r\nHost: x\r\n"
                                           b"Content-Length: 5\r\n\r\nhello")
        self.assertTrue(out.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"))
        self.assertIn(b"\r\nAllow: GET, HEAD\r\n", out)

    def test_404_is_json(self):
        status, headers, body = self.agent.get("/metrics-not-here")
        self.assertEqual(status, 404)
        self.assertEqual(headers["Content-Type"], "application/json")
        self.assertEqual(json.loads(body)["status"], 404)

    def test_oversized_request_line_414(self):
        out = raw_request(self.agent.port, b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 414 "), out[:40])

    def test_oversized_header_431(self):
        out = raw_request(self.agent.port, b"GET /stats HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 431 "), out[:40])
        endless = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(100))
        out = raw_request(self.agent.port, b"GET /stats HTTP/1.1\r\n" + endless)  # no end
        self.assertTrue(out.startswith(b"HTTP/1.1 431 "), out[:40])
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(200))
        out = raw_request(self.agent.port, b"GET /stats HTTP/1.1\r\n" + many + b"\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 431 "), out[:40])

    def test_absolute_form_and_leading_empty_lines(self):
        out = raw_request(self.agent.port, b"\r\n\r\nGET http://node-1:8080/stats HTTP/1.1\r\n"
                                           b"Host: node-1\r\nConnection: close\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"), out[:40])
        self.assertIn(b'"nodeName"', out)

    def test_bare_lf_line_endings(self):
        out = raw_request(self.agent.port, b"GET /stats HTTP/1.1\nConnection: close\n\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"), out[:40])

    def test_trickling_client_is_cut_off(self):
        # One header line every 2 s would hold a thread forever if every byte
        # restarted the timer; the whole head has 10 s.
        with socket.create_connection(("127.0.0.1", self.agent.port), timeout=20) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\n")
            t0 = time.monotonic()
            answer = b""
            for i in range(10):
                readable, _, _ = select.select([s], [], [], 2)
                if readable:
                    answer = s.recv(4096)
                    break
                s.sendall(b"X-%d: 1\r\n" % i)
            took = time.monotonic() - t0
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer[:40])
        self.assertGreater(took, 9)
        self.assertLess(took, 12)

    def test_garbage_request_400(self):
        out = raw_request(self.agent.port, b"hello\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:40])

    def test_idle_and_slow_clients_do_not_delay_others(self):
        idle = [socket.create_connection(("127.0.0.1", self.agent.port)) for _ in range(5)]
        slow = socket.create_connection(("127.0.0.1", self.agent.port))
        slow.sendall(b"GET /sta")           # a request line that never ends
        try:
            t0 = time.monotonic()
            for _ in range(10):
                self.assertEqual(self.agent.get("/stats", timeout=2)[0], 200)
            self.assertLess(time.monotonic() - t0, 2.0)
        finally:
            for s in idle + [slow]:
                s.close()

    def test_client_that_never_reads_does_not_block_others(self):
        hog = socket.create_connection(("127.0.0.1", self.agent.port))
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        done = threading.Event()

        def flood():
            try:
                hog.settimeout(3)
                while not done.is_set():
                    hog.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
            except OSError:
                pass
        t = threading.Thread(target=flood, daemon=True)
        t.start()
        try:
            time.sleep(1.0)
            t0 = time.monotonic()
            self.assertEqual(self.agent.get("/stats", timeout=2)[0], 200)
            self.assertLess(time.monotonic() - t0, 1.0)
        finally:
            done.set()
            hog.shutdown(socket.SHUT_RDWR)
            hog.close()
            t.join(5)

    def test_reset_mid_response_no_traceback_keeps_serving(self):
        linger = struct.pack("ii", 1, 0)    # close() sends RST
        t0 = time.monotonic()
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", self.agent.port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
            s.close()
        # A burst of connections must not overflow the listen backlog (each
        # overflow costs a client a 1 s SYN retransmit: 200 of them took 30 s).
        self.assertLess(time.monotonic() - t0, 10)
        time.sleep(0.3)
        self.assertEqual(self.agent.get("/stats")[0], 200)
        self.assertNotIn("Traceback", self.agent.log())
        self.assertNotIn("Error", self.agent.log())


if __name__ == "__main__":
    unittest.main()
