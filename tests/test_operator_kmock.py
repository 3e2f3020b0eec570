"""The real kopf operator against kmock's in-memory Kubernetes API: the whole flow with the
operator's metrics, and suspend/resume reaching the stage Job. (Failures, deletion and the flow
on real controllers: tests/test_cluster.py.)

The test plays the Job controller: it marks stage Jobs succeeded or failed, and watches the
operator create the next child and write status. kmock stores objects as plain JSON: `ApiServer`
below adds what the operator relies on and a real API server does (uid, resourceVersion,
generation, creationTimestamp, the namespace of created objects). It does not run garbage
collection, admission, or the Job controller: the test asserts ownerReferences instead of
cascading deletion, and plays the Job controller itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from datetime import datetime, timezone

import pytest

kmock = pytest.importorskip("kmock", reason="needs kmock (pip)")
kopf = pytest.importorskip("kopf", reason="needs kopf (pip)")
kubernetes = pytest.importorskip("kubernetes", reason="needs the kubernetes client (pip)")
pytest_asyncio = pytest.importorskip("pytest_asyncio", reason="needs pytest-asyncio (pip)")
pytestmark = pytest.mark.asyncio

NS = "team-a"
SPEC = {
    "dataset": {"uri": "s3://data/pairs.parquet", "columns": {"task": "task", "id": "id"}},
    "mining": {"batchSize": 64, "clusterSize": 16},
    "workDir": "/work/run-1",
}


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the object metadata a real API server maintains: uid,
    resourceVersion, generation (bumped by spec changes), creationTimestamp, generateName."""

    _versions = itertools.count(1)

    async def _handle(self, request):
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._versions))
            if request.action == kmock.action.CREATE:
                if "name" not in meta and "generateName" in meta:  # kopf's Events
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("namespace", request.namespace)
                meta.setdefault(
                    "creationTimestamp", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                )
                meta["generation"] = 1
            elif request.action == kmock.action.UPDATE and "spec" in data and request.name:
                current = self.objects[request.resource, request.namespace, request.name]
                meta["generation"] = current.get("metadata", {}).get("generation", 1) + 1
        return await super()._handle(request)


def use_kubeconfig(kmock, folder, monkeypatch):
    """A kubeconfig for kmock (namespace NS), as $KUBECONFIG."""
    config = folder / "kubeconfig"
    config.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: kmock, cluster: {{server: "{kmock.url}"}}}}]
users: [{{name: test, user: {{token: test}}}}]
contexts: [{{name: kmock, context: {{cluster: kmock, user: test, namespace: {NS}}}}}]
current-context: kmock
""")
    monkeypatch.setenv("KUBECONFIG", str(config))
    return config


@pytest_asyncio.fixture
async def cluster(kmock, tmp_path, monkeypatch):
    """kmock serving the resources the operator uses, a kubeconfig for it, and the operator."""
    for name, info in {
        "b3.dev/v1alpha1/b3jobs": kmock_info("B3Job", subresources={"status"}),
        "batch/v1/jobs": kmock_info("Job", subresources={"status"}),
        "v1/configmaps": kmock_info("ConfigMap"),
        "v1/services": kmock_info("Service"),
        "v1/pods": kmock_info("Pod"),
        "v1/events": kmock_info("Event"),
        # kopf waits to discover namespaces even when it does not list them
        "v1/namespaces": kmock.ResourceInfo(
            kind="Namespace", namespaced=False, verbs={"get", "list", "watch"}
        ),
        "ray.io/v1/rayjobs": kmock_info("RayJob", subresources={"status"}),
    }.items():
        kmock.resources[name] = info
    config = use_kubeconfig(kmock, tmp_path, monkeypatch)
    kubernetes.config.load_kube_config(config_file=str(config))

    import b3_operator.handlers  # noqa: F401  registers the handlers

    # cluster-wide and no scanning: otherwise kopf lists /api/v1/namespaces (a path kmock 0.8
    # cannot parse) and CRDs (kmock serves none)

    stop, ready = asyncio.Event(), asyncio.Event()
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    operator = asyncio.create_task(
        kopf.operator(
            standalone=True, clusterwide=True, settings=settings, stop_flag=stop, ready_flag=ready
        )
    )
    await asyncio.wait_for(ready.wait(), 30)
    yield kmock
    stop.set()
    with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
        await asyncio.wait_for(operator, 15)


def kmock_info(kind: str, subresources=()):
    return kmock.ResourceInfo(kind=kind, namespaced=True, subresources=set(subresources),
                              verbs={"get", "list", "watch", "create", "update", "patch", "delete"})  # fmt: skip


async def call(fn, *args):
    """The sync kubernetes client off the event loop that serves kmock."""
    return await asyncio.to_thread(fn, *args)


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi()


async def get_job(name: str) -> dict:
    return await call(
        custom().get_namespaced_custom_object, "b3.dev", "v1alpha1", NS, "b3jobs", name
    )


async def until(predicate, timeout: float = 20.0):
    """Poll an async predicate until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {predicate.__name__}")
        await asyncio.sleep(0.2)


async def child_job(stage: str, job: str = "job-1"):
    async def exists():
        try:
            return kubernetes.client.ApiClient().sanitize_for_serialization(
                await call(kubernetes.client.BatchV1Api().read_namespaced_job, f"{job}-{stage}", NS)
            )
        except kubernetes.client.exceptions.ApiException as err:
            if err.status == 404:
                return None
            raise

    exists.__name__ = f"the {stage} Job"
    return await until(exists)


async def finish_job(name: str, condition: str, message: str = "", pod_message: str = ""):
    """Play the Job controller: the Job's pod ended and the Job got its final condition."""
    if pod_message:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{name}-abcde", "namespace": NS, "labels": {"job-name": name}},
               "spec": {"containers": [{"name": "stage", "image": "worker"}]},
               "status": {"phase": "Failed", "containerStatuses": [{"name": "stage", "image": "worker", "imageID": "",
                   "ready": False, "restartCount": 0, "state": {"terminated": {
                   "exitCode": 2, "finishedAt": "2026-11-23T10:00:00Z", "message": pod_message}}}]}}  # fmt: skip
        await call(kubernetes.client.CoreV1Api().create_namespaced_pod, NS, pod)
    status = {
        "conditions": [{"type": condition, "status": "True", "reason": "Test", "message": message}]
    }
    if condition == "Complete":
        status["completionTime"] = "2026-11-23T10:00:00Z"
    await call(
        kubernetes.client.BatchV1Api().patch_namespaced_job_status, name, NS, {"status": status}
    )


async def phase_is(name: str, phase: str) -> dict:
    async def check():
        job = await get_job(name)
        return job if (job.get("status") or {}).get("phase") == phase else None

    check.__name__ = f"{name} phase {phase}"
    return await until(check)


def b3job(name: str, **spec) -> dict:
    return {"apiVersion": "b3.dev/v1alpha1", "kind": "B3Job", "metadata": {"name": name, "namespace": NS},
            "spec": {**SPEC, **spec}}  # fmt: skip


@pytest.mark.kmock(cls=ApiServer)
async def test_a_job_runs_through_every_stage_to_succeeded(cluster):
    await call(
        custom().create_namespaced_custom_object, "b3.dev", "v1alpha1", NS, "b3jobs", b3job("job-1")
    )
    rank = await child_job("rank")
    job = await get_job("job-1")
    assert rank["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    cm = await call(kubernetes.client.CoreV1Api().read_namespaced_config_map, "job-1-spec", NS)
    assert "workDir: /work/run-1" in cm.data["job.yaml"]
    assert (await phase_is("job-1", "Ranking"))["status"]["stage"] == "rank"

    await finish_job("job-1-rank", "Complete")
    await child_job("partition")
    await phase_is("job-1", "Partitioning")
    await finish_job("job-1-partition", "Complete")
    train = await child_job("train")
    assert train["spec"]["completionMode"] == "Indexed"
    service = await call(kubernetes.client.CoreV1Api().read_namespaced_service, "job-1-train", NS)
    assert service.spec.cluster_ip == "None"
    await phase_is("job-1", "Training")
    await finish_job("job-1-train", "Complete")
    done = await phase_is("job-1", "Succeeded")
    status = done["status"]
    assert status["progress"] == "3/3" and set(status["stages"]) == {"rank", "partition", "train"}
    assert all(s["completionTime"] for s in status["stages"].values())
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in status["conditions"])
    reasons = {
        e["reason"]
        for e in (await call(kubernetes.client.CoreV1Api().list_namespaced_event, NS)).to_dict()[
            "items"
        ]
    }
    assert {"StageStarted", "StageSucceeded", "Succeeded"} <= reasons
    from b3_operator.metrics import REGISTRY

    assert REGISTRY.get_sample_value("b3_operator_jobs", {"phase": "Succeeded"}) >= 1
    labels = {"namespace": NS, "b3job": "job-1"}
    assert REGISTRY.get_sample_value("b3_operator_job_phase", {**labels, "phase": "Succeeded"}) == 1
    assert REGISTRY.get_sample_value("b3_operator_job_phase", {**labels, "phase": "Training"}) == 0
    for stage in ("rank", "partition", "train"):
        assert (
            REGISTRY.get_sample_value("b3_operator_stage_duration_seconds_count", {"stage": stage})
            >= 1
        )
    reconciles = sum(REGISTRY.get_sample_value("b3_operator_reconciles_total", {"trigger": t}) or 0
                     for t in ("create", "update", "resume", "timer"))  # fmt: skip
    assert reconciles >= 4  # create, then one per finished stage


@pytest.mark.kmock(cls=ApiServer)
async def test_suspend_and_resume_reach_the_running_stage_job(cluster):
    await call(
        custom().create_namespaced_custom_object, "b3.dev", "v1alpha1", NS, "b3jobs", b3job("job-4")
    )
    await child_job("rank", "job-4")
    await phase_is("job-4", "Ranking")

    async def set_suspend(value: bool):
        await call(custom().patch_namespaced_custom_object, "b3.dev", "v1alpha1", NS, "b3jobs", "job-4",
                   {"spec": {"suspend": value}})  # fmt: skip

    async def rank_suspended_is(value: bool):
        async def check():
            job = await call(kubernetes.client.BatchV1Api().read_namespaced_job, "job-4-rank", NS)
            return job.spec.suspend is value

        check.__name__ = f"rank Job suspend={value}"
        await until(check)

    await set_suspend(True)
    await rank_suspended_is(True)
    suspended = await phase_is("job-4", "Suspended")
    assert suspended["status"]["observedGeneration"] == 2
    await set_suspend(False)
    await rank_suspended_is(False)
    await phase_is("job-4", "Ranking")


@pytest.mark.kmock(cls=ApiServer)
async def test_kuberays_status_changes_reach_the_job_at_once(cluster):
    """A rank RayJob is watched like a stage Job: KubeRay retrying it keeps the job ranking,
    its completion starts partition well before the 60 s resync would."""
    await call(custom().create_namespaced_custom_object, "b3.dev", "v1alpha1", NS, "b3jobs",
               b3job("job-5", rank={"workers": 2, "gpusPerWorker": 1}))  # fmt: skip

    async def rayjob():
        try:
            return await call(custom().get_namespaced_custom_object, "ray.io", "v1", NS, "rayjobs", "job-5-rank")
        except kubernetes.client.exceptions.ApiException as err:
            if err.status == 404:
                return None
            raise

    created = await until(rayjob)
    assert "ttlSecondsAfterFinished" not in created["spec"]
    await phase_is("job-5", "Ranking")

    async def set_status(deployment: str, job_status: str):
        await call(custom().patch_namespaced_custom_object_status, "ray.io", "v1", NS, "rayjobs", "job-5-rank",
                   {"status": {"jobDeploymentStatus": deployment, "jobStatus": job_status}})  # fmt: skip

    await set_status("Retrying", "FAILED")  # KubeRay retrying: not a failure of the B3Job
    await asyncio.sleep(2)
    assert (await get_job("job-5"))["status"]["phase"] == "Ranking"
    started = asyncio.get_running_loop().time()
    await set_status("Complete", "SUCCEEDED")
    await child_job("partition", "job-5")
    assert asyncio.get_running_loop().time() - started < 15  # the watch, not the resync


async def test_replicas_without_a_priority_each_draw_their_own(kmock, tmp_path, monkeypatch):
    """kopf freezes every operator that sees a peer of the same priority; the chart's replicas
    share one pod template, so each draws its own at startup (an explicit --priority stays)."""
    from b3_operator import handlers

    use_kubeconfig(kmock, tmp_path, monkeypatch)
    monkeypatch.delenv("B3_OPERATOR_METRICS_PORT", raising=False)
    drawn = []
    for _ in range(3):
        settings = kopf.OperatorSettings()
        handlers.configure(settings=settings)
        drawn.append(settings.peering.priority)
    assert len(set(drawn)) == 3 and all(1 <= p < 2**31 for p in drawn)
    settings = kopf.OperatorSettings()
    settings.peering.priority = 100  # kopf run --priority=100 sets it before startup handlers
    handlers.configure(settings=settings)
    assert settings.peering.priority == 100
