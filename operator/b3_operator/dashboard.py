"""The Grafana dashboard of B3Jobs, as data (Grafana's classic dashboard JSON model).

    python -m b3_operator.dashboard > charts/b3-operator/dashboards/b3-operator.json

The chart ships it in a ConfigMap for Grafana's dashboard sidecar. Tests type-check it against
`@grafana/schema`, check that every metric it queries exists in the code's registries, and run
every query against a real Prometheus scraping a CPU training run.
"""

from __future__ import annotations

import json
import sys
from typing import Any

JOB = 'b3job=~"$b3job"'

# (title, unit, [(PromQL, legend)], width, panel type)
PANELS: list[tuple[str, str, list[tuple[str, str]], int, str]] = [
    ("B3Jobs by phase", "none", [("sum by (phase) (b3_operator_jobs)", "{{phase}}")], 8, "bargauge"),
    ("Mean stage duration (last day)", "s", [
        ("sum by (stage) (increase(b3_operator_stage_duration_seconds_sum[1d])) / "
         "sum by (stage) (increase(b3_operator_stage_duration_seconds_count[1d]))", "{{stage}}")], 8, "bargauge"),
    ("Operator reconciles", "ops", [
        ("sum by (trigger) (rate(b3_operator_reconciles_total[5m]))", "{{trigger}}"),
        ("sum(rate(b3_operator_reconcile_errors_total[5m]))", "errors")], 8, "timeseries"),
    ("Ranking and partition progress", "percentunit", [
        (f"b3_stage_progress_done{{{JOB}}} / b3_stage_progress_total{{{JOB}}}", "{{b3job}} {{step}}")], 12, "timeseries"),
    ("Partition: edge cut and edges inside communities", "percentunit", [
        (f"b3_partition_edge_cut_share{{{JOB}}}", "{{b3job}} edge cut"),
        (f"b3_partition_s_edges_inside_share{{{JOB}}}", "{{b3job}} rank edges inside")], 6, "stat"),
    ("Batch hardness (top-K negative cosine)", "none", [
        (f"b3_batch_hardness{{{JOB}}}", "{{b3job}} {{batches}}")], 6, "stat"),
    ("Training progress", "percentunit", [
        (f"b3_train_step{{{JOB}}} / b3_train_total_steps{{{JOB}}}", "{{b3job}}")], 6, "gauge"),
    ("Training loss", "none", [(f"b3_train_loss{{{JOB}}}", "{{b3job}}")], 9, "timeseries"),
    ("In-batch accuracy", "percentunit", [(f"b3_train_inbatch_accuracy{{{JOB}}}", "{{b3job}}")], 9, "timeseries"),
    ("Examples per second", "none", [
        (f"sum by (b3job) (rate(b3_train_examples_total{{{JOB}}}[5m]))", "{{b3job}}")], 8, "timeseries"),
    ("Step time p50 / p95", "s", [
        (f"histogram_quantile(0.5, sum by (le, b3job) (rate(b3_train_step_seconds_bucket{{{JOB}}}[5m])))", "{{b3job}} p50"),
        (f"histogram_quantile(0.95, sum by (le, b3job) (rate(b3_train_step_seconds_bucket{{{JOB}}}[5m])))", "{{b3job}} p95")],
     8, "timeseries"),
    ("Learning rate", "none", [(f"b3_train_learning_rate{{{JOB}}}", "{{b3job}}")], 8, "timeseries"),
    ("Accelerator memory (peak)", "bytes", [
        (f"b3_train_accelerator_memory_bytes{{{JOB}}}", "{{b3job}} {{pod}}")], 12, "timeseries"),
    ("Checkpoint age", "s", [(f"b3_train_checkpoint_age_seconds{{{JOB}}}", "{{b3job}}")], 12, "timeseries"),
]  # fmt: skip


def _panel(
    i: int, x: int, y: int, title: str, unit: str, targets, width: int, kind: str
) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {
                "refId": chr(ord("A") + j),
                "expr": expr,
                "legendFormat": legend,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for j, (expr, legend) in enumerate(targets)
        ],  # fmt: skip
    }


def dashboard() -> dict[str, Any]:
    panels, x, y = [], 0, 0
    for i, (title, unit, targets, width, kind) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panels.append(_panel(i, x, y, title, unit, targets, width, kind))
        x += width
    return {
        "uid": "b3-operator",
        "title": "B3 jobs",
        "description": "B3Jobs: phases, stage durations, mining quality and training (b3-operator).",
        "tags": ["b3", "training", "embeddings"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "links": [],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "hide": 0,
                    "skipUrlSync": False,
                },
                {
                    "name": "b3job",
                    "label": "B3Job",
                    "type": "query",
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(b3_operator_job_phase, b3job)",
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                    "skipUrlSync": False,
                },
            ]
        },  # fmt: skip
        "panels": panels,
    }


def queries() -> list[str]:
    """Every PromQL expression of the dashboard, with $b3job matching all jobs."""
    return [expr.replace("$b3job", ".*") for _, _, targets, _, _ in PANELS for expr, _ in targets]


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
