"""The partition stage with METIS against KaMinPar (`mining.partitioner`), 10k to 1M nodes.

For each N, a synthetic rank output with m = 100 kept neighbours per row is written to a
work directory: rows belong to planted topics of 200 and list distinct neighbours, never
themselves, 70% topic-mates and 30% from anywhere, like a teacher's ranking of a clustered
corpus. Then `b3.stages.partition_stage` runs end to end (read topk.parquet, build the mutual
graph, partition, rebalance to exactly K, stats, write clusters.parquet) with METIS, with
KaMinPar on one thread and with KaMinPar on --threads (mining.partitionerThreads), each in a
fresh process so that peak memory is its own; below 1M nodes each runs twice and the two
clusters.parquet are compared (one thread must be deterministic for a seed; more need not).

    python bench/partition_scale.py                 # N = 10k, 100k, 1M; K = 32
    python bench/partition_scale.py --sizes 10000   # one size

Prints and saves JSON: per N and variant the stage's seconds, the partitioner's own seconds
inside it, peak RSS, the partitioner's edge cut, the edge cut after rebalancing to exactly K,
how many communities hold exactly K rows; and each KaMinPar variant's ratios to METIS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import machine
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TOPIC = 200


def synthetic_window(n: int, m: int, seed: int) -> np.ndarray:
    """Each row's m ranked neighbours as the rank stage lists them (distinct, never the row
    itself): 70% from its own planted topic of TOPIC rows, 30% from anywhere."""
    assert n % TOPIC == 0, f"n must be a multiple of {TOPIC}"
    rng = np.random.default_rng(seed)
    members = rng.permutation(n).reshape(-1, TOPIC)  # topic t holds members[t]
    topic, slot = np.divmod(np.argsort(members.ravel()), TOPIC)  # each row's topic and place in it
    n_own = min(round(0.7 * m), TOPIC - 1)
    # slot + j * step (mod TOPIC), j = 1..n_own, are distinct and never slot when step is coprime
    steps = np.array([s for s in range(1, TOPIC) if np.gcd(s, TOPIC) == 1])
    step = rng.choice(steps, n)[:, None]
    own = members[topic[:, None], (slot[:, None] + np.arange(1, n_own + 1) * step) % TOPIC]
    window = np.concatenate([own, rng.integers(0, n, (n, m - n_own))], axis=1)
    check = np.arange(n)
    while len(check):  # redraw the rare rows whose random picks repeat a neighbour or the row
        ordered = np.sort(window[check], axis=1)
        repeats = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        check = check[repeats | (window[check, n_own:] == check[:, None]).any(axis=1)]
        window[check, n_own:] = rng.integers(0, n, (len(check), m - n_own))
    return window


def bench_spec(work: str, m: int, k: int, partitioner: str = "metis", threads: int = 1):
    """The job whose partition stage the bench runs: one mining group, S = the m neighbours."""
    from b3.spec import parse_spec

    return parse_spec({
        "dataset": {"uri": os.path.join(work, "pairs.parquet")}, "workDir": work,
        "mining": {"p": 0, "m": m, "clusterSize": k, "batchSize": k * 2, "perTask": False, "mixTasks": True,
                   "partitioner": partitioner, "partitionerThreads": threads},
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


def run_stage(work: str, m: int, k: int, partitioner: str, threads: int, queue) -> None:
    import hashlib

    from b3.artifacts import Artifacts
    from b3.spec import B3Job

    spec = bench_spec(work, m, k, partitioner, threads)
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
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="KaMinPar's threads in its second run (mining.partitionerThreads)")
    args = parser.parse_args()

    variants = [("metis", "metis", 1), ("kaminpar", "kaminpar", 1)]
    if args.threads > 1:
        variants.append((f"kaminpar_{args.threads}_threads", "kaminpar", args.threads))
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="b3-bench-") as work:
            write_rank_output(work, n, args.m, args.k, seed=0)
            row: dict = {"nodes": n, "m": args.m, "k": args.k}
            for name, partitioner, threads in variants:
                runs = [in_child(run_stage, work, args.m, args.k, partitioner, threads)
                        for _ in range(2 if n < 1_000_000 else 1)]  # fmt: skip
                stage, stats = runs[0], runs[0]["stats"]
                row["graph_edges"] = stats["graph_edges"]
                row[name] = {
                    "threads": threads,
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
            for name, _, _ in variants[1:]:
                row[f"{name}_vs_metis"] = {
                    "stage_speedup": round(row["metis"]["stage_seconds"] / row[name]["stage_seconds"], 2),
                    "edge_cut_ratio": round(row[name]["edge_cut_after_rebalance"]
                                            / row["metis"]["edge_cut_after_rebalance"], 4),
                    "peak_rss_ratio": round(row[name]["peak_rss_gib"] / row["metis"]["peak_rss_gib"], 2),
                }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "question": "partition stage end to end: mining.partitioner metis (pymetis) vs kaminpar "
                    "(largek_fast) on one thread and on --threads, mutual S-graph",
        "rows": rows,
        "machine": machine.describe(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
