"""The operator, CRD, RBAC and chart on a real control plane (tests/cluster): the chart
installed with the real helm, the operator running in its pod under the chart's
ServiceAccount, stage Jobs run by the real Job controller, their pods by the node double.

Each test says which real component it leans on; what the node double does not emulate is in
tests/cluster/node_double.py and docs/development.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "b3-operator"
OPERATOR_NS = "b3-system"
OPERATOR_SA = f"system:serviceaccount:{OPERATOR_NS}:b3-b3-operator"


def wait_for(what: str, check, timeout: float = 180, every: float = 0.5, show=None):
    """check()'s first truthy value; TimeoutError after `timeout` s, with show()'s account of
    where things stood."""
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s" + (f"; {show()}" if show else ""))
        time.sleep(every)


def get(cluster, *args: str) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture(scope="module")
def operator(cluster):
    """`helm install` of the chart with the real helm CLI; the operator runs in its pod."""
    from control_plane import free_port

    cluster.kubectl("create", "namespace", OPERATOR_NS)
    cluster.helm("install", "b3", str(CHART), "--namespace", OPERATOR_NS,
                 "--set", "replicaCount=1",  # pods share 127.0.0.1: one replica's ports
                 "--set", f"operator.metricsPort={free_port()}", "--set", f"operator.livenessPort={free_port()}")  # fmt: skip
    wait_for("the operator Deployment available", lambda: any(
        c["type"] == "Available" and c["status"] == "True"
        for c in get(cluster, "deployment", "-n", OPERATOR_NS, "b3-b3-operator").get("status", {}).get("conditions", [])))  # fmt: skip
    return cluster


@pytest.fixture(scope="module")
def data_volume(cluster, tmp_path_factory, tiny_model_dir):
    return quickstart_volume(cluster, tmp_path_factory.mktemp("pv"), tiny_model_dir)


def quickstart_volume(cluster, root: Path, model_dir: str, owner: str | None = None) -> Path:
    """A hostPath PersistentVolume bound to PVC `b3-data` in namespace `e2e` (the real
    persistentvolume-binder binds it): the 2,000 quickstart rows and the tiny model at /data,
    owned by `owner` ("uid:gid") if given."""
    shutil.copy(ROOT / "examples" / "data" / "debian-2k.parquet", root / "debian-2k.parquet")
    shutil.copytree(model_dir, root / "model")
    if owner:
        subprocess.run(["chown", "-R", owner, str(root)], check=True)
    cluster.kubectl("create", "namespace", "e2e")
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "b3-data"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                  "hostPath": {"path": str(root)}, "claimRef": {"namespace": "e2e", "name": "b3-data"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "b3-data", "namespace": "e2e"},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": "b3-data",
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]))  # fmt: skip
    wait_for("PVC b3-data bound", lambda: get(cluster, "pvc", "-n", "e2e", "b3-data")["status"].get("phase") == "Bound")
    return root


def b3job(name: str, **overrides) -> dict:
    """The quickstart as a cluster job: data, model and work dir on the PVC at /data."""
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())["spec"]
    spec["dataset"]["uri"] = "/data/debian-2k.parquet"
    spec["teacher"] = {"model": "/data/model", "maxLength": 32}
    spec["training"].update(student="/data/model", maxLength=32, steps=4, checkpointEvery=2,
                            lora={"targetModules": ["query", "value"]})  # fmt: skip
    spec["workDir"] = f"/data/{name}"
    spec["template"] = {
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "b3-data"}}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "env": [{"name": "B3_METRICS_LINGER_SECONDS", "value": "0"}, {"name": "HF_HUB_OFFLINE", "value": "1"},
                {"name": "TOKENIZERS_PARALLELISM", "value": "false"}],
    }  # fmt: skip
    for path, value in overrides.items():
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return {"apiVersion": "b3.dev/v1alpha1", "kind": "B3Job", "metadata": {"name": name, "namespace": "e2e"},
            "spec": spec}  # fmt: skip


def apply(cluster, doc: dict, check: bool = True):
    return cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc), check=check)


def status(cluster, name: str) -> dict:
    return get(cluster, "b3job", "-n", "e2e", name).get("status", {})


def events(cluster, name: str) -> list[tuple[str, str]]:
    items = get(cluster, "events", "-n", "e2e", "--field-selector", f"involvedObject.name={name}")["items"]
    return [(e["reason"], e["message"]) for e in items]


# --- 1, 2: the chart and the CRD on the real API server ------------------------------------


def test_helm_installs_the_chart_and_the_api_server_takes_the_crd(operator):
    releases = json.loads(operator.helm("list", "-n", OPERATOR_NS, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("b3", "deployed")]
    crd = get(operator, "crd", "b3jobs.b3.dev")
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]}["Established"] == "True"
    # the operator pod runs under the chart's ServiceAccount, with its token mounted
    pod = get(operator, "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=b3-operator")["items"][0]
    assert pod["spec"]["serviceAccountName"] == "b3-b3-operator" and pod["status"]["phase"] == "Running"


def test_invalid_manifests_are_refused_by_the_real_api_server_naming_the_field(operator):
    operator.kubectl("create", "namespace", "schema")
    for path in sorted((ROOT / "tests" / "manifests" / "invalid").glob("*.yaml")):
        field = path.read_text().splitlines()[0].removeprefix("# expect: ").strip()
        result = operator.kubectl("apply", "--dry-run=server", "-n", "schema", "-f", str(path), check=False)
        assert result.returncode != 0, path.name
        assert field in result.stderr, (path.name, result.stderr)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        result = operator.kubectl("apply", "--dry-run=server", "-n", "schema", "-f", str(path), check=False)
        assert result.returncode == 0, (path.name, result.stderr)


def test_the_spec_is_fixed_after_creation_but_suspend_and_run_policy_change(operator, data_volume):
    apply(operator, b3job("fixed", suspend=True))  # suspended: the operator starts no pod
    refused = operator.kubectl("patch", "b3job", "fixed", "-n", "e2e", "--type=merge",
                               "-p", '{"spec": {"mining": {"p": 3}}}', check=False)  # fmt: skip
    assert refused.returncode != 0 and "spec: Invalid value: the spec cannot change" in refused.stderr
    for patch in ('{"spec": {"runPolicy": {"ttlSecondsAfterFinished": 60}}}', '{"spec": {"suspend": false}}'):
        operator.kubectl("patch", "b3job", "fixed", "-n", "e2e", "--type=merge", "-p", patch)
    operator.kubectl("delete", "b3job", "fixed", "-n", "e2e", "--wait=false")


# --- 4, 5: a whole job, and failures on the real controllers --------------------------------


def test_a_b3job_runs_every_stage_as_real_jobs_and_survives_an_operator_restart(operator, data_volume):
    apply(operator, b3job("debian"))
    wait_for("rank running", lambda: status(operator, "debian").get("phase") == "Ranking")
    # the operator pod dies mid-stage; its Deployment brings a new one, which must adopt
    old = get(operator, "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=b3-operator")["items"][0]
    operator.kubectl("delete", "pod", "-n", OPERATOR_NS, old["metadata"]["name"])
    final = wait_for("B3Job finished", lambda: status(operator, "debian").get("phase") in ("Succeeded", "Failed")
                     and status(operator, "debian"), timeout=420, every=2)  # fmt: skip
    assert final["phase"] == "Succeeded", (final, operator.pod_logs("e2e", "debian")[-4000:])
    assert (data_volume / "debian" / "train" / "final" / "model" / "config.json").exists()
    assert final["progress"] == "3/3" and all(final["stages"][s]["completionTime"] for s in ("rank", "partition", "train"))
    conditions = {c["type"]: (c["status"], c["reason"]) for c in final["conditions"]}
    assert conditions["Succeeded"] == ("True", "AllStagesSucceeded")
    assert conditions["Running"] == ("False", "Succeeded")

    jobs = get(operator, "jobs", "-n", "e2e", "-l", "b3.dev/job=debian")["items"]
    assert sorted(j["metadata"]["name"] for j in jobs) == ["debian-partition", "debian-rank", "debian-train"]
    assert all(j["status"].get("succeeded") == 1 for j in jobs)  # no stage ran twice
    assert [s["metadata"]["name"] for s in get(operator, "services", "-n", "e2e")["items"]] == ["debian-train"]
    reasons = [r for r, _ in events(operator, "debian")]
    for stage_event in ("StageStarted", "StageSucceeded"):
        assert reasons.count(stage_event) == 3, reasons
    assert "Succeeded" in reasons
    described = operator.kubectl("describe", "b3job", "-n", "e2e", "debian").stdout
    assert "AllStagesSucceeded" in described and "StageSucceeded" in described
    table = operator.kubectl("get", "b3j", "-n", "e2e").stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "PHASE", "STAGE", "PROGRESS"]
    assert table[1].split()[:2] == ["debian", "Succeeded"] and "3/3" in table[1]
    for pod in get(operator, "pods", "-n", "e2e", "-l", "b3.dev/job=debian")["items"]:
        spec = pod["spec"]  # no API token in stage pods: the admission plugin added no volume
        assert spec["automountServiceAccountToken"] is False
        assert not [v for v in spec["volumes"] if v["name"].startswith("kube-api-access")]
        assert spec["securityContext"]["runAsNonRoot"] is True
    logs = operator.pod_logs(OPERATOR_NS, "b3-b3-operator")
    assert "Forbidden" not in logs  # every 403 says so; the audit log is checked in the RBAC test


def test_stage_jobs_live_until_the_b3job_ends_then_the_ttl_controller_removes_them(operator, data_volume):
    """A finished stage's Job deleted mid-job (as an early TTL would) is not a stage to run
    again; runPolicy.ttlSecondsAfterFinished counts from the B3Job's end, and the real
    TTL-after-finished controller then deletes every stage Job."""
    apply(operator, b3job("ttl", **{"runPolicy.ttlSecondsAfterFinished": 3}))
    wait_for("partition running", lambda: status(operator, "ttl").get("phase") in ("Partitioning", "Training"), 240)
    rank = get(operator, "job", "-n", "e2e", "ttl-rank")
    assert "ttlSecondsAfterFinished" not in rank["spec"]  # none while the job runs
    operator.kubectl("delete", "job", "-n", "e2e", "ttl-rank", "--cascade=background")
    final = wait_for("B3Job finished", lambda: status(operator, "ttl").get("phase") in ("Succeeded", "Failed")
                     and status(operator, "ttl"), timeout=300, every=1)  # fmt: skip
    assert final["phase"] == "Succeeded", final
    assert [r for r, m in events(operator, "ttl") if r == "StageStarted" and "rank" in m] == ["StageStarted"]
    wait_for("stage Jobs deleted by the TTL controller",
             lambda: not get(operator, "jobs", "-n", "e2e", "-l", "b3.dev/job=ttl")["items"], 60)  # fmt: skip
    assert status(operator, "ttl")["phase"] == "Succeeded"  # nothing came back


def test_bad_input_fails_the_job_at_once_through_the_real_pod_failure_policy(operator, data_volume):
    apply(operator, b3job("badcolumn", **{"dataset.columns": {"query": "no_such_column", "positive": "positive"}}))
    final = wait_for("B3Job failed", lambda: status(operator, "badcolumn").get("phase") == "Failed"
                     and status(operator, "badcolumn"), timeout=240, every=1)  # fmt: skip
    assert "no_such_column" in final["message"] and "rank failed" in final["message"]
    job = get(operator, "job", "-n", "e2e", "badcolumn-rank")
    assert job["status"].get("failed") == 1  # not retried: backoffLimit 2 unspent
    failed = {c["type"]: c for c in job["status"]["conditions"]}["Failed"]
    assert failed["reason"] == "PodFailurePolicy"

    # deleting the B3Job: the operator drops its finalizer, the garbage collector the children
    operator.kubectl("delete", "b3job", "-n", "e2e", "badcolumn", "--timeout=60s")
    wait_for("children collected", lambda: not get(operator, "jobs,configmaps", "-n", "e2e",
                                                      "-l", "b3.dev/job=badcolumn")["items"], 120)  # fmt: skip


def test_a_lasting_object_store_fault_exits_75_and_the_real_job_controller_retries_the_stage(
    operator, data_volume, s3_server
):
    """The dataset on an S3 server that is unreachable when the rank pod starts: the pod's
    retries run out and it exits 75, which no podFailurePolicy rule fails the Job for, so the
    Job controller starts another pod; with the server back, that one ranks."""
    s3_server.put("cluster/debian-2k.parquet", (ROOT / "examples" / "data" / "debian-2k.parquet").read_bytes())
    job = b3job("blip", **{"dataset.uri": s3_server.uri("cluster/debian-2k.parquet")})
    job["spec"]["template"]["env"] += [{"name": k, "value": v} for k, v in s3_server.env.items()]
    s3_server.network.down()
    try:
        apply(operator, job)
        failed = wait_for("a rank pod failed", lambda: [
            t for p in get(operator, "pods", "-n", "e2e", "-l", "b3.dev/job=blip,b3.dev/stage=rank")["items"]
            for c in p["status"].get("containerStatuses", []) if (t := c["state"].get("terminated"))
            and t["exitCode"] != 0], timeout=240, every=1)  # fmt: skip
    finally:
        s3_server.network.up()
    assert failed[0]["exitCode"] == 75 and "transient fault" in failed[0].get("message", "")
    rank = wait_for("the rank Job succeeded on its next pod", lambda: (
        j := get(operator, "job", "-n", "e2e", "blip-rank"))["status"].get("succeeded") and j, timeout=300, every=1)  # fmt: skip
    assert rank["status"].get("failed") == 1
    assert status(operator, "blip").get("phase") != "Failed"
    operator.kubectl("delete", "b3job", "-n", "e2e", "blip", "--timeout=60s")


def test_a_foreign_object_blocks_and_a_refused_create_fails_the_job(operator, data_volume):
    """A ConfigMap named like the job's spec ConfigMap but not its own: condition Blocked and
    one Warning Event naming it, nothing created; deleted, the job goes on. A child the API
    server refuses (422 here: an invalid volume name in the template) fails the job at once
    with the server's message instead of a retry loop."""
    operator.kubectl("create", "configmap", "-n", "e2e", "taken-spec", "--from-literal=a=b")
    apply(operator, b3job("taken", suspend=True))
    blocked = wait_for("Blocked", lambda: {c["type"]: c for c in status(operator, "taken").get("conditions", [])}.get("Blocked"), 60)
    assert blocked["status"] == "True" and blocked["reason"] == "ForeignObject"
    assert "ConfigMap taken-spec exists (owned by nobody)" in blocked["message"]
    assert [r for r, _ in events(operator, "taken")].count("ForeignObject") == 1
    assert not get(operator, "jobs", "-n", "e2e", "-l", "b3.dev/job=taken")["items"]
    operator.kubectl("delete", "configmap", "-n", "e2e", "taken-spec")
    operator.kubectl("annotate", "b3job", "-n", "e2e", "taken", "nudge=1")  # any change re-reconciles
    wait_for("rank Job created", lambda: get(operator, "jobs", "-n", "e2e", "-l", "b3.dev/job=taken")["items"], 60)
    operator.kubectl("delete", "b3job", "-n", "e2e", "taken", "--wait=false")

    bad = b3job("refused")
    bad["spec"]["template"]["volumes"].append({"name": "Bad_Name", "emptyDir": {}})
    apply(operator, bad)
    final = wait_for("Failed", lambda: status(operator, "refused").get("phase") == "Failed" and status(operator, "refused"), 60)
    assert "creating Job refused-rank was refused (422)" in final["message"] and "Bad_Name" in final["message"]
    assert {c["type"]: c["reason"] for c in final["conditions"]}["Failed"] == "CreateRefused"
    assert "CreateRefused" in [r for r, _ in events(operator, "refused")]


def test_a_stage_that_cannot_create_its_pods_is_stalled_then_fails_at_its_startup_deadline(operator, data_volume):
    """The real Job controller cannot create the pod (its ServiceAccount does not exist): the
    B3Job gets Stalled quoting the FailedCreate Event, then fails at startupDeadlineSeconds."""
    apply(operator, b3job("nosa", **{"template.serviceAccountName": "nobody",
                                     "stages": {"rank": {"startupDeadlineSeconds": 5}}}))  # fmt: skip
    final = wait_for("failed at the deadline", lambda: status(operator, "nosa").get("phase") == "Failed"
                     and status(operator, "nosa"), 150, 2)  # fmt: skip
    reasons = {c["type"]: (c["status"], c["reason"]) for c in final["conditions"]}
    assert reasons["Failed"] == ("True", "StartupDeadlineExceeded")
    assert 'serviceaccount "nobody" not found' in final["message"] or "nobody" in final["message"]
    assert {"Stalled", "StartupDeadlineExceeded"} <= {r for r, _ in events(operator, "nosa")}


def test_a_ray_rank_stage_is_a_rayjob_the_operator_creates_and_resumes(operator, data_volume):
    """KubeRay's RayJob CRD (no KubeRay controller here): the operator's RayJob calls against
    the real API server, validated by KubeRay's own schema."""
    crd = ROOT.parent / "shared" / "crds" / "ray.io_rayjobs.yaml"
    if not crd.exists():
        pytest.skip(f"{crd} is absent")
    operator.kubectl("apply", "--server-side", "-f", str(crd))
    wait_for("RayJob CRD established", lambda: operator.kubectl("get", "rayjobs", "-A", check=False).returncode == 0, 60)
    apply(operator, b3job("ray", suspend=True, **{"rank.workers": 2}))
    rayjob = wait_for("RayJob created", lambda: operator.kubectl("get", "rayjob", "-n", "e2e", "ray-rank", "-o", "json",
                                                                 check=False).stdout, 60)  # fmt: skip
    assert json.loads(rayjob)["spec"]["suspend"] is True
    operator.kubectl("patch", "b3job", "ray", "-n", "e2e", "--type=merge", "-p", '{"spec": {"suspend": false}}')
    wait_for("RayJob resumed", lambda: get(operator, "rayjob", "-n", "e2e", "ray-rank")["spec"]["suspend"] is False, 60)
    operator.kubectl("delete", "b3job", "ray", "-n", "e2e", "--wait=false")

    # no KubeRay controller: the RayJob never gets its Ray pods, and its startup deadline fails it
    # (rechecked when due, with no event from any child)
    apply(operator, b3job("raystuck", **{"rank.workers": 2, "stages.rank.startupDeadlineSeconds": 5}))
    final = wait_for("RayJob stage failed", lambda: status(operator, "raystuck").get("phase") == "Failed"
                     and status(operator, "raystuck"), 40)  # fmt: skip
    assert {c["type"]: c["reason"] for c in final["conditions"]}["Failed"] == "StartupDeadlineExceeded"
    assert final["message"].startswith("rank: pods not started")


# --- Kueue (built from sigs.k8s.io/kueue) admits the stages -------------------------------------


@pytest.fixture(scope="module")
def kueue(operator, data_volume):
    """Kueue's manager and webhooks on this control plane, one ClusterQueue of 1 CPU."""
    operator.start_kueue()
    operator.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "default"}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": "b3"},
         "spec": {"namespaceSelector": {}, "resourceGroups": [{
             "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
             "flavors": [{"name": "default", "resources": [{"name": "cpu", "nominalQuota": "1"},
                                                            {"name": "memory", "nominalQuota": "64Gi"},
                                                            {"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]}},
        {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "b3-queue", "namespace": "e2e"},
         "spec": {"clusterQueue": "b3"}},
    ]))  # fmt: skip
    return operator


def workload(cluster, job: str) -> dict:
    uid = get(cluster, "job", "-n", "e2e", job)["metadata"]["uid"]
    items = get(cluster, "workloads", "-n", "e2e", "-l", f"kueue.x-k8s.io/job-uid={uid}")["items"]
    return items[0] if items else {}


def test_kueue_admits_the_stages_and_the_operator_never_fights_it(kueue, data_volume):
    """The real Kueue webhook suspends each queue-labelled stage Job and admits it when quota
    allows: the B3Job is Queued with Kueue's own reason meanwhile, B3Job suspend goes through
    the Workload's spec.active (which Kueue honours where a Job's suspend would be undone),
    and the operator never patches a stage Job's suspend (the audit log)."""
    apply(kueue, b3job("queued", **{"runPolicy.queueName": "b3-queue",
                                    "stages.rank.resources": {"requests": {"cpu": "2"}}}))  # fmt: skip
    def queued_condition():
        return {c["type"]: c for c in status(kueue, "queued").get("conditions", [])}.get("Queued", {})

    # first without a Workload (NoWorkload); Kueue's Workload events bring its reason
    queued = wait_for("Queued by Kueue", lambda: queued_condition().get("reason") == "Pending" and queued_condition(), 90,
                      show=lambda: f"condition {queued_condition()}, Workload {workload(kueue, 'queued-rank').get('status')}")
    assert queued["status"] == "True" and status(kueue, "queued")["phase"] == "Queued"
    assert "insufficient quota for cpu" in queued["message"] and "b3-queue" in queued["message"]
    assert get(kueue, "job", "-n", "e2e", "queued-rank")["spec"]["suspend"] is True

    kueue.kubectl("patch", "b3job", "queued", "-n", "e2e", "--type=merge", "-p", '{"spec": {"suspend": true}}')
    wait_for("Workload deactivated", lambda: workload(kueue, "queued-rank")["spec"].get("active") is False, 60)
    wait_for("Suspended", lambda: status(kueue, "queued").get("phase") == "Suspended", 60)
    kueue.kubectl("patch", "clusterqueue", "b3", "--type=json", "-p",
                  '[{"op": "replace", "path": "/spec/resourceGroups/0/flavors/0/resources/0/nominalQuota", "value": "8"}]')  # fmt: skip
    time.sleep(5)  # quota now fits, but an inactive Workload is not admitted
    assert get(kueue, "job", "-n", "e2e", "queued-rank")["spec"]["suspend"] is True

    kueue.kubectl("patch", "b3job", "queued", "-n", "e2e", "--type=merge", "-p", '{"spec": {"suspend": false}}')
    final = wait_for("B3Job finished", lambda: status(kueue, "queued").get("phase") in ("Succeeded", "Failed")
                     and status(kueue, "queued"), timeout=420, every=2)  # fmt: skip
    assert final["phase"] == "Succeeded", (final, kueue.pod_logs("e2e", "queued")[-3000:])
    assert {c["type"]: c["status"] for c in final["conditions"]}["Queued"] == "False"
    for stage in ("rank", "partition", "train"):  # each stage went through Kueue and was admitted
        admitted = {c["type"]: c["status"] for c in workload(kueue, f"queued-{stage}")["status"]["conditions"]}
        assert admitted.get("Admitted") == "True" or admitted.get("Finished") == "True", (stage, admitted)
    ours = [e for e in kueue.requests(OPERATOR_SA) if "queued-" in (e.get("objectRef") or {}).get("name", "")
            and e["verb"] == "patch"]  # the stage Jobs queued-*, their Workloads job-queued-*
    patched = sorted({(e["objectRef"]["resource"], e["objectRef"]["name"]) for e in ours})
    assert patched == [("workloads", workload(kueue, "queued-rank")["metadata"]["name"])], patched
    reasons = [r for r, _ in events(kueue, "queued")]
    assert "Queued" in reasons and "Suspending" in reasons and "Resuming" in reasons


# --- training restarts as a whole gang ---------------------------------------------------------


def newest_checkpoint(root: Path) -> int:
    steps = [int(p.name.removeprefix("step-")) for p in root.glob("train/checkpoints/*/step-*") if p.name[5:].isdigit()]
    return max(steps, default=0)


def training_pod(cluster, job: str) -> dict | None:
    pods = get(cluster, "pods", "-n", "e2e", "-l", f"job-name={job}")["items"]
    return next((p for p in pods if p["status"].get("phase") == "Running"), None)


def test_training_restarts_as_a_whole_gang_and_a_disruption_does_not_count(operator, data_volume):
    """A training pod evicted through the real Eviction API (the apiserver marks it
    DisruptionTarget; the trainer checkpoints on SIGTERM): the gang starts again as a new Job,
    not counted. A worker killed (a crash): again, counted in status.restarts. Each gang
    resumes from the newest checkpoint and the job succeeds."""
    import kubernetes

    apply(operator, b3job("gang", **{"training.steps": 400, "training.checkpointEvery": 5}))
    root = data_volume / "gang"
    wait_for("a first checkpoint", lambda: newest_checkpoint(root) >= 5, 300, 0.2)
    pod = training_pod(operator, "gang-train")
    core = kubernetes.client.CoreV1Api(operator.api_client())
    core.create_namespaced_pod_eviction(pod["metadata"]["name"], "e2e", {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod["metadata"]["name"], "namespace": "e2e"}})  # fmt: skip
    wait_for("second gang running", lambda: training_pod(operator, "gang-r1"), 120)
    evicted_at = newest_checkpoint(root)
    wait_for("a checkpoint of the second gang", lambda: newest_checkpoint(root) > evicted_at, 120, 0.2)
    assert status(operator, "gang").get("restarts", 0) == 0  # a disruption is not counted

    # the worker process crashes (torchrun's worker: python -u -m b3_jobs.train ...)
    subprocess.run(["pkill", "-KILL", "-f", "python[^ ]* -u -m b3_jobs.train /etc/b3/job.yaml"], check=True)
    final = wait_for("B3Job finished", lambda: status(operator, "gang").get("phase") in ("Succeeded", "Failed")
                     and status(operator, "gang"), timeout=420, every=2)  # fmt: skip
    assert final["phase"] == "Succeeded", (final, operator.pod_logs("e2e", "gang")[-3000:])
    assert final["restarts"] == 1 and final["stages"]["train"]["child"] == "gang-r2"
    jobs = {j["metadata"]["name"]: j for j in get(operator, "jobs", "-n", "e2e", "-l", "b3.dev/job=gang")["items"]}
    failed = {n: {c["type"]: c for c in j["status"].get("conditions", [])}.get("Failed") for n, j in jobs.items()}
    assert "DisruptionTarget" in failed["gang-train"]["message"] and failed["gang-r1"]["reason"] == "BackoffLimitExceeded"
    assert jobs["gang-r2"]["status"]["succeeded"] == 1
    restarts = {m.split()[1]: m for r, m in events(operator, "gang") if r == "TrainingRestarted"}  # by the failed Job
    assert len(restarts) == 2 and "not counted" in restarts["gang-train"] and "restart 1 of 3" in restarts["gang-r1"]
    logs = operator.pod_logs("e2e", "gang-r")
    assert logs.count("resumed from") == 2, logs[-3000:]  # each gang went on from a checkpoint


# --- 3: RBAC, last: it edits the ClusterRoles ------------------------------------------------


def operator_requests(cluster) -> dict[tuple[str, str, str], set[int]]:
    """(api group, resource[/subresource], verb) -> response codes, from the audit log."""
    out: dict[tuple[str, str, str], set[int]] = {}
    for event in cluster.requests(OPERATOR_SA):
        ref = event.get("objectRef") or {}
        if not ref.get("resource"):
            continue  # discovery
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        out.setdefault((ref.get("apiGroup", ""), resource, event["verb"]), set()).add(event["responseStatus"]["code"])
    return out


def can_i(cluster, verb: str, group: str, resource: str, who: str, namespace: str = "e2e") -> bool:
    name, _, sub = resource.partition("/")
    args = ["auth", "can-i", verb, f"{name}.{group}" if group else name, f"--as={who}", "-n", namespace]
    if sub:
        args.append(f"--subresource={sub}")
    return cluster.kubectl(*args, check=False).stdout.strip() == "yes"


def test_rbac_every_rule_is_used_none_refused_and_each_removal_denies_its_steps(operator):
    """After the jobs above (run under the chart's ServiceAccount): no request of the operator
    was refused; every rule of its ClusterRoles served some request; without a rule, the real
    authorizer denies exactly those requests. The worker ServiceAccount may read nothing."""
    used = operator_requests(operator)
    assert used, "no request of the operator in the audit log"
    assert not {k: c for k, c in used.items() if 403 in c}
    unused_verbs = []
    for name in ("b3-b3-operator", "b3-b3-operator-kopf"):
        role = get(operator, "clusterrole", name)
        role["metadata"] = {"name": name, "labels": role["metadata"].get("labels", {})}
        for rule in role["rules"]:
            served = sorted(k for k in used if k[0] in rule["apiGroups"] and k[1] in rule["resources"]
                            and k[2] in rule["verbs"])  # fmt: skip
            assert served, f"{name}: rule {rule} served no request"
            unused_verbs += [(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
                             if (g, r, v) not in used]  # fmt: skip
            operator.kubectl("apply", "-f", "-", stdin=json.dumps({**role, "rules": [r for r in role["rules"] if r != rule]}))
            for group, resource, verb in served:
                wait_for(f"{verb} {resource} denied without {rule}",
                         lambda g=group, r=resource, v=verb: not can_i(operator, v, g, r, OPERATOR_SA), 15)  # fmt: skip
            operator.kubectl("apply", "-f", "-", stdin=json.dumps(role))
            for group, resource, verb in served:
                wait_for(f"{verb} {resource} allowed again", lambda g=group, r=resource, v=verb: can_i(operator, v, g, r, OPERATOR_SA), 15)
    print(f"granted but not used in this run: {sorted(unused_verbs)}")
    assert not can_i(operator, "delete", "batch", "jobs", OPERATOR_SA)
    assert not can_i(operator, "get", "", "secrets", OPERATOR_SA)
    worker = f"system:serviceaccount:{OPERATOR_NS}:b3-worker"
    for verb, group, resource in (("get", "", "pods"), ("list", "", "configmaps"), ("get", "", "secrets"),
                                  ("list", "b3.dev", "b3jobs"), ("create", "batch", "jobs")):  # fmt: skip
        assert not can_i(operator, verb, group, resource, worker, OPERATOR_NS)


def test_b3jobs_deleted_while_no_operator_runs_go_at_once(operator, data_volume):
    """No finalizer on any B3Job, running or finished (the delete handler is optional and the
    resync is no kopf timer): with the operator scaled to zero, deleting them does not hang,
    and the garbage collector takes their children. Last: it stops the operator."""
    apply(operator, b3job("orphan", **{"dataset.columns": {"query": "missing", "positive": "positive"}}))
    apply(operator, b3job("paused", suspend=True))
    wait_for("it failed", lambda: status(operator, "orphan").get("phase") == "Failed", 240)
    wait_for("the other suspended", lambda: status(operator, "paused").get("phase") == "Suspended", 60)
    for name in ("orphan", "paused"):
        assert not get(operator, "b3job", "-n", "e2e", name)["metadata"].get("finalizers"), name
    operator.kubectl("scale", "deployment", "-n", OPERATOR_NS, "b3-b3-operator", "--replicas=0")
    wait_for("operator gone", lambda: not get(operator, "pods", "-n", OPERATOR_NS, "-l",
                                                "app.kubernetes.io/name=b3-operator")["items"], 60)  # fmt: skip
    operator.kubectl("delete", "b3job", "-n", "e2e", "orphan", "paused", "--timeout=20s")
    wait_for("children collected", lambda: not get(operator, "jobs,configmaps", "-n", "e2e",
                                                      "-l", "b3.dev/job in (orphan,paused)")["items"], 60)  # fmt: skip
