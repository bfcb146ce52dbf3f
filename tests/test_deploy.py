"""deploy/kubernetes: schema validation, the kustomize build, and the DaemonSet's own command run here.

kubernetes-validate (PyPI) and kubectl are CI tools, not the product's: the
tests that need them skip when they are absent.
"""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from live_agent import ROOT, Agent

DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
MANIFESTS = ("namespace.yaml", "daemonset.yaml", "service.yaml")
KUBECTL = shutil.which("kubectl")
SETPRIV = shutil.which("setpriv")
BUSYBOX = shutil.which("busybox")
CAP_NET_RAW = 1 << 13
# Where the DaemonSet's mounts come from on this machine.
MOUNTS = {"/opt/worker-monitor": ROOT, "/etc/worker-monitor": DEPLOY,
          "/host/proc": "/proc", "/host/sys": "/sys"}

try:
    import kubernetes_validate
    import yaml
except ImportError:
    kubernetes_validate = yaml = None
needs_validator = unittest.skipUnless(
    kubernetes_validate, "kubernetes-validate not installed (pip install kubernetes-validate)")
needs_kubectl = unittest.skipUnless(KUBECTL, "kubectl (for kustomize) not installed")


def read(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return f.read()


def kustomize_build():
    out = subprocess.run([KUBECTL, "kustomize", "--load-restrictor=LoadRestrictionsNone", DEPLOY],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if out.returncode != 0:
        raise AssertionError("kustomize failed: %s" % out.stderr.decode())
    return out.stdout.decode()


def daemonset_command():
    """The container command of daemonset.yaml (one line, JSON flow form) and its env."""
    text = read("daemonset.yaml")
    commands = re.findall(r"^\s*command:\s*(\[.*\])\s*$", text, re.M)
    if len(commands) != 1:
        raise AssertionError("daemonset.yaml must hold one one-line JSON command")
    env = {}
    for name, value in re.findall(r'^\s*- name: ([A-Z_]+)\n\s+(value: .*|valueFrom:)$', text, re.M):
        env[name] = json.loads(value[7:]) if value.startswith("value: ") else None
    return json.loads(commands[0]), env


def host_command(command):
    """The container's command with each mounted path mapped to this machine's."""
    out = []
    for arg in command:
        for inside, outside in MOUNTS.items():
            if arg == inside or arg.startswith(inside + "/"):
                arg = outside + arg[len(inside):]
        out.append(arg)
    assert out[0] == "python3", out
    return [sys.executable] + out[1:]


def peers_are_loopback(path):
    with open(path) as f:
        entries = [line.split("#", 1)[0].strip() for line in f]
    return all(ipaddress.ip_address(e).is_loopback for e in entries if e)


def cap_eff(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


@needs_validator
class Validate(unittest.TestCase):
    """Offline validation against the Kubernetes OpenAPI schemas, strict (no unknown keys)."""

    VERSIONS = ("1.28.0", None)     # the oldest supported here, and the validator's latest

    def validate_documents(self, text, source):
        kinds = []
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            for version in self.VERSIONS:
                version = version or kubernetes_validate.latest_version()
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    self.fail("%s %s invalid for %s: %s" % (source, doc.get("kind"), version, e))
            kinds.append(doc["kind"])
        return kinds

    def test_each_manifest(self):
        for name in MANIFESTS:
            self.assertTrue(self.validate_documents(read(name), name))

    @needs_kubectl
    def test_kustomize_output(self):
        kinds = self.validate_documents(kustomize_build(), "kustomize build")
        self.assertEqual(sorted(kinds),
                         ["ConfigMap", "ConfigMap", "DaemonSet", "Namespace", "Service"])

    def test_validator_does_reject_mistakes(self):
        doc = yaml.safe_load(read("daemonset.yaml"))
        doc["spec"]["template"]["spec"]["hostNetwork"] = "yes"
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        doc = yaml.safe_load(read("daemonset.yaml"))
        doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] = {}
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@unittest.skipUnless(yaml, "PyYAML not installed (comes with kubernetes-validate)")
class Manifests(unittest.TestCase):
    """What the issue asks of the DaemonSet, read from the YAML itself."""

    def setUp(self):
        self.ds = yaml.safe_load(read("daemonset.yaml"))
        self.pod = self.ds["spec"]["template"]["spec"]
        self.container, = self.pod["containers"]

    def test_node_wide_pod(self):
        self.assertIs(self.pod["hostNetwork"], True)
        self.assertEqual(self.pod["dnsPolicy"], "ClusterFirstWithHostNet")
        self.assertEqual(self.pod["tolerations"], [{"operator": "Exists"}])
        env = {e["name"]: e for e in self.container["env"]}
        self.assertEqual(env["NODE_NAME"]["valueFrom"], {"fieldRef": {"fieldPath": "spec.nodeName"}})

    def test_stock_image_and_script_from_configmap(self):
        self.assertRegex(self.container["image"], r"^python:3[.0-9]*-(alpine|slim)")
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        mounts = {m["mountPath"]: m for m in self.container["volumeMounts"]}
        self.assertEqual(volumes["script"]["configMap"]["name"], "worker-monitor-script")
        self.assertEqual(volumes["peers"]["configMap"]["name"], "worker-monitor-peers")
        self.assertEqual(set(mounts), set(MOUNTS))
        self.assertTrue(all(m.get("readOnly") for m in mounts.values()))
        for m in mounts.values():
            self.assertNotIn("subPath", m)      # subPath mounts never see ConfigMap edits

    def test_probes_and_scrape_annotations(self):
        port = self.container["ports"][0]
        self.assertEqual((port["name"], port["containerPort"]), ("http", 8080))
        for probe in ("readinessProbe", "livenessProbe"):
            self.assertEqual(self.container[probe]["httpGet"], {"path": "/healthz", "port": "http"})
        annotations = self.ds["spec"]["template"]["metadata"]["annotations"]
        self.assertEqual(annotations, {"prometheus.io/scrape": "true", "prometheus.io/port": "8080",
                                       "prometheus.io/path": "/metrics"})
        command, _ = daemonset_command()
        self.assertEqual(command, self.container["command"])
        self.assertEqual(command[command.index("--port") + 1], "8080")

    def test_security_context(self):
        sc = self.container["securityContext"]
        self.assertEqual(sc["capabilities"], {"drop": ["ALL"], "add": ["NET_RAW"]})
        self.assertIs(sc["allowPrivilegeEscalation"], False)
        self.assertIs(sc["readOnlyRootFilesystem"], True)
        self.assertIs(sc["privileged"], False)
        self.assertEqual(sc["runAsUser"], 0)
        self.assertEqual(sc["seccompProfile"], {"type": "RuntimeDefault"})
        self.assertIs(self.pod["automountServiceAccountToken"], False)

    def test_resources(self):
        res = self.container["resources"]
        self.assertEqual(res["requests"], {"cpu": "10m", "memory": "32Mi"})
        self.assertEqual(res["limits"], {"cpu": "500m", "memory": "64Mi"})

    def test_headless_service_and_namespace(self):
        svc = yaml.safe_load(read("service.yaml"))
        self.assertEqual(svc["spec"]["clusterIP"], "None")
        self.assertEqual(svc["spec"]["selector"], self.ds["spec"]["selector"]["matchLabels"])
        self.assertEqual(svc["spec"]["ports"][0]["port"], 8080)
        ns = yaml.safe_load(read("namespace.yaml"))
        self.assertEqual(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
                         "privileged")

    @needs_kubectl
    def test_plain_apply_k_is_refused_as_the_docs_say(self):
        """Why the README pipes `kubectl kustomize --load-restrictor=...` into apply -f."""
        out = subprocess.run([KUBECTL, "kustomize", DEPLOY], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=120)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn(b"is not in or below", out.stderr)

    @needs_kubectl
    def test_rendered_all_in_one_manifest_is_up_to_date(self):
        """deploy/worker-monitor.yaml (for `kubectl apply -f`) is the kustomize build of today's files."""
        with open(os.path.join(ROOT, "deploy", "worker-monitor.yaml")) as f:
            rendered = f.read()
        header, _, body = rendered.partition("\n# Generated by deploy/render.sh")
        body = body.partition("\n")[2]
        self.assertEqual(body, kustomize_build(),
                         "deploy/worker-monitor.yaml is out of date: run deploy/render.sh")

    @needs_kubectl
    def test_kustomize_generates_configmaps_from_the_real_files(self):
        docs = {(d["kind"], d["metadata"]["name"]): d
                for d in yaml.safe_load_all(kustomize_build()) if d}
        script = [d for (kind, name), d in docs.items()
                  if kind == "ConfigMap" and name.startswith("worker-monitor-script-")]
        self.assertEqual(len(script), 1)
        with open(os.path.join(ROOT, "worker_monitor.py")) as f:
            self.assertEqual(script[0]["data"]["worker_monitor.py"], f.read())
        self.assertEqual(docs[("ConfigMap", "worker-monitor-peers")]["data"]["peers.txt"],
                         read("peers.txt"))
        ds = docs[("DaemonSet", "worker-monitor")]
        self.assertEqual(ds["metadata"]["namespace"], "worker-monitor")
        volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["script"]["configMap"]["name"], script[0]["metadata"]["name"])


class DaemonSetCommand(unittest.TestCase):
    """The DaemonSet's command and environment, run here with its mounts mapped."""

    def setUp(self):
        self.command, self.env = daemonset_command()
        self.assertTrue(peers_are_loopback(os.path.join(DEPLOY, "peers.txt")),
                        "deploy/kubernetes/peers.txt must probe only loopback in tests")

    def environment(self):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        for name, value in self.env.items():
            env[name] = "node-under-test" if name == "NODE_NAME" else value
        self.assertIn("NODE_NAME", env)
        return env

    def run_agent(self, prefix=(), argv=None):
        agent = Agent(argv=argv or host_command(self.command), env=self.environment(),
                      prefix=prefix)
        agent.start(ready="/healthz")
        self.addCleanup(agent.stop)
        # The first probe round of 127.0.0.1 is done within a second.
        for _ in range(50):
            status, _, body = agent.get("/stats")
            stats = json.loads(body)
            if stats["latency"].get("127.0.0.1") is not None:
                break
            if "not permitted" in agent.log():
                break
            time.sleep(0.1)
        return agent, stats

    def test_exact_command_line_serves_healthz_and_stats(self):
        agent, stats = self.run_agent()
        status, headers, body = agent.get("/healthz")
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertEqual(stats["nodeName"], "node-under-test")
        self.assertEqual(list(stats["latency"]), ["127.0.0.1"])
        self.assertIsNotNone(stats["cpu"])
        self.assertIsNotNone(stats["mem"])
        if os.geteuid() == 0:
            self.assertIsInstance(stats["latency"]["127.0.0.1"], float)
        status, _, body = agent.get("/metrics")
        self.assertIn(b'worker_monitor_node_info{node="node-under-test"} 1', body)

    # The pod's credentials: uid 0, bounding set {NET_RAW}, no_new_privs, nothing inherited.
    POD_CREDENTIALS = ["--reuid", "0", "--regid", "0", "--clear-groups",
                       "--bounding-set", "-all,+net_raw", "--inh-caps", "-all", "--no-new-privs"]

    @unittest.skipUnless(SETPRIV and os.geteuid() == 0, "needs root and setpriv (util-linux)")
    def test_pod_credentials_read_a_real_latency(self):
        agent, stats = self.run_agent(prefix=[SETPRIV] + self.POD_CREDENTIALS + ["--"])
        self.assertEqual(cap_eff(agent.proc.pid), CAP_NET_RAW)
        self.assertIsInstance(stats["latency"]["127.0.0.1"], float, agent.log())
        self.assertGreater(stats["latency"]["127.0.0.1"], 0)
        self.assertEqual(agent.get("/healthz")[0], 200)

    @unittest.skipUnless(SETPRIV and BUSYBOX and os.geteuid() == 0,
                         "needs root, setpriv and busybox")
    def test_pod_credentials_with_busybox_ping_as_in_alpine(self):
        """python:*-alpine has busybox's ping, not iputils'."""
        argv = host_command(self.command) + ["--ping", BUSYBOX + " ping"]
        agent, stats = self.run_agent(prefix=[SETPRIV] + self.POD_CREDENTIALS + ["--"], argv=argv)
        self.assertEqual(cap_eff(agent.proc.pid), CAP_NET_RAW)
        self.assertIsInstance(stats["latency"]["127.0.0.1"], float, agent.log())

    @unittest.skipUnless(SETPRIV and os.geteuid() == 0 and os.path.exists("/usr/bin/python3"),
                         "needs root, setpriv and /usr/bin/python3")
    def test_non_root_cannot_ping_without_ping_group_range(self):
        """Why the DaemonSet runs as uid 0: non-root with NET_RAW only bounded gets null."""
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            low, high = map(int, f.read().split())
        if low <= 65534 <= high:
            self.skipTest("this host's ping_group_range admits gid 65534")
        tmp = tempfile.mkdtemp(prefix="wm-nobody-")
        self.addCleanup(shutil.rmtree, tmp, True)
        os.chmod(tmp, 0o755)
        for name in ("worker_monitor.py",):
            shutil.copy(os.path.join(ROOT, name), tmp)
        shutil.copy(os.path.join(DEPLOY, "peers.txt"), tmp)
        argv = ["/usr/bin/python3"] + [
            os.path.join(tmp, "worker_monitor.py") if a.endswith("/worker_monitor.py") else
            os.path.join(tmp, "peers.txt") if a.endswith("/peers.txt") else a
            for a in host_command(self.command)[1:]]
        prefix = [SETPRIV, "--reuid", "65534", "--regid", "65534", "--clear-groups",
                  "--bounding-set", "-all,+net_raw", "--inh-caps", "-all", "--no-new-privs", "--"]
        agent, stats = self.run_agent(prefix=prefix, argv=argv)
        self.assertEqual(cap_eff(agent.proc.pid), 0)
        self.assertIsNone(stats["latency"]["127.0.0.1"])
        self.assertIn("not permitted", agent.log())


if __name__ == "__main__":
    unittest.main()
