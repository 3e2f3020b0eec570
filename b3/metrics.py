"""Prometheus metrics of a training process, served over HTTP (prometheus-client).

Names are what the chart's dashboard and alerts query; `TRAIN_METRICS` lists them so tests can
check that every name a dashboard uses exists here.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> bool:
    """Serve `registry` on `port`. A port already taken (a hostNetwork neighbour, or pods that
    share one address) costs the metrics, not the work: a warning, and False."""
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as err:
        log.warning("metrics: cannot listen on %s:%d (%s); going on without a metrics endpoint", addr, port, err)
        return False
    return True

def linger_for_last_scrape() -> None:
    """Keep the process, and its metrics endpoint, alive for B3_METRICS_LINGER_SECONDS (the
    operator sets it on stage pods), so that the final values are scraped before it exits."""
    time.sleep(float(os.environ.get("B3_METRICS_LINGER_SECONDS", "0")))


TRAIN_METRICS = (
    "b3_train_step",
    "b3_train_total_steps",
    "b3_train_loss",
    "b3_train_inbatch_accuracy",
    "b3_train_examples_per_second",
    "b3_train_examples",  # counter: exposed as b3_train_examples_total
    "b3_train_step_seconds",  # histogram
    "b3_train_learning_rate",
    "b3_train_grad_norm",
    "b3_train_accelerator_memory_bytes",
    "b3_train_checkpoint_age_seconds",
)

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class TrainMetrics:
    """The training gauges for one job; `serve(port)` exposes them at /metrics."""

    def __init__(self, job: str, total_steps: int, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.job = job
        self.last_checkpoint = time.time()
        labels = ["b3job"]  # not "job": Prometheus reserves that for the scrape job

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(job)

        self.step = gauge("b3_train_step", "Optimizer steps done.")
        gauge("b3_train_total_steps", "Optimizer steps the job will run.").set(total_steps)
        self.loss = gauge(
            "b3_train_loss", "InfoNCE loss of the last step (mean over the global batch)."
        )
        self.accuracy = gauge(
            "b3_train_inbatch_accuracy", "Share of queries whose own positive scored highest."
        )
        self.throughput = gauge(
            "b3_train_examples_per_second", "Query-positive pairs per second, last step."
        )
        self.lr = gauge("b3_train_learning_rate", "Learning rate of the last step.")
        self.grad_norm = gauge("b3_train_grad_norm", "Gradient norm before clipping.")
        self.memory = gauge(
            "b3_train_accelerator_memory_bytes", "Peak accelerator memory allocated (0 on CPU)."
        )
        self.examples = Counter(
            "b3_train_examples", "Pairs trained on.", labels, registry=self.registry
        ).labels(job)
        self.step_seconds = Histogram(
            "b3_train_step_seconds",
            "Wall time of one optimizer step.",
            labels,
            buckets=STEP_BUCKETS,
            registry=self.registry,
        ).labels(job)
        Gauge("b3_train_checkpoint_age_seconds", "Seconds since the last checkpoint (or the start).", labels,
              registry=self.registry).labels(job).set_function(lambda: time.time() - self.last_checkpoint)  # fmt: skip

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        serve_metrics(self.registry, port, addr)

    def observe_step(
        self,
        step: int,
        loss: float,
        accuracy: float,
        lr: float,
        grad_norm: float,
        examples: int,
        seconds: float,
    ) -> None:
        self.step.set(step)
        self.loss.set(loss)
        self.accuracy.set(accuracy)
        self.lr.set(lr)
        self.grad_norm.set(grad_norm)
        self.examples.inc(examples)
        self.throughput.set(examples / seconds if seconds > 0 else 0.0)
        self.step_seconds.observe(seconds)
        if torch.cuda.is_available():
            self.memory.set(torch.cuda.max_memory_allocated())

    def checkpoint_saved(self) -> None:
        self.last_checkpoint = time.time()
