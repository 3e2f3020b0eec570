"""`b3 inspect`'s diagnosis: E and the step-0 gradient shares against hand-computed values,
their invariants, and a reading that follows the data (small tasks vs one large task)."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_pairs, write_manifest
from hypothesis import given, settings
from hypothesis import strategies as st

from b3.cli import main
from b3.diagnosis import expected_window_rows, in_batch_rows, negative_gradient_shares


def test_expected_window_rows_by_hand():
    e = expected_window_rows(32, np.array([100, 100, 9]), np.array([1500, 50_000, 10]))
    # 31 other rows, each in the window with probability w / (N - 1); a task smaller than the
    # batch is all in it, so its whole window is there
    assert e == pytest.approx([31 * 100 / 1499, 31 * 100 / 49_999, 9])
    assert e[1] == pytest.approx(0.062, abs=1e-3)  # the paper's |B| = 32 point


def test_in_batch_rows_counts_ranked_rows_sharing_the_batch():
    ranked = np.array([[1, 2], [0, -1], [3, 0], [-1, -1], [0, 1]])
    counts = in_batch_rows([[0, 1, 2], [3]], 5, ranked)  # row 4 is in no batch
    assert counts[:4].tolist() == [2, 1, 1, 0] and math.isnan(counts[4])


def test_gradient_shares_by_hand():
    # one batch of three rows; query 0 scores positive 1 at cosine 0.6 and positive 2 at 0
    q = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    p = np.array([[1.0, 0, 0], [0.6, 0.8, 0], [0, 1.0, 0]])
    tau = 0.5
    sets = {"near": np.array([[1], [-1], [-1]]), "far": np.array([[2], [-1], [-1]])}
    shares = negative_gradient_shares([[0, 1, 2]], q, p, np.array([0, 1, 2]), sets, tau)
    g1, g2 = math.exp(0.6 / tau), math.exp(0.0 / tau)  # softmax weights, the positive's cancels
    assert shares["near"][0] == pytest.approx(g1 / (g1 + g2))
    assert shares["far"][0] == pytest.approx(g2 / (g1 + g2))
    # query 1 has negatives (rows 0 and 2) but no ranked rows: none of its gradient is in a set
    assert shares["near"][1] == 0.0
    # row 2 has row 0's positive text: not a negative of query 0, so row 1 takes all of it
    shares = negative_gradient_shares([[0, 1, 2]], q, p, np.array([0, 1, 0]), sets, tau)
    assert shares["near"][0] == pytest.approx(1.0) and shares["far"][0] == 0.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 12), seed=st.integers(0, 10_000), tau=st.floats(0.01, 1.0))
def test_gradient_shares_are_shares(n, seed, tau):
    """In [0, 1]; additive over disjoint sets; every negative together holds all of it."""
    rng = np.random.default_rng(seed)
    q, p = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(2, n, 4)))
    group = rng.integers(0, n, n)
    others = np.array([[j for j in rng.permutation(n) if j != i] for i in range(n)])
    half = (n - 1) // 2
    a, b = others[:, :half], others[:, half:]
    batches = [list(range(n))]
    shares = negative_gradient_shares(batches, q, p, group, {"a": a, "b": b, "all": others}, tau)
    has_negative = np.array([(group != group[i]).any() for i in range(n)])
    assert np.isnan(shares["all"][~has_negative]).all()
    for name in ("a", "b", "all"):
        values = shares[name][has_negative]
        assert ((values >= -1e-12) & (values <= 1 + 1e-12)).all()
    assert np.allclose(shares["a"][has_negative] + shares["b"][has_negative], 1.0)
    assert np.allclose(shares["all"][has_negative], 1.0)


def _inspect(tmp_path, tiny_spec, tasks: int, capsys) -> tuple[dict, str]:
    data = tmp_path / f"pairs-{tasks}.parquet"
    pq.write_table(make_pairs(240, tasks=tasks), data)
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "uri": str(data)},
            "mining": {**tiny_spec["mining"], "m": 3}, "workDir": str(tmp_path / f"work-{tasks}")}  # fmt: skip
    manifest = str(write_manifest(tmp_path, spec, f"tasks-{tasks}"))
    assert main(["rank", manifest]) == 0 and main(["partition", manifest]) == 0
    capsys.readouterr()
    assert main(["inspect", manifest]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / f"work-{tasks}" / "inspect" / "diagnosis.json").read_text())
    return saved, out


def test_the_reading_follows_the_task_sizes(tmp_path, tiny_spec, capsys):
    """|B| = 16, m = 3: twelve tasks of 20 rows put ~2.4 window rows in a same-task random batch,
    one task of 240 rows ~0.19; the diagnosis says so, and the measured counts agree."""
    small, small_out = _inspect(tmp_path, tiny_spec, 12, capsys)
    large, large_out = _inspect(tmp_path, tiny_spec, 1, capsys)
    e_small = small["overall"]["expected_window_in_batch"]["random_same_task"]
    e_large = large["overall"]["expected_window_in_batch"]["random_same_task"]
    # a few rows more in the tasks that hold the duplicates
    assert e_small == pytest.approx(15 * 3 / 19, rel=0.05)
    assert e_large == pytest.approx(15 * 3 / 239)
    assert large["overall"]["expected_window_in_batch"]["random"] == pytest.approx(e_large)
    assert small["overall"]["expected_window_in_batch"]["random"] == pytest.approx(15 * 3 / 239)
    assert "already hold ~2.4 window neighbours" in small["reading"][0]
    assert "rarely hold a window neighbour (E = 0.19" in large["reading"][0]
    assert small["reading"][0] in small_out and large["reading"][0] in large_out
    assert set(small["tasks"]) == {f"task{i}" for i in range(12)}
    assert set(large["tasks"]) == {"task0"}
    for result in (small, large):
        overall = result["overall"]
        # one epoch of same-task random batches holds about E window rows per query
        measured = overall["random_same_task"]["window_in_batch"]
        expected = overall["expected_window_in_batch"]["random_same_task"]
        assert measured == pytest.approx(expected, rel=0.5, abs=0.1)
        # what mining is for: B3 batches hold more of each query's window than random ones
        assert overall["b3"]["window_in_batch"] > overall["random_same_task"]["window_in_batch"]
        for kind in ("random", "random_same_task", "b3"):
            on_ranked = overall[kind]["gradient_on_top_p"] + overall[kind]["gradient_on_window"]
            assert 0 <= on_ranked <= 1
