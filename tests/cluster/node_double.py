"""A node without a container runtime: registers a Node and runs every Pod the scheduler binds
to it as local processes, reporting real Pod status back to the API server.

    python tests/cluster/node_double.py --kubeconfig K --node b3-node-0 --root DIR --apiserver-port N

What it does, per container: the command and args (with `$(VAR)` expanded like the kubelet),
env (value, fieldRef, secretKeyRef, configMapKeyRef, envFrom; the last duplicate wins),
workingDir, and the volumes (ConfigMap, Secret, emptyDir, hostPath, a PVC through its bound
hostPath PersistentVolume, projected ServiceAccount tokens with kube-root-ca.crt and the
namespace) bound at their mountPath in a private mount namespace. /dev is a private copy
holding the termination-log file; /etc/hosts names the pods of a headless Service's
subdomain (all 127.0.0.1). Status: Running, then Succeeded or Failed with the exit code,
reason and termination message (FallbackToLogsOnError honoured); restartPolicy Always and
OnFailure restart the container in place with restartCount. A deleted Pod gets SIGTERM, then
SIGKILL after its grace period, and is removed once its processes are gone.

What it does not emulate: images (the command runs on this machine's Python and PATH),
resource limits and cgroups, users and securityContext, probes, networking between pods
(everything shares 127.0.0.1, so two pods cannot listen on the same port), `kubectl logs` /
`exec` (logs are files under ROOT/pods/), init containers beyond running them first, and
Service cluster IPs (KUBERNETES_SERVICE_HOST is 127.0.0.1 and the apiserver's port).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import kubernetes
from kubernetes.client.exceptions import ApiException

HERE = Path(__file__).resolve().parent
log = logging.getLogger("node-double")
CAPACITY = {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": "8",
            "ephemeral-storage": "100Gi"}  # fmt: skip
DEVICES = ["null", "zero", "full", "random", "urandom", "tty"]
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
# what stands in for the image: this checkout (editable installs point here) and its Python
IMAGE = sorted({str(HERE.parents[1]), sys.prefix, os.path.realpath(sys.prefix)})


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion: defined variables expand, $$ escapes, others stay."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)  # fmt: skip


def field_value(pod: dict, path: str) -> str:
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    return {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""), "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
    }.get(path, "")  # fmt: skip


class Node:
    def __init__(self, kubeconfig: str, name: str, root: Path, apiserver_port: int):
        self.api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.name, self.root, self.port = name, root, apiserver_port
        self.running: dict[str, dict[str, subprocess.Popen]] = {}  # pod uid -> container -> process
        self.started: set[str] = set()  # pod uids this node has started (or failed to)
        self.deleting: set[str] = set()
        self.lock = threading.Lock()

    # --- the Node object -------------------------------------------------------------------

    def register(self) -> None:
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name,
                                                            "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}}}  # fmt: skip
        try:
            self.core.create_node(body)
        except ApiException as err:
            if err.status != 409:
                raise
        self.heartbeat()
        self.renew_lease()

    def renew_lease(self) -> None:
        """The node's Lease in kube-node-lease: what the node lifecycle controller watches."""
        coordination = kubernetes.client.CoordinationV1Api(self.api)
        renew = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"metadata": {"name": self.name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.name, "leaseDurationSeconds": 40, "renewTime": renew}}  # fmt: skip
        try:
            coordination.patch_namespaced_lease(self.name, "kube-node-lease", body)
        except ApiException as err:
            if err.status != 404:
                raise
            coordination.create_namespaced_lease("kube-node-lease", body)

    def heartbeat(self) -> None:
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "node double is ready",
                 "lastHeartbeatTime": now(), "lastTransitionTime": now()}  # fmt: skip
        self.core.patch_node_status(self.name, {"status": {
            "capacity": CAPACITY, "allocatable": CAPACITY, "conditions": [ready],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "nodeInfo": {"kubeletVersion": "v1.37.2-node-double", "containerRuntimeVersion": "none://0",
                         "operatingSystem": "linux", "architecture": "amd64", "machineID": "", "systemUUID": "",
                         "bootID": "", "kernelVersion": "", "osImage": "node double", "kubeProxyVersion": ""},
        }})  # fmt: skip

    # --- pods ------------------------------------------------------------------------------

    def pod_dir(self, pod: dict) -> Path:
        meta = pod["metadata"]
        return self.root / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    def set_status(self, pod: dict, status: dict) -> None:
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
        except ApiException as err:
            if err.status != 404:
                log.warning("status of %s: %s", meta["name"], err.reason)

    def volumes(self, pod: dict, folder: Path) -> dict[str, Path]:
        """Each pod volume as a folder (or, for a PVC, its PersistentVolume's hostPath)."""
        ns, out = pod["metadata"]["namespace"], {}
        for vol in pod["spec"].get("volumes") or []:
            path = folder / "volumes" / vol["name"]
            if "hostPath" in vol:
                path = Path(vol["hostPath"]["path"])
                path.mkdir(parents=True, exist_ok=True)
            elif "persistentVolumeClaim" in vol:
                claim = self.core.read_namespaced_persistent_volume_claim(vol["persistentVolumeClaim"]["claimName"], ns)
                volume = self.core.read_persistent_volume(claim.spec.volume_name)
                path = Path(volume.spec.host_path.path)
            else:
                path.mkdir(parents=True, exist_ok=True)
                files: dict[str, bytes] = {}
                if "configMap" in vol:
                    files = self._config_map(ns, vol["configMap"])
                elif "secret" in vol:
                    files = self._secret(ns, vol["secret"])
                elif "projected" in vol:
                    for source in vol["projected"]["sources"]:
                        files.update(self._projected(pod, source))
                for name, data in files.items():
                    (path / name).parent.mkdir(parents=True, exist_ok=True)
                    (path / name).write_bytes(data)
            out[vol["name"]] = path
        return out

    def _items(self, data: dict[str, bytes], items) -> dict[str, bytes]:
        return {i["path"]: data[i["key"]] for i in items} if items else data

    def _config_map(self, ns: str, ref: dict) -> dict[str, bytes]:
        cm = self.core.read_namespaced_config_map(ref["name"], ns)
        return self._items({k: v.encode() for k, v in (cm.data or {}).items()}, ref.get("items"))

    def _secret(self, ns: str, ref: dict) -> dict[str, bytes]:
        secret = self.core.read_namespaced_secret(ref["secretName"], ns)
        return self._items({k: base64.b64decode(v) for k, v in (secret.data or {}).items()}, ref.get("items"))

    def _projected(self, pod: dict, source: dict) -> dict[str, bytes]:
        meta, ns = pod["metadata"], pod["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            request = {"spec": {"audiences": [source["serviceAccountToken"].get("audience")] if source["serviceAccountToken"].get("audience") else None,
                                "expirationSeconds": source["serviceAccountToken"].get("expirationSeconds", 3607),
                                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}}}  # fmt: skip
            token = self.core.create_namespaced_service_account_token(pod["spec"].get("serviceAccountName", "default"), ns, request)
            return {source["serviceAccountToken"]["path"]: token.status.token.encode()}
        if "configMap" in source:
            return self._config_map(ns, source["configMap"])
        if "secret" in source:
            return self._secret(ns, {"secretName": source["secret"]["name"], "items": source["secret"].get("items")})
        if "downwardAPI" in source:
            return {i["path"]: field_value(pod, i["fieldRef"]["fieldPath"]).encode()
                    for i in source["downwardAPI"]["items"] if "fieldRef" in i}  # fmt: skip
        return {}

    def env(self, pod: dict, container: dict) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"),
               "HOSTNAME": pod["spec"].get("hostname", pod["metadata"]["name"]),
               "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port)}  # fmt: skip
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = {k: v.decode() for k, v in self._config_map(ns, {"name": source["configMapRef"]["name"]}).items()}
            else:
                data = {k: v.decode() for k, v in self._secret(ns, {"secretName": source["secretRef"]["name"]}).items()}
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = expand(var["value"], env)
            elif "valueFrom" in var:
                ref = var["valueFrom"]
                if "fieldRef" in ref:
                    env[var["name"]] = field_value(pod, ref["fieldRef"]["fieldPath"])
                elif "secretKeyRef" in ref:
                    key = ref["secretKeyRef"]
                    env[var["name"]] = self._secret(ns, {"secretName": key["name"]})[key["key"]].decode()
                elif "configMapKeyRef" in ref:
                    key = ref["configMapKeyRef"]
                    env[var["name"]] = self._config_map(ns, {"name": key["name"]})[key["key"]].decode()
            else:
                env[var["name"]] = ""
        index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
        if index is not None:  # the Job controller's env for Indexed Jobs
            env.setdefault("JOB_COMPLETION_INDEX", index)
        return env

    def hosts(self, pod: dict, folder: Path) -> Path:
        """/etc/hosts naming this pod and the pods of its subdomain (a headless Service)."""
        lines = ["127.0.0.1 localhost", f"127.0.0.1 {pod['spec'].get('hostname', pod['metadata']['name'])}"]
        subdomain, ns = pod["spec"].get("subdomain"), pod["metadata"]["namespace"]
        if subdomain:
            for other in self.core.list_namespaced_pod(ns).items:
                if other.spec.subdomain == subdomain and other.spec.hostname:
                    for name in (f"{other.spec.hostname}.{subdomain}", f"{other.spec.hostname}.{subdomain}.{ns}.svc",
                                 f"{other.spec.hostname}.{subdomain}.{ns}.svc.cluster.local"):
                        lines.append(f"127.0.0.1 {name}")
        path = folder / "hosts"
        path.write_text("\n".join(lines) + "\n")
        return path

    def launch(self, pod: dict, container: dict, volumes: dict[str, Path], folder: Path) -> subprocess.Popen:
        name = container["name"]
        dev = folder / f"dev-{name}"
        dev.mkdir(parents=True, exist_ok=True)
        (dev / "shm").mkdir(exist_ok=True)
        message = Path(container.get("terminationMessagePath", "/dev/termination-log"))
        if message.parent == Path("/dev"):
            (dev / message.name).write_text("")
        devices = [[f"/dev/{d}", str(dev / d), False] for d in DEVICES if os.path.exists(f"/dev/{d}")]
        mounts = [[str(dev), "/dev", False], [str(self.hosts(pod, folder)), "/etc/hosts", True]]
        for mount in container.get("volumeMounts") or []:
            source = volumes[mount["name"]]
            if mount.get("subPath"):
                source = source / mount["subPath"]
            mounts.append([str(source), mount["mountPath"], bool(mount.get("readOnly"))])
        # the device files first (into this pod's folder), then parents before children
        mounts = devices + sorted(mounts, key=lambda m: Path(m[1]).parts.__len__())
        env = self.env(pod, container)
        command = [expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])]
        if not container.get("command"):
            raise RuntimeError(f"container {name} has no command: the node double cannot run an image's entrypoint")
        plan = folder / f"plan-{name}.json"
        plan.write_text(json.dumps({"mounts": mounts, "image": IMAGE, "workingDir": container.get("workingDir"),
                                    "command": command, "env": env}))  # fmt: skip
        out = open(folder / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--",
                                 sys.executable, str(HERE / "pod_launcher.py"), str(plan)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def termination_message(self, container: dict, folder: Path, code: int) -> str:
        path = Path(container.get("terminationMessagePath", "/dev/termination-log"))
        file = folder / f"dev-{container['name']}" / path.name
        text = file.read_text()[-4096:] if file.exists() else ""
        if not text and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = (folder / f"{container['name']}.log").read_text(errors="replace").splitlines()[-80:]
            text = "\n".join(lines)[-2048:]
        return text

    def run_pod(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        folder = self.pod_dir(pod)
        folder.mkdir(parents=True, exist_ok=True)
        started = now()
        try:
            volumes = self.volumes(pod, folder)
            for init in spec.get("initContainers") or []:
                code = self.launch(pod, init, volumes, folder).wait()
                if code != 0:
                    raise RuntimeError(f"init container {init['name']} exited with {code}")
            containers = spec["containers"]
            procs = {c["name"]: self.launch(pod, c, volumes, folder) for c in containers}
        except Exception as err:  # what a kubelet reports as CreateContainerError and friends
            log.warning("pod %s/%s cannot start: %s", meta["namespace"], meta["name"], err)
            self.set_status(pod, {"phase": "Failed", "reason": "NodeDoubleError", "message": str(err)[:2000],
                                  "startTime": started, "hostIP": "127.0.0.1", "podIP": "127.0.0.1"})  # fmt: skip
            return
        with self.lock:
            self.running[uid] = procs
        restarts = dict.fromkeys(procs, 0)
        states = {c["name"]: {"running": {"startedAt": started}} for c in containers}

        def report(phase: str) -> None:
            ready = "True" if phase == "Running" else "False"
            statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": ready == "True" and "running" in states[c["name"]],
                         "restartCount": restarts[c["name"]], "started": "running" in states[c["name"]],
                         "state": states[c["name"]], "containerID": f"node-double://{uid}/{c['name']}"} for c in containers]  # fmt: skip
            self.set_status(pod, {"phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                                  "podIPs": [{"ip": "127.0.0.1"}], "startTime": started, "containerStatuses": statuses,
                                  "conditions": [{"type": t, "status": s, "lastTransitionTime": now()} for t, s in
                                                 (("PodScheduled", "True"), ("Initialized", "True"),
                                                  ("ContainersReady", ready), ("Ready", ready))]})  # fmt: skip

        report("Running")
        policy = spec.get("restartPolicy", "Always")
        while True:
            time.sleep(0.2)
            with self.lock:
                procs = self.running.get(uid)
                if procs is None:  # deleted: delete_pod reports and removes it
                    return
            changed = False
            for c in containers:
                proc = procs[c["name"]]
                if "running" not in states[c["name"]] or proc.poll() is None:
                    continue
                code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
                states[c["name"]] = {"terminated": {
                    "exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": started,
                    "finishedAt": now(), "message": self.termination_message(c, folder, code)}}  # fmt: skip
                changed = True
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    time.sleep(min(10, 2 ** restarts[c["name"]]))  # a short crash-loop back-off
                    restarts[c["name"]] += 1
                    procs[c["name"]] = self.launch(pod, c, volumes, folder)
                    states[c["name"]] = {"running": {"startedAt": now()}}
            if not changed:
                continue
            terminated = [s["terminated"] for s in states.values() if "terminated" in s]
            if len(terminated) < len(containers):
                report("Running")
                continue
            report("Succeeded" if all(t["exitCode"] == 0 for t in terminated) else "Failed")
            with self.lock:
                self.running.pop(uid, None)
            return

    def delete_pod(self, pod: dict) -> None:
        """What the kubelet does for a Pod with a deletionTimestamp: stop, then remove it."""
        meta = pod["metadata"]
        with self.lock:
            procs = self.running.pop(meta["uid"], {})
        grace = meta.get("deletionGracePeriodSeconds") or 0
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + grace
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if procs:
            states = [{"name": name, "image": "", "imageID": "", "ready": False, "restartCount": 0,
                       "state": {"terminated": {"exitCode": p.returncode if p.returncode >= 0 else 128 - p.returncode,
                                                "reason": "Error" if p.returncode else "Completed", "finishedAt": now()}}}
                      for name, p in procs.items()]  # fmt: skip
            failed = any(s["state"]["terminated"]["exitCode"] != 0 for s in states)
            self.set_status(pod, {"phase": "Failed" if failed else "Succeeded", "containerStatuses": states})
        try:
            # like the kubelet: grace 0 once the containers are gone (in the body: with a
            # body, the apiserver ignores the query parameters)
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body={
                "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}})  # fmt: skip
        except ApiException as err:
            if err.status not in (404, 409):
                log.warning("delete %s: %s", meta["name"], err.reason)
        shutil.rmtree(self.pod_dir(pod) / "volumes", ignore_errors=True)

    # --- the loop --------------------------------------------------------------------------

    def handle(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if pod["metadata"].get("deletionTimestamp"):
            if uid not in self.deleting:
                self.deleting.add(uid)
                threading.Thread(target=self.delete_pod, args=(pod,), daemon=True).start()
            return
        if uid in self.started or pod["status"].get("phase") in ("Succeeded", "Failed"):
            return
        self.started.add(uid)
        threading.Thread(target=self.run_pod, args=(pod,), daemon=True).start()

    def serve(self) -> None:
        self.register()
        threading.Thread(target=self._heartbeats, daemon=True).start()
        selector = f"spec.nodeName={self.name}"
        while True:
            pods = self.core.list_pod_for_all_namespaces(field_selector=selector)
            for pod in pods.items:
                self.handle(self.api.sanitize_for_serialization(pod))
            watch = kubernetes.watch.Watch()
            try:
                for event in watch.stream(self.core.list_pod_for_all_namespaces, field_selector=selector,
                                          resource_version=pods.metadata.resource_version, timeout_seconds=60):  # fmt: skip
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.handle(self.api.sanitize_for_serialization(event["object"]))
            except ApiException as err:
                if err.status != 410:  # an expired resourceVersion: list again
                    raise

    def _heartbeats(self) -> None:
        while True:
            time.sleep(10)
            try:
                self.renew_lease()
                self.heartbeat()
            except Exception as err:  # the apiserver may be restarting; try again
                log.warning("heartbeat: %s", err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", default="b3-node-0")
    parser.add_argument("--root", required=True)
    parser.add_argument("--apiserver-port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    node = Node(args.kubeconfig, args.node, root, args.apiserver_port)

    def stop(*_):  # end every pod's processes with the node
        with node.lock:
            for procs in node.running.values():
                for proc in procs.values():
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    node.serve()


if __name__ == "__main__":
    main()
