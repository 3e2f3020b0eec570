"""What does mining cost per stage as the data grows: embed, rank and partition at 10k, 100k and
1M pairs, on this machine.

    python bench/mining_scale.py                      # N = 10k, 100k, 1M pairs; tasks of 10k rows
    python bench/mining_scale.py --sizes 10000 100000

Data: N synthetic pairs in tasks of `--task-size` rows (per-task mining, the default), each
task with 50 planted topics. Embeddings: d = 384 unit vectors (topic centroid plus noise; a
positive is its query plus noise), written through `b3.artifacts` as the rank stage's
embeddings side-file, so `b3.stages.rank_stage` ranks them without embedding. Then, each in a
fresh process (its own peak RSS):

  rank:       `rank_stage` end to end (exact top p+m per query inside its task, topk.parquet)
  partition:  `partition_stage` end to end (mutual graph, KaMinPar, exact K, clusters.parquet)
  embed:      the teacher (all-MiniLM-L6-v2, 128 tokens, batch 64) on `--embed-sample` real
              Debian descriptions, measured here; N pairs cost 2N texts at that rate (the
              Debian texts' lengths, no deduplication): an estimate from a measured rate,
              marked as such

Prints and saves JSON (bench/results/mining_scale.json): per N, seconds and peak RSS per stage,
and the scaling exponent between consecutive sizes (log time ratio / log size ratio).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import machine
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from partition_scale import in_child, peak_rss_gib  # noqa: E402 - bench/ is the script's folder

RESULTS = ROOT / "bench" / "results"
DIM, TOPICS = 384, 50


def bench_spec(work: str):
    from b3.spec import parse_spec

    return parse_spec({
        "dataset": {"uri": os.path.join(work, "pairs.parquet"), "columns": {"task": "task", "id": "id"}},
        "workDir": work, "mining": {"p": 30, "m": 100, "clusterSize": 32, "batchSize": 64},
    })  # fmt: skip


def write_inputs(work: str, n: int, task_size: int, seed: int) -> None:
    """The dataset file and the rank stage's embeddings side-file (current for the spec)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from b3.artifacts import Artifacts
    from b3.data import load_pairs

    ids = np.arange(n).astype(str)
    tasks = (np.arange(n) // task_size).astype(str)
    pq.write_table(pa.table({"id": ids, "query": np.char.add("q", ids), "positive": np.char.add("p", ids),
                             "task": tasks}), os.path.join(work, "pairs.parquet"))  # fmt: skip
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
    topic = rng.integers(0, TOPICS, n)
    q = centroids[topic] + 1.5 * rng.standard_normal((n, DIM), dtype=np.float32)
    p = q + 0.8 * rng.standard_normal((n, DIM), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    spec = bench_spec(work)
    pairs = load_pairs(spec.dataset, min_rows=spec.mining.batch_size)
    Artifacts(spec).write_embeddings(pairs.ids, q, p)


def run_stage(work: str, stage: str, queue) -> None:
    from b3.spec import B3Job
    from b3.stages import partition_stage, rank_stage

    start = time.perf_counter()
    record = {"rank": rank_stage, "partition": partition_stage}[stage](B3Job(spec=bench_spec(work)))
    queue.put({"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib(), "summary": record["summary"]})


def run_embed(sample: int, queue) -> None:
    import pyarrow.parquet as pq
    import torch

    from b3.teacher import TextEncoder

    texts = pq.read_table(ROOT / "examples" / "data" / "debian-2k.parquet").column("positive").to_pylist()
    texts = (texts * (sample // len(texts) + 1))[:sample]
    encoder = TextEncoder("sentence-transformers/all-MiniLM-L6-v2", max_length=128, batch_size=64)
    encoder.encode(texts[:64], desc="warm-up")
    start = time.perf_counter()
    encoder.encode(texts, desc="embed sample")
    seconds = time.perf_counter() - start
    queue.put({"texts_per_second": sample / seconds, "torch_threads": torch.get_num_threads()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--task-size", type=int, default=10_000)
    parser.add_argument("--embed-sample", type=int, default=1024)
    parser.add_argument("--out", default=str(RESULTS / "mining_scale.json"))
    args = parser.parse_args()

    embed = in_child(run_embed, args.embed_sample)
    print(json.dumps({"embed": embed}), flush=True)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="b3-mining-") as work:
            write_inputs(work, n, args.task_size, seed=0)
            rank = in_child(run_stage, work, "rank")
            partition = in_child(run_stage, work, "partition")
        row = {
            "pairs": n, "tasks": -(-n // args.task_size),
            "embed_seconds_estimated": round(2 * n / embed["texts_per_second"], 1),
            "rank_seconds": round(rank["seconds"], 2), "rank_peak_rss_gib": round(rank["peak_rss_gib"], 2),
            "partition_seconds": round(partition["seconds"], 2),
            "partition_peak_rss_gib": round(partition["peak_rss_gib"], 2),
            "communities_of_size_k": partition["summary"]["communities_of_size_k"],
            "communities": partition["summary"]["communities"],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    for before, after in zip(rows, rows[1:], strict=False):
        growth = math.log(after["pairs"] / before["pairs"])
        after["scaling_exponent"] = {
            stage: round(math.log(after[f"{stage}_seconds"] / before[f"{stage}_seconds"]) / growth, 2)
            for stage in ("rank", "partition")
        }
    result = {
        "question": "per-stage cost of mining from 10k to 1M pairs (tasks of 10k rows, p=30, m=100, K=32)",
        "embed": {**embed, "model": "all-MiniLM-L6-v2", "max_length": 128, "batch_size": 64,
                  "texts": "Debian package descriptions (examples/data/debian-2k.parquet)"},
        "rows": rows,
        "machine": machine.describe(),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
