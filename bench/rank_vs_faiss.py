"""Is our exact top-k ranking as fast as faiss-cpu's exact search, with the same neighbours?

Both rank the same float32 embeddings by inner product on the same number of threads, for
k = p + m = 130: ours with `b3.ranking.rank_topk` (on the CPU: matmul in cache-sized tiles, a
heap per query), faiss with `IndexFlatIP.search`. Prints one JSON object and saves it to bench/results/.

    python bench/rank_vs_faiss.py                       # synthetic: 20k queries x 100k, d=768
    python bench/rank_vs_faiss.py --work runs/debian-all-rows   # the rank stage's embeddings

Needs `pip install faiss-cpu` (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import machine
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from b3.ranking import rank_topk  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def synthetic(n_queries: int, n_corpus: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (like real embeddings: many near neighbours, few exact ties)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(n_corpus // 50, 1), dim)).astype(np.float32)
    corpus = centers[rng.integers(0, len(centers), n_corpus)] + 0.5 * rng.standard_normal(
        (n_corpus, dim), dtype=np.float32
    )
    queries = corpus[rng.integers(0, n_corpus, n_queries)] + 0.3 * rng.standard_normal(
        (n_queries, dim), dtype=np.float32
    )
    for x in (corpus, queries):
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return queries, corpus


def stage_embeddings(work: str, n_queries: int | None) -> tuple[np.ndarray, np.ndarray]:
    from b3.artifacts import read_embeddings
    from b3.storage import WorkDir

    q, p = read_embeddings(WorkDir(work))
    return (q if n_queries is None else q[:n_queries]), p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", help="a workDir whose rank stage finished (default: synthetic data)"
    )
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--corpus", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=130)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--budget-mib", type=int, default=1024, help="our score block budget")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the best counts")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json)")
    args = parser.parse_args()

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.work:
        queries, corpus = stage_embeddings(args.work, args.queries)
        source = f"rank stage embeddings in {args.work}"
    else:
        queries, corpus = synthetic(args.queries, args.corpus, args.dim, seed=0)
        source = "synthetic clustered unit vectors"
    queries, corpus = np.ascontiguousarray(queries), np.ascontiguousarray(corpus)

    def ours():
        return rank_topk(queries, corpus, args.k, budget_bytes=args.budget_mib << 20)

    def theirs():
        index = faiss.IndexFlatIP(corpus.shape[1])
        index.add(corpus)
        scores, idx = index.search(queries, args.k)
        return idx, scores

    timings = {"b3": [], "faiss": []}
    for _ in range(args.repeats):
        for name, fn in (("faiss", theirs), ("b3", ours)):
            start = time.perf_counter()
            result = fn()
            timings[name].append(time.perf_counter() - start)
            if name == "b3":
                our_idx, our_val = result
            else:
                faiss_idx, faiss_val = result

    same_rows = recall = 0
    for a, b in zip(our_idx, faiss_idx, strict=True):
        overlap = len(set(a.tolist()) & set(b.tolist()))
        same_rows += overlap == args.k
        recall += overlap / args.k
    # where sets differ, check it is only an exchange of equal scores at the k-th place
    kth_gap = float(np.abs(our_val[:, -1] - faiss_val[:, -1]).max())
    best = {name: min(ts) for name, ts in timings.items()}
    result = {
        "question": "b3 rank_topk vs faiss IndexFlatIP, exact inner-product top-k",
        "source": source,
        "queries": int(len(queries)),
        "corpus": int(len(corpus)),
        "dim": int(corpus.shape[1]),
        "k": args.k,
        "threads": args.threads,
        "seconds": {name: round(t, 3) for name, t in best.items()},
        "seconds_of_each_run": {name: [round(t, 3) for t in ts] for name, ts in timings.items()},
        "time_ratio_b3_over_faiss": round(best["b3"] / best["faiss"], 3),
        "rows_with_identical_neighbours": round(same_rows / len(queries), 6),
        "mean_recall_vs_faiss": round(recall / len(queries), 6),
        "max_abs_score_diff": float(np.abs(our_val - faiss_val).max()),
        "max_kth_score_gap": kth_gap,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "machine": machine.describe(),
        # faiss-cpu's wheel bundles an OpenBLAS that may not know a newer CPU (then set this)
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
    }
    print(json.dumps(result, indent=2))
    out = (
        Path(args.out)
        if args.out
        else RESULTS / ("rank_vs_faiss" + ("_stage" if args.work else "") + ".json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
