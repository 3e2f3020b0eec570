"""The B3 graph and its partition: symmetry, mutual/union edges, planted communities, sizes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from b3.graph import Graph, build_graph, edge_cut, partition_graph, rebalance, window_inside


def edge_set(g: Graph) -> set[tuple[int, int]]:
    return set(zip(g.edge_rows().tolist(), g.indices.tolist(), strict=True))


windows = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.lists(st.integers(-1, n - 1), min_size=1, max_size=8), min_size=n, max_size=n),
    )
)


@settings(max_examples=100, deadline=None)
@given(windows)
def test_graph_is_symmetric_simple_and_mutual_means_both_ways(case):
    n, lists = case
    width = max(len(x) for x in lists)
    window = np.full((n, width), -1)
    for i, row in enumerate(lists):
        window[i, : len(row)] = row
    listed = {(i, j) for i in range(n) for j in window[i] if j >= 0 and j != i}
    union, mutual = build_graph(window, mutual=False), build_graph(window, mutual=True)
    for g in (union, mutual):
        edges = edge_set(g)
        assert len(edges) == len(g.indices)  # no duplicate entries
        assert all((j, i) in edges for i, j in edges)  # symmetric
        assert all(i != j for i, j in edges)  # no self loops
        assert all((np.diff(g.indices[g.indptr[v] : g.indptr[v + 1]]) > 0).all() for v in range(n))
    assert edge_set(union) == listed | {(j, i) for i, j in listed}
    assert edge_set(mutual) == {(i, j) for i, j in listed if (j, i) in listed}


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), width=st.integers(1, 70), missing=st.floats(0, 0.3), seed=st.integers(0, 1000))
def test_mutual_edges_match_the_sparse_product_on_wide_windows_and_any_threads(n, width, missing, seed):
    """The mutual test binary-searches rows of any width (not only powers of two); it must
    keep exactly the entries of A * A^T, whatever the number of threads."""
    rng = np.random.default_rng(seed)
    window = rng.integers(0, n, (n, width))  # repeats and self loops included
    window[rng.random((n, width)) < missing] = -1
    valid = (window >= 0) & (window != np.arange(n)[:, None])
    a = sp.csr_matrix((np.ones(valid.sum()), (np.nonzero(valid)[0], window[valid])), shape=(n, n))
    a.data[:] = 1  # repeats summed to one entry
    expected = sp.csr_matrix(a.multiply(a.T))
    expected.sort_indices()
    for threads in (1, 2):
        g = build_graph(window, mutual=True, threads=threads)
        assert np.array_equal(g.indptr, expected.indptr)
        assert np.array_equal(g.indices, expected.indices)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), width=st.integers(1, 20), n_comm=st.integers(1, 10), seed=st.integers(0, 1000))
def test_edge_cut_and_window_inside_count_what_they_say(n, width, n_comm, seed):
    rng = np.random.default_rng(seed)
    window = rng.integers(-1, n, (n, width))
    comm = rng.integers(0, n_comm, n)
    g = build_graph(window, mutual=False)
    rows = g.edge_rows()
    named = window >= 0
    inside = named & (comm[np.maximum(window, 0)] == comm[:, None])
    assert edge_cut(g, comm) == int((comm[rows] != comm[g.indices]).sum()) // 2
    assert window_inside(window, comm) == (int(inside.sum()), int(named.sum()))
    # a column slice, as the partition stage passes S = R[:, p:p+m]
    assert window_inside(window[:, 1:], comm) == (int(inside[:, 1:].sum()), int(named[:, 1:].sum()))


def test_neighbour_ids_outside_the_rows_are_refused():
    """A damaged window would otherwise reach the partitioner as an invalid CSR (KaMinPar
    segfaults on one)."""
    for bad in (5, -2):
        with pytest.raises(ValueError, match="neighbour ids must lie in -1..4"):
            build_graph(np.array([[1, 2], [0, bad], [0, 1], [4, -1], [3, 2]]))


def planted(n_comm: int, k: int, m: int, noise: float, seed: int):
    """Each row lists m mates: mostly from its own planted community, `noise` share random."""
    rng = np.random.default_rng(seed)
    n = n_comm * k
    truth = rng.permutation(n) // k
    members = [np.flatnonzero(truth == c) for c in range(n_comm)]
    window = np.empty((n, m), dtype=np.int64)
    for i in range(n):
        mates = members[truth[i]][members[truth[i]] != i]
        own = rng.choice(mates, min(m, len(mates)), replace=False)
        random = rng.integers(0, n, m)
        window[i] = np.where(rng.random(m) < noise, random, np.resize(own, m))
    return truth, window


PARTITIONERS = ["metis", pytest.param("kaminpar", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("kaminpar") is None, reason="pip install kaminpar"))]  # fmt: skip


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partition_recovers_planted_communities(partitioner):
    k = 16
    truth, window = planted(n_comm=40, k=k, m=12, noise=0.1, seed=0)
    communities, _ = partition_graph(build_graph(window, mutual=False), k, seed=0, partitioner=partitioner)
    assert (np.bincount(communities) == k).all()
    # purity: the share of each found community that comes from its majority planted one
    purity = np.mean([np.bincount(truth[communities == c]).max() / k for c in range(40)])
    assert purity >= 0.95, purity


@pytest.mark.parametrize("partitioner", PARTITIONERS)
def test_partition_sizes_with_a_remainder_and_a_fixed_seed(partitioner):
    truth, window = planted(n_comm=13, k=10, m=6, noise=0.2, seed=3)
    window = window[:125]  # 12 communities of 10 and 5 left over
    window[window >= 125] = -1
    g = build_graph(window, mutual=True)
    a, _ = partition_graph(g, 10, seed=7, partitioner=partitioner)
    b, _ = partition_graph(g, 10, seed=7, partitioner=partitioner)
    assert np.array_equal(a, b)
    assert sorted(np.bincount(a).tolist()) == [5] + [10] * 12


@pytest.mark.skipif(__import__("importlib").util.find_spec("kaminpar") is None, reason="pip install kaminpar")
@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 300), k=st.integers(2, 24), m=st.integers(1, 8), seed=st.integers(0, 1000))
def test_kaminpar_blocks_are_exactly_k_before_any_rebalancing(n, k, m, seed):
    """KaMinPar with exact block weight limits: N // K blocks of K and one of N % K, the
    ParHIP file it reads holding exactly our graph (its edge cut equals ours)."""
    from b3.graph import kaminpar_parts

    window = np.random.default_rng(seed).integers(-1, n, (n, m))
    g = build_graph(window, mutual=False)
    parts, cut = kaminpar_parts(g, k, seed)
    assert sorted(np.bincount(parts).tolist()) == sorted([k] * (n // k) + ([n % k] if n % k else []))
    assert cut == edge_cut(g, parts)
    assert np.array_equal(kaminpar_parts(g, k, seed)[0], parts)  # deterministic for a seed


@pytest.mark.skipif(__import__("importlib").util.find_spec("kaminpar") is None, reason="pip install kaminpar")
def test_kaminpar_on_several_threads_keeps_exact_sizes_and_finds_planted_communities():
    """mining.partitionerThreads > 1 gives up determinism, not the contract or the quality."""
    from b3.graph import kaminpar_parts

    truth, window = planted(n_comm=40, k=16, m=10, noise=0.1, seed=5)
    window = np.where(window < 630, window, -1)[:630]  # 39 communities of 16 and 6 left over
    g = build_graph(window, mutual=True)
    parts, cut = kaminpar_parts(g, 16, seed=0, threads=2)
    assert sorted(np.bincount(parts).tolist()) == [6] + [16] * 39
    assert cut == edge_cut(g, parts)
    communities, _ = partition_graph(g, 16, seed=0, partitioner="kaminpar", threads=2)
    same = truth[:630][:, None] == truth[:630][None, :]
    together = communities[:, None] == communities[None, :]
    assert (same & together).sum() / same.sum() > 0.9  # planted mates stay together


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 200),
    k=st.integers(2, 20),
    parts=st.integers(1, 30),
    seed=st.integers(0, 1000),
)
def test_rebalance_gives_exact_sizes_from_any_labelling(n, k, parts, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, parts, n)  # uneven, with empty labels
    window = rng.integers(-1, n, (n, 5))
    g = build_graph(window, mutual=False)
    out = rebalance(labels, g, k, seed)
    sizes = np.bincount(out)
    full, rest = divmod(n, k)
    assert sorted(sizes.tolist()) == sorted([k] * full + ([rest] if rest else []))
    assert np.array_equal(out, rebalance(labels, g, k, seed))


def test_rebalance_keeps_balanced_partitions_and_moves_the_weakest():
    ring = np.array([[(i + 1) % 8, (i - 1) % 8] for i in range(8)])
    g = build_graph(ring, mutual=False)
    balanced = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert np.array_equal(rebalance(balanced, g, 4, 0), balanced)
    # 5 + 3: an end of part 0's arc (0 or 4, one internal edge each) moves to part 1
    uneven = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    for seed in range(5):
        out = rebalance(uneven, g, 4, seed)
        assert np.bincount(out).tolist() == [4, 4]
        assert len({out[i] for i in (1, 2, 3)}) == 1 and out[5] == out[6] == out[7] != out[2]
        assert edge_cut(g, out) == 2  # still two contiguous arcs


def test_graph_kernels_work_where_numba_has_nowhere_to_cache():
    """A read-only image with a read-only home leaves numba no cache folder; cache=True would
    then fail the import of b3.graph (numba: "no locator available")."""
    program = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []  # no writable cache folder anywhere\n"
        "import numpy as np\n"
        "from b3.graph import build_graph, edge_cut\n"
        "g = build_graph(np.array([[1, 2], [0, 2], [0, 1], [0, 1]]))\n"
        "print(g.edges, edge_cut(g, np.array([0, 0, 1, 1])))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3", "2"]  # the triangle 0-1-2; row 3 is listed by nobody


def test_a_forked_child_runs_the_kernels_after_its_parent_did():
    """multiprocessing forks on Linux; under GNU OpenMP (numba's default layer there) such a
    child was killed by SIGTERM ("fork() called from a process already using GNU OpenMP")."""
    program = (
        "import multiprocessing as mp\n"
        "import numpy as np\n"
        "from b3.graph import build_graph\n"
        "window = np.array([[1, 2], [0, 2], [0, 1]])\n"
        "build_graph(window, threads=2)\n"
        "child = mp.get_context('fork').Process(target=build_graph, args=(window, True, 2))\n"
        "child.start(); child.join(120)\n"
        "print(child.exitcode)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0"], done.stderr
