"""kopf handlers for B3Job: thin. Each reconcile observes the children, asks the planner, and
applies what it says. Run with:

    kopf run -m b3_operator.handlers --all-namespaces --peering=b3-operator \\
        --liveness=http://0.0.0.0:8080/healthz

Peering (`--peering`, a KopfPeering resource) makes sure that of several replicas only one
acts; `--liveness` serves kopf's health endpoint for the Deployment's probe.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from datetime import datetime, timezone
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from b3.spec import API_GROUP, API_VERSION
from b3_operator import children, metrics
from b3_operator.crd import PLURAL
from b3_operator.planner import (
    STAGES,
    TERMINAL,
    Action,
    Observed,
    child_marks,
    create_refused,
    job_state,
    plan,
    progress_due,
    rayjob_state,
)  # fmt: skip

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
KUEUE_GROUP, KUEUE_VERSION, KUEUE_PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
OBSERVED_ANNOTATION = f"{API_GROUP}/children"  # written by the child watch to re-trigger the job

log = logging.getLogger("b3_operator")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: the ServiceAccount at $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT, as
    client-go finds it (kopf's own service-account login assumes the DNS name
    kubernetes.default.svc on port 443, which hostNetwork pods and custom DNS policies lack);
    elsewhere: $KUBECONFIG (read now, not at import)."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return kopf.login_via_client(**kwargs)
    return kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    # kopf's bookkeeping under its own prefix, apart from our b3.dev/children annotation
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=f"kopf.{API_GROUP}"
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=f"kopf.{API_GROUP}", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # our own Events say what happened; kopf adds errors
    # kopf freezes every operator that sees a peer of its own priority, and the chart's replicas
    # share one pod template (so one --priority): each replica draws its own at startup, the
    # highest acts and the others stand by until its peering record lapses
    if settings.peering.priority == 0:
        settings.peering.priority = standby_priority()
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    port = os.environ.get("B3_OPERATOR_METRICS_PORT")
    if port:
        metrics.serve(int(port))


def standby_priority() -> int:
    """A kopf peering priority of this process's own, in [1, 2**31): two replicas share one with
    probability 2**-31."""
    return secrets.randbelow(2**31 - 1) + 1


def _api() -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient()


def _as_dict(obj: Any) -> dict[str, Any]:
    return _api().sanitize_for_serialization(obj)


def _owned(obj: dict[str, Any], uid: str) -> bool:
    return any(
        ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or []
    )


def _foreign(kind: str, obj: dict[str, Any]) -> str:
    owners = [f"{r.get('kind')} {r.get('name')}" for r in obj["metadata"].get("ownerReferences") or []]
    return f"{kind} {obj['metadata']['name']} exists (owned by {', '.join(owners) or 'nobody'})"


class ForeignChild(Exception):
    """A child's name is taken by an object this B3Job does not own."""


def read_training_progress(url: str, job: str, timeout: float = 2.0) -> dict[str, float] | None:
    """Rank 0's step, total steps and loss from its Prometheus endpoint (the pods need no API
    rights for the B3Job to show progress); None when it does not answer yet."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    names = {"b3_train_step": "step", "b3_train_total_steps": "totalSteps", "b3_train_loss": "loss"}
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    found = {names[s.name]: s.value for family in text_string_to_metric_families(text)
             for s in family.samples if s.name in names and s.labels.get("b3job") == job}  # fmt: skip
    return found if len(found) == len(names) else None


def kueue_workload(child: dict[str, Any]) -> dict[str, Any] | None:
    """The Kueue Workload of a child that has a queue (Kueue labels it with the child's uid);
    None without a queue, before Kueue made it, or without Kueue."""
    meta = child["metadata"]
    if children.KUEUE_QUEUE_LABEL not in (meta.get("labels") or {}):
        return None
    try:
        found = kubernetes.client.CustomObjectsApi().list_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, meta["namespace"], KUEUE_PLURAL,
            label_selector=f"kueue.x-k8s.io/job-uid={meta['uid']}")  # fmt: skip
    except ApiException as err:
        if err.status in (403, 404):  # Kueue not installed
            return None
        raise
    ours = [w for w in found["items"] if _owned(w, meta["uid"])]
    return ours[0] if ours else None


def observe(body: dict[str, Any]) -> Observed:
    """Read the job's children from the API server."""
    meta = body["metadata"]
    name, ns, uid = meta["name"], meta["namespace"], meta["uid"]
    core, batch = kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api()
    observed = Observed()
    try:
        configmap = _as_dict(core.read_namespaced_config_map(children.child_name(name, "spec"), ns))
        if _owned(configmap, uid):
            observed.configmap = True
        else:
            observed.foreign.append(_foreign("ConfigMap", configmap))
    except ApiException as err:
        if err.status != 404:
            raise
    jobs = batch.list_namespaced_job(ns, label_selector=f"{children.JOB_LABEL}={name}")
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for job in (_as_dict(j) for j in jobs.items):
        stage = (job["metadata"].get("labels") or {}).get(children.STAGE_LABEL)
        if stage not in STAGES:
            continue
        if not _owned(job, uid):  # e.g. left by a deleted B3Job of the same name
            observed.foreign.append(_foreign("Job", job))
            continue
        by_stage.setdefault(stage, []).append(job)
    for stage, jobs_of_stage in by_stage.items():
        # train: the newest gang; of the earlier ones only the TTL is left to set
        *earlier, job = sorted(jobs_of_stage, key=lambda j: child_marks(j)["attempt"])
        observed.previous += [job_state(j) for j in earlier]
        pods: list[dict[str, Any]] = []
        finished = any(c.get("type") == "Complete" and c.get("status") == "True"
                       for c in job.get("status", {}).get("conditions") or [])  # fmt: skip
        if not finished:  # the failure message, or why running pods are stuck
            listed = core.list_namespaced_pod(
                ns, label_selector=f"job-name={job['metadata']['name']}"
            )
            pods = [p for p in (_as_dict(p) for p in listed.items)
                    if (p["metadata"].get("labels") or {}).get("job-name") == job["metadata"]["name"]]  # fmt: skip
        failed_create = ""
        if not finished and not (job.get("status") or {}).get("active"):  # no pod: why not?
            selector = (f"involvedObject.kind=Job,involvedObject.name={job['metadata']['name']},"
                        "reason=FailedCreate")  # fmt: skip
            found = sorted(core.list_namespaced_event(ns, field_selector=selector).items,
                           key=lambda e: e.last_timestamp or e.event_time or e.metadata.creation_timestamp)  # fmt: skip
            failed_create = found[-1].message if found else ""
        workload = None if finished else kueue_workload(job)  # why Kueue holds it, if it does
        observed.stages[stage] = job_state(job, pods, now(), failed_create, workload)
        if stage == "train" and not finished and progress_due(body.get("status") or {}, now()):
            leader = [p for p in pods if (p["metadata"].get("annotations") or {}).get(
                "batch.kubernetes.io/job-completion-index") == "0" and (p.get("status") or {}).get("podIP")]  # fmt: skip
            if leader:
                url = f"http://{leader[0]['status']['podIP']}:{children.METRICS_PORT}/metrics"
                observed.training = read_training_progress(url, name)
    try:
        rayjob = kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, children.child_name(name, "rank")
        )
        if _owned(rayjob, uid):
            pods = core.list_namespaced_pod(  # the Ray head and workers carry the stage's labels
                ns, label_selector=f"{children.JOB_LABEL}={name},{children.STAGE_LABEL}=rank")
            observed.stages["rank"] = rayjob_state(rayjob, kueue_workload(rayjob),
                                                   [_as_dict(p) for p in pods.items], now())  # fmt: skip
        else:
            observed.foreign.append(_foreign("RayJob", rayjob))
    except ApiException as err:
        if err.status not in (404, 403):  # 404: none; 403/404 also when KubeRay is not installed
            raise
    return observed


def apply(action: Action, namespace: str) -> None:
    core, batch = kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api()
    custom = kubernetes.client.CustomObjectsApi()
    if action.verb == "create":
        create = {
            "ConfigMap": lambda m: core.create_namespaced_config_map(namespace, m),
            "Service": lambda m: core.create_namespaced_service(namespace, m),
            "Job": lambda m: batch.create_namespaced_job(namespace, m),
            "RayJob": lambda m: custom.create_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, m
            ),
        }[action.kind]
        try:
            create(action.manifest)
        except ApiException as err:
            if err.status != 409:
                raise
            # the name is taken by an object observe() did not see as ours: only the train
            # Service (not observed) may be ours, made just before a restart
            if action.kind != "Service":
                raise ForeignChild(f"{action.kind} {action.name} exists, not created by this B3Job") from None
            service = _as_dict(core.read_namespaced_service(action.name, namespace))
            if not _owned(service, action.manifest["metadata"]["ownerReferences"][0]["uid"]):
                raise ForeignChild(_foreign("Service", service)) from None
        return
    if action.verb == "expire":  # the TTL-after-finished controller deletes it when due
        try:
            batch.patch_namespaced_job(action.name, namespace, {"spec": {"ttlSecondsAfterFinished": action.manifest["ttl"]}})
        except ApiException as err:
            if err.status != 404:  # already gone
                raise
        return
    if action.verb in ("activate", "deactivate"):  # Kueue suspends and resumes the child
        custom.patch_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, namespace, KUEUE_PLURAL,
                                              action.name, {"spec": {"active": action.verb == "activate"}})  # fmt: skip
        return
    suspend = action.verb == "suspend"  # marked, so that only what we suspended is resumed
    patch = {"metadata": {"annotations": {children.SUSPENDED_ANNOTATION: "true" if suspend else None}},
             "spec": {"suspend": suspend}}  # fmt: skip
    if action.kind == "Job":
        batch.patch_namespaced_job(action.name, namespace, patch)
    else:
        custom.patch_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, action.name, patch
        )


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _server_message(err: ApiException) -> str:
    """The API server's own words from an error response (its Status message)."""
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError):
        return str(err.reason)


def _record(body: kopf.Body, patch: kopf.Patch, result) -> None:
    """Events, stage-duration and phase metrics, and the status patch of one plan."""
    for kind, reason, message in result.events:
        kopf.event(body, type=kind, reason=reason, message=message)
    old_stages = (body.get("status") or {}).get("stages") or {}
    for stage, record in result.status.get("stages", {}).items():
        if record.get("completionTime") and not old_stages.get(stage, {}).get("completionTime"):
            metrics.record_stage(stage, record["startTime"], record["completionTime"])
    patch.status.update(result.status)
    metrics.record_phase(
        f"{body['metadata']['namespace']}/{body['metadata']['name']}", result.status.get("phase")
    )


def reconcile(body: kopf.Body, patch: kopf.Patch, trigger: str) -> None:
    started = time.perf_counter()
    metrics.RECONCILES.labels(trigger).inc()
    try:
        raw, stamp = dict(body), now()
        observed = observe(raw)
        result = plan(raw, observed, stamp)
        try:
            for action in result.actions:
                apply(action, body["metadata"]["namespace"])
        except ForeignChild as err:
            observed.foreign.append(str(err))
            result = plan(raw, observed, stamp)  # Blocked, nothing to do
        except ApiException as err:
            if action.verb != "create" or not 400 <= err.status < 500:
                raise
            refused = create_refused(raw, result.status, action.kind, action.name, err.status,
                                     _server_message(err), stamp)  # fmt: skip
            _record(body, patch, refused)
            schedule(body["metadata"]["namespace"], body["metadata"]["name"], "Failed", None)
            raise kopf.PermanentError(refused.status["message"]) from None
        _record(body, patch, result)
        schedule(body["metadata"]["namespace"], body["metadata"]["name"], result.status.get("phase"), result.recheck)
    except Exception:
        metrics.RECONCILE_ERRORS.labels(trigger).inc()
        raise  # kopf logs it, posts an Event and retries with backoff
    finally:
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
def on_b3job(body: kopf.Body, patch: kopf.Patch, reason: str, **_: Any) -> None:
    reconcile(body, patch, reason)


# --- resync: each running job is reconciled at least every RESYNC_SECONDS ----------------------
# A safety net for a missed child event, the refresh of training progress, and a startup
# deadline falling due with no event. Not a kopf timer: kopf keeps a finalizer on every object
# with a timer, and a running B3Job deleted while no operator runs would hang on it. Instead
# one loop patches RESYNC_ANNOTATION on the jobs that are due, and kopf reconciles them as for
# any other change (one at a time per job, on the replica that holds the peering).

RESYNC_SECONDS = 60
RESYNC_ANNOTATION = f"{API_GROUP}/resync"
_due: dict[tuple[str, str], float] = {}  # (namespace, name) of running jobs -> monotonic due time


def schedule(namespace: str, name: str, phase: str | None, recheck: float | None) -> None:
    """After a reconcile: when to reconcile this job again, unless an event comes first."""
    if phase in TERMINAL:
        _due.pop((namespace, name), None)
    else:
        _due[(namespace, name)] = time.monotonic() + min(RESYNC_SECONDS, recheck or RESYNC_SECONDS)


def _nudge(namespace: str, name: str) -> None:
    try:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name,
            {"metadata": {"annotations": {RESYNC_ANNOTATION: now()}}})  # fmt: skip
    except ApiException as err:
        if err.status != 404:
            raise
        _due.pop((namespace, name), None)  # deleted


async def _resync_loop() -> None:
    while True:
        await asyncio.sleep(1)
        for key, due in list(_due.items()):
            if due <= time.monotonic():
                _due[key] = time.monotonic() + RESYNC_SECONDS  # until its reconcile reschedules it
                try:
                    await asyncio.to_thread(_nudge, *key)
                except Exception:  # the API server away: the next round tries again
                    log.exception("resync of %s/%s", *key)


@kopf.on.startup()
async def start_resync(memo: kopf.Memo, **_: Any) -> None:
    memo["resync"] = asyncio.get_running_loop().create_task(_resync_loop())


@kopf.on.cleanup()
async def stop_resync(memo: kopf.Memo, **_: Any) -> None:
    memo["resync"].cancel()


@kopf.on.event("batch", "v1", "jobs", labels={children.JOB_LABEL: kopf.PRESENT})
def on_child_job(body: kopf.Body, type: str | None, **_: Any) -> None:
    """A stage Job changed: re-trigger its B3Job by recording the children's state on it."""
    if type is None:  # the initial listing; resume handlers cover it
        return
    meta = body["metadata"]
    state = job_state(dict(body))
    _retrigger(meta["namespace"], meta.get("ownerReferences") or [], f"{meta['name']}={state.state}")


@kopf.on.event(RAY_GROUP, RAY_VERSION, RAY_PLURAL, labels={children.JOB_LABEL: kopf.PRESENT})
def on_child_rayjob(body: kopf.Body, type: str | None, **_: Any) -> None:
    """A rank RayJob changed (KubeRay moved its jobDeploymentStatus or jobStatus): re-trigger
    its B3Job as for a stage Job. (kopf serves this only where KubeRay's CRD exists.)"""
    if type is None:
        return
    meta, status = body["metadata"], body.get("status") or {}
    token = f"{meta['name']}={status.get('jobDeploymentStatus', '')}/{status.get('jobStatus', '')}"
    _retrigger(meta["namespace"], meta.get("ownerReferences") or [], token)


def _retrigger(namespace: str, owners: list, token: str) -> None:
    """Record a child's state on its B3Job (from the child's ownerReferences), which makes kopf
    reconcile the job."""
    owner = next((r for r in owners if r.get("kind") == "B3Job"), None)
    if owner is None:
        return
    try:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, owner["name"],
            {"metadata": {"annotations": {OBSERVED_ANNOTATION: token}}},
        )  # fmt: skip
    except ApiException as err:
        if err.status != 404:  # the job is being deleted
            raise


@kopf.on.event(KUEUE_GROUP, KUEUE_VERSION, KUEUE_PLURAL)
def on_workload(body: kopf.Body, type: str | None, **_: Any) -> None:
    """Kueue's Workload of a stage Job or rank RayJob changed (made, pending for a new reason,
    admitted, evicted): re-trigger the B3Job as for the child itself. (kopf serves this only where Kueue's
    CRD exists.)"""
    if type is None:
        return
    meta = body["metadata"]
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("kind") in ("Job", "RayJob")), None)
    if owner is None:
        return
    if owner["kind"] == "Job":
        jobs = kubernetes.client.BatchV1Api().list_namespaced_job(
            meta["namespace"], field_selector=f"metadata.name={owner['name']}",
            label_selector=children.JOB_LABEL)  # fmt: skip
        stage_children = [_as_dict(j) for j in jobs.items]
    else:
        try:
            stage_children = [kubernetes.client.CustomObjectsApi().get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, meta["namespace"], RAY_PLURAL, owner["name"])]  # fmt: skip
        except ApiException as err:
            if err.status != 404:
                raise
            stage_children = []
    newest = next((f"{c['type']}={c['status']}/{c.get('reason', '')}" for c in
                   reversed((body.get("status") or {}).get("conditions") or [])), "new")  # fmt: skip
    for child in stage_children:
        if children.JOB_LABEL in (child["metadata"].get("labels") or {}):
            _retrigger(meta["namespace"], child["metadata"].get("ownerReferences") or [], f"{meta['name']}={newest}")


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL, optional=True)
def on_delete(body: kopf.Body, **_: Any) -> None:
    """Children go with the job (ownerReferences); forget it in the metrics. Optional: no
    finalizer, so a B3Job deleted while no operator runs (uninstalled, scaled down) goes at
    once instead of hanging on a finalizer nobody removes."""
    metrics.record_phase(f"{body['metadata']['namespace']}/{body['metadata']['name']}", None)
    _due.pop((body["metadata"]["namespace"], body["metadata"]["name"]), None)
