"""The operator's own Prometheus metrics (served by `handlers.configure` on B3_OPERATOR_METRICS_PORT)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from b3_operator.crd import PHASES
from b3_operator.planner import seconds_between

REGISTRY = CollectorRegistry()
RECONCILES = Counter("b3_operator_reconciles_total", "Reconciles of B3Jobs, by trigger.", ["trigger"],
                     registry=REGISTRY)  # fmt: skip
RECONCILE_ERRORS = Counter("b3_operator_reconcile_errors_total", "Reconciles that raised, by trigger.",
                           ["trigger"], registry=REGISTRY)  # fmt: skip
RECONCILE_SECONDS = Histogram(
    "b3_operator_reconcile_seconds", "Time of one reconcile.", registry=REGISTRY
)
JOBS = Gauge("b3_operator_jobs", "B3Jobs by phase.", ["phase"], registry=REGISTRY)
JOB_PHASE = Gauge("b3_operator_job_phase", "1 for each B3Job's current phase, 0 for the others.",
                  ["namespace", "b3job", "phase"], registry=REGISTRY)  # fmt: skip
STAGE_SECONDS = Histogram("b3_operator_stage_duration_seconds", "Wall time of finished stages.", ["stage"],
                          buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800),
                          registry=REGISTRY)  # fmt: skip

_phases: dict[str, str] = {}  # namespace/name -> phase, for the JOBS gauge


def record_phase(key: str, phase: str | None) -> None:
    """Track a job's phase (None: the job is gone) and refresh the per-phase counts."""
    namespace, _, name = key.partition("/")
    if phase is None:
        _phases.pop(key, None)
        for p in PHASES:
            with contextlib.suppress(KeyError):
                JOB_PHASE.remove(namespace, name, p)
    else:
        _phases[key] = phase
        for p in PHASES:
            JOB_PHASE.labels(namespace, name, p).set(1 if p == phase else 0)
    for p in PHASES:
        JOBS.labels(p).set(sum(1 for v in _phases.values() if v == p))


def record_stage(stage: str, start: str, end: str) -> None:
    STAGE_SECONDS.labels(stage).observe(max(seconds_between(start, end), 0.0))


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)
