"""The chart's alert rules: `promtool check rules` and `promtool test rules` (Debian's
prometheus package ships promtool), with a stalled-training case among the unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (pip)")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (Debian package prometheus)"
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "b3-operator"
UNIT_TESTS = ROOT / "tests" / "alerts" / "b3-alerts.test.yaml"


def rendered_rule() -> dict:
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render({"prometheusRule": {"enabled": True}}, name="b3", namespace="b3-system")
    return yaml.safe_load(out["b3-operator/templates/prometheusrule.yaml"])


@pytest.fixture
def rules_dir(tmp_path) -> Path:
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": rendered_rule()["spec"]["groups"]})
    )
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return tmp_path


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_are_valid(rules_dir):
    result = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_alert_unit_tests_pass(rules_dir):
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {r["alert"] for g in rendered_rule()["spec"]["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
              for t in case["alert_rule_test"]}  # fmt: skip
    assert names == tested == {"B3JobFailed", "B3TrainingStalled", "B3TrainingLossNotFinite",
                               "B3OperatorDown", "B3OperatorReconcileErrors"}  # fmt: skip


def test_a_broken_rule_is_caught(rules_dir):
    """The check is real: a typo in an expression fails it."""
    rules = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    rules["groups"][0]["rules"][0]["expr"] = "max by (namespace b3_operator_job_phase"
    (rules_dir / "rules.yaml").write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", "rules.yaml", cwd=rules_dir).returncode != 0


def test_stall_window_follows_values():
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(
            {"prometheusRule": {"enabled": True, "trainingStalledMinutes": 45}}, name="b3"
        )
    assert "changes(b3_train_step[45m])" in out["b3-operator/templates/prometheusrule.yaml"]
