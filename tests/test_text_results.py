"""A text-only job gives exactly the results it gave before b3 took images: the same ranking,
the same communities, the same trained weights and the same evaluation.

The reference (tests/reference/text_job.json) was recorded by this module's `run_text_job`
at 1668dc2, the last commit before image columns (c490a52), with the torch and transformers
pinned in constraints.txt, on the CPU:

    git worktree add /tmp/before 1668dc2
    cd /tmp/before && PYTHONPATH=/tmp/before:/tmp/before/tests \\
        python /path/to/b3-operator/tests/test_text_results.py --record tests/reference/text_job.json

The job touches every text path that the image work went through: prompts per task, the
teacher's embedding and ranking, B3++ hard negatives, the top-p false-negative mask, GradCache,
LoRA with dropout, the export, and both evaluations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REFERENCE = Path(__file__).parent / "reference" / "text_job.json"
TEXTS = ["library parser module", "a font theme for the desktop", "kernel driver", "python tool"]


def job_spec(pairs: Path, model: str) -> dict:
    return {
        "dataset": {"uri": str(pairs), "columns": {"task": "task", "id": "id"}, "split": {"key": "source"},
                    "prompts": {"query": "query: ", "positive": "passage: ", "byTask": {"task1": {"query": "find: "}}}},
        "teacher": {"model": model, "maxLength": 32, "batchSize": 32, "usePrompts": True},
        "mining": {"p": 2, "m": 8, "clusterSize": 4, "batchSize": 16, "seed": 0, "hardNegatives": 2},
        "training": {"student": model, "maxLength": 32, "steps": 8, "miniBatchSize": 8, "falseNegatives": "top-p",
                     "learningRate": 0.001, "lora": {"targetModules": ["query", "value"]}},
        "workDir": "work",
    }  # fmt: skip


def run_text_job(folder: Path) -> dict:
    """Run the job with `b3 run` in `folder` and return what it computed."""
    from conftest import _tiny_bert, make_pairs, write_manifest

    from b3.cli import main
    from b3.teacher import TextEncoder

    model = _tiny_bert(folder / "tiny-bert", dropout=0.1)
    pq.write_table(make_pairs(240), folder / "pairs.parquet")
    manifest = write_manifest(folder, job_spec(folder / "pairs.parquet", model), name="text-job")
    assert main(["run", str(manifest)]) == 0
    work = folder / "work"
    final = TextEncoder(str(work / "train" / "final" / "model"), max_length=32, dtype="float32", device="cpu")
    results = json.loads((work / "eval" / "results.json").read_text())
    return {
        "topk": pq.read_table(work / "rank" / "topk.parquet").to_pydict(),
        "clusters": pq.read_table(work / "partition" / "clusters.parquet").to_pydict(),
        "embeddings": final.encode(TEXTS).tolist(),
        "eval": {name: {"mixed": {k: m[k] for k in ("ndcg@10", "recall@1", "recall@10", "mrr@10", "queries")},
                        "per_task": m["per_task"]} for name, m in results["models"].items()},
    }  # fmt: skip


def test_a_text_only_job_gives_the_results_it_gave_before_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got, expected = run_text_job(tmp_path), json.loads(REFERENCE.read_text())
    assert got["topk"] == expected["topk"]
    assert got["clusters"] == expected["clusters"]
    np.testing.assert_allclose(got["embeddings"], expected["embeddings"], rtol=0, atol=1e-6)
    assert got["eval"] == expected["eval"]


if __name__ == "__main__":  # record the reference: see the module's docstring
    import os
    import tempfile

    if sys.argv[1:2] != ["--record"] or len(sys.argv) != 3:
        sys.exit("usage: test_text_results.py --record REFERENCE.json")
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        record = run_text_job(Path(folder))
    Path(sys.argv[2]).write_text(json.dumps(record) + "\n")
