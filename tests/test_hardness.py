"""Batch hardness H_B^K against a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest

from b3.hardness import batch_hardness


def test_hardness_by_hand():
    # 2-d unit vectors; queries equal positives, so s(i, j) = cos(angle_i - angle_j)
    angles = np.array([0.0, 0.1, 1.5, 3.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    s = emb @ emb.T
    groups = np.array(
        [0, 1, 2, 2]
    )  # rows 2 and 3 share a positive text: not negatives of each other
    result = batch_hardness([[0, 1, 2, 3]], emb, emb, groups, top_k=2)
    per_query_top2 = [
        (s[0, 1] + s[0, 2]) / 2,  # row 0: negatives 1, 2, 3
        (s[1, 0] + s[1, 2]) / 2,
        (s[2, 1] + s[2, 0]) / 2,  # row 2: negatives 0, 1 (3 is a duplicate positive)
        (s[3, 2 - 1] + s[3, 0]) / 2,
    ]
    assert result["topk_negative"] == pytest.approx(np.mean(per_query_top2))
    assert result["top1_negative"] == pytest.approx(np.mean([s[0, 1], s[1, 0], s[2, 1], s[3, 1]]))
    mean_neg = [
        np.mean(s[0, [1, 2, 3]]),
        np.mean(s[1, [0, 2, 3]]),
        np.mean(s[2, [0, 1]]),
        np.mean(s[3, [0, 1]]),
    ]
    assert result["mean_negative"] == pytest.approx(np.mean(mean_neg))
    assert result["queries"] == 4
    # queries equal positives, so s(q_i, d_i) = 1 beats every negative: no false-negative suspects
    assert result["above_positive"] == 0 and result["above_positive_per_query"] == 0


def test_negatives_the_teacher_prefers_to_the_positive_are_counted():
    angles = np.array([0.0, 0.2, 0.25, 2.0])
    docs = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    queries = docs[[1, 1, 2, 3]]  # query 0 sits on row 1's positive; the others on their own
    result = batch_hardness([[0, 1, 2, 3]], queries, docs, np.arange(4), top_k=1)
    # query 0: negative 1 (s=1) and 2 beat its own positive (cos 0.2); no other query has one
    assert result["above_positive"] == pytest.approx(1 / 4)
    assert result["above_positive_per_query"] == pytest.approx(2 / 4)


def test_harder_batches_score_higher_and_empty_input_is_refused():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 16))
    emb = np.repeat(centers, 8, axis=0) + 0.1 * rng.standard_normal((32, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    groups = np.arange(32)
    clustered = [list(range(i, i + 8)) for i in range(0, 32, 8)]
    mixed = [list(range(i, 32, 4)) for i in range(4)]
    hard = batch_hardness(clustered, emb, emb, groups, 4)["topk_negative"]
    easy = batch_hardness(mixed, emb, emb, groups, 4)["topk_negative"]
    assert hard > easy + 0.5
    with pytest.raises(ValueError, match="no batch"):
        batch_hardness([[0]], emb, emb, groups, 4)
