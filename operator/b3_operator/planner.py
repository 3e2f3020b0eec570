"""The reconcile decision as a pure function: (B3Job, observed children) -> (actions, status).

    plan(body, observed, now) -> Plan(actions, status, events)

`body` is the B3Job as the API server returns it (metadata, spec, status); `observed` is what
the operator found of its children, summarised by `job_state` / `rayjob_state`. The planner
keeps no memory of its own: everything it needs is in the job's status and the children, so
an operator restarted at any moment makes the same decision, and children are only created
when absent (by deterministic names), so it never makes duplicates.

Stages run in order: rank -> partition -> train. Each is one child (a Job, a RayJob for
several ranking workers, or the training Service + Indexed Job); the next starts when the
previous one's child has succeeded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from b3.spec import MAX_TRAIN_ATTEMPTS, SpecError, hostname_problem, parse_spec
from b3_operator import children

STAGES = ["rank", "partition", "train"]
STAGE_PHASE = {"rank": "Ranking", "partition": "Partitioning", "train": "Training"}
TERMINAL = {"Succeeded", "Failed"}


@dataclass(frozen=True)
class ChildState:
    """One stage's child as observed: state is Running, Suspended, Succeeded or Failed."""

    kind: str
    name: str
    state: str
    reason: str = ""
    message: str = ""
    completion_time: str | None = None
    problem: tuple[str, str] | None = None  # (reason, message) of a stuck pod: see pod_problem
    started: bool = True  # every pod has started (run, or finished); False while any waits
    # training gangs: which one (children.ATTEMPT_LABEL), restarts counted before it, and how
    # its pods ended: container exit codes, and whether any was disrupted (evicted, preempted)
    attempt: int = 0
    restarts: int = 0
    exit_codes: tuple[int, ...] = ()
    disrupted: bool = False
    # suspension: ours (children.SUSPENDED_ANNOTATION), or Kueue's when the child has a queue
    suspended_by_us: bool = False
    queue: str = ""
    workload: str = ""  # its Kueue Workload, once Kueue made one
    workload_active: bool = True  # Workload spec.active: false while we hold it suspended
    admission: tuple[str, str] | None = None  # Kueue's (reason, message) while not admitted
    live: bool = False  # failed, but its controller would try again (a retrying RayJob): stop it


@dataclass
class Observed:
    configmap: bool = False
    stages: dict[str, ChildState] = field(default_factory=dict)
    previous: list[ChildState] = field(default_factory=list)  # earlier training gangs
    foreign: list[str] = field(default_factory=list)  # objects with a child's name, not ours
    training: dict[str, float] | None = None  # rank 0's step, totalSteps, loss (its metrics)


@dataclass(frozen=True)
class Action:
    """create: make `manifest`; suspend / resume: set spec.suspend of the child `kind/name`
    (and mark it ours); deactivate / activate: set spec.active of the Kueue Workload `name`;
    expire: set a finished Job's ttlSecondsAfterFinished to `manifest["ttl"]`."""

    verb: str
    kind: str
    name: str
    manifest: dict[str, Any] | None = None


@dataclass
class Plan:
    actions: list[Action]
    status: dict[str, Any]
    events: list[tuple[str, str, str]]  # (Normal | Warning, reason, message)
    recheck: float | None = None  # seconds until a decision falls due with no event (a deadline)


# --- observing children -------------------------------------------------------------------


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def _terminated(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container's terminated state with a non-zero exit code."""
    return [term for pod in pods for cs in (pod.get("status") or {}).get("containerStatuses") or []
            if (term := (cs.get("state") or {}).get("terminated") or {}).get("exitCode", 0) != 0]  # fmt: skip


def termination_message(pods: list[dict[str, Any]]) -> str:
    """The failed pods' message (the stage programs write their error there): bad input's
    (exit 2) first, as the cause the other pods of a gang failed after; else the newest's."""
    failed = sorted((t.get("exitCode") == children.EXIT_BAD_INPUT, t.get("finishedAt") or "",
                      t.get("message") or "") for t in _terminated(pods))  # fmt: skip
    return failed[-1][2].strip() if failed else ""


def _disrupted(pods: list[dict[str, Any]]) -> bool:
    """Whether a pod was evicted or preempted (the DisruptionTarget condition)."""
    return any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
               for pod in pods for c in (pod.get("status") or {}).get("conditions") or [])  # fmt: skip


def kueue_admission(workload: dict[str, Any] | None) -> dict[str, Any]:
    """The ChildState fields of a queue-labelled child from its Kueue Workload (None: Kueue
    has made none yet, or is not installed)."""
    if workload is None:
        return {"admission": ("NoWorkload", "no Kueue Workload for it yet (is Kueue installed?)")}
    out: dict[str, Any] = {"workload": workload["metadata"]["name"],
                           "workload_active": (workload.get("spec") or {}).get("active", True) is not False}  # fmt: skip
    if _condition(workload, "Admitted") is None:
        evicted = _condition(workload, "Evicted")
        waiting = evicted or next((c for c in (workload.get("status") or {}).get("conditions") or []
                                   if c.get("type") == "QuotaReserved"), None)  # fmt: skip
        out["admission"] = ((waiting.get("reason") or "Pending", waiting.get("message") or "")
                            if waiting else ("Pending", "waiting for Kueue to admit it"))  # fmt: skip
    return out


def child_marks(obj: dict[str, Any]) -> dict[str, Any]:
    """The ChildState fields the operator keeps on its children: attempt, restarts, queue,
    and whether it suspended the child itself."""
    meta = obj["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    return {"attempt": int(labels.get(children.ATTEMPT_LABEL, 0)),
            "restarts": int(annotations.get(children.RESTARTS_ANNOTATION, 0)),
            "queue": labels.get(children.KUEUE_QUEUE_LABEL, ""),
            "suspended_by_us": annotations.get(children.SUSPENDED_ANNOTATION) == "true"}  # fmt: skip


STUCK_WAITING = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError", "CrashLoopBackOff"}  # fmt: skip
UNSCHEDULABLE_GRACE_SECONDS = 120  # an autoscaler may still be adding a node


def seconds_between(start: str, end: str) -> float:
    """Seconds from one RFC 3339 timestamp (as the API server writes them) to another."""

    def parse(stamp: str) -> datetime:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    return (parse(end) - parse(start)).total_seconds()


def pod_problem(pods: list[dict[str, Any]], now: str) -> tuple[str, str] | None:
    """Why a running stage makes no progress, if its pods say so: a container stuck waiting
    (image pull, config error, crash loop) or a pod unschedulable for over two minutes."""
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                return waiting[
                    "reason"
                ], f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
        for c in status.get("conditions") or []:
            if (
                c.get("type") == "PodScheduled"
                and c.get("status") == "False"
                and c.get("reason") == "Unschedulable"
            ):
                since = (
                    c.get("lastTransitionTime") or pod["metadata"].get("creationTimestamp") or now
                )
                if seconds_between(since, now) >= UNSCHEDULABLE_GRACE_SECONDS:
                    return "Unschedulable", f"pod {name}: {c.get('message', 'unschedulable')}"
    return None


def job_state(
    job: dict[str, Any], pods: list[dict[str, Any]] = (), now: str | None = None,
    failed_create: str = "", workload: dict[str, Any] | None = None,
) -> ChildState:
    """Summarise a batch/v1 Job (and its pods, for the failure message; `failed_create`, the
    Job controller's newest FailedCreate Event, for a Job that cannot make its pods;
    `workload`, its Kueue Workload when it has a queue)."""
    name, pods = job["metadata"]["name"], list(pods)
    marks = child_marks(job)
    if marks["queue"]:
        marks.update(kueue_admission(workload))
    if _condition(job, "Complete"):
        return ChildState(
            "Job", name, "Succeeded", completion_time=job["status"].get("completionTime"), **marks
        )
    failed = _condition(job, "Failed")
    if failed:
        message = termination_message(pods) or failed.get("message", "")
        return ChildState("Job", name, "Failed", failed.get("reason", "Failed"), message,
                          completion_time=failed.get("lastTransitionTime"),
                          exit_codes=tuple(sorted({t["exitCode"] for t in _terminated(pods)})),
                          disrupted=_disrupted(pods) or "DisruptionTarget" in failed.get("message", ""),
                          **marks)  # fmt: skip
    if (job.get("spec") or {}).get("suspend"):
        return ChildState("Job", name, "Suspended", **marks)
    status, spec = job.get("status") or {}, job.get("spec") or {}
    begun = sum(status.get(k) or 0 for k in ("ready", "succeeded", "failed"))
    started = begun >= (spec.get("parallelism") or 1)
    problem = pod_problem(pods, now) if now else None
    if problem is None and failed_create and not status.get("active"):
        problem = ("FailedCreate", f"Job {name}: {failed_create}")  # quota, admission, no SA
    return ChildState("Job", name, "Running", problem=problem, started=started, **marks)


# KubeRay's final jobDeploymentStatus values (IsJobDeploymentTerminal, and a RayJob its
# validation refused); Complete is a success only with jobStatus SUCCEEDED (STOPPED is not)
RAYJOB_FINAL = ("Complete", "Failed", "ValidationFailed")
# how Ray's job supervisor reports a driver that exited non-zero (KubeRay copies it to
# status.message), followed by the tail of the driver's log
RAY_DRIVER_EXIT = re.compile(r"Job entrypoint command failed with exit code (\d+)")


def ray_driver_failure(message: str) -> tuple[int, str] | None:
    """(exit code, the driver's last log line) from a failed RayJob's message, else None.
    The stage program's last line is its error (`rank: ...`)."""
    found = RAY_DRIVER_EXIT.search(message)
    if found is None:
        return None
    lines = [line.strip() for line in message[found.end():].splitlines()[1:] if line.strip()]
    return int(found.group(1)), lines[-1] if lines else ""


def rayjob_state(rayjob: dict[str, Any], workload: dict[str, Any] | None = None,
                 pods: list[dict[str, Any]] = (), now: str | None = None) -> ChildState:
    """Summarise a KubeRay RayJob from its jobDeploymentStatus and jobStatus, and (when
    running) its Ray pods: started once the head and every worker run, stuck as pod_problem
    says. With no KubeRay controller there are no pods, and a startup deadline fails it."""
    name = rayjob["metadata"]["name"]
    marks = child_marks(rayjob)
    if marks["queue"]:
        marks.update(kueue_admission(workload))
    status = rayjob.get("status") or {}
    deployment, job_status = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    driver = ray_driver_failure(status.get("message", "")) if job_status == "FAILED" else None
    if driver is not None and driver[0] == children.EXIT_BAD_INPUT:
        # bad input fails every try the same way: the stage fails now, and KubeRay's retries
        # (a new Ray cluster each) are stopped while it would still make them
        return ChildState("RayJob", name, "Failed", "BadInput", driver[1], completion_time=status.get("endTime"),
                          exit_codes=(driver[0],), live=deployment not in RAYJOB_FINAL, **marks)  # fmt: skip
    # KubeRay (v1.5.0) decides on jobDeploymentStatus: Complete/Failed/ValidationFailed are final,
    # jobStatus alone is not (FAILED while Running waits for the submitter; Retrying keeps the
    # last try's FAILED until its Ray cluster is gone and a new one starts)
    if deployment == "Complete" and job_status == "SUCCEEDED":
        return ChildState("RayJob", name, "Succeeded", completion_time=status.get("endTime"), **marks)
    if deployment in RAYJOB_FINAL:
        return ChildState("RayJob", name, "Failed", status.get("reason") or job_status or deployment,
                          status.get("message", ""), **marks)  # fmt: skip
    spec = rayjob.get("spec") or {}
    if spec.get("suspend"):
        return ChildState("RayJob", name, "Suspended", **marks)
    groups = (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or []
    expected = 1 + sum(g.get("replicas") or 0 for g in groups)
    running = sum((p.get("status") or {}).get("phase") in ("Running", "Succeeded") for p in pods)
    problem = pod_problem(list(pods), now) if now else None
    return ChildState("RayJob", name, "Running", problem=problem, started=running >= expected, **marks)


def stop_action(child: ChildState) -> Action:
    """How to stop a child its controller would run again: through its Kueue Workload when
    Kueue holds it (Kueue unsuspends a suspended child whose Workload is admitted; it
    suspends the child of an inactive one itself), else by suspending it."""
    if child.workload:
        return Action("deactivate", "Workload", child.workload)
    return Action("suspend", child.kind, child.name)


def restart_decision(child: ChildState, max_restarts: int) -> tuple[str, bool] | None:
    """Whether a failed training gang restarts: (why, counted), or None when the job fails.
    Bad input fails at once (it would fail again), as does the stage's own deadline; a
    disruption restarts without counting; any other failure spends one of maxRestarts."""
    if children.EXIT_BAD_INPUT in child.exit_codes or child.reason == "DeadlineExceeded":
        return None
    if child.attempt + 1 > MAX_TRAIN_ATTEMPTS:
        return None
    if child.disrupted:
        return "a pod was disrupted (evicted or preempted)", False
    if child.restarts >= max_restarts:
        return None
    codes = ", ".join(str(c) for c in child.exit_codes)
    return f"{child.reason}" + (f", exit code {codes}" if codes else ""), True


# --- status helpers -------------------------------------------------------------------------


def spec_hash(spec: dict[str, Any]) -> str:
    """Hash of what may not change after start (everything but suspend and runPolicy), over
    the values that differ from their defaults: an operator upgrade that adds a defaulted field
    (which the API server then fills into every stored job) changes no running job's hash."""
    meaningful = parse_spec(spec).model_dump(mode="json", by_alias=True, exclude_defaults=True)
    fixed = {k: v for k, v in meaningful.items() if k not in ("suspend", "runPolicy")}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


def _legacy_spec_hash(spec: dict[str, Any]) -> str:
    """The hash 0.1.0 recorded (over the spec as stored, defaults included): a job started by
    it keeps running under this operator."""
    fixed = {k: v for k, v in spec.items() if k not in ("suspend", "runPolicy")}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


PROGRESS_REFRESH_SECONDS = 30


def progress_due(status: dict[str, Any], now: str) -> bool:
    """Whether to read training progress again (at most every PROGRESS_REFRESH_SECONDS)."""
    last = (status.get("training") or {}).get("updateTime")
    return last is None or seconds_between(last, now) >= PROGRESS_REFRESH_SECONDS


def training_progress(old: dict[str, Any] | None, sample: dict[str, float], now: str) -> dict[str, Any]:
    """status.training from a metrics sample of rank 0: step, total, percent, and the seconds
    left at the step rate since the previous sample (absent until there are two)."""
    step, total = int(sample["step"]), int(sample["totalSteps"])
    out = {"step": step, "totalSteps": total, "percent": round(100 * step / total, 1) if total else 0.0,
           "loss": round(float(sample["loss"]), 5), "updateTime": now}  # fmt: skip
    if old and old.get("updateTime") and step > old.get("step", step):
        rate = (step - old["step"]) / max(1e-9, seconds_between(old["updateTime"], now))
        out["remainingSeconds"] = int((total - step) / rate)
    elif old and "remainingSeconds" in old:
        out["remainingSeconds"] = old["remainingSeconds"]
    return out


def create_refused(body: dict[str, Any], status: dict[str, Any], kind: str, name: str,
                   code: int, message: str, now: str) -> Plan:
    """The API server refused to create a child (4xx other than 409: invalid, forbidden, over
    quota at admission): retrying cannot help, so the job fails with the server's words."""
    status = copy.deepcopy(status)
    text = f"creating {kind} {name} was refused ({code}): {message}"
    set_condition(status, "Failed", True, "CreateRefused", text, now)
    set_condition(status, "Running", False, "Failed", text, now)
    status.update(phase="Failed", message=text, completionTime=now)
    return Plan([], status, [("Warning", "CreateRefused", text)])


def expire_children(observed: Observed, ttl: int | None, now: str) -> list[Action]:
    """runPolicy.ttlSecondsAfterFinished counts from the end of the B3Job, as Kubeflow users
    expect, not from each stage's end: once the job is over, each finished stage Job gets the
    TTL that makes the TTL-after-finished controller delete it `ttl` seconds from now. (A stage
    Job deleted while the job runs would otherwise look like a stage never run.)"""
    if ttl is None:
        return []
    return [
        Action("expire", "Job", child.name,
               {"ttl": ttl + max(0, int(seconds_between(child.completion_time or now, now)))})
        for child in [*observed.stages.values(), *observed.previous]
        if child.kind == "Job" and child.state in ("Succeeded", "Failed")
    ]  # fmt: skip


def set_condition(
    status: dict[str, Any], kind: str, value: bool, reason: str, message: str, now: str
) -> None:
    """Upsert a condition; lastTransitionTime moves only when its status flips."""
    conditions = status.setdefault("conditions", [])
    new = "True" if value else "False"
    for c in conditions:
        if c["type"] == kind:
            if c["status"] != new:
                c["lastTransitionTime"] = now
            c.update(status=new, reason=reason, message=message)
            return
    conditions.append(
        {
            "type": kind,
            "status": new,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }
    )


def _validate(name: str, spec: dict[str, Any]):
    """The spec as the operator needs it: valid, with paths a pod can reach and child names
    that are DNS labels."""
    parsed = parse_spec(spec)
    errors = [problem] if (problem := hostname_problem(name, parsed.training.nodes)) else []
    paths = [("spec.workDir", parsed.work_dir), ("spec.dataset.uri", parsed.dataset.uri),
             ("spec.dataset.imageRoot", parsed.dataset.image_root), ("spec.teacher.embeddings", parsed.teacher.embeddings),
             ("spec.training.outputDir", parsed.training.output_dir)]  # fmt: skip
    for where, uri in paths:
        if uri is not None and "://" not in uri and not uri.startswith("/"):
            errors.append(f"{where}: {uri!r} is relative; on Kubernetes give an absolute path on a "
                          "mounted volume or a URI (s3://...)")  # fmt: skip
    if errors:
        raise SpecError(errors)
    return parsed


# --- the planner ------------------------------------------------------------------------------


def plan(body: dict[str, Any], observed: Observed, now: str) -> Plan:
    """Decide what to create, suspend or resume next, and the job's new status."""
    old = body.get("status") or {}
    status = {k: copy.deepcopy(v) for k, v in old.items() if k != "kopf"}
    status["observedGeneration"] = body["metadata"].get("generation", 1)
    status.setdefault("startTime", now)
    actions: list[Action] = []
    events: list[tuple[str, str, str]] = []
    spec_dict = body.get("spec") or {}

    def finish(phase: str, message: str = "") -> Plan:
        status["phase"], status["message"] = phase, message
        done = sum(
            1 for s in STAGES if (status.get("stages") or {}).get(s, {}).get("completionTime")
        )
        status["progress"] = f"{done}/{len(STAGES)}"
        if phase == "Training" and status.get("training"):
            status["progress"] += f" (train {status['training']['percent']}%)"
        if old.get("phase") != phase and phase not in ("Failed",):
            events.append(("Normal", phase, message or f"B3Job is {phase}"))
        return Plan(actions, status, events)

    if old.get("phase") in TERMINAL:
        return Plan(
            [],
            {
                **status,
                "observedGeneration": old.get("observedGeneration", status["observedGeneration"]),
            },
            [],
        )
    try:
        spec = _validate(body["metadata"]["name"], spec_dict)
    except SpecError as err:
        message = "; ".join(err.errors)
        set_condition(status, "Failed", True, "InvalidSpec", message, now)
        status["completionTime"] = now
        events.append(("Warning", "InvalidSpec", message))
        return finish("Failed", message)

    digest = spec_hash(spec_dict)
    if status.get("specHash") == _legacy_spec_hash(spec_dict):
        status["specHash"] = digest  # recorded by 0.1.0: the same spec
    recorded = status.setdefault("specHash", digest)
    if recorded != digest:
        message = (f"spec changed after the job started ({recorded} -> {digest}); only suspend and "
                   "runPolicy may change: restore the spec, or create a new B3Job")  # fmt: skip
        if not any(
            c["type"] == "SpecChanged" and c["status"] == "True"
            for c in status.get("conditions", [])
        ):
            events.append(("Warning", "SpecChanged", message))
        set_condition(status, "SpecChanged", True, "SpecChanged", message, now)
        status["message"] = message
        return Plan([], status, events)
    if any(c["type"] == "SpecChanged" for c in status.get("conditions", [])):
        set_condition(status, "SpecChanged", False, "SpecRestored", "", now)

    blocked = any(c["type"] == "Blocked" and c["status"] == "True" for c in status.get("conditions", []))
    if observed.foreign:  # never adopt or wait on what another owner made
        message = ("; ".join(observed.foreign) + ": not this B3Job's children; delete or rename "
                   "them, or give this B3Job another name")  # fmt: skip
        if not blocked:
            events.append(("Warning", "ForeignObject", message))
        set_condition(status, "Blocked", True, "ForeignObject", message, now)
        status["message"] = message
        status.setdefault("phase", "Pending")
        return Plan([], status, events)
    if blocked:
        set_condition(status, "Blocked", False, "Resolved", "", now)

    if not observed.configmap:
        actions.append(Action("create", "ConfigMap", children.child_name(body["metadata"]["name"], "spec"),
                              children.spec_configmap(body, spec)))  # fmt: skip
        set_condition(status, "Created", True, "ChildrenCreated", "spec ConfigMap created", now)

    def fail(reason: str, event: str, message: str) -> Plan:
        """A stage failed: the job is over, and its finished Jobs get their TTL."""
        set_condition(status, "Failed", True, reason, message, now)
        set_condition(status, "Running", False, "Failed", message, now)
        status["completionTime"] = now
        events.append(("Warning", event, message))
        actions.extend(expire_children(observed, spec.run_policy.ttl_seconds_after_finished, now))
        return finish("Failed", message)

    def restart_gang(child: ChildState, why: str, counted: bool) -> Plan:
        """All training pods again, as the next attempt's Job; the trainer resumes from the
        newest checkpoint."""
        attempt, restarts = child.attempt + 1, child.restarts + counted
        manifest = children.stage_job(body, spec, "train", suspend=spec.suspend, attempt=attempt,
                                      restarts=restarts)  # fmt: skip
        name = manifest["metadata"]["name"]
        actions.append(Action("create", "Job", name, manifest))
        stages["train"].update(child=name, attemptStartTime=now)  # its pods' startup deadline counts from now
        status["restarts"] = restarts
        used = (f"restart {restarts} of {spec.training.max_restarts}" if counted
                else "a disruption: not counted")  # fmt: skip
        events.append(("Warning", "TrainingRestarted",
                       f"train: {child.name} failed ({why}); all {spec.training.nodes} training pods "
                       f"start again as Job {name} from the newest checkpoint ({used})"))  # fmt: skip
        return _running(status, "train", spec.suspend, now, finish)

    # a child created now would be admitted and started by Kueue: wait until the job is resumed
    hold_creation = spec.suspend and spec.run_policy.queue_name is not None
    stages = status.setdefault("stages", {})
    for stage in STAGES:
        record = stages.setdefault(stage, {})
        child = observed.stages.get(stage)
        if record.get("completionTime"):  # done, whether its child still exists or not
            continue
        status["stage"] = stage
        if child is None and hold_creation:
            return _running(status, stage, True, now, finish)
        if child is None:  # the stage's turn: create its child (suspended if the job is)
            for manifest in children.stage_child(body, spec, stage, suspend=spec.suspend):
                actions.append(
                    Action("create", manifest["kind"], manifest["metadata"]["name"], manifest)
                )
            record.update(startTime=record.get("startTime", now), child=actions[-1].name)
            events.append(
                (
                    "Normal",
                    "StageStarted",
                    f"{stage}: created {actions[-1].kind} {actions[-1].name}",
                )
            )
            result = _running(status, stage, spec.suspend, now, finish)
            deadline = getattr(spec.stages, stage).startup_deadline_seconds
            result.recheck = deadline + 1 if deadline is not None and not spec.suspend else None
            return result
        if stage == "train":
            status["restarts"] = child.restarts
        if child.state == "Succeeded":
            if not record.get("completionTime"):
                record["completionTime"] = child.completion_time or now
                events.append(
                    ("Normal", "StageSucceeded", f"{stage}: {child.kind} {child.name} succeeded")
                )
            continue
        if child.state == "Failed":
            restart = restart_decision(child, spec.training.max_restarts) if stage == "train" else None
            if restart is not None and not hold_creation:
                return restart_gang(child, *restart)
            if restart is not None:  # restarted once resumed
                return _running(status, stage, True, now, finish)
            message = f"{stage} failed ({child.reason})" + (
                f": {child.message}" if child.message else ""
            )
            if child.restarts:
                message += f" [after {child.restarts} restarts]"
            if child.live:  # KubeRay frees a suspended RayJob's Ray cluster and makes no new one
                actions.append(stop_action(child))
            return fail(f"{STAGE_PHASE[stage]}Failed", "StageFailed", message)
        for action, reason, message in suspension(stage, child, spec.suspend, status):
            actions.append(action)
            events.append(("Normal", reason, message))
        held = child.state == "Suspended" and not spec.suspend and not _ours(child, status)
        _queued(status, stage, child if held else None, now)
        _stalled(status, child.problem, events, now)
        if stage == "train" and observed.training is not None:
            status["training"] = training_progress(status.get("training"), observed.training, now)
        deadline = getattr(spec.stages, stage).startup_deadline_seconds
        waited = seconds_between(record.get("attemptStartTime") or record.get("startTime") or now, now)
        waiting = deadline is not None and not child.started and not spec.suspend
        if waiting and waited > deadline:
            why = f": {child.problem[1]}" if child.problem else ""
            message = f"{stage}: pods not started {int(waited)}s after the stage began (startupDeadlineSeconds {deadline}){why}"
            return fail("StartupDeadlineExceeded", "StartupDeadlineExceeded", message)
        recheck = deadline - waited + 1 if waiting else None
        if held:
            set_condition(status, "Running", False, "Queued", f"{stage} is queued", now)
            return finish("Queued", _condition_message(status, "Queued"))
        result = _running(status, stage, spec.suspend, now, finish)
        result.recheck = recheck
        return result

    status["stage"] = ""
    status["completionTime"] = status.get("completionTime") or now
    set_condition(status, "Running", False, "Succeeded", "every stage finished", now)
    set_condition(
        status, "Succeeded", True, "AllStagesSucceeded", "rank, partition and train succeeded", now
    )
    actions.extend(expire_children(observed, spec.run_policy.ttl_seconds_after_finished, now))
    return finish("Succeeded", f"model in {spec.train_dir}/train/final/model")


def _ours(child: ChildState, status: dict[str, Any]) -> bool:
    """Whether the operator suspended this child (marked; or, for a child suspended before
    the mark existed, while the job's own Suspended condition held)."""
    return child.suspended_by_us or (not child.queue and _holds(status, "Suspended"))


def suspension(stage: str, child: ChildState, suspend: bool, status: dict[str, Any]) -> list[tuple[Action, str, str]]:
    """How to make a running child follow spec.suspend, as (action, Event reason, message).
    A child with a Kueue queue is started and stopped by Kueue: ask through its Workload's
    spec.active (Kueue evicts an inactive Workload and suspends its Job, and admits it again
    once active). Other children: suspend them, and resume only those the operator suspended,
    never one another controller holds."""
    what = f"{stage}: {child.kind} {child.name}"
    if child.queue:
        if child.workload and suspend and child.workload_active:
            return [(Action("deactivate", "Workload", child.workload), "Suspending",
                     f"{what}: deactivating its Kueue Workload {child.workload}")]  # fmt: skip
        if child.workload and not suspend and not child.workload_active:
            return [(Action("activate", "Workload", child.workload), "Resuming",
                     f"{what}: activating its Kueue Workload {child.workload}")]  # fmt: skip
        return []
    if suspend and child.state != "Suspended":
        return [(Action("suspend", child.kind, child.name), "Suspending", f"suspending {what}")]
    if not suspend and child.state == "Suspended" and _ours(child, status):
        return [(Action("resume", child.kind, child.name), "Resuming", f"resuming {what}")]
    return []


def _holds(status: dict[str, Any], kind: str) -> bool:
    """Whether the job's own condition `kind` is True."""
    return any(c["type"] == kind and c["status"] == "True" for c in status.get("conditions", []))


def _condition_message(status: dict[str, Any], kind: str) -> str:
    return next(c["message"] for c in status["conditions"] if c["type"] == kind)


def _queued(status: dict[str, Any], stage: str, held: ChildState | None, now: str) -> None:
    """The Queued condition: a stage whose child another controller holds suspended (Kueue,
    until it admits the child's Workload), with that controller's reason. (The phase Queued
    brings the Event.)"""
    if held is not None:
        reason, why = held.admission or ("Suspended", "suspended by another controller")
        where = f" in Kueue LocalQueue {held.queue}" if held.queue else ""
        message = f"{stage}: {held.kind} {held.name} is queued{where}: {why}"
        set_condition(status, "Queued", True, reason, message, now)
    elif _holds(status, "Queued"):
        set_condition(status, "Queued", False, "Admitted", f"{stage} admitted", now)


def _stalled(
    status: dict[str, Any], problem: tuple[str, str] | None, events: list, now: str
) -> None:
    """The Stalled condition: a stage that looks running while its pods cannot start."""
    was = any(
        c["type"] == "Stalled" and c["status"] == "True" for c in status.get("conditions", [])
    )
    if problem is not None:
        reason, message = problem
        if not was:
            events.append(("Warning", "Stalled", message))
        set_condition(status, "Stalled", True, reason, message, now)
    elif was:
        set_condition(status, "Stalled", False, "PodsRunning", "", now)


def _running(status: dict[str, Any], stage: str, suspend: bool, now: str, finish) -> Plan:
    if suspend:
        set_condition(status, "Suspended", True, "SuspendRequested", f"{stage} is suspended", now)
        set_condition(status, "Running", False, "Suspended", f"{stage} is suspended", now)
        return finish("Suspended", f"{stage} is suspended; set spec.suspend false to resume")
    if any(c["type"] == "Suspended" for c in status.get("conditions", [])):
        set_condition(status, "Suspended", False, "Resumed", f"{stage} resumed", now)
    set_condition(status, "Running", True, f"{STAGE_PHASE[stage]}", f"{stage} is running", now)
    return finish(STAGE_PHASE[stage], f"{stage} is running")
