"""Manifests of a B3Job's children: plain functions from the job to Kubernetes objects.

Every child is named after the job (`<job>-spec`, `<job>-rank`, `<job>-partition`,
`<job>-train`), labelled with `b3.dev/job` and `b3.dev/stage`, and owned by the B3Job
(ownerReferences with controller=true), so deleting the job deletes them. Commands are in exec
form; nothing from the spec is interpolated into a shell string.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from b3.spec import API_GROUP, API_VERSION, KIND, B3JobSpec, spec_to_dict

MANAGED_BY = "b3-operator"
JOB_LABEL = f"{API_GROUP}/job"
STAGE_LABEL = f"{API_GROUP}/stage"
ATTEMPT_LABEL = f"{API_GROUP}/attempt"  # which training gang: 0, then one more per restart
RESTARTS_ANNOTATION = f"{API_GROUP}/restarts"  # counted restarts before this gang was made
SUSPENDED_ANNOTATION = f"{API_GROUP}/suspended"  # "true": the operator suspended this child
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
MANIFEST_DIR = "/etc/b3"
MANIFEST_PATH = f"{MANIFEST_DIR}/job.yaml"
CONTAINER = "stage"
METRICS_PORT = 9400
RDZV_PORT = 29400
# of a pod's termination grace period, what the training launcher leaves itself after waiting
# for its workers to checkpoint (torchrun's --shutdown-timeout is the rest): to collect their
# exit codes and exit before the kubelet's SIGKILL
LAUNCHER_EXIT_SECONDS = 10
EXIT_BAD_INPUT = 2  # the stage programs' exit code for a bad manifest or dataset
DEFAULT_BACKOFF_LIMIT = 2  # pod retries of the rank and partition stages

DEFAULT_POD_SECURITY = {
    "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}  # fmt: skip
# a read-only root: the worker image keeps its caches and temporary files under /tmp, an
# emptyDir of the pod's own (pod_spec)
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}  # fmt: skip
GPU = "nvidia.com/gpu"  # rank: 1 per pod, train: training.processesPerNode per pod
DEFAULT_PARTITION_RESOURCES = {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}
DEFAULT_RAY_HEAD_RESOURCES = {"requests": {"cpu": "2", "memory": "8Gi"}}
RAY_HEAD_PORTS = ({"name": "gcs-server", "containerPort": 6379}, {"name": "dashboard", "containerPort": 8265},
                  {"name": "client", "containerPort": 10001})  # KubeRay's names and Ray's defaults  # fmt: skip


def child_name(job: str, stage: str) -> str:
    return f"{job}-{stage}"


def train_job_name(job: str, attempt: int) -> str:
    """The training gang's Job: <job>-train, and <job>-r<attempt> once restarted (short, so
    that its pods' hostnames <name>-<index> stay DNS labels; see b3.spec.MAX_TRAIN_ATTEMPTS)."""
    return child_name(job, "train") if attempt == 0 else f"{job}-r{attempt}"


def labels(job: str, stage: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/name": "b3job",
        JOB_LABEL: job,
    }
    if stage:
        out[STAGE_LABEL] = stage
    return out


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
            "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}  # fmt: skip


def _meta(body: dict[str, Any], name: str, stage: str | None) -> dict[str, Any]:
    meta = body["metadata"]
    return {"name": name, "namespace": meta.get("namespace", "default"),
            "labels": labels(meta["name"], stage), "ownerReferences": [owner_reference(body)]}  # fmt: skip


def spec_configmap(body: dict[str, Any], spec: B3JobSpec) -> dict[str, Any]:
    """The resolved spec as the manifest every stage pod reads from /etc/b3/job.yaml."""
    manifest = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
                "metadata": {"name": body["metadata"]["name"]}, "spec": spec_to_dict(spec)}  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(body, child_name(body["metadata"]["name"], "spec"), None),
        "data": {"job.yaml": yaml.safe_dump(manifest, sort_keys=False)},
    }


def _resources(spec: B3JobSpec, stage: str) -> dict[str, Any]:
    """The stage container's resources: the user's, with the GPU default added when they name no
    GPU, so that a memory-only limit keeps an 8-process gang on its 8 GPUs (`nvidia.com/gpu: 0`
    asks for none: the CPU)."""
    given = copy.deepcopy(getattr(spec.stages, stage).resources)
    if stage == "partition":
        resources = given if given is not None else copy.deepcopy(DEFAULT_PARTITION_RESOURCES)
    else:
        resources = given or {}
        if not any(GPU in (resources.get(kind) or {}) for kind in ("requests", "limits")):
            gpus = spec.training.processes_per_node if stage == "train" else 1
            resources["limits"] = {GPU: gpus, **(resources.get("limits") or {})}
    return _quantity_strings(resources)


def _quantity_strings(resources: dict[str, Any]) -> dict[str, Any]:
    """Quantities as strings ("8", "600Gi"): YAML gives ints, and clients want Quantity strings."""
    return {
        kind: {name: str(q) for name, q in amounts.items()} if isinstance(amounts, dict) else amounts
        for kind, amounts in resources.items()
    }


def pod_spec(
    body: dict[str, Any], spec: B3JobSpec, stage: str, command: list[str]
) -> dict[str, Any]:
    """One stage pod: the worker image running `command`, with the spec's pod settings."""
    t = spec.template
    job = body["metadata"]["name"]
    ours = [{"name": "B3_MANIFEST", "value": MANIFEST_PATH},
            {"name": "B3_METRICS_PORT", "value": str(METRICS_PORT)},
            {"name": "B3_METRICS_LINGER_SECONDS", "value": "45"},  # a last scrape before exit
            {"name": "PYTHONUNBUFFERED", "value": "1"}]  # fmt: skip
    # the template's env wins, once per name: KubeRay's schema (env is a map keyed by name)
    # refuses a RayJob whose container names a variable twice
    env = [e for e in ours if e["name"] not in {u["name"] for u in t.env}] + copy.deepcopy(t.env)
    mounts = [{"name": "b3-spec", "mountPath": MANIFEST_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}, *copy.deepcopy(t.volume_mounts)]  # fmt: skip
    volumes = [{"name": "b3-spec", "configMap": {"name": child_name(job, "spec")}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}, *copy.deepcopy(t.volumes)]  # fmt: skip
    if not any(m["mountPath"].rstrip("/") == "/tmp" for m in mounts):  # a user's /tmp volume wins
        mounts.append({"name": "b3-tmp", "mountPath": "/tmp"})
        volumes.append({"name": "b3-tmp", "emptyDir": {}})
    container = {
        "name": CONTAINER,
        "image": t.image,
        "imagePullPolicy": t.image_pull_policy,
        "command": command,
        "env": env,
        "resources": _resources(spec, stage),
        "volumeMounts": mounts,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        "securityContext": CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if t.env_from:
        container["envFrom"] = copy.deepcopy(t.env_from)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": _merged(DEFAULT_POD_SECURITY, t.security_context or {}),
        "automountServiceAccountToken": t.automount_service_account_token,
        "terminationGracePeriodSeconds": t.termination_grace_period_seconds,
        "enableServiceLinks": False,
    }
    optional = {
        "serviceAccountName": t.service_account_name,
        "priorityClassName": t.priority_class_name,
        "schedulerName": spec.run_policy.scheduler_name,
        "nodeSelector": dict(t.node_selector) or None,
        "tolerations": copy.deepcopy(t.tolerations) or None,
        "affinity": copy.deepcopy(t.affinity),
        "imagePullSecrets": [{"name": s} for s in t.image_pull_secrets] or None,
    }
    pod.update({k: v for k, v in optional.items() if v is not None})
    return pod


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`, key by key into nested objects (a user's runAsUser keeps the
    default seccomp profile and non-root rule)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else copy.deepcopy(value)
    return out


def _with_run_policy(child: dict[str, Any], spec: B3JobSpec, stage: str) -> dict[str, Any]:
    """Suspension, Kueue queue label and stage deadline: a Job and a RayJob name these fields
    alike. A child made suspended for the B3Job is marked as the operator's (only
    those does it resume); one with a queue starts suspended and unmarked, for Kueue to admit.
    A stage Job gets its TTL only when the whole B3Job is over (planner.expire_children):
    deleted mid-job, a finished stage would look never run. A RayJob gets none: its
    ttlSecondsAfterFinished is the delay before KubeRay deletes the Ray cluster, whose GPUs
    should go back when ranking ends (KubeRay's default, 0); the RayJob itself goes with the
    B3Job (ownerReferences)."""
    if child["spec"]["suspend"]:
        child["metadata"]["annotations"] = {**child["metadata"].get("annotations", {}), SUSPENDED_ANNOTATION: "true"}
    if spec.run_policy.queue_name:
        child["metadata"]["labels"][KUEUE_QUEUE_LABEL] = spec.run_policy.queue_name
        child["spec"]["suspend"] = True
    deadline = getattr(spec.stages, stage).active_deadline_seconds
    if deadline is not None:
        child["spec"]["activeDeadlineSeconds"] = deadline
    return child


def _backoff_limit(policy) -> int:
    return DEFAULT_BACKOFF_LIMIT if policy.backoff_limit is None else policy.backoff_limit


def _pod_failure_policy(stage: str) -> dict[str, Any]:
    """Bad input (exit 2) fails the stage at once. A disrupted (evicted, preempted) rank or
    partition pod is replaced without spending backoffLimit; a disrupted training pod fails its
    Job like any other training failure, so that the whole gang restarts (the operator does not
    count it as a restart)."""
    disrupted = "FailJob" if stage == "train" else "Ignore"
    return {
        "rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}},
            {"action": disrupted, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }  # fmt: skip


def stage_job(
    body: dict[str, Any], spec: B3JobSpec, stage: str, suspend: bool = False,
    attempt: int = 0, restarts: int = 0,
) -> dict[str, Any]:
    """The batch/v1 Job of one stage (rank and partition: one pod; train: one pod per node,
    `attempt` numbering the gangs, `restarts` the counted restarts before this one)."""
    job = body["metadata"]["name"]
    name = train_job_name(job, attempt) if stage == "train" else child_name(job, stage)
    policy = getattr(spec.stages, stage)
    if stage == "train":
        t = spec.training
        # b3_jobs.launch is torchrun that keeps a worker's exit code 2 (torchrun makes it 1)
        command = ["python", "-m", "b3_jobs.launch", "--nnodes", str(t.nodes), "--nproc-per-node", str(t.processes_per_node),
                   "--node-rank", "$(JOB_COMPLETION_INDEX)",  # expanded by the kubelet, not a shell
                   "--rdzv-endpoint", f"{name}-0.{child_name(job, 'train')}:{RDZV_PORT}",
                   "--shutdown-timeout", str(spec.template.termination_grace_period_seconds - LAUNCHER_EXIT_SECONDS),
                   "-m", "b3_jobs.train", MANIFEST_PATH]  # fmt: skip
    else:
        command = ["python", "-m", f"b3_jobs.{stage}", MANIFEST_PATH]
    pod = pod_spec(body, spec, stage, command)
    job_spec: dict[str, Any] = {
        # train: the first failed pod fails the Job, whose controller then stops the others
        "backoffLimit": 0 if stage == "train" else _backoff_limit(policy),
        "podFailurePolicy": _pod_failure_policy(stage),
        "suspend": suspend,
        "template": {"metadata": {"labels": labels(job, stage)}, "spec": pod},
    }
    meta = _meta(body, name, stage)
    if stage == "train":
        pod["subdomain"] = child_name(job, "train")  # pods resolve as <name>-<index>.<job>-train
        meta["labels"][ATTEMPT_LABEL] = str(attempt)
        meta["annotations"] = {RESTARTS_ANNOTATION: str(restarts)}
        pod["containers"][0]["ports"].append({"name": "rdzv", "containerPort": RDZV_PORT})
        job_spec.update(
            completionMode="Indexed",
            completions=spec.training.nodes,
            parallelism=spec.training.nodes,
        )
    return _with_run_policy(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec},
        spec, stage,
    )  # fmt: skip


def train_service(body: dict[str, Any]) -> dict[str, Any]:
    """Headless Service that gives the training pods DNS names for torchrun's rendezvous."""
    job = body["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(body, child_name(job, "train"), "train"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rendezvous happens before pods are Ready
            "selector": labels(job, "train"),
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }


def rank_rayjob(body: dict[str, Any], spec: B3JobSpec, suspend: bool = False) -> dict[str, Any]:
    """KubeRay RayJob for ranking with `rank.workers` Ray workers (a RayCluster per job)."""
    job = body["metadata"]["name"]
    name = child_name(job, "rank")

    def group_pod() -> dict[str, Any]:
        # the entrypoint runs on the head, the ranking tasks on the workers: all mount the
        # spec, the dataset and workDir volumes
        pod = pod_spec(body, spec, "rank", [])
        container = pod["containers"][0]
        del container["command"]  # KubeRay supplies `ray start`
        container["name"] = "ray"
        pod["restartPolicy"] = "Always"
        return {"metadata": {"labels": labels(job, "rank")}, "spec": pod}

    head = group_pod()
    # KubeRay's head Service takes its ports from the head container, and its own defaults only
    # when the container names none: Ray's ports beside the driver's metrics (KubeRay submits
    # the entrypoint to the dashboard port, the workers join at gcs-server)
    head["spec"]["containers"][0]["ports"][:0] = [dict(port) for port in RAY_HEAD_PORTS]
    head_resources = spec.stages.rank.head_resources or DEFAULT_RAY_HEAD_RESOURCES
    head["spec"]["containers"][0]["resources"] = _quantity_strings(copy.deepcopy(head_resources))
    worker = group_pod()
    del worker["spec"]["containers"][0]["ports"]  # the driver serves metrics, on the head
    rayjob: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(body, name, "rank"),
        "spec": {
            # a constant string (RayJob's entrypoint is one), nothing from the spec in it
            "entrypoint": f"python -m b3_jobs.rank {MANIFEST_PATH}",
            "shutdownAfterJobFinishes": True,
            "suspend": suspend,
            "backoffLimit": _backoff_limit(spec.stages.rank),
            "rayClusterSpec": {
                # num-cpus 0: Ray schedules no task on the head, whose pod is sized for the driver
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": head},
                "workerGroupSpecs": [{
                    "groupName": "rank", "replicas": spec.rank.workers, "minReplicas": spec.rank.workers,
                    "maxReplicas": spec.rank.workers, "rayStartParams": {}, "template": worker,
                }],
            },
        },
    }  # fmt: skip
    return _with_run_policy(rayjob, spec, "rank")


def stage_child(
    body: dict[str, Any], spec: B3JobSpec, stage: str, suspend: bool = False
) -> list[dict[str, Any]]:
    """The objects that run one stage, in creation order."""
    if stage == "rank" and spec.rank.workers > 1:
        return [rank_rayjob(body, spec, suspend)]
    if stage == "train":
        return [train_service(body), stage_job(body, spec, "train", suspend)]
    return [stage_job(body, spec, stage, suspend)]
