"""Retrieval evaluation on the held-out split: nDCG@10, Recall@1, Recall@10, MRR@10.

Corpus = the split's positives, deduplicated by exact text; a query's one relevant document
is its own positive text. Its rank is 1 + the number of corpus documents that score strictly
higher, so ties are resolved in the query's favour (as in most IR toolkits' exact scoring).

With one relevant document at rank r:  nDCG@10 = 1 / log2(r + 1) if r <= 10 else 0,
Recall@k = [r <= k],  MRR@10 = 1 / r if r <= 10 else 0; each averaged over queries.
"""

from __future__ import annotations

import numpy as np
import torch

from b3.data import Pairs, unique_texts
from b3.spec import PromptsSpec


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


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    top10 = ranks <= 10
    return {
        "ndcg@10": float(np.mean(np.where(top10, 1.0 / np.log2(ranks + 1), 0.0))),
        "recall@1": float(np.mean(ranks <= 1)),
        "recall@10": float(np.mean(top10)),
        "mrr@10": float(np.mean(np.where(top10, 1.0 / ranks, 0.0))),
        "queries": int(len(ranks)),
    }


def evaluate_encoder(encoder, pairs: Pairs, prompts: PromptsSpec | None = None) -> dict[str, float]:
    """Metrics of one encoder (anything with .encode(texts, desc)) on a split's pairs."""
    unique, relevant = unique_texts(pairs.positives)
    corpus = unique.tolist()
    queries = list(pairs.queries)
    if prompts is not None:
        queries = [prompts.for_task(t)[0] + q for t, q in zip(pairs.tasks, queries, strict=True)]
        # a positive shared by rows of several tasks takes the prompt of its first row
        first_task = {i: t for t, i in zip(pairs.tasks[::-1], relevant[::-1], strict=True)}
        corpus = [prompts.for_task(first_task[i])[1] + text for i, text in enumerate(corpus)]
    q_emb = encoder.encode(queries, desc="eval queries")
    c_emb = encoder.encode(corpus, desc="eval corpus")
    result = metrics_from_ranks(relevant_ranks(q_emb, c_emb, relevant))
    result["corpus"] = len(corpus)
    return result
