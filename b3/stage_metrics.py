"""Prometheus metrics of the rank and partition stages (training has `b3.metrics`).

A stage pod sets B3_METRICS_PORT; `serve` exposes these gauges there while the stage runs and
for B3_METRICS_LINGER_SECONDS after it ends, so the final values get scraped before the pod
exits. Every progress bar (`b3.progress`) feeds `b3_stage_progress_*`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from b3.metrics import linger_for_last_scrape, serve_metrics

STAGE_METRICS = (
    "b3_stage_progress_done",
    "b3_stage_progress_total",
    "b3_partition_edge_cut_share",
    "b3_partition_s_edges_inside_share",
    "b3_partition_communities",
    "b3_batch_hardness",
)

REGISTRY = CollectorRegistry()
PROGRESS_DONE = Gauge("b3_stage_progress_done", "Items done by a long step (embed, rank, partition).",
                      ["b3job", "step"], registry=REGISTRY)  # fmt: skip
PROGRESS_TOTAL = Gauge("b3_stage_progress_total", "Items a long step will process.", ["b3job", "step"],
                       registry=REGISTRY)  # fmt: skip
EDGE_CUT = Gauge("b3_partition_edge_cut_share", "Share of graph edges cut between communities.", ["b3job"],
                 registry=REGISTRY)  # fmt: skip
INSIDE = Gauge("b3_partition_s_edges_inside_share", "Share of rank-window edges inside a community.",
               ["b3job"], registry=REGISTRY)  # fmt: skip
COMMUNITIES = Gauge(
    "b3_partition_communities", "Communities made by the partition.", ["b3job"], registry=REGISTRY
)
HARDNESS = Gauge("b3_batch_hardness", "Mean top-K in-batch negative teacher cosine of epoch-0 batches.",
                 ["b3job", "batches"], registry=REGISTRY)  # fmt: skip

_job: str | None = None


def active_job() -> str | None:
    """The job whose stage metrics are being served in this process (None: not serving)."""
    return _job


def serve(job: str, port: int) -> None:
    global _job
    _job = job
    serve_metrics(REGISTRY, port)


def linger() -> None:
    """Keep the process (and its metrics endpoint) alive for a last scrape."""
    if _job is not None:
        linger_for_last_scrape()
