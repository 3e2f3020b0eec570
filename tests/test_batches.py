"""Samplers: hypothesis properties of both, whole communities for B3, resume, B3++ negatives."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import b3.batches
from b3.batches import B3BatchSampler, HardNegativeSampler, RandomBatchSampler


@st.composite
def datasets(draw):
    """Rows with a task each and communities nested inside tasks, of uneven sizes."""
    batch = draw(st.sampled_from([2, 4, 6, 8, 16]))
    n_tasks = draw(st.integers(1, 4))
    clusters, tasks, next_id = [], [], 0
    for t in range(n_tasks):
        sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=10))
        for s in sizes:
            clusters += [next_id] * s
            tasks += [t] * s
            next_id += 1
    n = len(clusters)
    assume_rows = draw(st.permutations(range(n)))  # rows of a community need not be adjacent
    order = np.asarray(assume_rows)
    return np.asarray(clusters)[order], np.asarray(tasks)[order], batch


def make(kind, clusters, tasks, batch, **kw):
    if kind == "b3":
        return B3BatchSampler(clusters, batch, groups=tasks, **kw)
    return RandomBatchSampler(len(tasks), batch, groups=tasks, **kw)


def group_sizes(tasks):
    return np.bincount(np.unique(tasks, return_inverse=True)[1])


@pytest.mark.parametrize("kind", ["b3", "random"])
@settings(max_examples=80, deadline=None)
@given(data=datasets(), seed=st.integers(0, 100), epoch=st.integers(0, 5))
def test_every_row_once_exact_sizes_pure_tasks(kind, data, seed, epoch):
    clusters, tasks, batch = data
    sizes = group_sizes(tasks)
    if (sizes < batch).all():
        with pytest.raises(ValueError, match="no group has"):
            make(kind, clusters, tasks, batch, seed=seed)
        return
    for drop_last in (True, False):
        sampler = make(kind, clusters, tasks, batch, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        rows = np.concatenate(batches)
        assert len(rows) == len(set(rows.tolist()))  # at most once, no duplicates in a batch
        for b in batches:
            assert len(set(tasks[b])) == 1  # task purity
        if drop_last:
            assert all(len(b) == batch for b in batches)
            assert len(rows) == len(tasks) - int((sizes % batch).sum())
        else:
            assert sorted(rows.tolist()) == list(range(len(tasks)))  # exactly once
            short = [b for b in batches if len(b) != batch]
            assert len(short) == int((sizes % batch > 0).sum()) and all(
                len(b) < batch for b in short
            )
        again = make(kind, clusters, tasks, batch, seed=seed, drop_last=drop_last)
        assert again.batches(epoch) == [] or all(
            np.array_equal(a, b)
            for a, b in zip(again.batches(epoch), sampler.batches(epoch), strict=True)
        )  # pure function of (inputs, seed, epoch)


@pytest.mark.parametrize("kind", ["b3", "random"])
def test_epochs_and_seeds_change_the_batches(kind):
    clusters, tasks = np.arange(400) // 8, np.zeros(400, dtype=int)
    s = make(kind, clusters, tasks, 32, seed=0)
    first, second = s.batches(0), s.batches(1)
    assert [b.tolist() for b in first] != [b.tolist() for b in second]
    assert [b.tolist() for b in first] != [
        b.tolist() for b in make(kind, clusters, tasks, 32, seed=1).batches(0)
    ]


@settings(max_examples=60, deadline=None)
@given(
    n_comm=st.integers(2, 30),
    k=st.sampled_from([2, 4, 8]),
    per_batch=st.integers(1, 4),
    seed=st.integers(0, 99),
)
def test_b3_batches_are_whole_communities_when_sizes_are_exact(n_comm, k, per_batch, seed):
    rng = np.random.default_rng(seed)
    clusters = rng.permutation(np.repeat(np.arange(n_comm), k))
    sampler = (
        B3BatchSampler(clusters, k * per_batch, seed=seed, drop_last=True)
        if n_comm >= per_batch
        else None
    )
    if sampler is None:
        return
    for b in sampler:
        counts = np.bincount(clusters[b])
        assert set(counts[counts > 0].tolist()) == {k}  # every community whole
        assert (counts > 0).sum() == per_batch


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 6), per_batch=st.integers(1, 3), extra=st.integers(0, 5),
       short=st.integers(1, 5), seed=st.integers(0, 1000), drop_last=st.booleans())  # fmt: skip
def test_the_short_community_moves_so_every_row_trains(k, per_batch, extra, short, seed, drop_last):
    """A group of q communities of K and the partition's short one of s < K rows: each epoch
    every batch is whole communities except at most one, which holds the short community
    whole plus K - s rows of one other; over the epochs every row trains."""
    s = min(short, k - 1)
    q = per_batch + extra  # enough for one batch
    clusters = np.concatenate([np.repeat(np.arange(q), k), np.full(s, q)])
    sampler = B3BatchSampler(clusters, k * per_batch, seed=seed, drop_last=drop_last)
    seen = np.zeros(len(clusters), dtype=bool)
    for epoch in range(60):
        batches = sampler.batches(epoch)
        rows = np.concatenate(batches)
        assert len(rows) == len(set(rows.tolist()))
        if not drop_last:
            assert sorted(rows.tolist()) == list(range(len(clusters)))
        mixed = 0
        for b in batches:
            counts = np.bincount(clusters[b], minlength=q + 1)
            if drop_last or len(b) == k * per_batch:
                assert len(b) == k * per_batch
            sizes = sorted(counts[counts > 0].tolist())
            if counts[q] and len(b) == k * per_batch:  # the short one, filled up by a donor
                mixed += 1
                assert counts[q] == s and sizes == sorted([s, k - s] + [k] * (per_batch - 1))
            elif len(b) == k * per_batch:
                assert sizes == [k] * per_batch
        assert mixed <= 1
        seen[rows] = True
    assert seen.all()


def test_rank_slices_reassemble_the_global_batch():
    clusters, tasks = np.arange(96) // 4, np.arange(96) // 48
    full = B3BatchSampler(clusters, 16, tasks, seed=3)
    slices = [
        list(B3BatchSampler(clusters, 16, tasks, seed=3, rank=r, world_size=4)) for r in range(4)
    ]
    for i, batch in enumerate(full):
        assert sum((s[i] for s in slices), []) == batch
        assert all(len(s[i]) == 4 for s in slices)


def test_resume_from_state_dict_continues_the_same_sequence():
    clusters = np.arange(200) // 5
    a = B3BatchSampler(clusters, 20, seed=5)
    a.set_epoch(2)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    state = a.state_dict()
    b = B3BatchSampler(clusters, 20, seed=5)
    b.load_state_dict(state)
    assert head + list(b) == [x.tolist() for x in B3BatchSampler(clusters, 20, seed=5).batches(2)]
    with pytest.raises(ValueError, match="seed"):
        B3BatchSampler(clusters, 20, seed=6).load_state_dict(state)


def test_constructor_errors_name_the_parameter():
    with pytest.raises(ValueError, match="community 0 holds rows of several groups"):
        B3BatchSampler([0, 0, 1, 1], 2, groups=["a", "b", "b", "b"])
    with pytest.raises(ValueError, match="groups must have one entry per row"):
        B3BatchSampler([0, 0, 1, 1], 2, groups=["a"])
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be divisible by world_size \(4\)"):
        RandomBatchSampler(12, 6, world_size=4)
    with pytest.raises(ValueError, match="rank must be in"):
        RandomBatchSampler(12, 4, rank=2, world_size=2)


def test_docstring_examples_run():
    assert doctest.testmod(b3.batches).failed == 0


# --- B3++ hard negatives -----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), h=st.integers(1, 4), p=st.integers(0, 3))
def test_hard_negatives_never_collide_with_the_batch(seed, h, p):
    rng = np.random.default_rng(seed)
    n, w = 120, 12
    neighbors = np.stack([rng.permutation(np.delete(np.arange(n), i))[:w] for i in range(n)])
    neighbors[rng.random((n, w)) < 0.1] = -1
    positive_group = rng.integers(0, 100, n)  # some rows share a positive text
    sampler = HardNegativeSampler(neighbors, p, w - p, positive_group, h, seed=seed)
    batch = rng.choice(n, 6, replace=False)
    neg = sampler.sample(batch, epoch=1, batch_index=4)
    assert len(neg) == len(set(neg.tolist())) == h * len(batch)
    assert not set(neg.tolist()) & set(batch.tolist())
    assert not set(positive_group[neg].tolist()) & set(positive_group[batch].tolist())
    top_p = neighbors[batch, :p]
    assert not set(neg.tolist()) & set(top_p[top_p >= 0].tolist())
    assert np.array_equal(neg, sampler.sample(batch, epoch=1, batch_index=4))


def test_hard_negatives_follow_the_s_counts():
    # rows 0-3 form the batch; all their S-rows list row 4 and only row 0 lists row 5
    neighbors = np.full((10, 3), -1)
    neighbors[0] = [9, 4, 5]
    neighbors[1:4] = [9, 4, 6]
    neighbors[1:4, 2] = -1
    sampler = HardNegativeSampler(neighbors, 1, 2, np.arange(10), num_negatives=1, seed=0)
    neg = sampler.sample([0, 1, 2, 3]).tolist()  # 4 draws: the ranked 4 and 5, then a top-up
    assert sorted(neg[:2]) == [4, 5] and set(neg[2:]) < {6, 7, 8} and len(set(neg)) == 4
    sampler = HardNegativeSampler(neighbors[:, :3], 1, 2, np.arange(10), num_negatives=1, seed=0)
    draws = [sampler.sample([0], batch_index=i)[0] for i in range(400)]
    assert set(draws) == {4, 5}  # row 0 alone: S_0 = {4, 5}, equal counts
    draws = [sampler.sample([0, 1, 2, 3], batch_index=i)[0] for i in range(400)]
    counts = np.bincount(draws, minlength=10)
    assert counts[9] == 0  # in a member's top p: never
    assert set(np.flatnonzero(counts)) == {4, 5}
    assert 0.7 < counts[4] / 400 < 0.9  # Pr = 4/5


def test_hard_negatives_are_exactly_h_per_member_when_the_group_is_small():
    """B3++ in a group too small for h x |B| candidates: the gathered column count must not
    depend on the batch (processes all-gather equal shapes), so the sampler tops up from other
    groups, then repeats allowed rows; never a member, a member's top p or a shared positive."""
    groups = np.array([0] * 6 + [1] * 4)
    neighbors = np.array([[(i + j) % 6 for j in (1, 2)] for i in range(6)]
                         + [[6 + (i + 1) % 4, 6 + (i + 2) % 4] for i in range(4)])  # fmt: skip
    positive_group = np.arange(10)
    sampler = HardNegativeSampler(neighbors, 0, 2, positive_group, 3, groups, seed=1)
    neg = sampler.sample([0, 1, 2, 3])  # 12 wanted; rows 4, 5 in the group, 6-9 outside
    assert len(neg) == 12 and set(neg.tolist()) == {4, 5, 6, 7, 8, 9}
    with pytest.raises(ValueError, match="mining.hardNegatives"):
        HardNegativeSampler(neighbors[:4, :] % 4, 0, 2, np.arange(4), 1, seed=0).sample([0, 1, 2, 3])
