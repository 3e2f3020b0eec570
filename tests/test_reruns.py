"""Reruns stay correct, black box through `b3 run` on the quickstart's Debian rows (tiny random
model, 4 steps): a changed config trains again, SIGTERM leaves a checkpoint that the rerun
resumes, a crash between a stage's outputs and its manifest makes the next run redo it."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_manifest
from safetensors.torch import load_file

import b3.artifacts
from b3.artifacts import Artifacts
from b3.cli import main
from b3.spec import load_manifest

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


@pytest.fixture
def quickstart(tmp_path, tiny_model_dir) -> dict:
    """The quickstart manifest's spec with the tiny model, short texts and 4 steps."""
    spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
    spec["dataset"]["uri"] = str(QUICKSTART.parent / spec["dataset"]["uri"])
    spec["teacher"] = {"model": tiny_model_dir, "maxLength": 32}
    spec["training"].update(student=tiny_model_dir, maxLength=32, steps=4, checkpointEvery=2,
                            learningRate=0.01, lora={"targetModules": ["query", "value"]})  # fmt: skip
    spec["workDir"] = str(tmp_path / "work")
    return spec


def b3_run(tmp_path, spec: dict, capsys) -> str:
    assert main(["run", str(write_manifest(tmp_path, spec, "quickstart"))]) == 0
    return capsys.readouterr().out


def adapter(spec: dict) -> dict:
    path = os.path.join(spec["workDir"], "train", "final", "adapter", "adapter_model.safetensors")
    return load_file(path)


def differs(a: dict, b: dict) -> bool:
    return any(not (a[k] == b[k]).all() for k in a)


def changed(spec: dict, section: str, **fields) -> dict:
    spec = copy.deepcopy(spec)
    spec[section].update(fields)
    return spec


def test_a_changed_learning_rate_trains_again_and_changing_it_back_reuses_its_checkpoint(
    tmp_path, quickstart, capsys
):
    first = b3_run(tmp_path, quickstart, capsys)
    assert "train: done" in first
    weights = adapter(quickstart)

    faster = changed(quickstart, "training", learningRate=0.05)
    out = b3_run(tmp_path, faster, capsys)
    assert "rank: up to date" in out and "partition: up to date" in out
    assert "train: done" in out and "steps: 4" in out
    assert differs(adapter(faster), weights)

    back = b3_run(tmp_path, quickstart, capsys)  # its own checkpoint: no step trained again
    assert "train: done" in back
    assert not differs(adapter(quickstart), weights)
    assert "up to date" in b3_run(tmp_path, quickstart, capsys).split("train:")[1][:20]


def test_changed_prompts_train_again_and_layout_settings_do_not(tmp_path, quickstart, capsys):
    b3_run(tmp_path, quickstart, capsys)
    weights = adapter(quickstart)
    layout = changed(quickstart, "training", checkpointEvery=3, keepCheckpoints=1)
    assert "train: up to date" in b3_run(tmp_path, layout, capsys)
    prompted = changed(quickstart, "dataset", prompts={"query": "query: "})
    out = b3_run(tmp_path, prompted, capsys)
    assert "rank: up to date" in out  # the teacher does not use prompts here
    assert "train: done" in out and differs(adapter(prompted), weights)


def test_sigterm_during_training_checkpoints_that_step_and_the_rerun_resumes_there(
    tmp_path, quickstart
):
    spec = changed(quickstart, "training", steps=5000, checkpointEvery=1000)
    manifest = str(write_manifest(tmp_path, spec, "quickstart"))
    log = tmp_path / "run.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "b3.cli", "run", manifest],
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        deadline = time.time() + 300
        while '"step": 20,' not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    logs = log.read_text()
    assert proc.returncode == 143, logs[-3000:]
    stopped = int(logs.split("stopped by SIGTERM after step ")[1].split()[0])
    assert 20 <= stopped < 5000
    root = Artifacts(load_manifest(manifest).spec).checkpoint_root()
    assert os.listdir(root) == [f"step-{stopped:07d}"]  # that step, no half-written folder
    assert "train 1" in out or "(exit 143)" in out

    again = subprocess.run([sys.executable, "-m", "b3.cli", "run", manifest], capture_output=True,
                           text=True, env={**os.environ, "B3_FAULT_AT_STEP": str(stopped + 1)},
                           timeout=300)  # fmt: skip
    assert again.returncode == -9, again.stderr[-3000:]  # killed on purpose one step later
    assert f"resumed from {root}/step-{stopped:07d} (step {stopped}," in again.stderr


def test_sigterm_to_the_launcher_reaches_the_trainer_under_torchrun_and_it_checkpoints_that_step(
    tmp_path, quickstart
):
    """What a kubelet does to a training pod: SIGTERM to its first process, the launcher
    (b3_jobs.launch, torchrun), which forwards it to every worker's process group, DataLoader
    workers included. The workers finish the step in flight, checkpoint it and exit 143; the
    pod exits 143; the next gang resumes from that step."""
    spec = changed(quickstart, "training", steps=5000, checkpointEvery=1000, processesPerNode=2)
    manifest = str(write_manifest(tmp_path, spec, "quickstart"))
    assert main(["rank", manifest]) == 0 and main(["partition", manifest]) == 0
    launch = [sys.executable, "-m", "b3_jobs.launch", "--standalone", "--nproc-per-node", "2",
              "-m", "b3_jobs.train", manifest]  # what the operator's training pods run
    log = tmp_path / "train.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(launch, stdout=err, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while '"step": 20,' not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    logs = log.read_text()
    assert code == 143, logs[-3000:]
    assert "DataLoader worker" not in logs and "Traceback" not in logs, logs[-3000:]
    stopped = int(logs.split("stopped by SIGTERM after step ")[1].split()[0])
    root = Artifacts(load_manifest(manifest).spec).checkpoint_root()
    assert os.listdir(root) == [f"step-{stopped:07d}"]

    again = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "B3_FAULT_AT_STEP": str(stopped + 1)})  # fmt: skip
    assert f"resumed from {root}/step-{stopped:07d} (step {stopped}," in again.stdout + again.stderr


@pytest.mark.parametrize("stage", ["rank", "partition", "train"])
def test_a_crash_between_outputs_and_manifest_makes_the_next_run_redo_the_stage(
    tmp_path, quickstart, capsys, monkeypatch, stage
):
    """Config A finishes; config B (other mining and training) crashes after writing `stage`'s
    outputs but before its manifest; the next run of A must not trust B's outputs."""
    b3_run(tmp_path, quickstart, capsys)
    clusters = Artifacts(load_manifest(tmp_path / "quickstart.yaml").spec).work.read_parquet(
        "partition", "clusters.parquet"
    )
    other = changed(quickstart, "mining", p=5, clusterSize=4)
    other["training"]["learningRate"] = 0.05
    real_finish = b3.artifacts.Artifacts.finish

    def crash_before_manifest(self, name, summary, started):
        if name == stage:
            raise RuntimeError(f"node lost before the {name} manifest")
        return real_finish(self, name, summary, started)

    monkeypatch.setattr(b3.artifacts.Artifacts, "finish", crash_before_manifest)
    with pytest.raises(RuntimeError, match="node lost"):
        main(["run", str(write_manifest(tmp_path, other, "quickstart"))])
    monkeypatch.setattr(b3.artifacts.Artifacts, "finish", real_finish)
    capsys.readouterr()

    out = b3_run(tmp_path, quickstart, capsys)
    assert f"{stage}: done" in out, out
    art = Artifacts(load_manifest(tmp_path / "quickstart.yaml").spec)
    assert art.work.read_parquet("partition", "clusters.parquet").equals(clusters)
