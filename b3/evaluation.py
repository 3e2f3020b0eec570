"""Retrieval evaluation on the held-out split: nDCG@10, Recall@1, Recall@10, MRR@10, two ways,
and MMEB's accuracy@1 where the queries have candidate lists.

Mixed: every query against one corpus, the split's positives deduplicated by exact text (a
query's one relevant document is its own positive text). Per task: every query only against
the deduplicated positives of its own task. Per task reports the micro average (over queries)
and the macro average (over tasks) beside one row per task.

Candidates (MMEB): a query given a candidate list (`dataset.columns.candidates`) is right when
its positive scores above every other candidate on its list; accuracy@1 is the share of such
queries, per task, with the macro average over tasks MMEB's score. The positive and the
candidates are embedded as documents (the task's positive prompt); candidates equal to the
positive (text and image) are the positive itself.

A query's rank is 1 + the number of candidate documents that score strictly higher, so ties are
resolved in the query's favour (as in most IR toolkits' exact scoring). With one relevant
document at rank r:  nDCG@10 = 1 / log2(r + 1) if r <= 10 else 0,  Recall@k = [r <= k],
MRR@10 = 1 / r if r <= 10 else 0.

Two models evaluated on the same queries are compared by a paired bootstrap: resample the
queries with replacement (within each task for the macro average, so every task keeps its
weight), take the difference of the two models' means on each resample, and report the 2.5th
and 97.5th percentiles of those differences as the 95% interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from b3.data import Pairs, side_keys, unique_texts
from b3.spec import PromptsSpec

METRICS = ("ndcg@10", "recall@1", "recall@10", "mrr@10")


def relevant_ranks(
    query_emb: np.ndarray, corpus_emb: np.ndarray, relevant: np.ndarray, block: int = 4096
) -> np.ndarray:
    """(n,) 1-based rank of each query's relevant document among all corpus documents."""
    q = torch.as_tensor(query_emb, dtype=torch.float32)
    c = torch.as_tensor(corpus_emb, dtype=torch.float32)
    rel = torch.as_tensor(
        np.array(relevant), dtype=torch.int64
    )  # a copy: Arrow arrays are read-only
    ranks = torch.empty(len(q), dtype=torch.int64)
    for start in range(0, len(q), block):
        scores = q[start : start + block] @ c.T  # (b, c)
        own = scores.gather(1, rel[start : start + block, None])  # (b, 1)
        ranks[start : start + block] = 1 + (scores > own).sum(1)
    return ranks.numpy()


def task_ranks(
    query_emb: np.ndarray, corpus_emb: np.ndarray, relevant: np.ndarray, tasks: np.ndarray
) -> np.ndarray:
    """(n,) rank of each query's relevant document among its own task's documents only.

    A task's documents are the corpus entries that are the positive of one of its queries."""
    relevant = np.asarray(relevant)
    ranks = np.empty(len(relevant), dtype=np.int64)
    for task in np.unique(tasks):
        rows = np.flatnonzero(tasks == task)
        documents = np.unique(relevant[rows])  # sorted corpus ids of this task
        local = np.searchsorted(documents, relevant[rows])
        ranks[rows] = relevant_ranks(query_emb[rows], corpus_emb[documents], local)
    return ranks


def per_query(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric's value for every query (float64 arrays), from its relevant rank."""
    ranks = np.asarray(ranks, dtype=np.float64)
    top10 = ranks <= 10
    return {
        "ndcg@10": np.where(top10, 1.0 / np.log2(ranks + 1), 0.0),
        "recall@1": (ranks <= 1).astype(np.float64),
        "recall@10": top10.astype(np.float64),
        "mrr@10": np.where(top10, 1.0 / ranks, 0.0),
    }


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    values = per_query(ranks)
    return {name: float(values[name].mean()) for name in METRICS} | {"queries": int(len(ranks))}


def per_task_metrics(ranks: np.ndarray, tasks: np.ndarray) -> dict:
    """Micro (over queries) and macro (over tasks) averages and one entry per task."""
    by_task = {str(t): metrics_from_ranks(ranks[tasks == t]) for t in np.unique(tasks)}
    macro = {name: float(np.mean([m[name] for m in by_task.values()])) for name in METRICS}
    return {"micro": metrics_from_ranks(ranks), "macro": macro | {"tasks": len(by_task)},
            "tasks": by_task}  # fmt: skip


def candidate_metrics(ranks: np.ndarray, tasks: np.ndarray) -> dict:
    """accuracy@1 of the queries with a candidate list (rank > 0): over queries (micro), the
    mean over tasks (macro, MMEB's score) and per task, with the mean list length."""
    listed = ranks > 0
    by_task = {str(t): {"accuracy@1": float(np.mean(ranks[listed & (tasks == t)] == 1)),
                        "queries": int(np.sum(listed & (tasks == t)))} for t in np.unique(tasks[listed])}  # fmt: skip
    return {"accuracy@1": float(np.mean(ranks[listed] == 1)) if listed.any() else 0.0,
            "macro": float(np.mean([m["accuracy@1"] for m in by_task.values()])) if by_task else 0.0,
            "queries": int(listed.sum()), "tasks": by_task}  # fmt: skip


@dataclass
class Ranks:
    """Per-query ranks of one model on a split, under every evaluation."""

    mixed: np.ndarray  # (n,) rank among the whole corpus
    task: np.ndarray  # (n,) rank among the query's task's documents
    tasks: np.ndarray  # (n,) task of each query
    corpus: int  # documents in the mixed corpus
    candidate: np.ndarray | None = None  # (n,) rank among the query's candidate list; 0: no list

    def summary(self) -> dict:
        """Mixed metrics at the top level (the table everyone reads), per-task ones under
        "per_task", MMEB's accuracy@1 under "candidates" where queries have candidate lists."""
        out = metrics_from_ranks(self.mixed) | {"corpus": self.corpus,
                                                "per_task": per_task_metrics(self.task, self.tasks)}  # fmt: skip
        if self.candidate is not None:
            out["candidates"] = candidate_metrics(self.candidate, self.tasks)
        return out


def candidate_ranks(encoder, pairs: Pairs, query_emb: np.ndarray, prompts: PromptsSpec | None) -> np.ndarray:
    """(n,) each query's positive's rank among its candidate list: 1 + the candidates that score
    strictly higher (ties go to the query, as above); 0 for a query without a list. Every
    distinct (prompted text, image) is embedded once."""
    lists = pairs.candidates
    listed = np.unique(lists.rows)
    ranks = np.zeros(len(pairs), dtype=np.int64)
    if not len(listed):
        return ranks
    positive_keys = side_keys(pairs.positives, pairs.positive_images)
    others = side_keys(lists.texts, lists.images) != positive_keys[lists.rows]  # (M,) not the positive itself
    rows = np.concatenate([listed, lists.rows[others]])  # the positives first, then the other candidates
    texts = np.concatenate([pairs.positives[listed], lists.texts[others]])
    images = None
    if pairs.positive_images is not None or lists.images is not None:
        def cells(array, picked):
            return np.full(len(picked), None, dtype=object) if array is None else array[picked]

        images = np.concatenate([cells(pairs.positive_images, listed), cells(lists.images, np.flatnonzero(others))])
    if prompts is not None:
        texts = np.asarray([prompts.for_task(pairs.tasks[r])[1] + t for r, t in zip(rows, texts, strict=True)],
                           dtype=object)  # fmt: skip
    _, which = unique_texts(side_keys(texts, images))  # (P + M',) index of each entry's distinct document
    first = np.unique(which, return_index=True)[1]
    emb = encoder.encode(texts[first].tolist(), desc="eval candidates",
                         images=None if images is None else images[first].tolist())  # fmt: skip
    scores = np.einsum("jd,jd->j", np.asarray(query_emb, dtype=np.float32)[rows], emb[which])  # (P + M',)
    positive_score = np.zeros(len(pairs), dtype=np.float32)
    positive_score[listed] = scores[: len(listed)]
    higher = scores[len(listed):] > positive_score[rows[len(listed):]]
    ranks[listed] = 1 + np.bincount(rows[len(listed):][higher], minlength=len(pairs))[listed]
    return ranks


def rank_encoder(encoder, pairs: Pairs, prompts: PromptsSpec | None = None) -> Ranks:
    """Ranks of one encoder (anything with .encode(texts, desc, images)) on a split's pairs.
    The corpus is the distinct positives (text and image), each query's relevant one its own;
    with candidate lists, each query's rank among its list too."""
    relevant = pairs.positive_group
    first = np.unique(relevant, return_index=True)[1]  # group ids are in first-seen order
    corpus = pairs.positives[first].tolist()
    queries = list(pairs.queries)
    if prompts is not None:
        queries = [prompts.for_task(t)[0] + q for t, q in zip(pairs.tasks, queries, strict=True)]
        # a positive shared by rows of several tasks takes the prompt of its first row
        first_task = {i: t for t, i in zip(pairs.tasks[::-1], relevant[::-1], strict=True)}
        corpus = [prompts.for_task(first_task[i])[1] + text for i, text in enumerate(corpus)]
    images = (None if pairs.query_images is None else pairs.query_images.tolist(),
              None if pairs.positive_images is None else pairs.positive_images[first].tolist())  # fmt: skip
    q_emb = encoder.encode(queries, desc="eval queries", images=images[0])
    c_emb = encoder.encode(corpus, desc="eval corpus", images=images[1])
    tasks = np.asarray(pairs.tasks, dtype=object)
    candidate = None if pairs.candidates is None else candidate_ranks(encoder, pairs, q_emb, prompts)
    return Ranks(mixed=relevant_ranks(q_emb, c_emb, relevant), task=task_ranks(q_emb, c_emb, relevant, tasks),
                 tasks=tasks, corpus=len(corpus), candidate=candidate)  # fmt: skip


def evaluate_encoder(encoder, pairs: Pairs, prompts: PromptsSpec | None = None) -> dict:
    """Metrics of one encoder on a split's pairs (`Ranks.summary`)."""
    return rank_encoder(encoder, pairs, prompts).summary()


def paired_bootstrap(
    base: np.ndarray,
    other: np.ndarray,
    strata: np.ndarray | None = None,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of `other - base` and its 95% paired bootstrap interval.

    Args:
        base, other: (n,) per-query values of two models on the same queries.
        strata: (n,) task of each query, for the macro average: queries are resampled within
            their task and the difference is the mean over tasks of the task means.
        resamples: bootstrap resamples.
    """
    diff = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(diff))] if strata is None else [
        np.flatnonzero(strata == s) for s in np.unique(strata)]  # fmt: skip
    estimate = float(np.mean([diff[g].mean() for g in groups]))
    means = np.zeros(resamples)
    chunk = max(1, 2_000_000 // max(1, len(diff)))  # bounded memory for the index matrix
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        for g in groups:
            picks = g[rng.integers(0, len(g), size=(n, len(g)))]
            means[start : start + n] += diff[picks].mean(1) / len(groups)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": estimate, "low": float(low), "high": float(high), "resamples": resamples}


def compare(base: Ranks, other: Ranks, metric: str = "ndcg@10", **bootstrap) -> dict[str, dict]:
    """`other - base` for one metric: mixed, per task micro, per task macro, with intervals;
    with candidate lists also accuracy@1 over them, macro over tasks (MMEB's score)."""
    if len(base.mixed) != len(other.mixed) or not np.array_equal(base.tasks, other.tasks):
        raise ValueError("the two models were not evaluated on the same queries")
    mixed_b, mixed_o = per_query(base.mixed)[metric], per_query(other.mixed)[metric]
    task_b, task_o = per_query(base.task)[metric], per_query(other.task)[metric]
    out = {
        "mixed": paired_bootstrap(mixed_b, mixed_o, **bootstrap),
        "per_task_micro": paired_bootstrap(task_b, task_o, **bootstrap),
        "per_task_macro": paired_bootstrap(task_b, task_o, strata=base.tasks, **bootstrap),
    }
    if base.candidate is not None and other.candidate is not None and (listed := base.candidate > 0).any():
        out["candidates_accuracy@1_macro"] = paired_bootstrap(
            base.candidate[listed] == 1, other.candidate[listed] == 1, strata=base.tasks[listed], **bootstrap)
    return out
