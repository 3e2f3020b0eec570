"""What does our partition stage cost beyond METIS itself, from 10k to 1M nodes?

For each N, a synthetic rank output with m = 100 kept neighbours per row is written to a
work directory: rows belong to planted topics of 200, and list 70% topic-mates and 30% random
rows, like a teacher's ranking of a clustered corpus. Then, each in a fresh process so that
peak memory is its own:

  stage:  `b3.stages.partition_stage` end to end (read topk.parquet, build the mutual graph,
          METIS, rebalance to exactly K, stats, write clusters.parquet)
  metis:  `pymetis.part_graph` alone on the same graph (built before the clock starts)

    python bench/partition_scale.py                 # N = 10k, 100k, 1M; K = 32
    python bench/partition_scale.py --sizes 10000   # one size

Prints JSON with seconds, overhead = stage / metis - 1, the same with the METIS call timed
inside the stage run (METIS's own time varies by +-10% between runs at 1M nodes), and peak RSS
of each process.
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


def bench_spec(work: str, m: int, k: int):
    """The job whose partition stage the bench runs: one mining group, S = the m neighbours."""
    from b3.spec import parse_spec

    return parse_spec({
        "dataset": {"uri": os.path.join(work, "pairs.parquet")}, "workDir": work,
        "mining": {"p": 0, "m": m, "clusterSize": k, "batchSize": k * 2, "perTask": False, "mixTasks": True},
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


def run_stage(work: str, m: int, k: int, queue) -> None:
    from b3.spec import B3Job

    spec = bench_spec(work, m, k)
    from b3.stages import partition_stage  # imports are not the stage's work: clock starts after

    start = time.perf_counter()
    record = partition_stage(B3Job(spec=spec))
    queue.put(
        {
            "seconds": time.perf_counter() - start,
            "peak_rss_gib": peak_rss_gib(),
            "stats": record["summary"],
        }
    )


def run_metis(work: str, k: int, queue) -> None:
    import pymetis

    from b3.graph import build_graph
    from b3.stages import read_topk
    from b3.storage import WorkDir

    _, neighbors = read_topk(WorkDir(work))
    graph = build_graph(neighbors, mutual=True)
    del neighbors
    adjacency = pymetis.CSRAdjacency(adj_starts=graph.indptr, adjacent=graph.indices)
    start = time.perf_counter()
    result = pymetis.part_graph(-(-graph.n // k), adjacency, options=pymetis.Options(seed=0))
    seconds = time.perf_counter() - start
    queue.put(
        {
            "seconds": seconds,
            "peak_rss_gib": peak_rss_gib(),
            "edge_cut": int(result.edge_cuts),
            "edges": graph.edges,
        }
    )


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
            metis = in_child(run_metis, work, args.k)
            stage = in_child(run_stage, work, args.m, args.k)
        row = {
            "nodes": n,
            "m": args.m,
            "k": args.k,
            "graph_edges": metis["edges"],
            "metis_seconds": round(metis["seconds"], 2),
            "stage_seconds": round(stage["seconds"], 2),
            "overhead": round(stage["seconds"] / metis["seconds"] - 1, 3),
            "metis_seconds_inside_stage": stage["stats"]["metis_seconds"],
            # the same METIS call timed inside the stage run: immune to METIS's run-to-run spread
            "overhead_within_stage": round(
                stage["seconds"] / stage["stats"]["metis_seconds"] - 1, 3
            ),
            "metis_process_peak_rss_gib": round(metis["peak_rss_gib"], 2),
            "stage_peak_rss_gib": round(stage["peak_rss_gib"], 2),
            "metis_edge_cut": metis["edge_cut"],
            "stage_edge_cut_after_rebalance": stage["stats"]["edge_cut"],
            "communities_of_size_k": stage["stats"]["communities_of_size_k"],
            "communities": stage["stats"]["communities"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "question": "partition stage end to end vs pymetis.part_graph alone (mutual S-graph)",
        "rows": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
