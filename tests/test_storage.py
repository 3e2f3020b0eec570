"""Atomic writes on any filesystem, and fingerprints (the stage protocol: test_artifacts)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from b3.storage import WorkDir, fingerprint


def test_fingerprint_ignores_key_order_and_sees_values():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_an_interrupted_write_leaves_nothing(tmp_path):
    work = WorkDir(str(tmp_path))
    with pytest.raises(RuntimeError), work.open_output("rank", "topk.parquet") as out:
        out.write(b"half")
        raise RuntimeError("killed")
    assert not work.exists("rank", "topk.parquet")
    assert list((tmp_path / "rank").iterdir()) == []


def test_round_trips(tmp_path):
    work = WorkDir(f"file://{tmp_path}")
    table = pa.table({"x": [1, 2, 3]})
    work.write_parquet(table, "a", "t.parquet")
    work.write_arrow(table, "a", "t.arrow")
    work.write_json({"k": [1]}, "a", "t.json")
    assert work.read_parquet("a", "t.parquet").equals(table)
    assert work.read_arrow("a", "t.arrow").equals(table)
    assert work.read_json("a", "t.json") == {"k": [1]}
