"""What the benchmarks build their numbers on: the partition benchmark's synthetic rank output
(shaped like the rank stage's lists) and the teacher precision benchmark's agreement measure."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_bench as load


def test_the_synthetic_rank_output_lists_distinct_neighbours_mostly_from_the_topic():
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    bench = load("partition_scale")
    n, m = 2_000, 50
    window = bench.synthetic_window(n, m, seed=1)
    assert window.shape == (n, m) and window.min() >= 0 and window.max() < n
    assert np.array_equal(window, bench.synthetic_window(n, m, seed=1))
    ordered = np.sort(window, axis=1)
    assert not (ordered[:, 1:] == ordered[:, :-1]).any()  # distinct, like top-k indices
    assert not (window == np.arange(n)[:, None]).any()  # never the row itself
    # the first 70% are topic-mates: linking them joins exactly the planted topics of 200
    own = window[:, : round(0.7 * m)]
    links = sp.coo_matrix((np.ones(own.size), (np.repeat(np.arange(n), own.shape[1]), own.ravel())), (n, n))
    count, labels = connected_components(links, directed=False)
    assert count == n // bench.TOPIC and set(np.bincount(labels)) == {bench.TOPIC}
    with pytest.raises(AssertionError, match="multiple of 200"):
        bench.synthetic_window(150, 10, seed=0)


def test_agreement_counts_the_reference_neighbours_the_other_list_keeps():
    bench = load("teacher_precision")
    reference = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    other = np.array([[4, 3, 9, 8], [6, 5, 7, 1]])
    assert bench.agreement(reference, other).tolist() == [0.5, 1.0]  # -1 is no neighbour


def test_the_machine_line_names_the_cpu():
    line = load("machine").describe()
    assert line.count(",") >= 2 and "cores" in line
