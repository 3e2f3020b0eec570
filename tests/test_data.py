"""Loading pairs: formats, URIs, splits, duplicate positives, and every bad-input refusal."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import SHARED, make_pairs

from b3.data import DataError, load_pairs, split_bucket
from b3.spec import DatasetSpec

COLUMNS = {"task": "task", "id": "id"}


def spec_for(path, **extra) -> DatasetSpec:
    return DatasetSpec.model_validate({"uri": str(path), "columns": COLUMNS, **extra})


def write_jsonl(table: pa.Table, path) -> None:
    import json

    with open(path, "w") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row) + "\n")


def test_parquet_jsonl_csv_and_file_uri_load_the_same_rows(tmp_path):
    table = make_pairs(50)
    pq.write_table(table, tmp_path / "p.parquet")
    write_jsonl(table, tmp_path / "p.jsonl")
    pacsv.write_csv(table, tmp_path / "p.csv")
    loaded = [
        load_pairs(spec_for(tmp_path / "p.parquet"), 8),
        load_pairs(spec_for(tmp_path / "p.jsonl"), 8),
        load_pairs(spec_for(tmp_path / "p.csv"), 8),
        load_pairs(spec_for(f"file://{tmp_path}/p.parquet"), 8),
    ]
    for pairs in loaded:
        assert pairs.queries.tolist() == table.column("query").to_pylist()
        assert pairs.positives.tolist() == table.column("positive").to_pylist()
        assert pairs.tasks.tolist() == table.column("task").to_pylist()
        assert pairs.ids.tolist() == table.column("id").to_pylist()


def test_identical_positives_share_a_group(tmp_path):
    table = make_pairs(30, duplicates=3)
    pq.write_table(table, tmp_path / "p.parquet")
    pairs = load_pairs(spec_for(tmp_path / "p.parquet"), 8)
    texts = pairs.positives
    same_text = texts[:, None] == texts[None, :]
    same_group = pairs.positive_group[:, None] == pairs.positive_group[None, :]
    assert (same_text == same_group).all()
    assert len(np.unique(pairs.positive_group)) == 27


def test_optional_columns_default_to_one_task_and_row_numbers(tmp_path):
    pq.write_table(make_pairs(20).select(["query", "positive"]), tmp_path / "p.parquet")
    pairs = load_pairs(DatasetSpec(uri=str(tmp_path / "p.parquet")), 8)
    assert set(pairs.tasks) == {"all"}
    assert pairs.ids.tolist() == [str(i) for i in range(20)]


def test_split_holds_out_whole_keys_and_is_stable(tmp_path):
    table = make_pairs(400)
    pq.write_table(table, tmp_path / "p.parquet")
    split = {"key": "source", "buckets": 10, "testBucket": 0}
    train = load_pairs(spec_for(tmp_path / "p.parquet", split=split), 8, "train")
    test = load_pairs(spec_for(tmp_path / "p.parquet", split=split), 8, "test")
    assert len(train) + len(test) == 400 and train.held_out == len(test)
    assert not set(train.ids) & set(test.ids)
    source = dict(
        zip(table.column("id").to_pylist(), table.column("source").to_pylist(), strict=True)
    )
    assert not {source[i] for i in train.ids} & {source[i] for i in test.ids}
    expected = [
        i
        for i in table.column("id").to_pylist()
        if int(hashlib.md5(source[i].encode()).hexdigest()[:8], 16) % 10 == 0
    ]
    assert test.ids.tolist() == expected


def test_split_matches_the_shared_dataset_convention():
    path = SHARED / "datasets" / "debian-descriptions-sample.parquet"
    if not path.exists():
        pytest.skip(f"shared dataset not found at {path}")
    table = pq.read_table(path, columns=["id", "split"])
    bucket = split_bucket(table.column("id").to_pylist(), 10)
    assert ((bucket == 0) == (np.asarray(table.column("split").to_pylist()) == "test")).all()


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: t.drop_columns(["positive"]), "missing column(s) 'positive' (positive)"),
        (lambda t: t.drop_columns(["task"]), "missing column(s) 'task' (task)"),
        (
            lambda t: t.set_column(
                1, "query", pa.array([None] + t.column("query").to_pylist()[1:])
            ),
            "1 rows have a null or empty 'query' (query): file row 0 (id pkg0)",
        ),
        (
            lambda t: t.set_column(
                2,
                "positive",
                pa.array(
                    t.column("positive").to_pylist()[:5]
                    + ["   "]
                    + t.column("positive").to_pylist()[6:]
                ),
            ),
            "null or empty 'positive' (positive): file row 5 (id pkg5)",
        ),
        (lambda t: t.slice(0, 10), "10 train rows, fewer than one batch (mining.batchSize = 16)"),
        (
            lambda t: t.set_column(0, "id", pa.array(["same"] * t.num_rows)),
            "'id' (id) has 39 repeated values: 'same' at file rows 0 and 1",
        ),
        (
            lambda t: t.set_column(1, "query", pa.array(list(range(t.num_rows)))),
            "column 'query' (query) must hold text",
        ),
        (
            lambda t: t.set_column(3, "task", pa.array([None] * t.num_rows, pa.string())),
            "'task' (task) has nulls: file rows 0 (id pkg0)",
        ),
        (lambda t: t.slice(0, 0), "no rows"),
    ],
)
def test_bad_tables_are_refused_with_the_problem_named(tmp_path, mutate, needle):
    pq.write_table(mutate(make_pairs(40)), tmp_path / "p.parquet")
    with pytest.raises(DataError) as info:
        load_pairs(spec_for(tmp_path / "p.parquet"), 16)
    assert needle in str(info.value)


def test_unreadable_missing_and_unknown_files(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(DataError, match="cannot read it as parquet"):
        load_pairs(spec_for(tmp_path / "junk.parquet"), 8)
    with pytest.raises(DataError, match="no such file"):
        load_pairs(spec_for(tmp_path / "absent.parquet"), 8)
    (tmp_path / "pairs.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match="set dataset.format"):
        load_pairs(spec_for(tmp_path / "pairs.xlsx"), 8)
    with pytest.raises(DataError, match="no test split"):
        pq.write_table(make_pairs(20), tmp_path / "p.parquet")
        load_pairs(spec_for(tmp_path / "p.parquet"), 8, "test")


# --- datasets input: a folder written by Dataset.save_to_disk ---------------------------------


def test_a_saved_hugging_face_dataset_loads_like_the_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = make_pairs(60)
    pq.write_table(table, tmp_path / "p.parquet")
    ds = datasets.Dataset(table)
    ds.save_to_disk(str(tmp_path / "ds"))
    split = {"key": "id", "buckets": 5, "testBucket": 0}
    for which in ("train", "test"):
        from_file = load_pairs(spec_for(tmp_path / "p.parquet", split=split), 4, which)
        from_folder = load_pairs(spec_for(tmp_path / "ds", split=split), 4, which)
        assert from_folder.ids.tolist() == from_file.ids.tolist()
        assert from_folder.queries.tolist() == from_file.queries.tolist()
        assert from_folder.tasks.tolist() == from_file.tasks.tolist()
    # renamed columns map like a file's; a selection saved as such is honoured
    ds.rename_column("query", "question").select(range(30, 60)).save_to_disk(str(tmp_path / "renamed"))
    pairs = load_pairs(spec_for(tmp_path / "renamed", columns={**COLUMNS, "query": "question"}, format="datasets"), 4)
    assert pairs.queries.tolist() == table.column("query").to_pylist()[30:]


def test_bad_saved_datasets_are_refused_naming_the_problem(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset(make_pairs(20))
    ds.remove_columns("positive").save_to_disk(str(tmp_path / "nopos"))
    with pytest.raises(DataError, match="missing column.*'positive' \\(positive\\)"):
        load_pairs(spec_for(tmp_path / "nopos"), 4)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=f"a DatasetDict with splits train, test; point dataset.uri at one of them, e.g. {tmp_path}/dict/train"):
        load_pairs(spec_for(tmp_path / "dict"), 4)
    assert len(load_pairs(spec_for(tmp_path / "dict" / "train"), 4)) == 20
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_pairs(spec_for(tmp_path / "folder"), 4)


def test_a_saved_datasets_identity_follows_its_content(tmp_path):
    datasets = pytest.importorskip("datasets")
    from b3.data import dataset_identity

    datasets.Dataset(make_pairs(20)).save_to_disk(str(tmp_path / "a"))
    first = dataset_identity(spec_for(tmp_path / "a"))
    assert dataset_identity(spec_for(tmp_path / "a")) == first
    changed = datasets.load_from_disk(str(tmp_path / "a")).map(lambda row: {"query": row["query"] + "!"})
    changed.save_to_disk(str(tmp_path / "b"))
    assert dataset_identity(spec_for(tmp_path / "b"))["fingerprint"] != first["fingerprint"]


def test_a_bad_row_is_named_by_the_files_own_row_number_and_id_not_its_place_after_the_split(tmp_path):
    table = make_pairs(40)
    split = {"key": "source", "buckets": 4, "testBucket": 0}
    held_out = split_bucket(table.column("source").to_pylist(), 4) == 0
    row = int(np.flatnonzero(~held_out)[np.flatnonzero(~held_out) > np.flatnonzero(held_out)[0]][0])
    assert row != int((~held_out[:row]).sum())  # the row's place among the training rows differs
    queries = table.column("query").to_pylist()
    queries[row] = ""
    pq.write_table(table.set_column(1, "query", pa.array(queries)), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=rf"file row {row} \(id pkg{row}\)"):
        load_pairs(spec_for(tmp_path / "p.parquet", split=split), 16)
