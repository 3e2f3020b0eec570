"""B3 batches in sentence-transformers' trainer (b3.sentence_transformers): one process fits
on exactly the mined batches; two processes (torchrun, gloo) together hold exactly one mined
batch in every step; bad pairings are refused; the snippet of docs/sentence-transformers.md runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_manifest

from b3.cli import main

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "st" / "record_batches.py"


@pytest.fixture
def mined_job(tmp_path, tiny_spec):
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "prompts": {"query": "q: "}}}
    manifest = write_manifest(tmp_path, spec)
    assert main(["rank", str(manifest)]) == 0 and main(["partition", str(manifest)]) == 0
    return manifest


def mined_anchor_batches(manifest, epoch: int = 0) -> list[list[str]]:
    from b3.sentence_transformers import MinedBatches

    mined = MinedBatches(manifest)
    sampler = mined.rows.batch_sampler(mined.spec)
    return [[mined.rows.queries[i] for i in batch] for batch in sampler.batches(epoch=epoch)]


def record(manifest, tmp_path, steps: int, processes: int = 1) -> list[dict]:
    out = tmp_path / "seen"
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
              if processes > 1 else [sys.executable])  # fmt: skip
    done = subprocess.run([*launch, str(RECORD), str(manifest), str(out), str(steps)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((tmp_path / f"seen.{rank}.json").read_text()) for rank in range(processes)]


def test_one_process_trains_on_exactly_the_mined_batches(mined_job, tmp_path):
    (seen,) = record(mined_job, tmp_path, steps=3)
    expected = mined_anchor_batches(mined_job)
    assert seen["batches"][:3] == expected[:3]  # the prompt applied, the mined order kept
    assert all(a.startswith("q: ") for batch in seen["batches"] for a in batch)
    assert seen["weights_changed"]


def test_two_processes_together_hold_exactly_one_mined_batch_per_step(mined_job, tmp_path):
    ranks = record(mined_job, tmp_path, steps=4, processes=2)
    expected = mined_anchor_batches(mined_job)
    for step in range(4):
        chunks = [r["batches"][step] for r in ranks]
        assert all(len(c) == 8 for c in chunks)
        assert chunks[0] + chunks[1] == expected[step], step  # process i: the i-th chunk
    assert all(r["weights_changed"] and r["world"] == 2 for r in ranks)


def test_bad_pairings_are_refused(mined_job, tmp_path, tiny_spec):
    import datasets

    from b3.data import DataError
    from b3.sentence_transformers import MinedBatches

    mined = MinedBatches(mined_job)
    with pytest.raises(ValueError, match="the training dataset has 3 rows, the mined work directory 240"):
        mined.batch_sampler(datasets.Dataset.from_dict({"anchor": ["a"] * 3, "positive": ["b"] * 3}), 8)
    with pytest.raises(ValueError, match="per-device batch size 5 does not divide mining.batchSize 16"):
        mined.batch_sampler(mined.dataset(), 5)
    sampler = mined.batch_sampler(mined.dataset(), 8)
    assert len(sampler) == 2 * len(mined.rows.batch_sampler(mined.spec))
    with pytest.raises(DataError, match="was made for another spec"):
        MinedBatches(mined_job, ["mining.m=7"])  # the work directory was mined with m=8


def test_b3_plus_plus_negatives_are_columns_from_the_first_epoch(tmp_path, tiny_spec):
    spec = {**tiny_spec, "mining": {**tiny_spec["mining"], "hardNegatives": 2}}
    manifest = write_manifest(tmp_path, spec)
    assert main(["rank", str(manifest)]) == 0 and main(["partition", str(manifest)]) == 0
    from b3.artifacts import read_topk
    from b3.sentence_transformers import MinedBatches

    mined = MinedBatches(manifest)
    ds = mined.dataset()
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    hard = mined.rows.hard_negatives(mined.spec, *read_topk(mined.work, ["skip", "window"]))
    batch = mined.rows.batch_sampler(mined.spec).batches(epoch=0)[1]
    chosen = hard.sample(batch, epoch=0, batch_index=1).reshape(len(batch), 2)
    for row, negatives in zip(batch, chosen, strict=True):
        assert [ds[int(row)]["negative_1"], ds[int(row)]["negative_2"]] == [mined.rows.positives[i] for i in negatives]


def test_the_docs_snippet_runs(mined_job, tmp_path):
    page = (ROOT / "docs" / "sentence-transformers.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    (tmp_path / "job.yaml").write_text(Path(mined_job).read_text())
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "st-b3" / "final" / "config_sentence_transformers.json").exists()
