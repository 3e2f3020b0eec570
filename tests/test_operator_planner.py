"""The planner, table-driven: (B3Job, observed children) -> (actions, status, events) for every
transition, failure, suspend/resume, an operator restarted mid-stage and a spec change."""

from __future__ import annotations

import copy

import pytest

from b3_operator.planner import ChildState, Observed, job_state, kueue_admission, plan, rayjob_state

NOW, LATER = "2026-11-23T10:00:00Z", "2026-11-23T11:00:00Z"
SPEC = {
    "dataset": {"uri": "s3://data/pairs.parquet", "columns": {"task": "task"}},
    "mining": {"batchSize": 64, "clusterSize": 16},
    "workDir": "/work/run-1",
}


def body(status=None, generation=1, **spec_changes) -> dict:
    return {"apiVersion": "b3.dev/v1alpha1", "kind": "B3Job", "spec": {**SPEC, **spec_changes},
            "metadata": {"name": "job-1", "namespace": "ns", "uid": "u-1", "generation": generation},
            "status": status or {}}  # fmt: skip


def child(stage: str, state: str, **kw) -> ChildState:
    return ChildState("Job", f"job-1-{stage}", state, **kw)


def observed(**stages) -> Observed:
    return Observed(configmap=True, stages={k: child(k, v) for k, v in stages.items()})


def run(b: dict, obs: Observed, now: str = NOW):
    result = plan(b, obs, now)
    return result, [(a.verb, a.kind, a.name) for a in result.actions], [e[1] for e in result.events]


def conditions(status: dict) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


# (observed children, expected actions, phase, stage, progress)
TRANSITIONS = [
    pytest.param(Observed(), [("create", "ConfigMap", "job-1-spec"), ("create", "Job", "job-1-rank")],
                 "Ranking", "rank", "0/3", id="new job: spec ConfigMap and the rank Job"),
    pytest.param(observed(rank="Running"), [], "Ranking", "rank", "0/3", id="ranking"),
    pytest.param(observed(rank="Succeeded"), [("create", "Job", "job-1-partition")],
                 "Partitioning", "partition", "1/3", id="rank done: partition"),
    pytest.param(observed(rank="Succeeded", partition="Succeeded"),
                 [("create", "Service", "job-1-train"), ("create", "Job", "job-1-train")],
                 "Training", "train", "2/3", id="partition done: Service + Indexed Job"),
    pytest.param(observed(rank="Succeeded", partition="Succeeded", train="Running"), [],
                 "Training", "train", "2/3", id="training"),
    pytest.param(observed(rank="Succeeded", partition="Succeeded", train="Succeeded"), [],
                 "Succeeded", "", "3/3", id="all done"),
]  # fmt: skip


@pytest.mark.parametrize("obs, actions, phase, stage, progress", TRANSITIONS)
def test_stages_run_in_order(obs, actions, phase, stage, progress):
    result, got, _ = run(body(), obs)
    assert got == actions
    assert (result.status["phase"], result.status["stage"], result.status["progress"]) == (
        phase,
        stage,
        progress,
    )
    assert result.status["observedGeneration"] == 1
    if phase == "Succeeded":
        assert (
            conditions(result.status)["Succeeded"] == "True"
            and result.status["completionTime"] == NOW
        )


def test_a_whole_job_through_its_status():
    """Feed each plan's status back, as the API server would: times and events accumulate once."""
    b = body()
    steps = [Observed(), observed(rank="Running"), observed(rank="Succeeded"),
             observed(rank="Succeeded", partition="Succeeded"),
             observed(rank="Succeeded", partition="Succeeded", train="Succeeded")]  # fmt: skip
    events = []
    for i, obs in enumerate(steps):
        result, _, reasons = run(b, obs, f"2026-11-23T10:0{i}:00Z")
        events += reasons
        b = {**b, "status": result.status}
    stages = b["status"]["stages"]
    assert stages["rank"] == {"startTime": "2026-11-23T10:00:00Z", "child": "job-1-rank",
                              "completionTime": "2026-11-23T10:02:00Z"}  # fmt: skip
    assert stages["train"]["startTime"] == "2026-11-23T10:03:00Z"
    assert events.count("StageSucceeded") == 3 and events.count("StageStarted") == 3
    assert events[-1] == "Succeeded" and b["status"]["phase"] == "Succeeded"
    # finished: nothing more happens, whatever is observed
    result, actions, reasons = run(b, Observed(), LATER)
    assert actions == [] and reasons == [] and result.status["phase"] == "Succeeded"


@pytest.mark.parametrize("stage, earlier", [("rank", {}), ("partition", {"rank": "Succeeded"}),
                                            ("train", {"rank": "Succeeded", "partition": "Succeeded"})])  # fmt: skip
def test_a_failed_stage_fails_the_job_with_the_pod_message(stage, earlier):
    obs = observed(**earlier)
    obs.stages[stage] = child(stage, "Failed", reason="PodFailurePolicy", exit_codes=(1, 2),
                              message="rank: dataset.columns: column 'query' missing")  # fmt: skip
    result, actions, reasons = run(body(), obs)
    assert actions == [] and result.status["phase"] == "Failed"
    assert "column 'query' missing" in result.status["message"]
    failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"].endswith("Failed")
    assert "StageFailed" in reasons
    # terminal: a later reconcile changes nothing, even if the Job is gone
    again, actions, _ = run({**body(), "status": result.status}, Observed(), LATER)
    assert actions == [] and again.status["phase"] == "Failed"


@pytest.mark.parametrize("obs, verb", [
    (observed(rank="Running"), "suspend"),
    (observed(rank="Succeeded", partition="Succeeded", train="Running"), "suspend"),
])  # fmt: skip
def test_suspend_suspends_the_running_child(obs, verb):
    result, actions, _ = run(body(suspend=True), obs)
    assert actions[0][0] == verb and actions[0][2] == obs.stages[list(obs.stages)[-1]].name
    assert result.status["phase"] == "Suspended"
    assert conditions(result.status) == {"Suspended": "True", "Running": "False"}


def test_resume_after_suspend():
    suspended, _, _ = run(body(suspend=True), observed(rank="Running"))
    obs = observed(rank="Suspended")
    result, actions, reasons = run(body(status=suspended.status, suspend=False), obs, LATER)
    assert actions == [("resume", "Job", "job-1-rank")] and "Resuming" in reasons
    assert result.status["phase"] == "Ranking"
    assert (
        conditions(result.status)["Suspended"] == "False"
        and conditions(result.status)["Running"] == "True"
    )


def test_a_suspended_job_creates_its_next_stage_suspended():
    result, actions, _ = run(body(suspend=True), observed(rank="Succeeded"))
    (create,) = result.actions
    assert create.manifest["spec"]["suspend"] is True and result.status["phase"] == "Suspended"


def test_an_operator_restarted_mid_stage_creates_nothing_twice():
    """A fresh operator process sees the same children and the stored status: same decision."""
    first, actions, _ = run(body(), observed(rank="Succeeded"))
    assert actions == [("create", "Job", "job-1-partition")]
    # it crashed after creating the partition Job but before writing status
    restarted, actions, reasons = run(
        body(), observed(rank="Succeeded", partition="Running"), LATER
    )
    assert actions == [] and restarted.status["phase"] == "Partitioning"
    # ... or after writing status: still nothing new, and the recorded times are kept
    again, actions, _ = run(
        body(status=first.status), observed(rank="Succeeded", partition="Running"), LATER
    )
    assert actions == [] and again.status["stages"]["partition"]["startTime"] == NOW


def test_a_spec_change_after_start_is_refused_until_restored():
    started, _, _ = run(body(), observed(rank="Running"))
    changed = body(
        status=started.status, generation=2, mining={"batchSize": 128, "clusterSize": 16}
    )
    result, actions, reasons = run(changed, observed(rank="Succeeded"), LATER)
    assert actions == [] and reasons == ["SpecChanged"]
    assert (
        conditions(result.status)["SpecChanged"] == "True"
        and result.status["observedGeneration"] == 2
    )
    # the warning is not repeated on every reconcile
    _, _, reasons = run({**changed, "status": result.status}, observed(rank="Succeeded"), LATER)
    assert reasons == []
    # restored: the job goes on
    restored, actions, _ = run(
        body(status=result.status, generation=3), observed(rank="Succeeded"), LATER
    )
    assert actions == [("create", "Job", "job-1-partition")]
    assert conditions(restored.status)["SpecChanged"] == "False"


def test_suspend_and_run_policy_may_change():
    started, _, _ = run(body(), observed(rank="Running"))
    later = body(
        status=started.status, generation=2, suspend=True, runPolicy={"ttlSecondsAfterFinished": 60}
    )
    result, actions, _ = run(later, observed(rank="Running"))
    assert actions == [("suspend", "Job", "job-1-rank")] and "SpecChanged" not in conditions(
        result.status
    )


@pytest.mark.parametrize("change, field", [
    ({"mining": {"batchSize": 64, "clusterSize": 24}}, "clusterSize"),
    ({"workDir": "relative/dir"}, "spec.workDir"),
    ({"training": {"outputDir": "ckpt"}}, "spec.training.outputDir"),
    ({"dataset": {"uri": "/data/pairs.parquet", "imageRoot": "images"}}, "spec.dataset.imageRoot"),
    ({"teacher": {"embeddings": "embeddings.parquet"}}, "spec.teacher.embeddings"),
])  # fmt: skip
def test_an_invalid_spec_fails_without_children(change, field):
    result, actions, reasons = run(body(**change), Observed())
    assert actions == [] and result.status["phase"] == "Failed" and reasons == ["InvalidSpec"]
    assert field in result.status["message"]


def test_deletion_needs_no_action_children_are_owned():
    """Children carry controller ownerReferences, so the API server's garbage collector deletes
    them with the B3Job; the planner's creations all carry one."""
    result, _, _ = run(body(), Observed())
    for action in result.actions:
        (owner,) = action.manifest["metadata"]["ownerReferences"]
        assert owner["uid"] == "u-1" and owner["controller"] is True


def test_ray_ranking_is_a_rayjob():
    result, actions, _ = run(body(rank={"workers": 3}), Observed())
    assert actions[1] == ("create", "RayJob", "job-1-rank")


JOB = {"metadata": {"name": "job-1-rank"}, "spec": {"suspend": False}, "status": {}}


@pytest.mark.parametrize("status, spec, state", [
    ({"conditions": [{"type": "Complete", "status": "True"}], "completionTime": LATER}, {}, "Succeeded"),
    ({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}, {}, "Failed"),
    ({"conditions": [{"type": "Failed", "status": "False"}], "active": 1}, {}, "Running"),
    ({}, {"suspend": True}, "Suspended"),
    ({"active": 1}, {}, "Running"),
])  # fmt: skip
def test_job_state(status, spec, state):
    job = copy.deepcopy(JOB)
    job["status"].update(status)
    job["spec"].update(spec)
    assert job_state(job).state == state


def test_job_state_carries_the_newest_failed_pods_termination_message():
    job = copy.deepcopy(JOB)
    job["status"]["conditions"] = [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "x"}
    ]
    pods = [{"status": {"containerStatuses": [{"state": {"terminated": {
        "exitCode": code, "finishedAt": at, "message": msg}}}]}}
        for code, at, msg in [(1, "2026-11-23T10:00:00Z", "old"), (2, "2026-11-23T10:05:00Z", "rank: bad column\n")]]  # fmt: skip
    state = job_state(job, pods)
    assert (state.state, state.reason, state.message) == (
        "Failed",
        "PodFailurePolicy",
        "rank: bad column",
    )


# every (jobDeploymentStatus, jobStatus) pair, with the values of KubeRay v1.5.0's
# ray-operator/apis/ray/v1/rayjob_types.go; the decision is on jobDeploymentStatus
# (controllers/ray/rayjob_controller.go: Complete/Failed are terminal, a Failed RayJob with
# retries left is set to Retrying in the same reconcile, ValidationFailed is never left)
KUBERAY_JOB_STATUSES = ["", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]
KUBERAY_DEPLOYMENT_STATUSES = {
    "": "Running", "Initializing": "Running", "Running": "Running", "Complete": None, "Failed": "Failed",
    "ValidationFailed": "Failed", "Suspending": "Running", "Suspended": "Running", "Retrying": "Running",
    "Waiting": "Running",
}  # fmt: skip


@pytest.mark.parametrize("deployment", list(KUBERAY_DEPLOYMENT_STATUSES))
@pytest.mark.parametrize("job_status", KUBERAY_JOB_STATUSES)
def test_rayjob_state_follows_kuberays_deployment_status(deployment, job_status):
    expected = KUBERAY_DEPLOYMENT_STATUSES[deployment] or ("Succeeded" if job_status == "SUCCEEDED" else "Failed")
    rayjob = {"metadata": {"name": "r"}, "spec": {}, "status": {"jobDeploymentStatus": deployment, "jobStatus": job_status}}
    assert rayjob_state(rayjob).state == expected
    suspended = {**rayjob, "spec": {"suspend": True}}
    assert rayjob_state(suspended).state == (expected if expected != "Running" else "Suspended")


def test_a_retrying_rayjob_is_running_and_its_final_failure_keeps_kuberays_reason():
    retrying = {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "reason": "AppFailed", "failed": 1}
    assert rayjob_state({"metadata": {"name": "r"}, "spec": {"backoffLimit": 2}, "status": retrying}).state == "Running"
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "boom", "failed": 3}
    state = rayjob_state({"metadata": {"name": "r"}, "spec": {"backoffLimit": 2}, "status": failed})
    assert (state.state, state.reason, state.message) == ("Failed", "AppFailed", "boom")
    stopped = rayjob_state({"metadata": {"name": "r"}, "spec": {}, "status": {"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}})
    assert (stopped.state, stopped.reason) == ("Failed", "STOPPED")


# Ray's job supervisor (ray 2.60.0, dashboard/modules/job/job_supervisor.py) on a driver that
# exited non-zero; KubeRay copies it into the RayJob's status.message
RAY_DRIVER_FAILED = ("Job entrypoint command failed with exit code {code}, last available logs (truncated to "
                     "20,000 chars):\n2026-11-23 10:00:00 INFO rank: reading s3://data/pairs.parquet\n"
                     "rank: dataset.columns: column 'query' missing\n")  # fmt: skip


@pytest.mark.parametrize("deployment, live", [("Running", True), ("Retrying", True), ("Failed", False)])
def test_bad_input_in_the_ray_driver_fails_at_once_and_stops_kuberays_retries(deployment, live):
    """Exit 2 fails the same way on every try: whatever KubeRay would do next, the stage has
    failed, naming the driver's error; a RayJob KubeRay would retry is suspended (its Ray
    cluster freed, no new one made)."""
    status = {"jobDeploymentStatus": deployment, "jobStatus": "FAILED", "reason": "AppFailed",
              "message": RAY_DRIVER_FAILED.format(code=2)}  # fmt: skip
    state = rayjob_state({"metadata": {"name": "job-1-rank"}, "spec": {"backoffLimit": 2}, "status": status})
    assert (state.state, state.reason, state.exit_codes, state.live) == ("Failed", "BadInput", (2,), live)
    assert state.message == "rank: dataset.columns: column 'query' missing"
    result, actions, reasons = run(body(rank={"workers": 2}), Observed(configmap=True, stages={"rank": state}))
    assert result.status["phase"] == "Failed" and "StageFailed" in reasons
    assert "column 'query' missing" in result.status["message"]
    assert actions == ([("suspend", "RayJob", "job-1-rank")] if live else [])
    # held by Kueue, which would unsuspend it while its Workload is admitted: the Workload is
    # deactivated instead (Kueue then suspends the RayJob)
    queued = {"metadata": {"name": "job-1-rank", "labels": {"kueue.x-k8s.io/queue-name": "q"}},
              "spec": {"backoffLimit": 2}, "status": status}  # fmt: skip
    state = rayjob_state(queued, {"metadata": {"name": "rayjob-job-1-rank-1"}, "spec": {"active": True}, "status": {
        "conditions": [{"type": "QuotaReserved", "status": "True"}, {"type": "Admitted", "status": "True"}]}})  # fmt: skip
    _, actions, _ = run(body(rank={"workers": 2}, runPolicy={"queueName": "q"}), Observed(configmap=True, stages={"rank": state}))
    assert actions == ([("deactivate", "Workload", "rayjob-job-1-rank-1")] if live else [])
    # any other exit code is KubeRay's to retry
    status["message"] = RAY_DRIVER_FAILED.format(code=1)
    other = rayjob_state({"metadata": {"name": "job-1-rank"}, "spec": {"backoffLimit": 2}, "status": status})
    assert other.state == ("Failed" if deployment == "Failed" else "Running") and not other.live


def pod(name="job-1-rank-x", waiting=None, unschedulable_since=None) -> dict:
    status: dict = {"phase": "Pending"}
    if waiting:
        status["containerStatuses"] = [
            {"name": "stage", "state": {"waiting": {"reason": waiting, "message": "nope"}}}
        ]
    if unschedulable_since:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                 "message": "0/4 nodes have nvidia.com/gpu", "lastTransitionTime": unschedulable_since}]  # fmt: skip
    return {"metadata": {"name": name}, "status": status}


@pytest.mark.parametrize("pods, reason", [
    ([pod(waiting="ImagePullBackOff")], "ImagePullBackOff"),
    ([pod(waiting="CreateContainerConfigError")], "CreateContainerConfigError"),
    ([pod(unschedulable_since="2026-11-23T09:55:00Z")], "Unschedulable"),  # 5 minutes before NOW
    ([pod(unschedulable_since="2026-11-23T09:59:30Z")], None),  # 30 s: an autoscaler may add a node
    ([pod(waiting="ContainerCreating")], None),
    ([], None),
])  # fmt: skip
def test_pod_problem(pods, reason):
    from b3_operator.planner import pod_problem

    problem = pod_problem(pods, NOW)
    assert (problem[0] if problem else None) == reason


def test_a_running_stage_whose_pods_cannot_start_is_stalled_until_they_do():
    job = {"metadata": {"name": "job-1-rank"}, "spec": {}, "status": {"active": 1}}
    stuck = job_state(job, [pod(waiting="ImagePullBackOff")], NOW)
    obs = Observed(configmap=True, stages={"rank": stuck})
    result, actions, reasons = run(body(), obs)
    assert actions == [] and result.status["phase"] == "Ranking" and reasons.count("Stalled") == 1
    stalled = next(c for c in result.status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ImagePullBackOff"
    assert "job-1-rank-x" in stalled["message"]
    # still stuck: no second event
    again, _, reasons = run(body(status=result.status), obs, LATER)
    assert "Stalled" not in reasons
    # the image arrived
    fine = Observed(configmap=True, stages={"rank": job_state(job, [], LATER)})
    recovered, _, _ = run(body(status=again.status), fine, LATER)
    assert conditions(recovered.status)["Stalled"] == "False"


# --- runPolicy.ttlSecondsAfterFinished and the spec hash (issue: behaviour on real clusters) ---


def test_a_finished_stage_whose_job_the_ttl_controller_deleted_stays_done():
    """The recorded completion says the stage is done; a missing child is not a stage to run."""
    status = {"specHash": plan(body(), Observed(), NOW).status["specHash"],
              "stages": {"rank": {"startTime": NOW, "completionTime": NOW}, "partition": {"startTime": NOW}}}  # fmt: skip
    result, actions, _ = run(body(status), Observed(configmap=True, stages={"partition": child("partition", "Running")}))
    assert actions == [] and result.status["phase"] == "Partitioning"


def test_ttl_counts_from_the_end_of_the_b3job():
    """Stage Jobs carry no TTL while the job runs; when it ends, each finished Job gets the TTL
    that makes the TTL controller delete it `ttl` seconds after the B3Job ended."""
    from b3.spec import parse_spec
    from b3_operator import children

    spec = {**SPEC, "runPolicy": {"ttlSecondsAfterFinished": 600}}
    (job,) = children.stage_child(body(**spec), parse_spec(spec), "rank")
    assert "ttlSecondsAfterFinished" not in job["spec"]
    finished = Observed(configmap=True, stages={
        "rank": child("rank", "Succeeded", completion_time="2026-11-23T09:00:00Z"),
        "partition": child("partition", "Succeeded", completion_time="2026-11-23T09:30:00Z"),
        "train": child("train", "Succeeded", completion_time=NOW)})  # fmt: skip
    result = plan(body(runPolicy={"ttlSecondsAfterFinished": 600}), finished, NOW)
    assert result.status["phase"] == "Succeeded"
    assert [(a.verb, a.name, a.manifest["ttl"]) for a in result.actions] == [
        ("expire", "job-1-rank", 600 + 3600), ("expire", "job-1-partition", 600 + 1800),
        ("expire", "job-1-train", 600)]  # fmt: skip
    failed = Observed(configmap=True, stages={
        "rank": child("rank", "Succeeded", completion_time=NOW),
        "partition": child("partition", "Failed", reason="PodFailurePolicy", completion_time=NOW)})  # fmt: skip
    result = plan(body(runPolicy={"ttlSecondsAfterFinished": 0}), failed, NOW)
    assert result.status["phase"] == "Failed"
    assert [(a.verb, a.name, a.manifest["ttl"]) for a in result.actions] == [
        ("expire", "job-1-rank", 0), ("expire", "job-1-partition", 0)]
    assert [a.verb for a in plan(body(), finished, NOW).actions] == []  # no TTL asked: none set


def test_the_spec_hash_survives_an_upgrade_that_adds_defaults():
    """The API server fills a new version's defaulted fields into every stored job: the hash
    must not see them, nor explicit defaults; a real change still shows; a hash recorded by
    0.1.0 (over the stored spec) is taken over."""
    from b3_operator.planner import _legacy_spec_hash, spec_hash

    filled = {**SPEC, "teacher": {"batchSize": 64, "pooling": "mean"}, "mining": {**SPEC["mining"], "p": 30},
              "training": {"lora": {"r": 8}}, "rank": {}}  # fmt: skip
    assert spec_hash(filled) == spec_hash(SPEC)
    assert spec_hash({**SPEC, "mining": {**SPEC["mining"], "p": 10}}) != spec_hash(SPEC)
    assert spec_hash({**SPEC, "suspend": True, "runPolicy": {"queueName": "q"}}) == spec_hash(SPEC)
    started_by_010 = {"specHash": _legacy_spec_hash(SPEC), "stages": {"rank": {"startTime": NOW}}}
    result, actions, events = run(body(started_by_010), observed(rank="Running"))
    assert "SpecChanged" not in events and result.status["specHash"] == spec_hash(SPEC)
    assert conditions(result.status).get("SpecChanged") is None


def test_a_foreign_object_with_a_childs_name_blocks_until_it_is_gone():
    """Never adopt or wait on another owner's ConfigMap or Job: Blocked, one Warning Event,
    nothing created; once it is gone, the job goes on."""
    foreign = Observed(foreign=["ConfigMap job-1-spec exists (owned by B3Job old)"])
    result, actions, events = run(body(), foreign)
    assert actions == [] and events == ["ForeignObject"]
    assert conditions(result.status)["Blocked"] == "True" and "job-1-spec" in result.status["message"]
    again, actions, events = run(body(result.status), foreign, LATER)
    assert actions == [] and events == []  # the Event once
    freed, actions, _ = run(body(again.status), Observed(), LATER)
    assert actions[0] == ("create", "ConfigMap", "job-1-spec") and conditions(freed.status)["Blocked"] == "False"


def test_a_refused_create_fails_the_job_with_the_servers_message():
    from b3_operator.planner import create_refused

    result = create_refused(body(), {"phase": "Ranking"}, "Job", "job-1-rank", 422,
                            'Job.batch "job-1-rank" is invalid: spec.template.spec.volumes[2].name: Invalid value: "Bad_Name"', NOW)  # fmt: skip
    assert result.status["phase"] == "Failed" and "Bad_Name" in result.status["message"]
    failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "CreateRefused" and "(422)" in failed["message"]
    assert [e[1] for e in result.events] == ["CreateRefused"]


def test_a_job_that_cannot_create_pods_is_stalled_and_a_startup_deadline_fails_it():
    job = {"metadata": {"name": "job-1-rank"}, "spec": {"parallelism": 1}, "status": {}}
    why = 'Error creating: pods "job-1-rank-x" is forbidden: error looking up service account ns/nobody'
    state = job_state(job, [], NOW, failed_create=why)
    assert state.state == "Running" and not state.started
    assert state.problem == ("FailedCreate", f"Job job-1-rank: {why}")
    assert job_state({**job, "status": {"ready": 1, "active": 1}}, [], NOW).started

    spec = {"stages": {"rank": {"startupDeadlineSeconds": 600}}}
    status = {"specHash": plan(body(**spec), Observed(), NOW).status["specHash"],
              "stages": {"rank": {"startTime": NOW}}}  # fmt: skip
    stuck = Observed(configmap=True, stages={"rank": state})
    early, _, events = run(body(status, **spec), stuck, "2026-11-23T10:05:00Z")
    assert early.status["phase"] == "Ranking" and conditions(early.status)["Stalled"] == "True"
    assert "Stalled" in events
    late, _, events = run(body(early.status, **spec), stuck, "2026-11-23T10:11:00Z")
    assert late.status["phase"] == "Failed" and events == ["StartupDeadlineExceeded"]
    failed = next(c for c in late.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StartupDeadlineExceeded" and "service account ns/nobody" in failed["message"]
    running = Observed(configmap=True, stages={"rank": job_state({**job, "status": {"ready": 1, "active": 1}}, [], NOW)})
    assert run(body(status, **spec), running, "2026-11-23T10:11:00Z")[0].status["phase"] == "Ranking"


def test_training_progress_on_the_resource():
    """status.training from rank 0's metrics: percent at once, the seconds left from the step
    rate between two samples; `progress` carries the percent while training."""
    from b3_operator.planner import progress_due, training_progress

    first = training_progress(None, {"step": 100, "totalSteps": 1000, "loss": 0.51234567}, NOW)
    assert first == {"step": 100, "totalSteps": 1000, "percent": 10.0, "loss": 0.51235, "updateTime": NOW}
    later = training_progress(first, {"step": 400, "totalSteps": 1000, "loss": 0.4}, "2026-11-23T10:01:00Z")
    assert later["remainingSeconds"] == 120 and later["percent"] == 40.0  # 300 steps a minute
    assert not progress_due({"training": later}, "2026-11-23T10:01:20Z")
    assert progress_due({"training": later}, "2026-11-23T10:01:30Z") and progress_due({}, NOW)

    status = {"specHash": plan(body(), Observed(), NOW).status["specHash"]}
    obs = observed(rank="Succeeded", partition="Succeeded", train="Running")
    obs.training = {"step": 250, "totalSteps": 1000, "loss": 0.3}
    result, _, _ = run(body(status), obs)
    assert result.status["training"]["percent"] == 25.0
    assert result.status["progress"] == "2/3 (train 25.0%)"


def test_the_operator_reads_progress_from_a_real_training_metrics_endpoint():
    import socket

    from b3.metrics import TrainMetrics
    from b3_operator.handlers import read_training_progress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics = TrainMetrics("job-1", 1000)
    metrics.serve(port, addr="127.0.0.1")
    metrics.observe_step(42, 0.5, 0.9, 1e-4, 1.0, 64, 0.1)
    url = f"http://127.0.0.1:{port}/metrics"
    assert read_training_progress(url, "job-1") == {"step": 42.0, "totalSteps": 1000.0, "loss": 0.5}
    assert read_training_progress(url, "another-job") is None
    assert read_training_progress("http://127.0.0.1:9/metrics", "job-1", timeout=0.5) is None


# --- whole-gang restart of training ------------------------------------------------------------

TRAINING = {"rank": "Succeeded", "partition": "Succeeded"}


def failed_gang(**kw) -> Observed:
    obs = observed(**TRAINING)
    kw.setdefault("reason", "BackoffLimitExceeded")
    obs.stages["train"] = ChildState("Job", kw.pop("name", "job-1-train"), "Failed", **kw)
    return obs


def test_a_failed_training_pod_restarts_the_whole_gang_as_a_new_job():
    result, actions, reasons = run(body(), failed_gang(exit_codes=(1,), message="NCCL timeout"))
    assert actions == [("create", "Job", "job-1-r1")] and "TrainingRestarted" in reasons
    job = result.actions[0].manifest
    assert job["metadata"]["labels"]["b3.dev/attempt"] == "1"
    assert job["metadata"]["annotations"]["b3.dev/restarts"] == "1"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1 and job["spec"]["backoffLimit"] == 0
    # the new gang finds its rank 0 under the same Service, by its own hostnames
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--rdzv-endpoint") + 1] == "job-1-r1-0.job-1-train:29400"
    assert job["spec"]["template"]["spec"]["subdomain"] == "job-1-train"
    assert result.status["restarts"] == 1 and result.status["phase"] == "Training"
    assert result.status["stages"]["train"]["child"] == "job-1-r1"
    message = next(m for _, r, m in result.events if r == "TrainingRestarted")
    assert "job-1-train failed (BackoffLimitExceeded, exit code 1)" in message and "restart 1 of 3" in message


def test_restarts_stop_at_max_restarts_and_the_job_fails_saying_so():
    obs = failed_gang(name="job-1-r3", attempt=3, restarts=3, exit_codes=(1,), message="CUDA error")
    result, actions, reasons = run(body(), obs)
    assert actions == [] and result.status["phase"] == "Failed" and "StageFailed" in reasons
    assert "CUDA error" in result.status["message"] and "after 3 restarts" in result.status["message"]
    more = body(training={"maxRestarts": 5})
    assert [a for _, a, _ in [run(more, obs)]] == [[("create", "Job", "job-1-r4")]]


def test_a_disruption_restarts_without_counting():
    obs = failed_gang(name="job-1-r3", attempt=3, restarts=3, exit_codes=(143,), disrupted=True)
    result, actions, _ = run(body(), obs)
    assert actions == [("create", "Job", "job-1-r4")]
    assert result.status["restarts"] == 3 and result.actions[0].manifest["metadata"]["annotations"]["b3.dev/restarts"] == "3"
    assert "not counted" in next(m for _, r, m in result.events if r == "TrainingRestarted")


@pytest.mark.parametrize("kw", [{"exit_codes": (1, 2), "reason": "PodFailurePolicy"},
                                {"reason": "DeadlineExceeded"},
                                {"exit_codes": (1,), "attempt": 999, "disrupted": True}],
                         ids=["bad input in any worker", "the stage's deadline", "out of attempt names"])  # fmt: skip
def test_failures_a_restart_cannot_mend_fail_the_job_at_once(kw):
    result, actions, _ = run(body(), failed_gang(message="train: dataset.columns: column 'id' missing", **kw))
    assert actions == [] and result.status["phase"] == "Failed"


def test_an_operator_restarted_after_creating_the_next_gang_adopts_it():
    obs = observed(**TRAINING)
    obs.stages["train"] = ChildState("Job", "job-1-r1", "Running", attempt=1, restarts=1)
    obs.previous = [ChildState("Job", "job-1-train", "Failed", "BackoffLimitExceeded", exit_codes=(1,))]
    result, actions, _ = run(body(), obs)  # the status patch of the restart was lost
    assert actions == [] and result.status["restarts"] == 1 and result.status["phase"] == "Training"


def test_every_gang_gets_its_ttl_when_the_job_ends():
    obs = observed(**TRAINING)
    obs.stages["train"] = ChildState("Job", "job-1-r1", "Succeeded", attempt=1, restarts=1, completion_time=NOW)
    obs.previous = [ChildState("Job", "job-1-train", "Failed", "BackoffLimitExceeded", completion_time=NOW)]
    result, actions, _ = run(body(runPolicy={"ttlSecondsAfterFinished": 60}), obs)
    assert result.status["phase"] == "Succeeded"
    assert {a[2] for a in actions if a[0] == "expire"} == {"job-1-rank", "job-1-partition", "job-1-train", "job-1-r1"}


def test_job_state_reads_exit_codes_disruption_and_the_bad_input_message():
    job = {"metadata": {"name": "job-1-r2", "labels": {"b3.dev/attempt": "2"}, "annotations": {"b3.dev/restarts": "1"}},
           "spec": {}, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                                  "message": "Container stage for pod ns/x failed with exit code 2 matching FailJob rule at index 0"}]}}  # fmt: skip

    def pod(code, message, finished, conditions=()):
        return {"metadata": {"name": f"p{code}"}, "status": {"conditions": list(conditions), "containerStatuses": [
            {"state": {"terminated": {"exitCode": code, "message": message, "finishedAt": finished}}}]}}  # fmt: skip

    state = job_state(job, [pod(2, "column 'id' missing", NOW), pod(1, "rendezvous closed", LATER)])
    assert (state.attempt, state.restarts, state.exit_codes) == (2, 1, (1, 2))
    assert state.message == "column 'id' missing" and not state.disrupted  # the cause, not the newest
    evicted = pod(143, "", NOW, [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}])
    assert job_state(job, [evicted]).disrupted


# --- Kueue: it starts and stops queued children ------------------------------------------------


def queued(state: str = "Suspended", **kw) -> Observed:
    obs = Observed(configmap=True)
    obs.stages["rank"] = ChildState("Job", "job-1-rank", state, queue="gpu", **kw)
    return obs


PENDING = ("Pending", "couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default, 1 more needed")


def test_a_child_kueue_holds_is_queued_with_kueues_reason_and_never_resumed():
    b = body(runPolicy={"queueName": "gpu"})
    result, actions, reasons = run(b, queued(workload="job-job-1-rank-1", admission=PENDING))
    assert actions == [] and reasons == ["Queued"]
    assert result.status["phase"] == "Queued" and "insufficient unused quota" in result.status["message"]
    queued_condition = next(c for c in result.status["conditions"] if c["type"] == "Queued")
    assert (queued_condition["status"], queued_condition["reason"]) == ("True", "Pending")
    assert conditions(result.status)["Running"] == "False"
    # admitted: Kueue unsuspended it
    again, actions, reasons = run({**b, "status": result.status}, queued("Running", workload="job-job-1-rank-1"), LATER)
    assert actions == [] and again.status["phase"] == "Ranking" and "Queued" not in reasons
    assert conditions(again.status)["Queued"] == "False"


def test_suspend_goes_through_the_kueue_workload():
    held = queued("Running", workload="w-1")
    result, actions, _ = run(body(suspend=True, runPolicy={"queueName": "gpu"}), held)
    assert actions == [("deactivate", "Workload", "w-1")] and result.status["phase"] == "Suspended"
    stopped = queued(workload="w-1", workload_active=False, admission=("Deactivated", "inactive"))
    assert run(body(suspend=True, runPolicy={"queueName": "gpu"}), stopped)[1] == []
    result, actions, _ = run(body(runPolicy={"queueName": "gpu"}), stopped)
    assert actions == [("activate", "Workload", "w-1")]


def test_a_queued_stage_is_not_created_while_the_job_is_suspended():
    result, actions, _ = run(body(suspend=True, runPolicy={"queueName": "gpu"}), Observed(configmap=True))
    assert actions == [] and result.status["phase"] == "Suspended"
    result, actions, _ = run(body(runPolicy={"queueName": "gpu"}), Observed(configmap=True))
    (job,) = [a.manifest for a in result.actions]
    assert job["spec"]["suspend"] is True and "b3.dev/suspended" not in job["metadata"].get("annotations", {})


def test_only_children_the_operator_suspended_are_resumed():
    ours = observed(rank="Suspended")
    ours.stages["rank"] = child("rank", "Suspended", suspended_by_us=True)
    assert run(body(), ours)[1] == [("resume", "Job", "job-1-rank")]
    other = observed(rank="Suspended")  # suspended by someone else (another controller)
    result, actions, reasons = run(body(), other)
    assert actions == [] and result.status["phase"] == "Queued" and reasons == ["Queued"]
    # created suspended for a suspended job: marked as ours
    (cm, job) = [a.manifest for a in plan(body(suspend=True), Observed(), NOW).actions]
    assert job["spec"]["suspend"] is True and job["metadata"]["annotations"]["b3.dev/suspended"] == "true"


def test_kueue_admission_from_the_workload():
    assert kueue_admission(None)["admission"][0] == "NoWorkload"
    admitted = {"metadata": {"name": "w"}, "spec": {"active": True},
                "status": {"conditions": [{"type": "QuotaReserved", "status": "True"}, {"type": "Admitted", "status": "True"}]}}  # fmt: skip
    assert kueue_admission(admitted) == {"workload": "w", "workload_active": True}
    pending = {"metadata": {"name": "w"}, "spec": {"active": False}, "status": {"conditions": [
        {"type": "QuotaReserved", "status": "False", "reason": "Pending", "message": PENDING[1]}]}}  # fmt: skip
    assert kueue_admission(pending) == {"workload": "w", "workload_active": False, "admission": PENDING}


# --- RayJob stages are watched like Jobs; deadlines come back on their own ------------------------


def ray_pod(phase: str, waiting: str | None = None) -> dict:
    statuses = [{"state": {"waiting": {"reason": waiting, "message": "no such image"}}}] if waiting else []
    return {"metadata": {"name": f"ray-{phase.lower()}"}, "status": {"phase": phase, "containerStatuses": statuses}}


def test_a_rayjob_is_started_once_head_and_workers_run_and_stuck_pods_say_why():
    rayjob = {"metadata": {"name": "job-1-rank"}, "spec": {"rayClusterSpec": {"workerGroupSpecs": [{"replicas": 2}]}},
              "status": {"jobDeploymentStatus": "Initializing"}}  # fmt: skip
    assert not rayjob_state(rayjob, None, [], NOW).started  # no KubeRay: no pods at all
    two = [ray_pod("Running"), ray_pod("Running")]
    assert not rayjob_state(rayjob, None, two, NOW).started
    assert rayjob_state(rayjob, None, [*two, ray_pod("Running")], NOW).started
    stuck = rayjob_state(rayjob, None, [*two, ray_pod("Pending", "ImagePullBackOff")], NOW)
    assert stuck.problem[0] == "ImagePullBackOff" and "ray-pending" in stuck.problem[1]


def test_a_pending_startup_deadline_asks_to_be_rechecked_when_it_falls_due():
    b = body(stages={"rank": {"startupDeadlineSeconds": 30}}, status={"startTime": NOW,
             "stages": {"rank": {"startTime": NOW, "child": "job-1-rank"}}})  # fmt: skip
    waiting = Observed(configmap=True, stages={"rank": child("rank", "Running", started=False)})
    result = plan(b, waiting, "2026-11-23T10:00:10Z")
    assert result.status["phase"] == "Ranking" and result.recheck == 21  # 30 - 10 + 1
    assert plan(b, waiting, "2026-11-23T10:00:31Z").status["phase"] == "Failed"
    started = Observed(configmap=True, stages={"rank": child("rank", "Running")})
    assert plan(b, started, "2026-11-23T10:00:10Z").recheck is None
    assert plan(body(stages={"rank": {"startupDeadlineSeconds": 30}}), Observed(configmap=True), NOW).recheck == 31


def test_a_restarted_gang_gets_its_own_startup_deadline():
    b = body(stages={"train": {"startupDeadlineSeconds": 60}}, status={"startTime": NOW,
             "stages": {"rank": {"completionTime": NOW}, "partition": {"completionTime": NOW},
                        "train": {"startTime": NOW, "child": "job-1-train"}}})  # fmt: skip
    result, actions, _ = run(b, failed_gang(exit_codes=(1,)), LATER)  # an hour into training
    assert actions == [("create", "Job", "job-1-r1")]
    assert result.status["stages"]["train"]["attemptStartTime"] == LATER
    obs = observed(**TRAINING)
    obs.stages["train"] = ChildState("Job", "job-1-r1", "Running", attempt=1, restarts=1, started=False)
    again = plan({**b, "status": result.status}, obs, "2026-11-23T11:00:30Z")
    assert again.status["phase"] == "Training" and again.recheck == 31  # not failed: 30 s of 60
