"""Image columns: every cell form a user's data may hold, rows with text, image or both, the
groups of identical positives, and each bad image refused by its row before any compute."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from b3 import images as b3_images
from b3.data import DataError, load_pairs, split_bucket
from b3.preflight import PreflightError, check
from b3.spec import DatasetSpec, parse_manifest

IMAGES = {"queryImage": "query_image", "positiveImage": "positive_image", "id": "id"}


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


def write(tmp_path, rows: dict, name: str = "pairs.parquet", schema: pa.Schema | None = None):
    path = tmp_path / name
    pq.write_table(pa.table(rows, schema=schema), path)
    return path


def spec_for(path, **extra) -> DatasetSpec:
    return DatasetSpec.model_validate({"uri": str(path), "columns": IMAGES, **extra})


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "img").mkdir()
    for name, color in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        (tmp_path / "img" / name).write_bytes(png(color))
    return tmp_path


def test_bytes_paths_and_hugging_face_structs_load_as_each_rows_image(folder):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    path = write(folder, {
        "id": ["a", "b", "c", "d"],
        "query": ["red square", None, "", "both"],
        "query_image": pa.array([None, "img/red.png", str(folder / "img" / "blue.png"), "img/blue.png"]),
        "positive": [None, "a red one", "a blue one", "blue again"],
        "positive_image": pa.array([{"bytes": png((255, 0, 0)), "path": "ignored.png"},
                                    None, {"bytes": None, "path": "img/blue.png"}, None], struct),
    })  # fmt: skip
    pairs = load_pairs(spec_for(path), min_rows=1)
    assert pairs.queries.tolist() == ["red square", "", "", "both"]  # no text: ""
    assert pairs.query_images.tolist() == [None, f"{folder}/img/red.png", f"{folder}/img/blue.png", f"{folder}/img/blue.png"]
    assert pairs.positives.tolist() == ["", "a red one", "a blue one", "blue again"]
    assert pairs.positive_images[0] == png((255, 0, 0))  # a struct's bytes win over its path
    assert pairs.positive_images[1:].tolist() == [None, f"{folder}/img/blue.png", None]


def test_image_root_is_the_dataset_folder_unless_set_and_resolves_against_the_manifest(folder):
    (folder / "data").mkdir()
    path = write(folder / "data", {"id": ["a"], "query": ["q"], "query_image": ["red.png"],
                                   "positive": ["p"], "positive_image": [None]})  # fmt: skip
    with pytest.raises(DataError, match=rf"no such file {folder}/data/red.png"):
        load_pairs(spec_for(path), min_rows=1)
    job = parse_manifest({"spec": {"dataset": {"uri": "data/pairs.parquet", "imageRoot": "img", "columns": IMAGES},
                                   "workDir": "work"}},
                         base_dir=folder)  # fmt: skip
    assert job.spec.dataset.image_root == str(folder / "img")
    assert load_pairs(job.spec.dataset, min_rows=1).query_images.tolist() == [f"{folder}/img/red.png"]


def test_positives_are_the_same_when_text_and_image_both_are(folder):
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    path = write(folder, {
        "id": list("abcdef"), "query": list("qrstuv"), "query_image": pa.array([None] * 6, pa.string()),
        "positive": ["cat", "cat", "cat", "cat", "", ""],
        "positive_image": pa.array([red, red, blue, None, blue, blue]),
    })  # fmt: skip
    groups = load_pairs(spec_for(path), min_rows=1).positive_group.tolist()
    # a and b: same text, same bytes; c: another image; d: no image; e and f: the same image alone
    assert groups[0] == groups[1] and len({groups[0], groups[2], groups[3], groups[4]}) == 4
    assert groups[4] == groups[5]


def test_a_row_with_neither_text_nor_image_is_refused_by_its_row(folder):
    path = write(folder, {"id": ["a", "b", "c"], "query": ["q", " ", "q"],
                          "query_image": pa.array([None, None, "img/red.png"]),
                          "positive": ["p", "p", "p"], "positive_image": pa.array([None, None, None], pa.string())})  # fmt: skip
    with pytest.raises(DataError, match=r"1 rows have neither a query text \('query'\) nor a query image: file row 1 \(id b\)"):
        load_pairs(spec_for(path), min_rows=1)


@pytest.mark.parametrize("cell, why", [
    ("img/missing.png", r"no such file .*/img/missing.png"),
    (b"not an image at all", "its bytes are not an image Pillow can decode"),
    (png((0, 255, 0), 64)[:-40], "not an image Pillow can decode"),  # truncated: the header reads, the pixels do not
    ("img", r"cannot read .*/img"),  # a folder
])  # fmt: skip
def test_a_bad_image_is_refused_by_its_row_before_any_compute(folder, cell, why):
    path = write(folder, {"id": ["a", "b", "c"], "query": ["q1", "q2", "q3"], "query_image": [None, None, cell],
                          "positive": ["p1", "p2", "p3"], "positive_image": pa.array([None] * 3, pa.string())})  # fmt: skip
    with pytest.raises(DataError, match=rf"1 query image\(s\) in column 'query_image' cannot be used: file row 2 \(id c\).*{why}"):
        load_pairs(spec_for(path), min_rows=1)


def test_a_column_that_cannot_hold_images_is_named(folder):
    path = write(folder, {"id": ["a"], "query": ["q"], "query_image": [3], "positive": ["p"], "positive_image": [None]})
    with pytest.raises(DataError, match="column 'query_image' \\(query image\\) cannot hold images: it is int64"):
        load_pairs(spec_for(path), min_rows=1)


def test_an_object_store_fault_while_reading_an_image_is_retried_not_called_bad_input(folder, monkeypatch):
    """The first read of the image fails as a dropped connection does; the retry reads it."""
    local, failures = pafs.LocalFileSystem(), []

    def resolve(uri):
        def open_input_stream(path):
            if not failures:
                failures.append(path)
                raise ConnectionResetError("connection reset by peer")
            return local.open_input_stream(path)

        return type("FlakyFs", (), {"open_input_stream": staticmethod(open_input_stream)})(), uri

    monkeypatch.setattr(b3_images, "resolve_filesystem", resolve)
    monkeypatch.setattr("b3.retry.FIRST_PAUSE", 0.01)
    path = write(folder, {"id": ["a"], "query": ["q"], "query_image": ["img/red.png"], "positive": ["p"],
                          "positive_image": [None]})  # fmt: skip
    assert load_pairs(spec_for(path), min_rows=1).query_images.tolist() == [f"{folder}/img/red.png"]
    assert failures == [f"{folder}/img/red.png"]


def test_image_columns_are_refused_before_compute_with_models_that_embed_text_only(folder):
    path = write(folder, {"id": ["a"], "query": ["q"], "query_image": ["img/red.png"], "positive": ["p"],
                          "positive_image": [None]})  # fmt: skip
    job = parse_manifest({"spec": {"dataset": {"uri": str(path), "columns": IMAGES}, "workDir": str(folder / "work")}})
    with pytest.raises(PreflightError) as info:
        check(job, ["rank", "train"])
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["teacher.model", "training.student"]  # rank ranks, train trains
    assert all("embeds text only (its folder has no image processor), and dataset.columns.queryImage: 'query_image' "
               "and dataset.columns.positiveImage: 'positive_image' hold images" in p for p in problems)  # fmt: skip
    assert not (folder / "work").exists()  # nothing written for a job refused



# --- candidate lists (MMEB-style evaluation) -----------------------------------------------------


def candidates_spec(path, test: bool = True, images: bool = True) -> DatasetSpec:
    """Every row shares the split key "k", so every row is in the test split (or, with
    test=False, in the training split)."""
    bucket = int(split_bucket(["k"], 2)[0])
    columns = {**IMAGES, "candidates": "candidates"} | ({"candidateImages": "candidate_images"} if images else {})
    return DatasetSpec.model_validate({"uri": str(path), "columns": columns,
                                       "split": {"key": "key", "buckets": 2, "testBucket": bucket if test else 1 - bucket}})  # fmt: skip


def candidate_rows(**changes) -> dict:
    rows = {
        "id": ["a", "b", "c"], "key": ["k"] * 3, "query": ["q1", "q2", "q3"],
        "query_image": pa.array([None, "img/red.png", None]),
        "positive": ["a red one", "", "p3"], "positive_image": pa.array([None, "img/blue.png", None]),
        # MMEB's tgt_text / tgt_img_path: the positive first, then the others; c has no list
        "candidates": pa.array([["a red one", None, "a blue one"], ["", "x"], None], pa.list_(pa.string())),
        "candidate_images": pa.array([[None, "img/red.png", None], ["img/blue.png", "img/red.png"], None],
                                     pa.list_(pa.string())),
    }  # fmt: skip
    return rows | changes


def test_the_test_split_carries_each_query_s_candidate_list_with_its_images(folder):
    path = write(folder, candidate_rows())
    lists = load_pairs(candidates_spec(path), min_rows=1, split="test").candidates
    assert lists.rows.tolist() == [0, 0, 0, 1, 1]
    assert lists.texts.tolist() == ["a red one", "", "a blue one", "", "x"]  # a null text: an image alone
    red, blue = f"{folder}/img/red.png", f"{folder}/img/blue.png"
    assert lists.images.tolist() == [None, red, None, blue, red]
    assert load_pairs(candidates_spec(path, test=False), min_rows=1).candidates is None  # training never reads them
    named = write(folder, candidate_rows(candidates=pa.array([["a red one", "x"], ["y"], None], pa.list_(pa.string()))))
    texts_only = load_pairs(candidates_spec(named, images=False), min_rows=1, split="test").candidates
    assert texts_only.rows.tolist() == [0, 0, 1] and texts_only.images is None


@pytest.mark.parametrize("changes, message", [
    ({"candidate_images": pa.array([[None, None], ["img/blue.png", "img/red.png"], None], pa.list_(pa.string()))},
     r"1 rows list a different number of candidate images \('candidate_images'\) than candidates \('candidates'\): "
     r"file row 0 \(id a\)"),
    ({"candidate_images": pa.array([[None, "img/red.png", None], [None, "img/red.png"], None], pa.list_(pa.string()))},
     r"1 rows have a candidate with neither text nor image in 'candidates': file row 1 \(id b\)"),
    ({"candidate_images": pa.array([[None, "img/gone.png", None], ["img/gone.png", "img/red.png"], None],
                                   pa.list_(pa.string()))},
     r"1 candidate image\(s\) in column 'candidate_images' cannot be used, listed by file rows 0 \(id a\), 1 \(id b\)"
     r".*: no such file .*/img/gone.png"),
    ({"candidates": ["a", "b", "c"]}, r"column 'candidates' \(candidates\) must hold a list per row, not string"),
    ({"candidates": pa.array([[1], [2], None], pa.list_(pa.int64()))},
     r"column 'candidates' \(candidates\) must hold lists of texts, not list<.*int64>"),
])  # fmt: skip
def test_a_bad_candidate_list_is_refused_by_its_row_before_any_compute(folder, changes, message):
    path = write(folder, candidate_rows(**changes))
    with pytest.raises(DataError, match=message):
        load_pairs(candidates_spec(path), min_rows=1, split="test")


def test_candidate_images_need_candidate_texts():
    with pytest.raises(ValueError, match="candidateImages needs candidates"):
        DatasetSpec.model_validate({"uri": "x.parquet", "columns": {"candidateImages": "candidate_images"}})
