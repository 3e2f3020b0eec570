"""The partition stage with METIS against KaMinPar (`mining.partitioner`), 10k to 1M nodes.

For each N, a synthetic rank output with m = 100 kept neighbours per row is written to a
work directory: rows belong to planted topics of 200, and list 70% topic-mates and 30% random
rows, like a teacher's ranking of a clustered corpus. Then `b3.stages.partition_stage` runs
end to end (read topk.parquet, build the mutual graph, partition, rebalance to exactly K,
stats, write clusters.parquet) once per partitioner, each in a fresh process so that peak
memory is its own; below 1M nodes each partitioner runs twice, and the two clusters.parquet
must be identical (deterministic for a seed).

    python bench/partition_scale.py                 # N = 10k, 100k, 1M; K = 32
    python bench/partition_scale.py --sizes 10000   # one size

Prints and saves JSON: per N and partitioner the stage's seconds, the partitioner's own
seconds inside it, peak RSS, the partitioner's edge cut, the edge cut after rebalancing to
exactly K, how many communities hold exactly K rows; and kaminpar / metis ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TOPIC = 200


def synthetic_window(n: int, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topic_of = rng.permutation(n) // TOPIC  # row -> topic
    members = np.argsort(topic_of, kind="stable")  # rows grouped by topic
    start = np.searchsorted(topic_of[members], topic_of)  # first member slot of each row's topic
    size = np.bincount(topic_of)[topic_of]
    own = members[start[:, None] + (rng.random((n, m)) * size[:, None]).astype(np.int64)]
    random = rng.integers(0, n, (n, m))
    return np.where(rng.random((n, m)) < 0.7, own, random)


def bench_spec(work: str, m: int, k: int, partitioner: str = "metis"):
    """The job whose partition stage the bench runs: one mining group, S = the m neighbours."""
    from b3.spec import parse_spec

    return parse_spec({
        "dataset": {"uri": os.path.join(work, "pairs.parquet")}, "workDir": work,
        "mining": {"p": 0, "m": m, "clusterSize": k, "batchSize": k * 2, "perTask": False, "mixTasks": True,
                   "partitioner": partitioner},
    })  # fmt: skip


def write_rank_output(work: str, n: int, m: int, k: int, seed: int) -> None:
    """A finished rank stage as the partition stage reads it (through `b3.artifacts`, so the
    partition stage's upstream check holds): the dataset file, topk.parquet, the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from b3.artifacts import Artifacts

    ids = pa.array(np.arange(n).astype(str))
    pq.write_table(pa.table({"id": ids, "query": ids, "positive": ids}), os.path.join(work, "pairs.parquet"))
    window = synthetic_window(n, m, seed)
    offsets = pa.array(np.arange(0, n * m + 1, m, dtype=np.int32))
    table = pa.table(
        {
            "row": pa.array(np.arange(n)),
            "id": ids,
            "task": pa.array(["all"] * n),
            "group": pa.array(["all"] * n),
            "positive_group": pa.array(np.arange(n)),
            "skip": pa.array(np.zeros(n, dtype=np.int32)),
            "window": pa.array(np.full(n, m, dtype=np.int32)),
            "neighbors": pa.ListArray.from_arrays(
                offsets, pa.array(window.ravel().astype(np.int32))
            ),
            "scores": pa.ListArray.from_arrays(
                offsets, pa.array(np.zeros(n * m, dtype=np.float32))
            ),
        }
    )
    artifacts = Artifacts(bench_spec(work, m, k))
    artifacts.begin("rank")
    artifacts.work.write_parquet(table, "rank", "topk.parquet")
    artifacts.work.write_bytes(b"", "rank", "embeddings.arrow")  # not read by the partition stage
    artifacts.finish("rank", {"rows": n, "synthetic": True}, time.time())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_stage(work: str, m: int, k: int, partitioner: str, queue) -> None:
    import hashlib

    from b3.artifacts import Artifacts
    from b3.spec import B3Job

    spec = bench_spec(work, m, k, partitioner)
    Artifacts(spec).invalidate("partition")  # a second run must compute, not skip
    from b3.stages import partition_stage  # imports are not the stage's work: clock starts after

    start = time.perf_counter()
    record = partition_stage(B3Job(spec=spec))
    seconds = time.perf_counter() - start
    clusters = Path(work, "partition", "clusters.parquet").read_bytes()
    queue.put({"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "stats": record["summary"],
               "clusters_sha256": hashlib.sha256(clusters).hexdigest()})  # fmt: skip


def in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "partition_scale.json"))
    args = parser.parse_args()

    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="b3-bench-") as work:
            write_rank_output(work, n, args.m, args.k, seed=0)
            row: dict = {"nodes": n, "m": args.m, "k": args.k}
            for partitioner in ("metis", "kaminpar"):
                runs = [in_child(run_stage, work, args.m, args.k, partitioner)
                        for _ in range(2 if n < 1_000_000 else 1)]  # fmt: skip
                stage, stats = runs[0], runs[0]["stats"]
                row["graph_edges"] = stats["graph_edges"]
                row[partitioner] = {
                    "stage_seconds": round(stage["seconds"], 2),
                    "partitioner_seconds": stats["partitioner_seconds"],
                    "peak_rss_gib": round(stage["peak_rss_gib"], 2),
                    "partitioner_edge_cut": stats["partitioner_edge_cut"],
                    "edge_cut_after_rebalance": stats["edge_cut"],
                    "communities_of_size_k": stats["communities_of_size_k"],
                    "communities": stats["communities"],
                    "community_size": stats["community_size"],
                    "deterministic": len({r["clusters_sha256"] for r in runs}) == 1 if len(runs) > 1 else None,
                }
            row["kaminpar_vs_metis"] = {
                "stage_speedup": round(row["metis"]["stage_seconds"] / row["kaminpar"]["stage_seconds"], 2),
                "edge_cut_ratio": round(row["kaminpar"]["edge_cut_after_rebalance"]
                                        / row["metis"]["edge_cut_after_rebalance"], 4),
                "peak_rss_ratio": round(row["kaminpar"]["peak_rss_gib"] / row["metis"]["peak_rss_gib"], 2),
            }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "question": "partition stage end to end: mining.partitioner metis (pymetis) vs kaminpar "
                    "(largek_fast, one thread), mutual S-graph",
        "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
