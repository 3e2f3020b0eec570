"""The mining sweep: what other p, m, K, edges and mining scopes would give, before training.

From one rank stage's teacher embeddings (no new embedding, no training), for every point of a
grid it ranks (once per scope, with the widest window), builds the S-graph of ranks [p, p+m),
cuts it into communities of K, lays out one epoch of batches of |B| (the manifest's), and
measures those batches with the teacher:

    hardness         H_B^k: mean over queries of their k hardest in-batch negatives' cosine
                     (k fixed across the grid, so points compare), and its ratio to random
                     batches and to random batches of one task
    window_in_batch  rows of the query's own window [p, p+m) in its batch (what B3 aims for)
    top_p_in_batch   rows of the query's teacher top p in its batch (the ranks skipped as
                     likely false negatives, brought back by their shared neighbours)
    above_positive   share of queries with an in-batch negative the teacher scores above their
                     own positive (the GISTEmbed false-negative rule)
    s_inside         share of S-edges inside a community
    e_same_task      E: window rows a random batch of the query's mining group would hold
                     (`b3.diagnosis`); B3 has the most to add where it is small
    gradient_on_top_p, gradient_on_window
                     share of the step-0 negative gradient on the top p and on the window, from
                     the teacher's scores at training.temperature (`b3.diagnosis`)

Scopes: "per-task" ranks and cuts within each task, batches one task each (B3's default);
"whole-set" ranks the training split as one task (`perTask: false`, `mixTasks: true`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from b3.artifacts import Artifacts, read_embeddings
from b3.batches import B3BatchSampler, RandomBatchSampler
from b3.data import load_pairs
from b3.diagnosis import (
    batch_of_rows,
    expected_window_rows,
    in_batch_counts,
    negative_gradient_shares,
)
from b3.hardness import batch_hardness
from b3.progress import progress
from b3.ranking import assign_mining_groups, clamp_window, rank_groups
from b3.spec import B3Job, SpecError
from b3.stages import communities

SCOPES = ("per-task", "whole-set")


@dataclass
class Grid:
    p: list[int]
    m: list[int]
    k: list[int]
    edges: list[str]
    scopes: list[str]

    def problems(self, batch_size: int, rows: int) -> list[str]:
        errors = [f"--k {k} does not divide mining.batchSize ({batch_size})" for k in self.k if batch_size % k or k < 2]
        errors += [f"--edges {e}: mutual or union" for e in self.edges if e not in ("mutual", "union")]
        errors += [f"--scope {s}: {' or '.join(SCOPES)}" for s in self.scopes if s not in SCOPES]
        if max(self.p) + max(self.m) >= rows - 1:
            errors.append(f"p + m ({max(self.p) + max(self.m)}) must be below the training rows - 1 ({rows - 1})")
        return errors  # fmt: skip


def sweep(job: B3Job, grid: Grid, top_k: int) -> dict:
    """Batch statistics for every grid point (see the module docstring), with the random
    baselines' hardness; needs the rank stage's embeddings only."""
    spec = job.spec
    artifacts = Artifacts(spec)
    artifacts.require("rank")
    mining = spec.mining
    pairs = load_pairs(spec.dataset, min_rows=mining.batch_size)
    problems = grid.problems(mining.batch_size, len(pairs))
    if problems:
        raise SpecError(problems)
    q_emb, p_emb = read_embeddings(artifacts.work)
    task_groups = assign_mining_groups(pairs.tasks, True, mining.pool_below, mining.batch_size)
    random = {
        "random": RandomBatchSampler(len(pairs), mining.batch_size, mix_tasks=True, seed=mining.seed),
        "random_same_task": RandomBatchSampler(len(pairs), mining.batch_size, task_groups.of_row, seed=mining.seed),
    }  # fmt: skip
    baselines = {kind: batch_hardness(s.batches(0), q_emb, p_emb, pairs.positive_group, top_k)
                 for kind, s in random.items()}  # fmt: skip
    widest = max(grid.p) + max(grid.m)
    points = []
    windows = list(itertools.product(grid.p, grid.m))
    cuts = list(itertools.product(grid.k, grid.edges))
    with progress(len(windows) * len(cuts) * len(grid.scopes), "sweep", unit="point") as bar:
        for scope in grid.scopes:
            groups = task_groups if scope == "per-task" else assign_mining_groups(
                pairs.tasks, False, mining.pool_below, mining.batch_size)  # fmt: skip
            neighbors, _ = rank_groups(q_emb, p_emb, groups, pairs.positive_group, widest,
                                       budget_bytes=spec.rank.memory_budget_mib << 20)  # fmt: skip
            sizes = np.bincount(groups.of_row)
            for p, m in windows:  # what depends on the window only, once per window
                clamped = np.array([clamp_window(int(size) - 1, p, m) for size in sizes])
                skip, window = clamped[groups.of_row, 0], clamped[groups.of_row, 1]
                rank = np.arange(widest)[None, :]
                window_ranks = np.where((rank >= skip[:, None]) & (rank < (skip + window)[:, None]), neighbors, -1)
                top_p = np.where(rank < skip[:, None], neighbors, -1)
                for k, edges in cuts:
                    started = time.perf_counter()
                    point = mining.model_copy(update={"p": p, "m": m, "cluster_size": k, "edges": edges,
                                                      "per_task": scope == "per-task", "mix_tasks": scope == "whole-set"})  # fmt: skip
                    clusters, cut = communities(neighbors, groups.of_row, len(groups.names), skip, window, point)
                    batches = B3BatchSampler(clusters, mining.batch_size, groups.of_row, mix_tasks=point.mix_tasks,
                                             seed=mining.seed).batches(0)  # fmt: skip
                    batch_of = batch_of_rows(batches, len(pairs))
                    kept = batch_of >= 0
                    hard = batch_hardness(batches, q_emb, p_emb, pairs.positive_group, top_k)
                    shares = negative_gradient_shares(batches, q_emb, p_emb, pairs.positive_group,
                                                      {"top_p": top_p, "window": window_ranks},
                                                      spec.training.temperature)  # fmt: skip
                    points.append({
                        "scope": scope, "p": p, "m": m, "k": k, "edges": edges,
                        "hardness": hard["topk_negative"],
                        "vs_random": hard["topk_negative"] / baselines["random"]["topk_negative"],
                        "vs_random_same_task": hard["topk_negative"] / baselines["random_same_task"]["topk_negative"],
                        "window_in_batch": float(in_batch_counts(batch_of, window_ranks)[kept].mean()),
                        "top_p_in_batch": float(in_batch_counts(batch_of, top_p)[kept].mean()),
                        "above_positive": hard["above_positive"],
                        "s_inside": cut["s_edges_inside_share"],
                        "e_same_task": float(expected_window_rows(mining.batch_size, window, sizes[groups.of_row]).mean()),
                        "gradient_on_top_p": float(np.nanmean(shares["top_p"])),
                        "gradient_on_window": float(np.nanmean(shares["window"])),
                        "seconds": round(time.perf_counter() - started, 2),
                    })  # fmt: skip
                    bar.update(1)
    return {"rows": len(pairs), "batch_size": mining.batch_size, "top_k": top_k, "seed": mining.seed,
            "partitioner": mining.partitioner, "baselines": baselines, "points": points}  # fmt: skip


def table(result: dict) -> str:
    """The sweep as aligned text, best hardness first within each scope."""
    b = result["baselines"]
    lines = [f"mining sweep: {result['rows']} rows, |B|={result['batch_size']}, H_B^{result['top_k']} by the teacher; "
             f"random {b['random']['topk_negative']:.3f} (neg > pos {100 * b['random']['above_positive']:.1f}%), "
             f"random same task {b['random_same_task']['topk_negative']:.3f} "
             f"(neg > pos {100 * b['random_same_task']['above_positive']:.1f}%)",
             f"  {'scope':<10}{'p':>4}{'m':>5}{'K':>4}{'edges':>8}{'hardness':>10}{'/random':>9}{'/same task':>11}"
             f"{'window':>8}{'top-p':>7}{'neg>pos':>9}{'S inside':>10}{'E task':>8}{'grad top-p':>12}{'grad win':>10}"]  # fmt: skip
    for pt in sorted(result["points"], key=lambda x: (x["scope"], -x["hardness"])):
        lines.append(f"  {pt['scope']:<10}{pt['p']:>4}{pt['m']:>5}{pt['k']:>4}{pt['edges']:>8}{pt['hardness']:>10.3f}"
                     f"{pt['vs_random']:>8.2f}x{pt['vs_random_same_task']:>10.2f}x{pt['window_in_batch']:>8.2f}"
                     f"{pt['top_p_in_batch']:>7.2f}{100 * pt['above_positive']:>8.1f}%{100 * pt['s_inside']:>9.1f}%"
                     f"{pt['e_same_task']:>8.2f}{100 * pt['gradient_on_top_p']:>11.1f}%{100 * pt['gradient_on_window']:>9.1f}%")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Hardness against the false-negative proxy, one marker per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    markers = {k: m for k, m in zip(sorted({pt["k"] for pt in result["points"]}), "osD^v<>", strict=False)}
    ps = sorted({pt["p"] for pt in result["points"]})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(ps)))
    for pt in result["points"]:
        color = colors[ps.index(pt["p"])]
        ax.scatter(100 * pt["above_positive"], pt["vs_random_same_task"], marker=markers[pt["k"]],
                   facecolors=color if pt["scope"] == "per-task" else "none", edgecolors=color,
                   alpha=0.9 if pt["edges"] == "mutual" else 0.5, s=20 + pt["m"] / 2)  # fmt: skip
    for p, color in zip(ps, colors, strict=True):
        ax.scatter([], [], color=color, label=f"p={p}")
    for k, marker in markers.items():
        ax.scatter([], [], marker=marker, color="gray", label=f"K={k}")
    same_task = result["baselines"]["random_same_task"]["topk_negative"]
    for kind, marker in (("random", "X"), ("random_same_task", "P")):
        base = result["baselines"][kind]
        ax.scatter(100 * base["above_positive"], base["topk_negative"] / same_task, marker=marker, color="black",
                   s=60, label=kind.replace("_", " "))  # fmt: skip
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("queries with an in-batch negative scored above their positive (%)")
    ax.set_ylabel(f"H_B^{result['top_k']} / random same task")
    ax.set_title("filled: per task, hollow: whole set; size: m; faint: union edges", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
