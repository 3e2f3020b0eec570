"""Which in-batch columns are likely false negatives of a query, by the teacher's judgement.

B3 skips each query's top-p ranked positives when it builds the graph, because the paper finds
that they are often not true negatives. Batches made of whole communities still bring such rows
together (two near-duplicate packages share their neighbours, so METIS puts them in one
community). `training.falseNegatives` removes them from the loss's denominator instead:

    "top-p"    column j is masked for query i when j is one of i's top-p ranked positives
               (the same p as `mining.p`; `rank/topk.parquet` holds them)
    "teacher"  column j is masked for query i when the teacher scores it above i's own
               positive: s_t(q_i, d_j) > s_t(q_i, d_i) (GISTEmbed's guided filter)

Masks are built from row ids on the data-loader side, so every process masks exactly what a
single process would on the whole global batch.
"""

from __future__ import annotations

import numpy as np


class TopPFilter:
    """Masks a query's teacher top-p positives.

    Args:
        neighbors: (N, w) ranked neighbour rows per query, -1 padded (`read_topk`).
        skip: (N,) p of each row (smaller where the rank window was clamped).
    """

    def __init__(self, neighbors: np.ndarray, skip: np.ndarray):
        self.neighbors, self.skip = neighbors, skip

    def mask(self, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """(len(queries), len(columns)) bool: True where the column is a likely false negative."""
        width = int(self.skip[queries].max()) if len(queries) else 0
        top = self.neighbors[queries, :width]  # (b, p)
        top = np.where(np.arange(width)[None, :] < self.skip[queries, None], top, -1)
        return (top[:, :, None] == columns[None, None, :]).any(axis=1)


class TeacherScoreFilter:
    """Masks columns the teacher scores above the query's own positive.

    Args:
        query_emb, positive_emb: (N, d) L2-normalised teacher embeddings (`read_embeddings`).
    """

    def __init__(self, query_emb: np.ndarray, positive_emb: np.ndarray):
        self.q, self.p = query_emb, positive_emb

    def mask(self, queries: np.ndarray, columns: np.ndarray) -> np.ndarray:
        q = self.q[queries].astype(np.float32)
        scores = q @ self.p[columns].astype(np.float32).T  # (b, C)
        own = (q * self.p[queries].astype(np.float32)).sum(1, keepdims=True)  # (b, 1)
        return scores > own
