"""Exact top-k ranking of positives for every query, within mining groups.

The rank matrix R (N x N) is never materialised: `rank_topk` scores a block of queries
against the candidate positives, masks the query's own positive and its exact duplicates,
keeps the top k, and moves on. On a GPU one block holds all candidates (its height set by the
memory budget) and torch.topk keeps the best. On the CPU the scores come in tiles small enough
to stay in cache, and a heap per query keeps the best k as the tiles pass: faiss's scheme,
which beats a full-row torch.topk on the CPU (see `_keep_largest`). With several workers the
blocks are spread over Ray tasks (GPUs or nodes).

Mining groups: by default rows are ranked only against rows of their own task. Tasks smaller
than `pool_below` rows are pooled into one group (they cannot fill a batch alone), and a group
with fewer candidates than p + m gets a proportionally smaller window (`clamp_window`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numba
import numpy as np
import torch

from b3.jit import compiled, use_threads
from b3.progress import progress
from b3.raycluster import ensure_ray, use_ray

POOLED = "__pooled__"
ALL = "__all__"


@dataclass(frozen=True)
class MiningGroups:
    names: list[str]  # group name per group index
    of_row: np.ndarray  # (N,) int64 group index of each row
    notes: list[str] = field(default_factory=list)  # what was pooled or merged, for the summary

    def rows(self, g: int) -> np.ndarray:
        return np.flatnonzero(self.of_row == g)


def assign_mining_groups(
    tasks: np.ndarray, per_task: bool, pool_below: int, batch_size: int
) -> MiningGroups:
    """Group rows for ranking and partitioning.

    per_task False: one group. Otherwise one group per task, except that tasks with fewer
    than `pool_below` rows share the group POOLED; if that pool cannot fill one batch it
    joins the smallest regular task, so its rows still train.
    """
    if not per_task:
        return MiningGroups([ALL], np.zeros(len(tasks), dtype=np.int64))
    names, inverse, counts = np.unique(
        np.asarray(tasks, dtype=object), return_inverse=True, return_counts=True
    )
    tiny = counts < pool_below
    notes = []
    if tiny.all():  # nothing big enough: pooling everything is the same as one group
        notes.append(
            f"all {len(names)} tasks have fewer than {pool_below} rows: mined as one group"
        )
        return MiningGroups([POOLED], np.zeros(len(tasks), dtype=np.int64), notes)
    group_names = [str(n) for n in names[~tiny]]
    target = np.full(len(names), -1, dtype=np.int64)
    target[~tiny] = np.arange(len(group_names))
    if tiny.any():
        pooled_rows = int(counts[tiny].sum())
        if pooled_rows >= batch_size:
            group_names.append(POOLED)
            target[tiny] = len(group_names) - 1
            notes.append(
                f"{int(tiny.sum())} tasks with fewer than {pool_below} rows pooled into "
                f"{POOLED} ({pooled_rows} rows)"
            )
        else:
            smallest = int(np.flatnonzero(~tiny)[np.argmin(counts[~tiny])])
            target[tiny] = target[smallest]
            notes.append(
                f"{int(tiny.sum())} tasks with fewer than {pool_below} rows ({pooled_rows} rows, "
                f"less than one batch) joined the smallest task {str(names[smallest])!r}"
            )
    return MiningGroups(group_names, target[inverse], notes)


def clamp_window(candidates: int, p: int, m: int) -> tuple[int, int]:
    """(p, m) shrunk in proportion so that p + m <= candidates (m stays >= 1 while any remain)."""
    if p + m <= candidates:
        return p, m
    if candidates <= 0:
        return 0, 0
    p_new = (candidates * p) // (p + m)  # < candidates because m >= 1
    return p_new, candidates - p_new


def _excluded_pairs(query_groups: np.ndarray, sorted_groups: np.ndarray, order: np.ndarray):
    """(row, col) pairs where candidate col shares the positive group of query row."""
    starts = np.searchsorted(sorted_groups, query_groups, side="left")
    counts = np.searchsorted(sorted_groups, query_groups, side="right") - starts
    rows = np.repeat(np.arange(len(query_groups)), counts)
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, order[np.repeat(starts, counts) + offsets]


# CPU score tiles of 1024 queries x 4096 candidates (16 MiB of float32): on the 2-core Intel
# Xeon they were among the fastest shapes for both 20k x 100k x 768 (synthetic) and the Debian
# embeddings (d=384), where tiles from 1024 x 2048 to 4096 x 4096 were within this VM's
# run-to-run noise of each other (up to 40%). 4,000 x 100k x 768: blocks of full rows spent
# 3.2-3.4 s in the matmul (numpy's OpenBLAS no better) and 0.7-1.2 s in torch.topk; tiles of
# 512 x 16384 2.9 s in torch's (MKL) matmul and 0.4 s in the heaps; torch.topk per tile of
# 1024 x 8192 plus a merge 2.4 s.
# With few candidates the heaps weigh more: tasks of 10k (bench/mining_scale.py at 100k pairs,
# d=384) spent 3.2 s in them and 3.3 s in the matmul, the rank stage 10.5 s where full rows
# and torch.topk took 13.2 s. (A reservoir of 2k, faiss's other scheme, was slower than the
# heap here: 30.6 / 8.5 / 5.6 ms against 28.7 / 6.1 / 4.5 ms on three tiles of 1024 x 4096.)
CPU_TILE_ROWS, CPU_TILE_COLUMNS = 1024, 4096


def block_rows(candidates: int, budget_bytes: int) -> int:
    """Query rows per block so that a float32 score block stays within the budget."""
    return max(1, budget_bytes // (4 * max(1, candidates)))


def cpu_tile(candidates: int, budget_bytes: int) -> tuple[int, int]:
    """(query rows, candidate columns) of one CPU score tile within the budget."""
    columns = max(1, min(candidates, CPU_TILE_COLUMNS, budget_bytes // 4))
    return min(CPU_TILE_ROWS, block_rows(columns, budget_bytes)), columns


@compiled(inline="always")
def _sift_down(values, ids, size):
    """Restore the min-heap after its root changed."""
    at = 0
    while True:
        child = 2 * at + 1
        if child >= size:
            return
        if child + 1 < size and values[child + 1] < values[child]:
            child += 1
        if values[child] >= values[at]:
            return
        values[at], values[child] = values[child], values[at]
        ids[at], ids[child] = ids[child], ids[at]
        at = child


@compiled(parallel=True)
def _keep_largest(scores, first_column, values, ids):
    """Fold a score tile into each row's min-heap of the k best so far (values, ids: (rows, k),
    -inf and -1 while not full). A score enters only when it beats the heap's smallest, which
    after the first tiles few do, so most of the tile is one compare per score; -inf (masked)
    never enters, and of equal scores the first seen stays."""
    for row in numba.prange(scores.shape[0]):
        heap, heap_ids = values[row], ids[row]
        smallest = heap[0]
        for column in range(scores.shape[1]):
            score = scores[row, column]
            if score > smallest:
                heap[0], heap_ids[0] = score, first_column + column
                _sift_down(heap, heap_ids, heap.shape[0])
                smallest = heap[0]


def _cpu_topk(queries: torch.Tensor, positives: torch.Tensor, k: int, columns: int, excluded,
              buffer: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Top k of one query block, tile by tile: (ids (b, k) best first, -1 padded; scores)."""
    b = len(queries)
    values = np.full((b, k), -np.inf, dtype=np.float32)
    ids = np.full((b, k), -1, dtype=np.int64)
    for first in range(0, len(positives), columns):
        width = min(columns, len(positives) - first)
        tile = torch.matmul(queries, positives[first : first + width].T, out=buffer[: b * width].view(b, width))
        if excluded is not None:
            rows, cols = excluded
            inside = (cols >= first) & (cols < first + width)
            tile.numpy()[rows[inside], cols[inside] - first] = -np.inf
        _keep_largest(tile.numpy(), first, values, ids)
    best = torch.sort(torch.from_numpy(values), dim=1, descending=True)  # a third of a stable argsort's time
    return np.take_along_axis(ids, best.indices.numpy(), axis=1), best.values.numpy()


def rank_topk(
    queries: np.ndarray | torch.Tensor,
    positives: np.ndarray | torch.Tensor,
    k: int,
    query_groups: np.ndarray | None = None,
    positive_groups: np.ndarray | None = None,
    budget_bytes: int = 1 << 30,
    device: str | torch.device = "cpu",
    bar=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k positives by inner product for every query.

    Args:
        queries: (n, d) embeddings.
        positives: (c, d) candidate embeddings.
        k: neighbours kept per query.
        query_groups, positive_groups: (n,), (c,) ints; candidate j is never returned for
            query i when positive_groups[j] == query_groups[i] (own positive, duplicates).
        budget_bytes: bound on the score block held at once.
        device: where to compute ("cpu", "cuda", ...).

    Returns:
        indices (n, k) int64 into `positives`, -1 where fewer than k candidates remain;
        scores (n, k) float32, descending per row, -inf where the index is -1.
    """
    device = torch.device(device)
    n, c = len(queries), len(positives)
    k_eff = min(k, c)
    indices = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or k_eff == 0:
        return indices, scores
    masking = query_groups is not None
    if masking:
        order = np.argsort(positive_groups, kind="stable")
        sorted_groups = np.asarray(positive_groups)[order]
    q_t = torch.as_tensor(queries, dtype=torch.float32)
    pos = torch.as_tensor(positives, dtype=torch.float32).to(device).contiguous()
    if device.type == "cpu":
        step, columns = cpu_tile(c, budget_bytes)
        buffer = torch.empty(min(step, n) * columns, dtype=torch.float32)
        use_threads(torch.get_num_threads())  # the heaps as wide as the matmul
    else:
        step = block_rows(c, budget_bytes)
    for start in range(0, n, step):
        b = min(step, n - start)
        excluded = None
        if masking:
            excluded = _excluded_pairs(query_groups[start : start + b], sorted_groups, order)
        if device.type == "cpu":
            idx, vals = _cpu_topk(q_t[start : start + b], pos, k_eff, columns, excluded, buffer)
        else:
            s = q_t[start : start + b].to(device) @ pos.T  # (b, c)
            if excluded is not None:
                rows, cols = excluded
                s[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)] = -math.inf
            vals, idx = torch.topk(s, k_eff, dim=1)  # (b, k_eff) each, sorted descending
            vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
            idx[np.isneginf(vals)] = -1
        indices[start : start + b, :k_eff] = idx
        scores[start : start + b, :k_eff] = vals
        if bar is not None:
            bar.update(b)
    return indices, scores


@dataclass(frozen=True)
class RankUnit:
    """A slice of one group's queries: the unit of work a Ray task takes."""

    group: int
    rows: np.ndarray  # global rows of the queries in this unit
    candidates: np.ndarray  # global rows of the group's candidates


def _rank_unit(unit: RankUnit, q_emb, p_emb, positive_group, k, budget, device):
    idx, val = rank_topk(
        q_emb[unit.rows],
        p_emb[unit.candidates],
        k,
        query_groups=positive_group[unit.rows],
        positive_groups=positive_group[unit.candidates],
        budget_bytes=budget,
        device=device,
    )
    glob = np.where(idx >= 0, unit.candidates[np.maximum(idx, 0)], -1)
    return unit.rows, glob, val


def plan_units(groups: MiningGroups, workers: int, min_rows: int = 256) -> list[RankUnit]:
    """Split each group's queries so that `workers` tasks get similar amounts of work."""
    units = []
    total = sum(len(groups.rows(g)) ** 2 for g in range(len(groups.names)))
    for g in range(len(groups.names)):
        rows = groups.rows(g)
        share = (len(rows) ** 2) / max(total, 1)
        pieces = max(1, min(math.ceil(share * workers * 4), math.ceil(len(rows) / min_rows)))
        units.extend(RankUnit(g, chunk, rows) for chunk in np.array_split(rows, pieces))
    return units


def rank_groups(
    q_emb: np.ndarray,
    p_emb: np.ndarray,
    groups: MiningGroups,
    positive_group: np.ndarray,
    k: int,
    budget_bytes: int,
    device: str = "cpu",
    workers: int = 1,
    gpus_per_worker: float = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours (global row ids, -1 padded) and scores for every row, within groups.

    One worker and no RAY_ADDRESS: computed in this process. Otherwise the units run as Ray
    tasks on the cluster at RAY_ADDRESS, or on a Ray started here.
    """
    n = len(q_emb)
    neighbors = np.full((n, k), -1, dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    units = plan_units(groups, workers)
    with progress(n, "rank", unit="query") as bar:
        if not use_ray(workers):
            results = (
                _rank_unit(u, q_emb, p_emb, positive_group, k, budget_bytes, device) for u in units
            )
        else:
            results = _ray_rank(
                units, q_emb, p_emb, positive_group, k, budget_bytes, gpus_per_worker, workers
            )
        for rows, idx, val in results:
            neighbors[rows], scores[rows] = idx, val
            bar.update(len(rows))
    return neighbors, scores


def _ray_rank(units, q_emb, p_emb, positive_group, k, budget, gpus_per_worker, workers):
    """Yield unit results as Ray tasks finish, in completion order."""
    import ray

    ensure_ray(workers)
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    remote = ray.remote(num_cpus=1, num_gpus=gpus_per_worker)(_rank_unit)
    q_ref, p_ref, g_ref = ray.put(q_emb), ray.put(p_emb), ray.put(positive_group)
    pending = [remote.remote(u, q_ref, p_ref, g_ref, k, budget, device) for u in units]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
