"""False-negative masks: by hand, against brute force, and inside the loss."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from b3.false_negatives import TeacherScoreFilter, TopPFilter
from b3.loss import InfoNCELoss


def test_top_p_mask_by_hand():
    neighbors = np.array([[3, 1, 2, -1], [0, 2, 3, -1], [3, 0, 1, -1], [2, 1, 0, -1]])
    skip = np.array([2, 1, 2, 0])  # row 3: a clamped window with no skipped ranks
    mask = TopPFilter(neighbors, skip).mask(np.array([0, 1, 3]), np.array([0, 1, 2, 3]))
    assert mask.tolist() == [
        [False, True, False, True],  # row 0's top-2: 3, 1
        [True, False, False, False],  # row 1's top-1: 0
        [False, False, False, False],  # row 3 skips nothing
    ]


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_top_p_mask_matches_brute_force(n, width, seed):
    rng = np.random.default_rng(seed)
    neighbors = np.stack([rng.permutation(n)[:width] if width <= n else
                          np.r_[rng.permutation(n), -np.ones(width - n, int)] for _ in range(n)])  # fmt: skip
    skip = rng.integers(0, width + 1, n)
    queries, columns = rng.choice(n, min(n, 5), replace=False), rng.permutation(n)
    mask = TopPFilter(neighbors, skip).mask(queries, columns)
    for a, i in enumerate(queries):
        for c, j in enumerate(columns):
            assert mask[a, c] == (j in set(neighbors[i, : skip[i]].tolist()) - {-1})


def test_teacher_mask_marks_columns_scored_above_the_own_positive():
    angles = np.array([0.0, 0.2, 0.25, 2.0])
    docs = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float16)
    queries = docs[[1, 1, 2, 3]]  # query 0 sits on row 1's positive
    mask = TeacherScoreFilter(queries, docs).mask(np.arange(4), np.arange(4))
    assert mask.tolist() == [
        [False, True, True, False],
        [False, False, False, False],
        [False, False, False, False],
        [False, False, False, False],
    ]


def test_a_masked_column_is_as_if_it_were_not_in_the_batch():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    p = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    p[2] = q[0]  # row 2's positive is query 0's best match: a false negative that dominates
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 2] = True  # column 2 is not a negative of query 0
    loss = InfoNCELoss(scale=20.0)
    masked = loss(q, p, mask=mask)
    logits = 20.0 * q @ p.T
    by_hand = [
        torch.logsumexp(logits[i, [c for c in range(4) if not mask[i, c]]], 0) - logits[i, i]
        for i in range(4)
    ]
    assert torch.allclose(masked, torch.stack(by_hand).mean(), atol=1e-6)
    assert masked < loss(q, p) - 1
    # the own positive is never masked, even if a mask says so
    diagonal = torch.eye(4, dtype=torch.bool)
    assert torch.allclose(loss(q, p, mask=diagonal), loss(q, p))
