"""How hard a set of batches is, measured with the teacher's scores.

The B3 paper bounds the contrastive loss through the top-K in-batch negatives of each query
(its Theorem 1, the `H_B^K` term). We measure exactly that on the teacher's embeddings:

    H_B^K = mean over queries i in batches B of  (1/K) * sum of the K largest s(q_i, d_j),
                                                  j in B, j not a positive of i

where s is the cosine similarity and "positive of i" covers i's own positive and any row
with the identical positive text. Larger is harder. We also report the hardest (top-1)
negative and the mean negative, for context, and how often a negative looks like a false one:

    above_positive = share of queries i with some in-batch negative j with s(q_i, d_j) > s(q_i, d_i)

(the teacher prefers another row's positive to the query's own; the rule GISTEmbed uses to drop
likely false negatives).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def batch_hardness(
    batches: Iterable[Sequence[int]],
    query_emb: np.ndarray,
    positive_emb: np.ndarray,
    positive_group: np.ndarray,
    top_k: int,
) -> dict[str, float]:
    """Mean top-K, top-1 and overall in-batch negative similarity over all queries.

    Args:
        batches: row ids per batch.
        query_emb, positive_emb: (N, d) L2-normalised embeddings of each row.
        positive_group: (N,) id of each row's exact positive text.
        top_k: K, clamped per batch to the negatives it has.
    """
    q_all = torch.as_tensor(query_emb, dtype=torch.float32)
    p_all = torch.as_tensor(positive_emb, dtype=torch.float32)
    g_all = torch.as_tensor(np.array(positive_group))  # a copy: Arrow-backed arrays are read-only
    topk_sum = top1_sum = mean_sum = 0.0
    above_queries = above_count = 0
    queries = 0
    for batch in batches:
        idx = torch.as_tensor(np.asarray(batch, dtype=np.int64))
        if len(idx) < 2:
            continue
        s = q_all[idx] @ p_all[idx].T  # (b, b) query x positive
        same = g_all[idx][:, None] == g_all[idx][None, :]  # (b, b) positives of the query
        negatives = (~same).sum(1)  # (b,)
        own = (q_all[idx] * p_all[idx]).sum(1, keepdim=True)  # (b, 1) s(q_i, d_i)
        s = s.masked_fill(same, -torch.inf)
        above = (s > own).sum(1)
        above_queries += int((above > 0).sum())
        above_count += int(above.sum())
        k = max(1, min(top_k, int(negatives.min())))
        keep = negatives > 0  # a batch of one positive text has no negatives
        if not keep.any():
            continue
        s = s[keep]
        topk_sum += s.topk(k, dim=1).values.mean(1).sum().item()
        top1_sum += s.max(1).values.sum().item()
        finite = torch.where(torch.isinf(s), torch.zeros_like(s), s)
        mean_sum += (finite.sum(1) / negatives[keep]).sum().item()
        queries += int(keep.sum())
    if queries == 0:
        raise ValueError("no batch has a query with an in-batch negative")
    return {
        "topk_negative": topk_sum / queries,
        "top1_negative": top1_sum / queries,
        "mean_negative": mean_sum / queries,
        "above_positive": above_queries / queries,
        "above_positive_per_query": above_count / queries,
        "queries": queries,
        "top_k": top_k,
    }
