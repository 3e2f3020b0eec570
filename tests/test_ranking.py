"""Ranking: exact top-k against brute force, exclusions, mining groups, window clamping."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from b3 import ranking
from b3.ranking import (
    POOLED,
    assign_mining_groups,
    clamp_window,
    plan_units,
    rank_groups,
    rank_topk,
)


def brute_force(q, p, k, qg, pg):
    s = q @ p.T
    s[qg[:, None] == pg[None, :]] = -np.inf
    order = np.full((len(q), k), -1)
    vals = np.full((len(q), k), -np.inf, dtype=np.float32)
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    order[:, : best.shape[1]] = best
    vals[:, : best.shape[1]] = np.take_along_axis(s, best, axis=1)
    order[np.isneginf(vals)] = -1
    return order, vals


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    c=st.integers(1, 60),
    d=st.integers(1, 16),
    k=st.integers(1, 70),
    groups=st.integers(1, 80),
    budget=st.sampled_from([4, 64, 1000, 1 << 20]),
    seed=st.integers(0, 2**16),
)
def test_rank_topk_equals_brute_force(n, c, d, k, groups, budget, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, d)).astype(np.float32)
    p = rng.standard_normal((c, d)).astype(np.float32)
    qg, pg = rng.integers(0, groups, n), rng.integers(0, groups, c)
    idx, val = rank_topk(q, p, k, qg, pg, budget_bytes=budget)
    ref_idx, ref_val = brute_force(q, p, k, qg, pg)
    assert idx.shape == val.shape == (n, k)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, atol=1e-5)
    for row in range(n):  # same neighbour sets (order may differ only between exact ties)
        assert set(idx[row][idx[row] >= 0]) == set(ref_idx[row][ref_idx[row] >= 0])
        kept = idx[row][idx[row] >= 0]
        assert (pg[kept] != qg[row]).all()
        assert (np.diff(val[row][idx[row] >= 0]) <= 1e-6).all()  # best first


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    c=st.integers(1, 50),
    k=st.integers(1, 60),
    tile=st.tuples(st.integers(1, 8), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_cpu_tiles_of_any_shape_give_the_brute_force_top_k(n, c, k, tile, seed):
    """The heaps must merge tiles that split rows and candidates anywhere; ties are made
    likely (scores on a coarse grid) so that equal scores at the k-th place are exercised."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (n, 4)).astype(np.float32)
    p = rng.integers(-2, 3, (c, 4)).astype(np.float32)
    qg, pg = rng.integers(0, 5, n), rng.integers(0, 5, c)
    saved = ranking.CPU_TILE_ROWS, ranking.CPU_TILE_COLUMNS
    ranking.CPU_TILE_ROWS, ranking.CPU_TILE_COLUMNS = tile
    try:
        idx, val = rank_topk(q, p, k, qg, pg)
    finally:
        ranking.CPU_TILE_ROWS, ranking.CPU_TILE_COLUMNS = saved
    ref_idx, ref_val = brute_force(q, p, k, qg, pg)
    np.testing.assert_array_equal(val, ref_val)  # integer grid: exact scores, best first
    assert ((idx >= 0) == (ref_idx >= 0)).all()
    s = q @ p.T
    for row in range(n):  # any of the tied candidates may fill the last places, none other
        kept = idx[row][idx[row] >= 0]
        assert len(set(kept)) == len(kept) and (pg[kept] != qg[row]).all()
        np.testing.assert_array_equal(s[row, kept], val[row][idx[row] >= 0])


def test_rank_topk_without_groups_and_with_padding():
    q = np.eye(3, dtype=np.float32)
    idx, val = rank_topk(q, q, 5)
    assert (idx[:, 0] == np.arange(3)).all() and (idx[:, 3:] == -1).all()
    assert np.isneginf(val[:, 3:]).all()


@settings(max_examples=200)
@given(c=st.integers(0, 500), p=st.integers(0, 60), m=st.integers(1, 200))
def test_clamp_window_fits_and_keeps_the_skip_share(c, p, m):
    p2, m2 = clamp_window(c, p, m)
    assert p2 + m2 <= max(c, 0) or (p2, m2) == (p, m)
    if p + m <= c:
        assert (p2, m2) == (p, m)
    elif c >= 1:
        assert m2 >= 1 and p2 <= p and m2 <= m + p
        assert p2 / (p2 + m2) <= p / (p + m) + 1e-9


def test_mining_groups_pool_tiny_tasks():
    tasks = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 5 + ["d"] * 12)
    groups = assign_mining_groups(tasks, per_task=True, pool_below=16, batch_size=16)
    names = np.asarray(groups.names)[groups.of_row]
    assert (names[:50] == "a").all() and (names[50:80] == "b").all()
    assert (names[80:] == POOLED).all() and "pooled" in groups.notes[0]
    # a pool smaller than a batch joins the smallest regular task instead
    groups = assign_mining_groups(tasks, per_task=True, pool_below=13, batch_size=64)
    names = np.asarray(groups.names)[groups.of_row]
    assert (names[80:85] == "b").all() and (names[85:] == "b").all()
    assert "joined the smallest task 'b'" in groups.notes[0]
    assert assign_mining_groups(tasks, per_task=False, pool_below=16, batch_size=16).names == [
        "__all__"
    ]
    assert assign_mining_groups(tasks, per_task=True, pool_below=1000, batch_size=16).names == [
        POOLED
    ]


def test_rank_groups_stays_inside_groups_and_maps_to_global_rows():
    rng = np.random.default_rng(1)
    tasks = np.array(["x", "y"] * 60)
    groups = assign_mining_groups(tasks, True, 10, 10)
    emb = rng.standard_normal((120, 8)).astype(np.float32)
    pos_group = np.arange(120)
    nb, sc = rank_groups(emb, emb, groups, pos_group, k=20, budget_bytes=1 << 12)
    assert (nb >= 0).all()
    assert (tasks[nb] == tasks[:, None]).all()
    assert (nb != np.arange(120)[:, None]).all()
    for g in range(2):  # equals ranking each group on its own
        rows = groups.rows(g)
        ref, _ = rank_topk(emb[rows], emb[rows], 20, pos_group[rows], pos_group[rows])
        np.testing.assert_array_equal(nb[rows], rows[ref])


def test_plan_units_cover_every_row_once():
    groups = assign_mining_groups(np.array(["a"] * 1000 + ["b"] * 300), True, 10, 10)
    units = plan_units(groups, workers=4, min_rows=64)
    rows = np.concatenate([u.rows for u in units])
    assert sorted(rows.tolist()) == list(range(1300)) and len(units) > 2


@pytest.mark.slow
def test_ray_workers_give_the_same_ranking(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rng = np.random.default_rng(2)
    tasks = np.array(["x"] * 700 + ["y"] * 300)
    groups = assign_mining_groups(tasks, True, 10, 10)
    emb = rng.standard_normal((1000, 16)).astype(np.float32)
    pos_group = np.arange(1000)
    local = rank_groups(emb, emb, groups, pos_group, k=30, budget_bytes=1 << 16)
    try:
        distributed = rank_groups(
            emb, emb, groups, pos_group, k=30, budget_bytes=1 << 16, workers=2
        )
    finally:
        ray.shutdown()
    # Ray workers run other BLAS threading: scores agree to float32 rounding, and neighbour
    # lists agree except where two candidates tie within that rounding
    true = emb.astype(np.float64) @ emb.T.astype(np.float64)  # (N, N) exact scores
    rows = np.arange(1000)[:, None]
    for idx, scores in (local, distributed):
        np.testing.assert_allclose(scores, true[rows, idx], atol=1e-5)
    np.testing.assert_allclose(local[1], distributed[1], atol=1e-5)
    for i in range(1000):
        a, b = set(local[0][i].tolist()), set(distributed[0][i].tolist())
        boundary = local[1][i, -1]  # k-th score: only candidates tied with it may swap
        assert all(abs(true[i, j] - boundary) < 1e-5 for j in a ^ b), (i, a ^ b)
