"""The B3 graph and its partition into communities of size K.

`build_graph` turns the kept ranks S = R[:, p:p+m] into a symmetric CSR graph without self
loops or duplicate edges: with `mutual` an edge i-j needs j in S_i and i in S_j (the paper's
code does this; it also cuts METIS time about fourfold), with `union` either suffices. The
mutual test and the cut statistics are numba kernels: at 1M rows they were a third of the
partition stage's time outside the partitioner as scipy/numpy passes.

`partition_graph` asks a partitioner for ceil(N/K) parts: METIS (pymetis) or KaMinPar
(`mining.partitioner`). METIS balances only to within a few percent and may leave a part
empty; KaMinPar is given each block's exact size as its weight limit. Batches need communities
of exactly K, so `rebalance` then trims every part to its target size (members with the fewest
edges inside the part leave first) and places the leavers where they have the most edges,
deterministically for a given seed (a no-op when the parts are already exact). Afterwards
N // K communities hold exactly K rows and, when K does not divide N, one holds the remaining
N % K.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass

import numba
import numpy as np
import pymetis
import scipy.sparse as sp

from b3.jit import compiled, use_threads


@dataclass(frozen=True)
class Graph:
    """Symmetric CSR adjacency: neighbours of v are indices[indptr[v]:indptr[v+1]]."""

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (2 * edges,) int64

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    @property
    def edges(self) -> int:
        """Undirected edges."""
        return len(self.indices) // 2

    def edge_rows(self) -> np.ndarray:
        """Source vertex of every CSR entry."""
        return np.repeat(np.arange(self.n, dtype=np.int64), np.diff(self.indptr))


def build_graph(window: np.ndarray, mutual: bool = True, threads: int = 1) -> Graph:
    """Symmetric, deduplicated, self-loop-free graph from per-row neighbour lists.

    window: (n, w) int, row i lists i's preferred batch-mates (local ids), -1 for none.
    threads: for the mutual test; the graph is the same for any number.
    """
    n = window.shape[0]
    index = np.int32 if n < 2**31 - 1 else np.int64  # int32 halves the memory traffic
    # Sorted rows make duplicates adjacent, let the mutual test binary-search a row and hand
    # scipy a canonical CSR. One copy, sorted in place: np.sort would make a second, and a fresh
    # 1M x 100 array took 0.8 s here (page faults), the SIMD sort itself 0.14 s.
    rows = window.astype(index, copy=True)
    rows.sort(axis=1)
    if rows.size and (rows[:, 0].min() < -1 or rows[:, -1].max() >= n):  # sorted: ends are extremes
        raise ValueError(f"neighbour ids must lie in -1..{n - 1} (-1: none)")
    if mutual:
        use_threads(threads)
        keep = _mutual_entries(rows)
        indptr = np.concatenate([[0], np.cumsum(np.count_nonzero(keep, axis=1))])
        return Graph(indptr.astype(np.int64), rows[keep].astype(np.int64))
    valid = rows >= 0
    valid &= rows != np.arange(n, dtype=index)[:, None]
    valid[:, 1:] &= rows[:, 1:] != rows[:, :-1]
    counts, data = np.count_nonzero(valid, axis=1), rows[valid]
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64 if len(data) >= 2**31 else index)
    a = sp.csr_matrix((np.ones(len(data), dtype=np.int8), data, indptr), shape=(n, n))
    a.has_canonical_format = True  # sorted, duplicate-free rows (see above)
    union = sp.csr_matrix(a + a.T)  # O(edges): scipy merges sorted rows
    union.sort_indices()
    return Graph(union.indptr.astype(np.int64), union.indices.astype(np.int64))


@compiled(parallel=True)
def _mutual_entries(rows: np.ndarray) -> np.ndarray:
    """Which entries of the sorted rows are mutual edges (j in row i and i in row j), each
    pair marked once in both rows; -1, self loops and repeats stay unmarked.

    Each pair i < j is tested once, from row i, by a binary search for i in row j; no two
    tests write the same entry, so blocks of rows run on any number of threads with the same
    result. Row j is a random place in memory, so the searches of one row run level by level
    side by side: their loads are independent and overlap, where one search after another
    waits on every load. 1M rows of 100 on this project's 2-core machine: 2.6 s on one
    thread, 1.9 s on two (memory-bound); one search at a time 5.6 s; scipy's A.multiply(A.T)
    6.6 s. (The same loop compiled without parallel=True ran at half the speed on one thread.)
    """
    n, w = rows.shape
    keep = np.zeros((n, w), dtype=np.bool_)
    block = 4096
    for b in numba.prange((n + block - 1) // block):
        targets = np.empty(w, dtype=rows.dtype)  # the larger ends j of row i's pairs
        slots = np.empty(w, dtype=np.int64)  # where each j sits in row i
        found = np.empty(w, dtype=np.int64)  # the search's position in row j
        for i in range(b * block, min(n, (b + 1) * block)):
            pairs = 0
            for a in range(w):
                j = rows[i, a]
                if j > i and (a == 0 or rows[i, a - 1] != j):
                    targets[pairs], slots[pairs], found[pairs] = j, a, 0
                    pairs += 1
            size = w
            while size > 1:  # branchless lower bound of i in each row j
                half = size >> 1
                for e in range(pairs):
                    found[e] += half if rows[targets[e], found[e] + half - 1] < i else 0
                size -= half
            for e in range(pairs):
                j = targets[e]
                at = found[e] + (rows[j, found[e]] < i)
                if at < w and rows[j, at] == i:
                    keep[i, slots[e]] = True
                    keep[j, at] = True
    return keep


def metis_parts(graph: Graph, n_parts: int, seed: int) -> tuple[np.ndarray, int]:
    """pymetis k-way partition: (part of each vertex, METIS edge cut)."""
    if n_parts <= 1 or graph.n <= 1:
        return np.zeros(graph.n, dtype=np.int64), 0
    result = pymetis.part_graph(
        n_parts,
        pymetis.CSRAdjacency(adj_starts=graph.indptr, adjacent=graph.indices),
        options=pymetis.Options(seed=seed),
    )
    return np.asarray(result.vertex_part, dtype=np.int64), int(result.edge_cuts)


def kaminpar_parts(graph: Graph, k: int, seed: int, threads: int = 1) -> tuple[np.ndarray, int]:
    """KaMinPar (its large-k fast configuration) with block weight limits of exactly K (and
    N % K for the last): (part of each vertex, KaMinPar's edge cut). One thread is
    deterministic for a seed; more are faster and are not (two 2-thread runs with one seed gave
    different blocks in bench/partition_scale.py). Its Python binding reads graphs from files
    only: the CSR arrays go to a ParHIP binary file (a 24-byte header, byte offsets of each
    adjacency list, the adjacency lists; 64-bit ids)."""
    try:
        import kaminpar
    except ImportError:
        raise ImportError("the kaminpar partitioner needs the kaminpar package (wheels for Linux and "
                          "macOS arm64): pip install kaminpar, or use the metis partitioner") from None  # fmt: skip
    if graph.n <= 1:
        return np.zeros(graph.n, dtype=np.int64), 0
    full, rest = divmod(graph.n, k)
    limits = [k] * full + ([rest] if rest else [])
    if len(limits) == 1:
        return np.zeros(graph.n, dtype=np.int64), 0
    version = 0b11  # no edge weights, no node weights, 64-bit edge and node ids
    header = np.array([version, graph.n, len(graph.indices)], dtype=np.uint64)
    offsets = (header.nbytes + (graph.n + 1) * 8 + graph.indptr.astype(np.uint64) * 8).astype(np.uint64)
    with tempfile.TemporaryDirectory(prefix="b3-kaminpar-") as folder:
        path = os.path.join(folder, "graph.parhip")
        with open(path, "wb") as f:
            for part in (header, offsets, graph.indices.astype(np.uint64)):
                f.write(memoryview(part))
        loaded = kaminpar.load_graph(path, kaminpar.GraphFileFormat.PARHIP)
    kaminpar.reseed(seed)
    parts = _kaminpar(threads).compute_partition(loaded, max_block_weights=limits)
    return np.asarray(parts, dtype=np.int64), int(kaminpar.edge_cut(loaded, parts))


@functools.cache
def _kaminpar(threads: int):
    """One KaMinPar per process and thread count: it also holds TBB's thread limit for the
    process (a fresh instance per call let one-thread runs differ under load)."""
    import kaminpar

    return kaminpar.KaMinPar(num_threads=threads, ctx=kaminpar.largek_fast_context())


PARTITIONERS = {"metis": lambda graph, k, seed, threads=1: metis_parts(graph, -(-graph.n // k), seed),
                "kaminpar": kaminpar_parts}  # fmt: skip


def _target_sizes(labels: np.ndarray, n_labels: int, k: int) -> np.ndarray:
    """Capacity per label: the largest parts get K, the next gets N % K, the rest 0."""
    full, rest = divmod(len(labels), k)
    sizes = np.bincount(labels, minlength=n_labels)
    by_size = np.argsort(-sizes, kind="stable")
    cap = np.zeros(n_labels, dtype=np.int64)
    cap[by_size[:full]] = k
    if rest:
        cap[by_size[full]] = rest
    return cap


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) for every pair, without a Python loop."""
    counts = ends - starts
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())


def rebalance(
    labels: np.ndarray, graph: Graph, k: int, seed: int, max_rounds: int = 20
) -> np.ndarray:
    """Communities of exactly `k` (one of N % k) that stay as close as possible to `labels`."""
    n = len(labels)
    n_labels = max(int(labels.max()) + 1 if n else 0, -(-n // k))
    cap = _target_sizes(labels, n_labels, k)
    if (np.bincount(labels, minlength=n_labels) == cap).all():  # exact already (KaMinPar)
        return _renumber(labels)
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(n)
    rows = graph.edge_rows()
    internal = np.bincount(rows, weights=labels[graph.indices] == labels[rows], minlength=n)

    # 1. Trim: inside each part keep the members with the most internal edges.
    order = np.lexsort((tiebreak, -internal, labels))
    first = np.searchsorted(labels[order], np.arange(n_labels))
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n) - first[labels[order]]
    out = np.where(position < cap[labels], labels, -1)
    deficit = cap - np.bincount(out[out >= 0], minlength=n_labels)

    # 2. Fill: each leaver goes to the open part it has the most edges to, strongest first.
    for _ in range(max_rounds):
        pool = np.flatnonzero(out < 0)
        if len(pool) == 0 or not deficit.any():
            break
        edge_ids = _ranges(graph.indptr[pool], graph.indptr[pool + 1])
        src = np.repeat(pool, np.diff(graph.indptr)[pool])
        dst_label = out[graph.indices[edge_ids]]
        ok = dst_label >= 0
        ok[ok] = deficit[dst_label[ok]] > 0
        if not ok.any():
            break
        pair, count = np.unique(src[ok] * n_labels + dst_label[ok], return_counts=True)
        u, lab = pair // n_labels, pair % n_labels
        best = np.lexsort((tiebreak[u], -count, u))  # per u: highest count first
        best = best[np.r_[True, u[best][1:] != u[best][:-1]]]
        u, lab, count = u[best], lab[best], count[best]
        by_label = np.lexsort((tiebreak[u], -count, lab))
        lab_sorted = lab[by_label]
        rank = np.arange(len(by_label)) - np.searchsorted(lab_sorted, lab_sorted)
        take = by_label[rank < deficit[lab_sorted]]
        out[u[take]] = lab[take]
        deficit -= np.bincount(lab[take], minlength=n_labels)

    # 3. Whoever has no edge into an open part fills the remaining places in seeded order.
    pool = np.flatnonzero(out < 0)
    if len(pool):
        slots = np.repeat(np.arange(n_labels), deficit)
        out[rng.permutation(pool)] = slots
    return _renumber(out)


def _renumber(labels: np.ndarray) -> np.ndarray:
    """Compact ids 0..C-1 numbered by first appearance, so that the result does not depend on
    the partitioner's own block ids."""
    _, first_seen, compact = np.unique(labels, return_index=True, return_inverse=True)
    renumber = np.empty(len(first_seen), dtype=np.int64)
    renumber[np.argsort(first_seen, kind="stable")] = np.arange(len(first_seen))
    return renumber[compact]


def partition_graph(
    graph: Graph, k: int, seed: int = 0, partitioner: str = "kaminpar", threads: int = 1
) -> tuple[np.ndarray, int]:
    """Communities of size k: (community of each vertex, the partitioner's own edge cut)."""
    labels, cut = PARTITIONERS[partitioner](graph, k, seed, threads)
    return rebalance(labels, graph, k, seed), cut


def edge_cut(graph: Graph, communities: np.ndarray) -> int:
    """Undirected edges whose ends lie in different communities."""
    return _cut_entries(graph.indptr, graph.indices, communities) // 2


@compiled()
def _cut_entries(indptr: np.ndarray, indices: np.ndarray, communities: np.ndarray) -> int:
    cut = 0
    for v in range(len(indptr) - 1):
        for e in range(indptr[v], indptr[v + 1]):
            cut += communities[v] != communities[indices[e]]
    return cut


@compiled()
def window_inside(window: np.ndarray, communities: np.ndarray) -> tuple[int, int]:
    """(entries of the window whose row shares the community of the window's row, entries
    that name a row at all): how much of S a partition keeps inside batches."""
    inside = named = 0
    for i in range(window.shape[0]):
        for a in range(window.shape[1]):
            j = window[i, a]
            if j >= 0:
                named += 1
                inside += communities[j] == communities[i]
    return inside, named
