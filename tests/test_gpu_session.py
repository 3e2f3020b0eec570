"""bench/gpu_session.py, the one command for a lent GPU: its dry mode runs every part on the
CPU (so the script cannot rot between GPU sessions), and it refuses clearly where it cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_bench

ROOT = Path(__file__).resolve().parents[1]
session = load_bench("gpu_session")


@pytest.mark.slow
def test_the_dry_run_goes_through_every_part_and_writes_each_result(tmp_path):
    out = tmp_path / "gpu_session.json"
    ran = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session.py"), "--dry", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry"] and result["device"]["packages"]["torch"]
    assert result["parts"]["embed"]["texts"] == 64 and result["parts"]["embed"]["tokens_per_s"] > 0
    assert result["parts"]["rank"]["rows"] == 64
    assert {(t["finetuning"], t["batch"]) for t in result["parts"]["train"]} == {("lora", 8), ("full", 8)}
    assert all(t["pairs_per_s"] > 0 for t in result["parts"]["train"])
    for name, cell in result["parts"]["experiments"].items():
        assert cell["status"] == "done", (name, cell)
        arms = {run["arm"] for run in json.loads(Path(cell["results"]).read_text())["runs"]}
        assert arms == {"random", "b3"}, name
    weak = json.loads(Path(result["parts"]["experiments"]["weak_full"]["results"]).read_text())
    assert weak["finetuning"] == "full" and "weak-student" in weak["student"]


def test_without_a_gpu_or_a_carry_it_says_what_to_do(tmp_path, capsys):
    if session.torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as stopped:
        session.main(["--carry", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert stopped.value.code == 2 and "no CUDA device here" in capsys.readouterr().err


def test_a_device_without_a_needed_package_runs_nothing_and_says_which(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(session, "required_packages", lambda: ["torch", "no-such-package-b3"])
    monkeypatch.setattr(session.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(session.torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(session.torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(session.torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 2**40}))
    carry = tmp_path / "carry"
    (carry / "teacher").mkdir(parents=True)
    (carry / "teacher" / "config.json").write_text("{}")
    out = tmp_path / "r.json"
    assert session.main(["--carry", str(carry), "--out", str(out)]) == 3
    assert "lacks no-such-package-b3: nothing ran" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["missing_packages"] == ["no-such-package-b3"] and saved["device"]["peak_bf16_flops"] == 989e12
    assert saved["parts"] == {}
