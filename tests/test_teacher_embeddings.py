"""Precomputed teacher embeddings (`teacher.embeddings`): a ranking made elsewhere drives the
mining exactly as the teacher's own would, no teacher model runs, and a file that does not fit
the dataset is refused by name before anything is written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_manifest

from b3.artifacts import read_embeddings
from b3.cli import main
from b3.storage import WorkDir


def embeddings_file(path, ids, query, positive) -> None:
    pq.write_table(pa.table({"id": list(ids), "query": [list(map(float, v)) for v in query],
                             "positive": [list(map(float, v)) for v in positive]}), path)  # fmt: skip


@pytest.fixture
def ranked(tmp_path, tiny_spec):
    """A work dir ranked by the tiny teacher itself, and its embeddings as a user's file: rows
    shuffled, one extra row for an id the dataset does not have."""
    assert main(["rank", str(write_manifest(tmp_path, {**tiny_spec, "workDir": str(tmp_path / "own")}, "own"))]) == 0
    own = WorkDir(str(tmp_path / "own"))
    ids = own.read_arrow("rank", "embeddings.arrow").column("id").to_pylist()
    query, positive = read_embeddings(own)
    order = np.random.default_rng(0).permutation(len(ids))
    embeddings_file(tmp_path / "given.parquet", [*np.asarray(ids)[order], "not-in-the-dataset"],
                    [*query[order], query[0]], [*positive[order], positive[0]])  # fmt: skip
    return ids, query, positive


def given_spec(tmp_path, tiny_spec, name: str = "given") -> dict:
    # teacher.model names nothing that exists: with embeddings given, no teacher model is loaded
    return {**tiny_spec, "teacher": {"model": str(tmp_path / "no-such-model"), "embeddings": "given.parquet"},
            "dataset": {**tiny_spec["dataset"], "split": {"key": "source"}}, "workDir": str(tmp_path / name)}  # fmt: skip


def test_mining_from_given_embeddings_equals_mining_with_the_teacher(tmp_path, tiny_spec, ranked, capsys):
    own_spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source"}}, "workDir": str(tmp_path / "own2")}
    assert main(["rank", str(write_manifest(tmp_path, own_spec, "own2"))]) == 0
    manifest = write_manifest(tmp_path, given_spec(tmp_path, tiny_spec))
    assert main(["run", str(manifest)]) == 0
    out = capsys.readouterr().out
    given, own = WorkDir(str(tmp_path / "given")), WorkDir(str(tmp_path / "own2"))
    assert given.read_parquet("rank", "topk.parquet").equals(own.read_parquet("rank", "topk.parquet"))
    report = given.read_json("eval", "results.json")
    assert set(report["models"]) == {"student (untrained)", "student (trained)"}  # no teacher model to score
    assert "train: done" in out
    assert main(["rank", str(manifest)]) == 0 and "rank: up to date" in capsys.readouterr().out
    ids, query, positive = ranked
    embeddings_file(tmp_path / "given.parquet", ids, positive, query)  # other embeddings, same path
    assert main(["rank", str(manifest)]) == 0 and "rank: done" in capsys.readouterr().out


@pytest.mark.parametrize("problem, change", [
    ("31 of the 210 training rows have no embeddings, e.g. id", lambda ids, q, p: (ids[35:], q[35:], p[35:])),
    ("column 'positive' holds vectors of lengths", lambda ids, q, p: (ids, q, [v[: 8 + i % 2] for i, v in enumerate(p)])),
    ("query vectors have 32 dimensions, positive ones 16", lambda ids, q, p: (ids, q, p[:, :16])),
    ("query vector(s) are zero or not finite, e.g. id", lambda ids, q, p: (ids, np.where(np.arange(len(q))[:, None] == 3, np.nan, q), p)),
    ("appears twice", lambda ids, q, p: ([*ids, ids[0]], [*q, q[0]], [*p, p[0]])),
])  # fmt: skip
def test_a_file_that_does_not_fit_the_dataset_is_refused_by_name_and_nothing_is_lost(
    tmp_path, tiny_spec, ranked, capsys, problem, change
):
    manifest = write_manifest(tmp_path, given_spec(tmp_path, tiny_spec))
    assert main(["rank", str(manifest)]) == 0
    before = WorkDir(str(tmp_path / "given")).read_json("rank", "manifest.json")
    capsys.readouterr()
    ids, query, positive = ranked
    embeddings_file(tmp_path / "given.parquet", *change(list(ids), query, positive))
    assert main(["rank", str(manifest)]) == 2
    err = capsys.readouterr().err
    assert f"teacher.embeddings {tmp_path / 'given.parquet'}: " in err and problem in err, err
    assert WorkDir(str(tmp_path / "given")).read_json("rank", "manifest.json") == before  # the old ranking stays


def test_a_missing_file_or_column_is_refused_before_compute(tmp_path, tiny_spec, capsys):
    manifest = write_manifest(tmp_path, given_spec(tmp_path, tiny_spec))
    assert main(["rank", str(manifest)]) == 2
    assert f"teacher.embeddings: {tmp_path / 'given.parquet'}: no such file" in capsys.readouterr().err
    pq.write_table(pa.table({"id": ["pkg0"], "query": [[1.0]]}), tmp_path / "given.parquet")
    assert main(["rank", str(manifest)]) == 2
    assert "missing column(s) 'positive'" in capsys.readouterr().err
    assert not (tmp_path / "given").exists()
