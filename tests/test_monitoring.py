"""Monitoring: the dashboard (generated, type-checked against @grafana/schema with tsc), the
Prometheus Operator objects (validated against @kubernetes-models/prometheus-operator), every
metric the dashboard and alerts use exists in the code, and a real Prometheus scraping a CPU
training run answers every dashboard and alert query."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import require_program, write_manifest
from prometheus_client import CollectorRegistry

from b3 import stage_metrics
from b3.metrics import TrainMetrics
from b3_operator import dashboard
from b3_operator import metrics as operator_metrics

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "b3-operator"
JS = ROOT / "tests" / "js"
NODE = shutil.which("node")
needs_js = pytest.mark.skipif(
    NODE is None or not (JS / "node_modules").exists(),
    reason="needs node and `npm ci` in tests/js (.ci/run does it)",
)


def render(values: dict) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (pip)")
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="b3", namespace="b3-system")
    return [d for p, t in out.items() if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]


def alert_queries() -> list[str]:
    (rule,) = [
        o for o in render({"prometheusRule": {"enabled": True}}) if o["kind"] == "PrometheusRule"
    ]
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def exposed_names() -> set[str]:
    """Every sample name the code's registries can expose (counters end in _total, histograms
    in _bucket/_sum/_count)."""
    train = CollectorRegistry()
    TrainMetrics("x", 1, registry=train)
    names = set()
    for registry in (train, stage_metrics.REGISTRY, operator_metrics.REGISTRY):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""]
            )
            names |= {family.name + s for s in suffixes}
    return names | {"up"}  # Prometheus' own


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(b3_[a-z_]+|up)\b(?=\s*[{\[)\s]|$)", expr))


def test_chart_dashboard_is_generated():
    assert (CHART / "dashboards" / "b3-operator.json").read_text() == dashboard.render()
    (cm,) = [o for o in render({}) if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["b3-operator.json"]) == dashboard.dashboard()


def test_every_metric_in_the_dashboard_and_alerts_exists_in_the_code():
    exposed = exposed_names()
    used = set().union(*(metric_names(q) for q in [*dashboard.queries(), *alert_queries()]))
    assert used - exposed == set()
    panels = {p["title"] for p in dashboard.dashboard()["panels"]}
    for title in ["B3Jobs by phase", "Training loss", "Step time p50 / p95", "Checkpoint age",
                  "Ranking and partition progress", "Batch hardness (top-K negative cosine)"]:  # fmt: skip
        assert title in panels
    variables = {v["name"] for v in dashboard.dashboard()["templating"]["list"]}
    assert "b3job" in variables


@needs_js
def test_dashboard_type_checks_against_grafana_schema(tmp_path):
    def check(model: dict) -> subprocess.CompletedProcess:
        (tmp_path / "check.ts").write_text(
            "import type { Dashboard } from '@grafana/schema';\n\n"
            f"export const dashboard: Dashboard = {json.dumps(model, indent=2)};\n"
        )
        (tmp_path / "tsconfig.json").write_text(json.dumps({
            "compilerOptions": {"strict": True, "noEmit": True, "module": "esnext", "moduleResolution": "bundler",
                                "skipLibCheck": True, "types": [],
                                "paths": {"@grafana/schema": [str(JS / "node_modules" / "@grafana" / "schema")]}},
            "files": ["check.ts"]}))  # fmt: skip
        return subprocess.run([NODE, str(JS / "node_modules" / "typescript" / "bin" / "tsc"), "-p", "tsconfig.json"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip

    result = check(dashboard.dashboard())
    assert result.returncode == 0, result.stdout + result.stderr
    broken = dashboard.dashboard()
    broken["panels"][0]["gridPos"]["w"] = "wide"
    assert check(broken).returncode != 0  # the check bites


@needs_js
def test_prometheus_operator_objects_match_their_schemas():
    values = {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
              "prometheusRule": {"enabled": True}}  # fmt: skip
    objects = [o for o in render(values) if o["apiVersion"].startswith("monitoring.coreos.com")]
    assert sorted(o["kind"] for o in objects) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]

    def validate(objs) -> subprocess.CompletedProcess:
        return subprocess.run([NODE, str(JS / "validate-monitoring.mjs")], input=json.dumps(objs),
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    result = validate(objects)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = json.loads(json.dumps(objects))
    next(o for o in bad if o["kind"] == "ServiceMonitor")["spec"]["endpoints"][0]["interval"] = (
        "often"
    )
    assert validate(bad).returncode == 1


# --- a real Prometheus ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


@pytest.mark.slow
def test_prometheus_scraping_a_training_run_answers_every_query(tmp_path, tiny_spec, monkeypatch):
    require_program("prometheus", "prometheus")
    from b3.cli import main, stage_main

    # the operator's metrics, as a running operator would have them
    op_port, stage_port, train_port, prom_port = (free_port() for _ in range(4))
    operator_metrics.serve(op_port)
    operator_metrics.record_phase("ml/live", "Training")
    operator_metrics.RECONCILES.labels("update").inc()
    operator_metrics.RECONCILE_ERRORS.labels("update")
    # rank, then partition as a stage pod would run it (serving its metrics)
    monkeypatch.setattr(stage_metrics, "_job", None)
    spec = {**tiny_spec, "training": {**tiny_spec["training"], "steps": 100000, "checkpointEvery": 100000,
                                      "lora": {"targetModules": ["query", "value"]}}}  # fmt: skip
    manifest = str(write_manifest(tmp_path, spec, "live"))
    assert main(["rank", manifest]) == 0
    monkeypatch.setenv("B3_METRICS_PORT", str(stage_port))
    assert stage_main("partition", [manifest]) == 0
    # a CPU training run serving b3_train_* (stopped once Prometheus has what it needs)
    train = subprocess.Popen([sys.executable, "-m", "b3_jobs.train", manifest], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "B3_METRICS_PORT": str(train_port)})  # fmt: skip
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [
        {"job_name": "b3-b3-operator-metrics", "static_configs": [{"targets": [f"127.0.0.1:{op_port}"]}]},
        {"job_name": "b3-stages", "static_configs": [{"targets": [f"127.0.0.1:{stage_port}"]}]},
        {"job_name": "b3-train", "static_configs": [{"targets": [f"127.0.0.1:{train_port}"]}]}]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:  # enough scrapes of a stepping trainer for rate() and histogram_quantile()
            try:
                ready = prom_query(
                    prom_port,
                    "count_over_time(b3_train_step[1m]) >= 5 and changes(b3_train_step[1m]) > 1",
                )
                if ready["data"]["result"]:
                    break
            except OSError:
                pass
            assert train.poll() is None, "training ended before Prometheus saw it"
            assert time.time() < deadline, "Prometheus never scraped the training run"
            time.sleep(1)
        operator_metrics.record_stage("rank", "2026-11-23T10:00:00Z", "2026-11-23T10:05:00Z")
        operator_metrics.RECONCILES.labels("update").inc()
        time.sleep(3)  # two more scrapes: increase() and rate() see the change
        empty = []
        for expr in dashboard.queries():
            answer = prom_query(prom_port, expr)
            assert answer["status"] == "success", (expr, answer)
            if not answer["data"]["result"]:
                empty.append(expr)
        assert empty == [], f"dashboard queries without data: {empty}"
        for expr in alert_queries():
            assert prom_query(prom_port, expr)["status"] == "success", expr
            for name in metric_names(expr):  # each series an alert watches is there
                selector = 'up{job="b3-b3-operator-metrics"}' if name == "up" else name
                assert prom_query(prom_port, selector)["data"]["result"], (expr, name)
    finally:
        train.kill()
        prom.terminate()
        prom.wait(30)


@pytest.mark.slow
def test_a_nan_loss_fires_the_alert_in_a_real_prometheus_after_the_trainer_exited(tmp_path, tiny_spec):
    """The trainer stops at a NaN loss; it keeps its endpoint up for one last scrape, and the
    chart's own rule, evaluated by Prometheus, still fires once the series went stale."""
    require_program("prometheus", "prometheus")
    from b3.cli import main

    spec = {**tiny_spec, "training": {**tiny_spec["training"], "steps": 50, "checkpointEvery": 100,
                                      "lora": {"targetModules": ["query", "value"]}}}  # fmt: skip
    manifest = str(write_manifest(tmp_path, spec, "nan"))
    assert main(["rank", manifest]) == 0 and main(["partition", manifest]) == 0
    train_port, prom_port = free_port(), free_port()
    (rule,) = [o for o in render({"prometheusRule": {"enabled": True}}) if o["kind"] == "PrometheusRule"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(tmp_path / "rules.yaml")],
              "scrape_configs": [{"job_name": "b3-train", "static_configs": [{"targets": [f"127.0.0.1:{train_port}"]}]}]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        env = {**os.environ, "B3_METRICS_PORT": str(train_port), "B3_NAN_LOSS_AT_STEP": "3",
               "B3_METRICS_LINGER_SECONDS": "5"}  # fmt: skip
        train = subprocess.run([sys.executable, "-m", "b3_jobs.train", manifest], env=env,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        assert train.returncode == 1 and "loss is nan at step 3" in train.stderr, train.stderr[-2000:]
        deadline = time.time() + 30
        while not prom_query(prom_port, "up == 0")["data"]["result"]:  # the pod is gone
            assert time.time() < deadline, "Prometheus never saw the trainer go"
            time.sleep(1)
        time.sleep(3)
        assert prom_query(prom_port, "b3_train_loss")["data"]["result"] == []  # stale by now
        firing = prom_query(prom_port, 'ALERTS{alertname="B3TrainingLossNotFinite", alertstate="firing"}')
        assert [a["metric"]["b3job"] for a in firing["data"]["result"]] == ["nan"]
    finally:
        prom.terminate()
        prom.wait(30)


def test_a_taken_metrics_port_costs_the_metrics_not_the_work(caplog):
    """A stage whose metrics port is taken (pods sharing an address, hostNetwork) goes on
    without its endpoint: a warning, no exception (it used to crash the training pod)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        TrainMetrics("job", 10).serve(port)
        stage_metrics.serve("job", port)
    warnings = [r.getMessage() for r in caplog.records if "cannot listen" in r.getMessage()]
    assert len(warnings) == 2 and f":{port}" in warnings[0]
