"""The mining sweep (`b3 inspect --sweep`): its counts by hand and against brute force, and
each point against what `b3 partition` + `b3 inspect` measure for the same settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_manifest
from hypothesis import given, settings
from hypothesis import strategies as st

from b3.cli import main
from b3.diagnosis import in_batch_counts


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_in_batch_counts_by_hand():
    batch_of = np.array([0, 0, 1, 1, -1])
    ranked = np.array([[1, 2, -1], [0, 4, 3], [3, -1, -1], [0, 1, 2], [0, 1, 2]])
    # row 4 sits in no batch (-1): its "batch" is that of other unbatched rows only
    assert in_batch_counts(batch_of, ranked).tolist() == [1, 1, 1, 1, 0]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_in_batch_counts_equals_a_loop(data):
    n = data.draw(st.integers(2, 30))
    batch_of = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
    width = data.draw(st.integers(1, 6))
    ranked = np.array(data.draw(st.lists(st.lists(st.integers(-1, n - 1), min_size=width, max_size=width),
                                         min_size=n, max_size=n)))  # fmt: skip
    expected = [sum(1 for j in ranked[i] if j >= 0 and batch_of[j] == batch_of[i]) for i in range(n)]
    assert in_batch_counts(batch_of, ranked).tolist() == expected


def test_each_point_measures_what_partition_and_inspect_would(tmp_path, tiny_spec, capsys):
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("rank", manifest) == 0
    capsys.readouterr()
    assert run("inspect", manifest, "--sweep", "--p", "0", "2", "--m", "8", "--k", "4", "8",
               "--edges", "mutual", "union", "--json", "--plot", tmp_path / "sweep.png") == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    points = result["points"]
    assert len(points) == 2 * 1 * 2 * 2 * 2  # p x m x K x edges x scopes
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "work" / "inspect" / "sweep.json").read_text()) == result
    for pt in points:
        assert 0 <= pt["above_positive"] <= 1 and 0 <= pt["s_inside"] <= 1
        assert 0 <= pt["window_in_batch"] <= 8 and pt["hardness"] > 0
        if pt["p"] == 0:
            assert pt["top_p_in_batch"] == 0
        # a community of K rows in the batch holds at most K - 1 others, plus other communities
        assert pt["vs_random"] == pt["hardness"] / result["baselines"]["random"]["topk_negative"]

    # the manifest's own settings (p=2, m=8, K=4, mutual, per task) through the real stages
    assert run("partition", manifest) == 0
    capsys.readouterr()
    assert run("inspect", manifest, "--json") == 0
    inspected = json.loads(capsys.readouterr().out)
    own = next(pt for pt in points if (pt["scope"], pt["p"], pt["k"], pt["edges"]) == ("per-task", 2, 4, "mutual"))
    assert own["hardness"] == inspected["batches"]["b3"]["topk_negative"]
    assert result["baselines"]["random_same_task"]["topk_negative"] == inspected["batches"]["random_same_task"]["topk_negative"]
    stats = json.loads((tmp_path / "work" / "partition" / "stats.json").read_text())
    assert own["s_inside"] == stats["s_edges_inside_share"]
    # and what the diagnosis measures on the same batches
    diagnosed = inspected["diagnosis"]["overall"]
    assert own["e_same_task"] == pytest.approx(
        diagnosed["expected_window_in_batch"]["random_same_task"]
    )
    assert own["window_in_batch"] == pytest.approx(diagnosed["b3"]["window_in_batch"])
    assert own["gradient_on_top_p"] == pytest.approx(diagnosed["b3"]["gradient_on_top_p"])
    assert own["gradient_on_window"] == pytest.approx(diagnosed["b3"]["gradient_on_window"])


def test_sweep_refuses_bad_grids_and_a_missing_rank_stage(tmp_path, tiny_spec, capsys, monkeypatch):
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("inspect", manifest, "--sweep") == 2
    assert "rank" in capsys.readouterr().err
    assert run("rank", manifest) == 0
    capsys.readouterr()
    # the default K grid keeps the sizes that divide |B| = 16 (8 and 16 of 8, 16, 32)
    assert run("inspect", manifest, "--sweep", "--p", "2", "--m", "8", "--scope", "per-task", "--json") == 0
    assert {pt["k"] for pt in json.loads(capsys.readouterr().out)["points"]} == {8, 16}
    assert run("inspect", manifest, "--sweep", "--k", "5", "--edges", "both", "--scope", "global") == 2
    err = capsys.readouterr().err
    assert "--k 5 does not divide mining.batchSize (16)" in err
    assert "--edges both: mutual or union" in err and "--scope global: per-task or whole-set" in err
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert run("inspect", manifest, "--sweep", "--plot", tmp_path / "x.png") == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
