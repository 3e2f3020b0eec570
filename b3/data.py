"""Loading (query, positive) pairs and refusing bad input before any compute is spent.

`load_pairs` reads parquet, JSONL or CSV from a path or URI with pyarrow, checks it, keeps the
training split and returns `Pairs`. Every problem with the input raises `DataError`, which the
stage programs turn into exit code 2 with the message in the pod's termination log. A network
or object-store fault is not a problem with the input: it is retried (`b3.retry`) and, when it
persists, raised as `TransientError` (exit 75, which the Job retries).

Rows whose positives are identical (the same text and the same image) share a
`positive_group`; downstream code uses it so that a query never meets its own positive's
duplicates as negatives. With image columns (`dataset.columns.queryImage`, `positiveImage`;
`b3.images` says what a cell may hold) a side needs its text, its image or both, and every image
is read and decoded once before any compute, a bad one named by its row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from b3.errors import TransientError
from b3.images import cell_type_problem, image_cells, image_key, image_problems
from b3.retry import is_transient, retrying
from b3.spec import DatasetSpec
from b3.storage import resolve_filesystem

EXIT_BAD_INPUT = 2
SINGLE_TASK = "all"

_FORMATS = {
    ".parquet": "parquet", ".pq": "parquet",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv", ".tsv": "csv",
}  # fmt: skip


class DataError(ValueError):
    """Input that no stage can use. Stages exit with EXIT_BAD_INPUT and this message."""


@dataclass(frozen=True)
class CandidateLists:
    """Each test query's candidate list (MMEB-style evaluation), flat: entry j is a candidate of
    query row `rows[j]`; a row without a list has no entries."""

    rows: np.ndarray  # (M,) int64, ascending: the query row each candidate belongs to
    texts: np.ndarray  # (M,) str, "" for an image alone
    images: np.ndarray | None  # (M,) object image cells (None: no image), with candidateImages


@dataclass(frozen=True)
class Pairs:
    """Training rows. Row i is (queries[i], positives[i]); arrays are aligned by row."""

    ids: np.ndarray  # (N,) str
    queries: np.ndarray  # (N,) str
    positives: np.ndarray  # (N,) str
    tasks: np.ndarray  # (N,) str
    positive_group: np.ndarray  # (N,) int64, equal for rows with identical positives
    held_out: int  # rows of the file left out as the test split
    # (N,) object: each row's image (bytes or a resolved path; None: no image), when the
    # dataset names an image column for that side; "" stands for a side's missing text then
    query_images: np.ndarray | None = None
    positive_images: np.ndarray | None = None
    candidates: CandidateLists | None = None  # the test split's, with dataset.columns.candidates

    def __len__(self) -> int:
        return len(self.ids)


def unique_texts(texts) -> tuple[np.ndarray, np.ndarray]:
    """Distinct texts (first-seen order, object array) and each row's index into them.

    Arrow dictionary encoding, not np.unique(texts.astype(str)): that pads every text to the
    longest one (20 GB for the Debian set's 81k-character outlier)."""
    encoded = pc.dictionary_encode(pa.array(list(texts), pa.large_string()))
    unique = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    return unique, encoded.indices.to_numpy().astype(np.int64)


def split_bucket(keys: list[str], buckets: int) -> np.ndarray:
    """Bucket of each key: int(md5(key)[:8], 16) % buckets (stable across processes)."""
    return np.fromiter(
        (int(hashlib.md5(k.encode()).hexdigest()[:8], 16) % buckets for k in keys),
        dtype=np.int64,
        count=len(keys),
    )


def _is_saved_dataset(spec: DatasetSpec, info) -> bool:
    """A folder written by `datasets`' save_to_disk: declared, or (auto) any folder."""
    return spec.format == "datasets" or (spec.format == "auto" and info.type.name == "Directory")


def _detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise DataError(
        f"dataset {path}: cannot tell the format from the extension; set dataset.format "
        "to parquet, jsonl or csv"
    )


def _io(uri: str, what: str, call):
    """`call()` on the dataset's filesystem: transient faults retried (TransientError once they
    persist), any other failure to read is the input's problem (DataError)."""
    try:
        return retrying(f"dataset {uri}: {what}", call)
    except TransientError:
        raise
    except (OSError, ValueError, pa.ArrowException) as err:
        if is_transient(err):
            raise
        raise DataError(f"dataset {uri}: cannot {what} ({' '.join(str(err).split())})") from None


def _stat(spec: DatasetSpec):
    def stat():
        fs, path = resolve_filesystem(spec.uri)
        return fs, path, fs.get_file_info(path)

    fs, path, info = _io(spec.uri, "open", stat)
    if info.type.name == "NotFound":
        raise DataError(f"dataset {spec.uri}: no such file")
    return fs, path, info


# object stores' names for a hash of an object's content, as pyarrow's input files report them
_CONTENT_KEYS = ("etag", "md5", "md5hash", "crc32c")


def dataset_identity(spec: DatasetSpec) -> dict:
    """What says the dataset file is the one a stage read (a stat, not a read; the URI and
    columns are spec fields): on an object store that reports one, the hash of its content
    (S3's ETag: an identical upload keeps it), else size and modification time; for a saved
    Hugging Face dataset, the fingerprint `datasets` keeps of its content and its files' sizes."""
    fs, path, info = _stat(spec)
    if _is_saved_dataset(spec, info):
        state = _saved_dataset_state(fs, path, spec.uri)
        files = [f["filename"] for f in state.get("_data_files", [])]
        sizes = _io(spec.uri, "stat its files", lambda: [fs.get_file_info(f"{path}/{f}").size for f in files])
        return {"fingerprint": state.get("_fingerprint"), "sizes": sizes}
    if info.type.name == "File" and not isinstance(fs, pafs.LocalFileSystem):
        content = _io(spec.uri, "read its metadata", lambda: _content_hash(fs, path))
        if content is not None:
            return {"size": info.size, "content": content}
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def _content_hash(fs, path: str) -> str | None:
    """The store's hash of an object's content (a HEAD request for S3), if it reports one."""
    with fs.open_input_file(path) as f:
        metadata = {key.lower(): value for key, value in (f.metadata() or {}).items()}
    for key in _CONTENT_KEYS:
        if metadata.get(key):
            value = metadata[key]
            return f"{key}:{(value.decode() if isinstance(value, bytes) else value).strip(chr(34))}"
    return None


def _read_json(fs, path: str):
    """A small JSON file, None when absent or unreadable (transient faults retried)."""
    def read():
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return json.loads(retrying(f"read {path}", read))
    except TransientError:
        raise
    except (OSError, ValueError) as err:
        if is_transient(err):
            raise
        return None


def _saved_dataset_state(fs, path: str, uri: str) -> dict:
    """state.json of a folder written by `Dataset.save_to_disk` (a DatasetDict's folder holds
    one such folder per split instead)."""
    state = _read_json(fs, f"{path}/state.json")
    if isinstance(state, dict):
        return state
    splits = (_read_json(fs, f"{path}/dataset_dict.json") or {}).get("splits")
    if splits is None:
        raise DataError(f"dataset {uri}: a folder, but not one written by datasets' save_to_disk "
                        "(no state.json)") from None  # fmt: skip
    raise DataError(f"dataset {uri}: a DatasetDict with splits {', '.join(splits)}; point "
                    f"dataset.uri at one of them, e.g. {uri.rstrip('/')}/{(splits or ['train'])[0]}")  # fmt: skip


def _read_saved_dataset(fs, path: str, uri: str) -> pa.Table:
    """A dataset saved with `datasets`' save_to_disk, as the Arrow table of its rows (in its
    order, selections and shuffles applied)."""
    _saved_dataset_state(fs, path, uri)  # a clear error for a DatasetDict or another folder
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset {uri}: a saved Hugging Face dataset; reading it needs the "
                        "`datasets` package (pip install 'b3-operator[datasets]')") from None  # fmt: skip
    return _io(uri, "read it as a saved dataset", lambda: datasets.load_from_disk(uri).with_format("arrow")[:])


def read_table(spec: DatasetSpec) -> pa.Table:
    """The whole file as an Arrow table."""
    fs, path, info = _stat(spec)
    if _is_saved_dataset(spec, info):
        return _read_saved_dataset(fs, path, spec.uri)
    fmt = _detect_format(path, spec.format)

    def read() -> pa.Table:
        if fmt == "parquet":
            return pq.read_table(path, filesystem=fs)
        with fs.open_input_stream(path, compression="detect") as stream:
            if fmt == "jsonl":
                return pajson.read_json(stream)
            return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=_delimiter(path)))

    return _io(spec.uri, f"read it as {fmt}", read)


def _where(bad: np.ndarray, file_rows: np.ndarray, ids: np.ndarray | None) -> str:
    """'file rows 5 (id pkg5), 9 (id pkg9), ...': the first few of the rows `bad` (indices into
    the kept rows) as the file numbers them, counting from 0, with their ids."""
    shown = [f"{file_rows[r]}" + (f" (id {ids[r]})" if ids is not None else "") for r in bad[:5]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"file row{'s' * (len(bad) > 1)} {', '.join(shown)}{more} (counting from 0)"


def require_columns(spec: DatasetSpec, present: list[str]) -> None:
    """DataError unless every column the spec names is among `present`."""
    cols = spec.columns
    wanted = {"query": cols.query, "positive": cols.positive, "task": cols.task, "id": cols.id,
              "query image": cols.query_image, "positive image": cols.positive_image,
              "candidates": cols.candidates, "candidate images": cols.candidate_images}  # fmt: skip
    if spec.split is not None:
        wanted["split key"] = spec.split.key
    missing = [f"{name!r} ({role})" for role, name in wanted.items() if name and name not in present]
    if missing:
        raise DataError(f"dataset {spec.uri}: missing column(s) {', '.join(missing)}; present: "
                        f"{', '.join(present)}")  # fmt: skip


def dataset_columns(spec: DatasetSpec) -> list[str]:
    """The dataset's column names, read from its schema (a Parquet footer, a saved dataset's
    features, the first block of a CSV or JSON Lines file), not from its rows."""
    fs, path, info = _stat(spec)
    if _is_saved_dataset(spec, info):
        _saved_dataset_state(fs, path, spec.uri)  # a clear error for a DatasetDict or another folder
        features = (_read_json(fs, f"{path}/dataset_info.json") or {}).get("features")
        if not isinstance(features, dict):
            raise DataError(f"dataset {spec.uri}: a saved dataset without features in dataset_info.json")
        return list(features)
    fmt = _detect_format(path, spec.format)

    def schema() -> pa.Schema:
        if fmt == "parquet":
            return pq.read_schema(path, filesystem=fs)
        with fs.open_input_stream(path, compression="detect") as stream:
            if fmt == "jsonl":
                return pajson.open_json(stream).schema
            return pacsv.open_csv(stream, parse_options=pacsv.ParseOptions(delimiter=_delimiter(path))).schema

    return list(_io(spec.uri, f"read it as {fmt}", schema).names)


def _delimiter(path: str) -> str:
    return "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _text_column(table: pa.Table, name: str, role: str, uri: str, file_rows: np.ndarray,
                 ids: np.ndarray | None, images: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The column's texts; a null or empty text is refused, unless the row has an image on this
    side (`images`), where it becomes "" (image only); a row with neither is refused."""
    col = table.column(name)
    if pa.types.is_null(col.type) and images is not None:  # every text null: an image-only side
        col = col.cast(pa.string())
    if not _is_text_type(col.type):
        raise DataError(f"dataset {uri}: column {name!r} ({role}) must hold text, not {col.type}")
    empty = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
    empty = empty.to_numpy(zero_copy_only=False).astype(bool, copy=False)
    if images is None:
        if len(bad := np.flatnonzero(empty)):
            raise DataError(f"dataset {uri}: {len(bad)} rows have a null or empty {name!r} ({role}): "
                            f"{_where(bad, file_rows, ids)}")  # fmt: skip
        return np.asarray(col.to_pylist(), dtype=object)
    if len(bad := np.flatnonzero(empty & np.asarray([image is None for image in images], dtype=bool))):
        raise DataError(f"dataset {uri}: {len(bad)} rows have neither a {role} text ({name!r}) nor a "
                        f"{role} image: {_where(bad, file_rows, ids)}")  # fmt: skip
    return np.asarray(["" if e else t for e, t in zip(empty, col.to_pylist(), strict=True)], dtype=object)


def _image_column(table: pa.Table, name: str | None, role: str, spec: DatasetSpec) -> np.ndarray | None:
    """Each row's image on one side (None without an image column), not read yet."""
    if name is None:
        return None
    col = table.column(name)
    if problem := cell_type_problem(col.type):
        raise DataError(f"dataset {spec.uri}: column {name!r} ({role} image) cannot hold images: {problem}")
    return image_cells(col, _image_root(spec))


def _image_root(spec: DatasetSpec) -> str:
    """Where relative image paths are read: dataset.imageRoot, else the dataset file's folder."""
    return spec.image_root or spec.uri.rstrip("/").rsplit("/", 1)[0]


def _check_images(cells: np.ndarray | None, name: str, role: str, uri: str, file_rows: np.ndarray,
                  ids: np.ndarray | None) -> None:  # fmt: skip
    """Every image read and decoded: DataError naming the rows whose image is missing or broken."""
    if cells is None:
        return
    if problems := image_problems(cells, f"{role} images"):
        rows = np.asarray([row for row, _ in problems])
        reasons = "; ".join(why for _, why in problems[:3])
        raise DataError(f"dataset {uri}: {len(problems)} {role} image(s) in column {name!r} cannot be "
                        f"used: {_where(rows, file_rows, ids)}: {reasons}")  # fmt: skip


def _list_column(table: pa.Table, name: str, role: str, uri: str) -> pa.Array:
    """A column of lists (one per row, null: none), DataError unless it is one."""
    col = table.column(name).combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise DataError(f"dataset {uri}: column {name!r} ({role}) must hold a list per row, not {col.type}")
    return col


def _candidate_lists(table: pa.Table, spec: DatasetSpec, file_rows: np.ndarray,
                     ids: np.ndarray | None) -> CandidateLists | None:  # fmt: skip
    """The rows' candidate lists, checked like the pairs: texts, images that decode (each
    distinct image once), one image cell per candidate, a text or an image for each."""
    cols, uri = spec.columns, spec.uri
    if cols.candidates is None:
        return None
    texts = _list_column(table, cols.candidates, "candidates", uri)
    if not (_is_text_type(texts.type.value_type) or pa.types.is_null(texts.type.value_type)):
        raise DataError(f"dataset {uri}: column {cols.candidates!r} (candidates) must hold lists of texts, "
                        f"not {texts.type}")  # fmt: skip
    lengths = pc.fill_null(pc.list_value_length(texts), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    flat = [text or "" for text in pc.list_flatten(texts).to_pylist()]
    images = None
    if cols.candidate_images is not None:
        cells = _list_column(table, cols.candidate_images, "candidate images", uri)
        if problem := cell_type_problem(cells.type.value_type):
            raise DataError(f"dataset {uri}: column {cols.candidate_images!r} (candidate images) cannot hold "
                            f"images: {problem}")  # fmt: skip
        image_lengths = pc.fill_null(pc.list_value_length(cells), 0).to_numpy(zero_copy_only=False)
        if len(bad := np.flatnonzero(image_lengths != lengths)):
            raise DataError(f"dataset {uri}: {len(bad)} rows list a different number of candidate images "
                            f"({cols.candidate_images!r}) than candidates ({cols.candidates!r}): "
                            f"{_where(bad, file_rows, ids)}")  # fmt: skip
        images = image_cells(pa.chunked_array([pc.list_flatten(cells)]), _image_root(spec))
    has_image = np.zeros(len(flat), dtype=bool) if images is None else np.asarray([c is not None for c in images])
    empty = np.asarray([not text.strip() for text in flat], dtype=bool) & ~has_image
    if len(bad := np.unique(rows[empty])):
        raise DataError(f"dataset {uri}: {len(bad)} rows have a candidate with neither text nor image in "
                        f"{cols.candidates!r}: {_where(bad, file_rows, ids)}")  # fmt: skip
    return CandidateLists(rows=rows, texts=np.asarray(flat, dtype=object), images=images)


def _check_candidate_images(lists: CandidateLists | None, spec: DatasetSpec, file_rows: np.ndarray,
                            ids: np.ndarray | None) -> None:  # fmt: skip
    """Every distinct candidate image read and decoded once; DataError naming the rows that list
    a bad one."""
    if lists is None or lists.images is None:
        return
    keys = np.asarray([image_key(cell) or "" for cell in lists.images], dtype=object)
    distinct, first = np.unique(keys, return_index=True)
    problems = image_problems(lists.images[first], "candidate images")
    if problems:
        bad_keys = {distinct[i] for i, _ in problems}
        rows = np.unique(lists.rows[[key in bad_keys for key in keys]])
        reasons = "; ".join(why for _, why in problems[:3])
        raise DataError(f"dataset {spec.uri}: {len(problems)} candidate image(s) in column "
                        f"{spec.columns.candidate_images!r} cannot be used, listed by {_where(rows, file_rows, ids)}: "
                        f"{reasons}")  # fmt: skip


def load_pairs(spec: DatasetSpec, min_rows: int, split: str = "train") -> Pairs:
    """Read, check and split the dataset; return the rows of `split` ("train" or "test").

    Raises DataError for: an unreadable file, missing columns, null or empty texts (where the
    side has no image), images that cannot be read or decoded, duplicate ids, and fewer than
    `min_rows` rows in the split (one batch, for training). The test split also carries its
    candidate lists (`dataset.columns.candidates`), checked the same way.
    """
    table = read_table(spec)
    cols = spec.columns
    require_columns(spec, table.column_names)
    if table.num_rows == 0:
        raise DataError(f"dataset {spec.uri}: no rows")

    every_row = np.arange(table.num_rows)
    if cols.id is not None:
        ids = np.asarray(table.column(cols.id).cast(pa.string()).to_pylist(), dtype=object)
        if nulls := [i for i, x in enumerate(ids) if x is None]:
            raise DataError(f"dataset {spec.uri}: column {cols.id!r} (id) has nulls: "
                            f"{_where(np.asarray(nulls), every_row, None)}")  # fmt: skip
        first_seen: dict[str, int] = {}
        repeats = [(first_seen[x], i) for i, x in enumerate(ids) if first_seen.setdefault(x, i) != i]
        if repeats:
            shown = ", ".join(f"{ids[b]!r} at file rows {a} and {b}" for a, b in repeats[:5])
            raise DataError(f"dataset {spec.uri}: column {cols.id!r} (id) has {len(repeats)} repeated "
                            f"values: {shown} (counting from 0)")  # fmt: skip
    else:
        ids = np.asarray([str(i) for i in range(table.num_rows)], dtype=object)

    if spec.split is not None:
        keys = table.column(spec.split.key).cast(pa.string()).to_pylist()
        if nulls := [i for i, k in enumerate(keys) if k is None]:
            raise DataError(f"dataset {spec.uri}: split key column {spec.split.key!r} has nulls: "
                            f"{_where(np.asarray(nulls), every_row, ids if cols.id else None)}")  # fmt: skip
        is_test = split_bucket(keys, spec.split.buckets) == spec.split.test_bucket
        keep = is_test if split == "test" else ~is_test
    else:
        if split == "test":
            raise DataError("dataset.split is not set, so there is no test split")
        keep = np.ones(table.num_rows, dtype=bool)
    table = table.filter(pa.array(keep))
    ids, file_rows = ids[keep], every_row[keep]
    named = ids if cols.id else None

    query_images = _image_column(table, cols.query_image, "query", spec)
    positive_images = _image_column(table, cols.positive_image, "positive", spec)
    queries = _text_column(table, cols.query, "query", spec.uri, file_rows, named, query_images)
    positives = _text_column(table, cols.positive, "positive", spec.uri, file_rows, named, positive_images)
    if cols.task is not None:
        tasks = table.column(cols.task).cast(pa.string())
        if tasks.null_count:
            bad = np.flatnonzero(tasks.is_null().to_numpy(zero_copy_only=False))
            raise DataError(f"dataset {spec.uri}: column {cols.task!r} (task) has nulls: "
                            f"{_where(bad, file_rows, named)}")  # fmt: skip
        tasks = np.asarray(tasks.to_pylist(), dtype=object)
    else:
        tasks = np.full(len(ids), SINGLE_TASK, dtype=object)

    candidates = _candidate_lists(table, spec, file_rows, named) if split == "test" else None
    if len(ids) < min_rows:
        raise DataError(
            f"dataset {spec.uri}: {len(ids)} {split} rows, fewer than one batch "
            f"(mining.batchSize = {min_rows})"
        )
    # last: reading every image is the one check that costs more than the table
    _check_images(query_images, cols.query_image, "query", spec.uri, file_rows, named)
    _check_images(positive_images, cols.positive_image, "positive", spec.uri, file_rows, named)
    _check_candidate_images(candidates, spec, file_rows, named)
    return Pairs(
        ids=ids,
        queries=queries,
        positives=positives,
        tasks=tasks,
        positive_group=unique_texts(side_keys(positives, positive_images))[1],
        held_out=int((~keep).sum()),
        query_images=query_images,
        positive_images=positive_images,
        candidates=candidates,
    )


def side_keys(texts: np.ndarray, images: np.ndarray | None) -> np.ndarray:
    """What makes two rows' sides (two positives, two queries) the same: the text, and the image
    when there are images."""
    if images is None:
        return texts
    return np.asarray([f"{text}\0{image_key(image) or ''}" for text, image in zip(texts, images, strict=True)],
                      dtype=object)  # fmt: skip
