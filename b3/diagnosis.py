"""Will B3 help on this data? What random batches already hold, and where each batch kind puts
the first step's gradient, from the rank and partition stages' output (no training).

B3 brings each query's rank window [p, p+m) into its batch. How much that adds depends on how
much of the window random batches hold already. A random batch of |B| rows drawn from the N_g
rows of the query's task holds, on average,

    E = (min(|B|, N_g) - 1) * w / (N_g - 1)

rows of its window (w = m, clamped for small tasks); drawn from the whole split, N_g becomes the
split's N. We report E per task and the measured counts in one epoch's batches of each kind.

Where the loss pushes matters more than what is present. For the InfoNCE loss of query i over
its batch's positives, with logits s(q_i, d_j) / tau, the gradient on the logit of a negative j
is its softmax weight

    g_ij = exp(s_ij / tau) / sum_k exp(s_ik / tau)

so the share of query i's negative gradient on a set S of its in-batch negatives is
sum_{j in S} g_ij / sum_{j negative} g_ij. We compute it from the teacher's cosines at the
student's temperature (the student at step 0, when it is the teacher or close to it), for S the
teacher's top p (ranks the mining skips: look-alikes, often false negatives) and the window, and
average it over queries. Rows with the query's own positive text are not negatives. Only the
query-to-document direction is measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from b3.artifacts import Artifacts, read_embeddings, read_topk
from b3.spec import B3Job
from b3.stages import epoch_batches

KINDS = ("random", "random_same_task", "b3")
# the readings' thresholds on E for same-task random batches, and the evidence behind them
# (docs/experiments.md): on Debian (E ~ 2 at |B| = 32) B3 trailed same-task random batches by
# 0.8-1.0 nDCG@10; the paper's largest gain (+14 at |B| = 32 on MMEB) has E ~ 0.06 and its gain at
# |B| = 1024 (E ~ 2) is +2.5
E_SATURATED = 1.0
E_SPARSE = 0.25


def expected_window_rows(batch_size: int, window: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """(N,) E for each row: window rows among the other rows of a random batch drawn from a
    pool of `pool` rows (its task's size, or the split's)."""
    others = np.minimum(batch_size, pool) - 1
    return others * window / np.maximum(pool - 1, 1)


def batch_of_rows(batches: Sequence[Sequence[int]], rows: int) -> np.ndarray:
    """(N,) each row's batch, -1 for rows in none (the last partial batch is dropped)."""
    batch_of = np.full(rows, -1, dtype=np.int64)
    for b, members in enumerate(batches):
        batch_of[np.asarray(members, dtype=np.int64)] = b
    return batch_of


def in_batch_counts(batch_of: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """(N,) how many of each row's ranked rows (-1 padded) sit in its own batch."""
    valid = ranked >= 0
    same = batch_of[np.maximum(ranked, 0)] == batch_of[:, None]
    return (same & valid).sum(1)


def in_batch_rows(batches: Sequence[Sequence[int]], rows: int, ranked: np.ndarray) -> np.ndarray:
    """`in_batch_counts` of these batches, NaN for rows in no batch."""
    batch_of = batch_of_rows(batches, rows)
    return np.where(batch_of >= 0, in_batch_counts(batch_of, ranked), np.nan)


def negative_gradient_shares(
    batches: Sequence[Sequence[int]],
    query_emb: np.ndarray,
    positive_emb: np.ndarray,
    positive_group: np.ndarray,
    sets: dict[str, np.ndarray],
    temperature: float,
) -> dict[str, np.ndarray]:
    """(N,) per named set of ranked rows (-1 padded): each query's share of its step-0 negative
    gradient on those rows, NaN for queries without a batch or without a negative."""
    rows = len(query_emb)
    q_all = torch.as_tensor(query_emb, dtype=torch.float64)
    p_all = torch.as_tensor(positive_emb, dtype=torch.float64)
    group = np.asarray(positive_group)
    out = {name: np.full(rows, np.nan) for name in sets}
    column = np.full(rows, -1, dtype=np.int64)  # a row's column in the batch at hand, else -1
    for members in batches:
        idx = np.asarray(members, dtype=np.int64)
        column[idx] = np.arange(len(idx))
        logits = (q_all[idx] @ p_all[idx].T) / temperature
        weight = torch.softmax(logits, dim=1).numpy()  # g_ij over the batch's columns
        negative = group[idx][:, None] != group[idx][None, :]
        total = (weight * negative).sum(1)
        for name, ranked in sets.items():
            cols = np.where(ranked[idx] >= 0, column[np.maximum(ranked[idx], 0)], -1)  # (b, w)
            r, c = np.nonzero(cols >= 0)
            inside = np.zeros_like(negative)
            inside[r, cols[r, c]] = True
            with np.errstate(invalid="ignore", divide="ignore"):
                share = (weight * (inside & negative)).sum(1) / total
            out[name][idx] = np.where(total > 0, share, np.nan)
        column[idx] = -1
    return out


def diagnose(job: B3Job, epoch: int = 0) -> dict:
    """Per task and overall, for random, same-task random and B3 batches of the manifest's
    |B|: E, the measured top-p and window rows in the batch, and the negative-gradient shares on
    them; with a reading (`reading`)."""
    spec = job.spec
    artifacts = Artifacts(spec)
    artifacts.require("rank")
    artifacts.require("partition")
    work = artifacts.work
    table, neighbors = read_topk(work, ["task", "group", "positive_group", "skip", "window"])
    clusters = work.read_parquet("partition", "clusters.parquet", columns=["cluster", "group"])
    q_emb, p_emb = read_embeddings(work)
    mining, rows = spec.mining, table.num_rows
    tasks = np.asarray(table.column("task").to_pylist(), dtype=object)
    _, group = np.unique(table.column("group").to_numpy(zero_copy_only=False), return_inverse=True)
    skip, window = table.column("skip").to_numpy(), table.column("window").to_numpy()
    rank = np.arange(neighbors.shape[1])[None, :]
    ranked = {
        "top_p": np.where(rank < skip[:, None], neighbors, -1),
        "window": np.where(
            (rank >= skip[:, None]) & (rank < (skip + window)[:, None]), neighbors, -1
        ),
    }
    group_size = np.bincount(group)[group]
    expected = {
        "random": expected_window_rows(mining.batch_size, window, np.full(rows, rows)),
        "random_same_task": expected_window_rows(mining.batch_size, window, group_size),
    }
    per_row: dict[str, dict[str, np.ndarray]] = {}
    for kind, batches in epoch_batches(clusters, mining, epoch, KINDS).items():
        shares = negative_gradient_shares(batches, q_emb, p_emb, table.column("positive_group").to_numpy(),
                                          ranked, spec.training.temperature)  # fmt: skip
        per_row[kind] = {
            "top_p_in_batch": in_batch_rows(batches, rows, ranked["top_p"]),
            "window_in_batch": in_batch_rows(batches, rows, ranked["window"]),
            "gradient_on_top_p": shares["top_p"],
            "gradient_on_window": shares["window"],
        }

    def summary(mask: np.ndarray) -> dict:
        return {
            "rows": int(mask.sum()),
            "expected_window_in_batch": {kind: float(e[mask].mean()) for kind, e in expected.items()},
            **{kind: {name: _mean(values[mask]) for name, values in stats.items()} for kind, stats in per_row.items()},
        }  # fmt: skip

    result = {
        "batch_size": mining.batch_size, "p": mining.p, "m": mining.m, "cluster_size": mining.cluster_size,
        "temperature": spec.training.temperature, "epoch": epoch,
        "overall": summary(np.ones(rows, dtype=bool)),
        "tasks": {str(t): summary(tasks == t) for t in sorted(set(tasks.tolist()), key=str)},
    }  # fmt: skip
    result["reading"] = reading(result["overall"])
    return result


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def reading(summary: dict) -> list[str]:
    """What the numbers say for this data, each line backed by a measurement (module doc)."""
    e = summary["expected_window_in_batch"]["random_same_task"]
    if e >= E_SATURATED:
        lines = [f"random same-task batches already hold ~{e:.1f} window neighbours per query: expect "
                 "little from B3 at this batch size (on Debian, E ~ 2, B3 trailed them by 0.8-1.0 nDCG@10)"]  # fmt: skip
    elif e < E_SPARSE:
        lines = [f"random same-task batches rarely hold a window neighbour (E = {e:.2f} per query): the "
                 "regime of the paper's largest gains (E ~ 0.06 at |B| = 32)"]  # fmt: skip
    else:
        lines = [f"random same-task batches hold {e:.2f} window neighbours per query: B3 can add some; "
                 "train against random same-task batches to see if it does"]  # fmt: skip
    b3 = summary["b3"]
    top_p, window = b3["gradient_on_top_p"], b3["gradient_on_window"]
    if top_p is not None and window is not None and top_p > window:
        lines.append(
            f"B3 batches put more of the first step's negative gradient on the teacher's top p "
            f"({top_p:.0%}, look-alikes, often false negatives) than on the window ({window:.0%}): a "
            "smaller clusterSize brings fewer look-alikes together"
        )
    return lines


def table_text(result: dict) -> str:
    """The diagnosis as aligned text: overall, then per task, then the reading."""
    lines = [f"where B3 can help: |B|={result['batch_size']}, p={result['p']}, m={result['m']}, "
             f"K={result['cluster_size']}, tau={result['temperature']}; per query: E and the measured window "
             "and top-p rows in its batch, and the share of its step-0 negative gradient on them",
             f"  {'task':<20}{'rows':>6}  {'batches':<18}{'E':>6}{'window':>8}{'top-p':>7}"
             f"{'grad top-p':>12}{'grad window':>13}"]  # fmt: skip
    for task, s in [("all", result["overall"]), *result["tasks"].items()]:
        for i, kind in enumerate(KINDS):
            head = f"{task[:20]:<20}{s['rows']:>6}" if i == 0 else " " * 26
            e = s["expected_window_in_batch"].get(kind)
            k = s[kind]
            lines.append(f"  {head}  {kind.replace('_', ' '):<18}{_fmt(e, '.2f'):>6}"
                         f"{_fmt(k['window_in_batch'], '.2f'):>8}{_fmt(k['top_p_in_batch'], '.2f'):>7}"
                         f"{_fmt(k['gradient_on_top_p'], '.0%'):>12}{_fmt(k['gradient_on_window'], '.0%'):>13}")  # fmt: skip
    lines += [f"  reading: {line}" for line in result["reading"]]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
