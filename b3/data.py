"""Loading (query, positive) pairs and refusing bad input before any compute is spent.

`load_pairs` reads parquet, JSONL or CSV from a path or URI with pyarrow, checks it, keeps the
training split and returns `Pairs`. Every problem raises `DataError`, which the stage
programs turn into exit code 2 with the message in the pod's termination log.

Rows whose positive texts are identical share a `positive_group`; downstream code uses it so
that a query never meets its own positive's duplicates as negatives.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

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
class Pairs:
    """Training rows. Row i is (queries[i], positives[i]); arrays are aligned by row."""

    ids: np.ndarray  # (N,) str
    queries: np.ndarray  # (N,) str
    positives: np.ndarray  # (N,) str
    tasks: np.ndarray  # (N,) str
    positive_group: np.ndarray  # (N,) int64, equal for rows with identical positive text
    held_out: int  # rows of the file left out as the test split

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


def _stat(spec: DatasetSpec):
    try:
        fs, path = resolve_filesystem(spec.uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as err:
        raise DataError(f"dataset {spec.uri}: cannot open ({err})") from None
    if info.type.name == "NotFound":
        raise DataError(f"dataset {spec.uri}: no such file")
    return fs, path, info


def dataset_identity(spec: DatasetSpec) -> dict:
    """What says the dataset file is the one a stage read: its size and modification time
    (a stat, not a read; the URI and columns are spec fields); for a saved Hugging Face
    dataset, the fingerprint `datasets` keeps of its content and the sizes of its files."""
    fs, path, info = _stat(spec)
    if _is_saved_dataset(spec, info):
        state = _saved_dataset_state(fs, path, spec.uri)
        files = [f["filename"] for f in state.get("_data_files", [])]
        return {"fingerprint": state.get("_fingerprint"),
                "sizes": [fs.get_file_info(f"{path}/{f}").size for f in files]}  # fmt: skip
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def _saved_dataset_state(fs, path: str, uri: str) -> dict:
    """state.json of a folder written by `Dataset.save_to_disk` (a DatasetDict's folder holds
    one such folder per split instead)."""
    try:
        with fs.open_input_stream(f"{path}/state.json") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        pass
    try:
        with fs.open_input_stream(f"{path}/dataset_dict.json") as f:
            splits = json.loads(f.read()).get("splits", [])
    except (OSError, ValueError):
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
    try:
        return datasets.load_from_disk(uri).with_format("arrow")[:]
    except (OSError, ValueError, FileNotFoundError) as err:
        raise DataError(f"dataset {uri}: unreadable as a saved dataset ({err})") from None


def read_table(spec: DatasetSpec) -> pa.Table:
    """The whole file as an Arrow table."""
    fs, path, info = _stat(spec)
    if _is_saved_dataset(spec, info):
        return _read_saved_dataset(fs, path, spec.uri)
    fmt = _detect_format(path, spec.format)
    try:
        if fmt == "parquet":
            table = pq.read_table(path, filesystem=fs)
        else:
            with fs.open_input_stream(path, compression="detect") as stream:
                if fmt == "jsonl":
                    table = pajson.read_json(stream)
                else:
                    delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
                    table = pacsv.read_csv(
                        stream, parse_options=pacsv.ParseOptions(delimiter=delimiter)
                    )
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"dataset {spec.uri}: unreadable as {fmt} ({err})") from None
    return table


def _where(bad: np.ndarray, file_rows: np.ndarray, ids: np.ndarray | None) -> str:
    """'file rows 5 (id pkg5), 9 (id pkg9), ...': the first few of the rows `bad` (indices into
    the kept rows) as the file numbers them, counting from 0, with their ids."""
    shown = [f"{file_rows[r]}" + (f" (id {ids[r]})" if ids is not None else "") for r in bad[:5]]
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"file row{'s' * (len(bad) > 1)} {', '.join(shown)}{more} (counting from 0)"


def _text_column(table: pa.Table, name: str, role: str, uri: str, file_rows: np.ndarray,
                 ids: np.ndarray | None) -> np.ndarray:  # fmt: skip
    col = table.column(name)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        raise DataError(f"dataset {uri}: column {name!r} ({role}) must hold text, not {col.type}")
    empty = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
    bad = np.flatnonzero(empty.to_numpy(zero_copy_only=False).astype(bool, copy=False))
    if len(bad):
        raise DataError(f"dataset {uri}: {len(bad)} rows have a null or empty {name!r} ({role}): "
                        f"{_where(bad, file_rows, ids)}")  # fmt: skip
    return np.asarray(col.to_pylist(), dtype=object)


def load_pairs(spec: DatasetSpec, min_rows: int, split: str = "train") -> Pairs:
    """Read, check and split the dataset; return the rows of `split` ("train" or "test").

    Raises DataError for: an unreadable file, missing columns, null or empty texts, duplicate
    ids, and fewer than `min_rows` rows in the split (one batch, for training).
    """
    table = read_table(spec)
    cols = spec.columns
    wanted = {"query": cols.query, "positive": cols.positive, "task": cols.task, "id": cols.id}
    if spec.split is not None:
        wanted["split key"] = spec.split.key
    missing = [
        f"{name!r} ({role})"
        for role, name in wanted.items()
        if name and name not in table.column_names
    ]
    if missing:
        raise DataError(
            f"dataset {spec.uri}: missing column(s) {', '.join(missing)}; present: "
            f"{', '.join(table.column_names)}"
        )
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

    queries = _text_column(table, cols.query, "query", spec.uri, file_rows, named)
    positives = _text_column(table, cols.positive, "positive", spec.uri, file_rows, named)
    if cols.task is not None:
        tasks = table.column(cols.task).cast(pa.string())
        if tasks.null_count:
            bad = np.flatnonzero(tasks.is_null().to_numpy(zero_copy_only=False))
            raise DataError(f"dataset {spec.uri}: column {cols.task!r} (task) has nulls: "
                            f"{_where(bad, file_rows, named)}")  # fmt: skip
        tasks = np.asarray(tasks.to_pylist(), dtype=object)
    else:
        tasks = np.full(len(ids), SINGLE_TASK, dtype=object)

    if len(ids) < min_rows:
        raise DataError(
            f"dataset {spec.uri}: {len(ids)} {split} rows, fewer than one batch "
            f"(mining.batchSize = {min_rows})"
        )
    return Pairs(
        ids=ids,
        queries=queries,
        positives=positives,
        tasks=tasks,
        positive_group=unique_texts(positives)[1],
        held_out=int((~keep).sum()),
    )
