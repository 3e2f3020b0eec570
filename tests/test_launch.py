"""b3_jobs.launch: torchrun that keeps a worker's exit code 2 (bad input) and 143 (stopped
after a checkpoint), which plain torchrun reports as 1. Real torchrun, two CPU workers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from b3_jobs.launch import exit_code

WORKER = """
import os, sys, time
if int(os.environ["RANK"]) == 1:
    sys.exit(int(sys.argv[1]))
time.sleep(30 if sys.argv[1] != "0" else 0)  # rank 0 would wait on rank 1 (torchrun stops it)
"""


def launch(module: str, tmp_path, code: int) -> int:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [sys.executable, "-m", module, "--standalone", "--nproc-per-node", "2", str(script), str(code)]
    return subprocess.run(args, capture_output=True, timeout=120).returncode


@pytest.mark.parametrize("worker, pod", [(0, 0), (2, 2), (143, 143), (7, 1)])
def test_the_pod_exits_with_what_its_workers_mean(tmp_path, worker, pod):
    assert launch("b3_jobs.launch", tmp_path, worker) == pod


def test_plain_torchrun_loses_the_bad_input_code(tmp_path):
    assert launch("torch.distributed.run", tmp_path, 2) == 1  # why b3_jobs.launch exists


def test_exit_code_table():
    assert exit_code({2, -15}) == 2 and exit_code({1, 2}) == 2
    assert exit_code({143, -15}) == 143 and exit_code({143}) == 143
    assert exit_code({143, 1}) == 1 and exit_code({-9}) == 1
    assert exit_code({75, -15}) == 75 and exit_code({75, 1}) == 1 and exit_code({75, 2}) == 2


def test_a_stopped_pod_exits_143_after_its_workers(tmp_path):
    """SIGTERM to the pod's process (a deleted pod): torchrun passes it to the workers."""
    import signal
    import time

    script = tmp_path / "worker.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda *_: (open(sys.argv[1] + '.' + __import__('os').environ['RANK'], 'w').close(), sys.exit(143)))\n"
                      "time.sleep(60)\n")  # fmt: skip
    marker = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "b3_jobs.launch", "--standalone", "--nproc-per-node", "2",
                             str(script), str(marker)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(8)  # the workers are up
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert sorted(p.name for p in tmp_path.glob("stopped.*")) == ["stopped.0", "stopped.1"]  # each worker saw it


def test_b3_train_with_two_processes_exits_2_on_bad_input(tmp_path):
    """`b3 train` with processesPerNode 2 goes through the launcher too: a missing upstream
    stage is bad input in both workers, exit 2 with the message (plain torchrun: 1)."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    doc = yaml.safe_load((root / "examples" / "quickstart.yaml").read_text())
    doc["spec"].update(workDir=str(tmp_path / "work"))
    doc["spec"]["dataset"]["uri"] = str(root / "examples" / "data" / "debian-2k.parquet")
    doc["spec"]["training"]["processesPerNode"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    done = subprocess.run([sys.executable, "-m", "b3.cli", "train", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "partition stage output missing" in done.stderr
