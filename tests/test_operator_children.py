"""Children manifests: valid Kubernetes objects (official schemas, strict) with the semantics
the operator relies on: ownership, exec-form commands, failure policy, gang training."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import SHARED

from b3.spec import parse_spec
from b3_operator import children

kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (pip)")
K8S_VERSION = "1.33"
RAYJOB_CRD = SHARED / "crds" / "ray.io_rayjobs.yaml"

BASE = {
    "dataset": {"uri": "s3://data/pairs.parquet", "columns": {"task": "task", "id": "id"}},
    "mining": {"batchSize": 64, "clusterSize": 16},
    "workDir": "/work/run-1",
}
MULTI_NODE = {
    **BASE,
    "template": {
        "image": "registry.example.com/b3/worker:0.1.0",
        "serviceAccountName": "b3-worker",
        "priorityClassName": "training",
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}}},
        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        "envFrom": [{"secretRef": {"name": "s3-credentials"}}],
        "volumes": [{"name": "work", "persistentVolumeClaim": {"claimName": "b3-work"}}],
        "volumeMounts": [{"name": "work", "mountPath": "/work"}],
    },
    "training": {"nodes": 2, "processesPerNode": 8, "steps": 1000, "maxRestarts": 4},
    "stages": {"train": {"activeDeadlineSeconds": 86400,
                         "resources": {"limits": {"nvidia.com/gpu": 8, "memory": "900Gi"}}}},
    "runPolicy": {"queueName": "gpu-team", "schedulerName": "default-scheduler",
                  "ttlSecondsAfterFinished": 3600},
}  # fmt: skip
RAY = {**BASE, "rank": {"workers": 4, "gpusPerWorker": 1}}


def body(spec: dict, name: str = "job-1") -> dict:
    return {"apiVersion": "b3.dev/v1alpha1", "kind": "B3Job", "spec": spec,
            "metadata": {"name": name, "namespace": "team-a", "uid": "1234-abcd", "generation": 1}}  # fmt: skip


def every_child(spec: dict) -> list[dict]:
    b, parsed = body(spec), parse_spec(spec)
    objects = [children.spec_configmap(b, parsed)]
    for stage in ("rank", "partition", "train"):
        objects += children.stage_child(b, parsed, stage)
    return objects


@pytest.mark.parametrize("spec", [BASE, MULTI_NODE, RAY], ids=["minimal", "multi-node", "ray"])
def test_children_validate_against_the_official_schemas(spec):
    for obj in every_child(spec):
        if obj["kind"] == "RayJob":
            continue  # a CRD: checked against KubeRay's own schema below
        kv.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)


def test_rayjob_validates_against_the_kuberay_crd():
    if not RAYJOB_CRD.exists():
        pytest.skip(f"{RAYJOB_CRD} is absent (the shared third-party CRDs)")
    import jsonschema
    from test_operator_crd import _as_json_schema  # strict: unknown fields are errors

    crd = yaml.safe_load(RAYJOB_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _as_json_schema(version["schema"]["openAPIV3Schema"])
    with_policies = {**RAY, "stages": {"rank": {"activeDeadlineSeconds": 3600}},
                     "runPolicy": MULTI_NODE["runPolicy"], "template": MULTI_NODE["template"]}  # fmt: skip
    for spec in (RAY, with_policies):
        (rayjob,) = children.stage_child(body(spec), parse_spec(spec), "rank")
        assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
        jsonschema.validate(rayjob, schema)
    (rayjob,) = children.stage_child(body(RAY), parse_spec(RAY), "rank")
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 4
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_children_are_owned_named_and_labelled():
    objects = every_child(MULTI_NODE)
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert names == [("ConfigMap", "job-1-spec"), ("Job", "job-1-rank"), ("Job", "job-1-partition"),
                     ("Service", "job-1-train"), ("Job", "job-1-train")]  # fmt: skip
    for obj in objects:
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "b3.dev/v1alpha1", "kind": "B3Job", "name": "job-1",
                         "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True}  # fmt: skip
        assert obj["metadata"]["namespace"] == "team-a"
        assert obj["metadata"]["labels"]["b3.dev/job"] == "job-1"
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert all(j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team" for j in jobs)


def test_the_configmap_holds_the_resolved_spec_the_pods_read():
    cm = every_child(MULTI_NODE)[0]
    manifest = yaml.safe_load(cm["data"]["job.yaml"])
    assert manifest["kind"] == "B3Job" and manifest["metadata"]["name"] == "job-1"
    assert parse_spec(manifest["spec"]) == parse_spec(MULTI_NODE)


def test_training_is_an_indexed_gang_with_torchrun_in_exec_form():
    service, train = children.stage_child(body(MULTI_NODE), parse_spec(MULTI_NODE), "train")
    spec, pod = train["spec"], train["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    assert (
        service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    )
    (container,) = pod["containers"]
    assert container["command"] == [
        "python", "-m", "b3_jobs.launch", "--nnodes", "2", "--nproc-per-node", "8",
        "--node-rank", "$(JOB_COMPLETION_INDEX)", "--rdzv-endpoint", "job-1-train-0.job-1-train:29400",
        "--shutdown-timeout", "50", "-m", "b3_jobs.train", "/etc/b3/job.yaml",
    ]  # fmt: skip
    # SIGTERM to SIGKILL: torchrun waits 50 s for its workers' checkpoint, then 10 s to exit
    assert pod["terminationGracePeriodSeconds"] == 60
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "8", "memory": "900Gi"}}
    # the first failed pod fails the Job (whose controller stops the rest): the gang restarts
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 86400
    rules = spec["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "FailJob"]
    assert train["metadata"]["labels"]["b3.dev/attempt"] == "0"
    assert train["metadata"]["annotations"]["b3.dev/restarts"] == "0"
    assert "ttlSecondsAfterFinished" not in spec  # set when the whole B3Job ends (planner)
    assert pod["schedulerName"] == "default-scheduler" and pod["priorityClassName"] == "training"
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
    } in container["env"]
    assert {"name": "work", "mountPath": "/work"} in container["volumeMounts"]


def test_bad_input_fails_at_once_and_disruptions_do_not_count():
    for job in (o for o in every_child(BASE) if o["kind"] == "Job"):
        rules = job["spec"]["podFailurePolicy"]["rules"]
        assert rules[0] == {
            "action": "FailJob",
            "onExitCodes": {"containerName": "stage", "operator": "In", "values": [2]},
        }
        # a disrupted rank/partition pod is replaced; a disrupted training pod fails its Job, so
        # that the operator restarts the whole gang (without counting it, see the planner)
        stage = job["metadata"]["labels"]["b3.dev/stage"]
        assert rules[1] == {
            "action": "FailJob" if stage == "train" else "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        }
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_pods_run_as_non_root_unless_the_spec_says_otherwise():
    rank = every_child(BASE)[1]
    pod = rank["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    assert pod["automountServiceAccountToken"] is False  # stage pods need no API token
    # a user securityContext is merged over the hardened default, not in place of it
    custom = {**BASE, "template": {"securityContext": {"runAsUser": 2000, "seccompProfile": {"type": "Localhost",
              "localhostProfile": "b3.json"}}, "automountServiceAccountToken": True}}  # fmt: skip
    pod = every_child(custom)[1]["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 2000, "runAsGroup": 1000, "fsGroup": 1000,
        "seccompProfile": {"type": "Localhost", "localhostProfile": "b3.json"}}  # fmt: skip
    assert pod["automountServiceAccountToken"] is True


def test_the_ray_cluster_goes_when_ranking_ends_whatever_the_jobs_ttl():
    """runPolicy.ttlSecondsAfterFinished is the B3Job's; in a RayJob the field is the delay
    before KubeRay deletes the Ray cluster (and frees its GPUs)."""
    spec = {**RAY, "runPolicy": {"ttlSecondsAfterFinished": 86400}}
    (rayjob,) = children.stage_child(body(spec), parse_spec(spec), "rank")
    assert rayjob["kind"] == "RayJob" and rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert "ttlSecondsAfterFinished" not in rayjob["spec"]  # KubeRay's default: 0


def test_the_ray_head_is_sized_for_the_driver_runs_no_ranking_task_and_names_rays_ports():
    """stages.rank.resources size the Ray workers (with the GPU default), headResources the head
    (default 2 CPU/8Gi, no GPU); the head offers Ray no CPU, so no task lands beside the driver."""

    def head_and_worker(spec: dict) -> tuple[dict, dict]:
        (rayjob,) = children.stage_child(body(spec), parse_spec(spec), "rank")
        cluster = rayjob["spec"]["rayClusterSpec"]
        assert cluster["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
        # KubeRay's head Service (and its submission to the dashboard) reads the head's ports
        ports = {p["name"]: p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": children.METRICS_PORT}
        return (cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"],
                cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"])  # fmt: skip

    head, worker = head_and_worker(RAY)
    assert head == {"requests": {"cpu": "2", "memory": "8Gi"}}
    assert worker == {"limits": {"nvidia.com/gpu": "1"}}
    sized = {**RAY, "stages": {"rank": {"resources": {"limits": {"memory": "16Gi"}},
                                        "headResources": {"requests": {"cpu": 1, "memory": "32Gi"}}}}}  # fmt: skip
    head, worker = head_and_worker(sized)
    assert head == {"requests": {"cpu": "1", "memory": "32Gi"}}
    assert worker == {"limits": {"nvidia.com/gpu": "1", "memory": "16Gi"}}


def test_stage_containers_run_on_a_read_only_root_with_a_writable_tmp_of_their_own():
    jobs = [c for c in every_child(MULTI_NODE) if c["kind"] == "Job"]
    assert len(jobs) == 3  # rank, partition, train
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "b3-tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        assert {"name": "b3-tmp", "emptyDir": {}} in pod["volumes"]
    # a /tmp of the user's own replaces the emptyDir
    own = {**BASE, "template": {"volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "50Gi"}}],
                                "volumeMounts": [{"name": "scratch", "mountPath": "/tmp/"}]}}  # fmt: skip
    pod = every_child(own)[1]["spec"]["template"]["spec"]
    assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]].count("/tmp/") == 1
    assert all(v["name"] != "b3-tmp" for v in pod["volumes"])


def test_a_suspended_job_creates_its_stage_suspended():
    (rank,) = children.stage_child(body(BASE), parse_spec(BASE), "rank", suspend=True)
    assert rank["spec"]["suspend"] is True


def test_the_templates_env_overrides_the_operators_once_per_name():
    """A template variable named like one of ours replaces it, not duplicates it: KubeRay's
    schema keys env by name and the real API server refused such a RayJob (422)."""
    env = [{"name": "B3_METRICS_LINGER_SECONDS", "value": "0"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
    for spec in (BASE, RAY):
        spec = {**spec, "template": {"env": env}}
        for child in children.stage_child(body(spec), parse_spec(spec), "rank"):
            if child["kind"] == "RayJob":
                pods = [child["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"],
                        child["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]]  # fmt: skip
            else:
                pods = [child["spec"]["template"]["spec"]]
            for pod in pods:
                names = [e["name"] for e in pod["containers"][0]["env"]]
                assert len(names) == len(set(names)) and "B3_MANIFEST" in names
                assert {"name": "B3_METRICS_LINGER_SECONDS", "value": "0"} in pod["containers"][0]["env"]


def test_every_child_name_of_the_longest_allowed_job_name_is_a_dns_label():
    import re

    from b3.spec import MAX_NAME_LENGTH, NAME_PATTERN

    name = "a" * MAX_NAME_LENGTH
    assert re.fullmatch(NAME_PATTERN, name)
    b = {**body(MULTI_NODE), "metadata": {**body(MULTI_NODE)["metadata"], "name": name}}
    parsed = parse_spec(MULTI_NODE)
    objects = [children.spec_configmap(b, parsed)]
    for stage in ("rank", "partition", "train"):
        objects += children.stage_child(b, parsed, stage)
    for obj in objects:
        child = obj["metadata"]["name"]
        assert len(child) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", child), child
    hostname = f"{children.child_name(name, 'train')}-{MULTI_NODE['training']['nodes'] - 1}"
    assert len(hostname) <= 63  # the Indexed Job's pods: <job>-train-<index>


def test_a_longer_stop_window_lengthens_the_launchers_wait_for_its_workers():
    spec = {**MULTI_NODE, "template": {**MULTI_NODE["template"], "terminationGracePeriodSeconds": 600}}
    _, train = children.stage_child(body(spec), parse_spec(spec), "train")
    pod = train["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--shutdown-timeout") + 1] == "590"
    assert pod["terminationGracePeriodSeconds"] == 600
    (partition,) = children.stage_child(body(spec), parse_spec(spec), "partition")
    assert partition["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600


@pytest.mark.parametrize("stage, given, expected", [
    # a memory-only limit keeps the GPU default: 8 processes still get their 8 GPUs
    ("train", {"limits": {"memory": "600Gi"}}, {"limits": {"nvidia.com/gpu": "8", "memory": "600Gi"}}),
    ("train", {"requests": {"cpu": "48"}}, {"requests": {"cpu": "48"}, "limits": {"nvidia.com/gpu": "8"}}),
    ("train", {"limits": {"nvidia.com/gpu": 0, "cpu": "16"}}, {"limits": {"nvidia.com/gpu": "0", "cpu": "16"}}),
    ("rank", {"limits": {"memory": "64Gi"}}, {"limits": {"nvidia.com/gpu": "1", "memory": "64Gi"}}),
    ("rank", {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 2}},
     {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}),
    ("partition", {"limits": {"memory": "32Gi"}}, {"limits": {"memory": "32Gi"}}),
    ("partition", None, {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}),
])  # fmt: skip
def test_user_resources_keep_the_gpu_default_unless_they_name_gpus(stage, given, expected):
    spec = {**MULTI_NODE, "stages": {stage: {"resources": given}}}
    job = [c for c in children.stage_child(body(spec), parse_spec(spec), stage) if c["kind"] == "Job"][0]
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == expected


def test_only_pods_that_serve_metrics_declare_the_port():
    (rayjob,) = children.stage_child(body(RAY), parse_spec(RAY), "rank")
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": children.METRICS_PORT} in head["ports"]  # the driver
    assert "ports" not in worker
