"""The images of a dataset's rows: what a cell may hold, where its file is, and whether it decodes.

An image column holds, per row, one of (MMEB/VLM2Vec and Hugging Face conventions):

- encoded image bytes (binary);
- a path (text): relative to `dataset.imageRoot` (default: the dataset file's folder), or an
  absolute path or URI (s3://, gs://, ...);
- a Hugging Face `Image` struct `{bytes, path}`: its bytes when set, else its path;
- null: the row has no image on that side.

`image_cells` turns a column into one Python value per row (bytes, a path resolved to a URI or
absolute path, or None); `image_problems` opens each image once and names the ones that cannot
be read or decoded, so a bad image is refused by row before any compute. Transient faults of an
object store are retried (`b3.retry`), never reported as a bad image.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa

from b3.errors import TransientError
from b3.progress import progress
from b3.retry import is_transient, retrying
from b3.storage import resolve_filesystem


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def cell_type_problem(t: pa.DataType) -> str | None:
    """Why a column of this type cannot hold images (None when it can)."""
    if _is_text(t) or _is_binary(t) or pa.types.is_null(t):
        return None
    if pa.types.is_struct(t):
        fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
        if "bytes" in fields or "path" in fields:
            if "bytes" in fields and not (_is_binary(fields["bytes"]) or pa.types.is_null(fields["bytes"])):
                return f"its struct's 'bytes' is {fields['bytes']}, not binary"
            if "path" in fields and not (_is_text(fields["path"]) or pa.types.is_null(fields["path"])):
                return f"its struct's 'path' is {fields['path']}, not text"
            return None
    return (f"it is {t}; an image column holds encoded bytes, a path, or a Hugging Face Image "
            "struct {bytes, path}")  # fmt: skip


def resolve(path: str, root: str) -> str:
    """A path cell as the absolute path or URI to read: relative paths join `root`."""
    if "://" in path or path.startswith("/"):
        return path
    return f"{root.rstrip('/')}/{path}"


def image_cells(column: pa.ChunkedArray, root: str) -> np.ndarray:
    """One value per row: the image's bytes, its resolved path, or None (no image). An empty
    path or empty bytes is no image, like null."""
    values = []
    for cell in column.to_pylist():
        if isinstance(cell, dict):  # a Hugging Face Image struct: bytes win, as datasets reads it
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, str):
            cell = resolve(cell.strip(), root) if cell.strip() else None
        values.append(cell or None)
    return np.asarray(values, dtype=object)


def image_key(cell) -> str | None:
    """What says two cells are the same image: the path, or a hash of the bytes."""
    if cell is None:
        return None
    if isinstance(cell, bytes):
        return "sha256:" + hashlib.sha256(cell).hexdigest()
    return cell


def read_image_bytes(cell) -> bytes:
    """The encoded image a cell names (its bytes, or its file's content; retried when the
    store fails transiently)."""
    if isinstance(cell, bytes):
        return cell

    def read() -> bytes:
        fs, path = resolve_filesystem(cell)
        with fs.open_input_stream(path) as f:
            return f.read()

    return retrying(f"read image {cell}", read)


def open_image(cell):
    """The image a cell names, decoded, as an RGB PIL image (what processors take)."""
    from PIL import Image

    with Image.open(io.BytesIO(read_image_bytes(cell))) as image:
        return image.convert("RGB")


def image_problems(cells: np.ndarray, what: str) -> list[tuple[int, str]]:
    """(row, why) for each image that cannot be read or does not decode. Each image is read
    once and decoded in full (PIL's verify() misses truncated pixel data)."""
    problems = []
    rows = np.flatnonzero([c is not None for c in cells])
    with progress(len(rows), f"check {what}", unit="image") as bar:
        for row in rows:
            problem = _problem(cells[row])
            if problem:
                problems.append((int(row), problem))
            bar.update()
    return problems


def _problem(cell) -> str | None:
    """Why one cell's image cannot be used (None when it reads and decodes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_image_bytes(cell)
    except TransientError:
        raise
    except (OSError, ValueError) as err:
        if is_transient(err):
            raise
        if isinstance(err, FileNotFoundError):
            return f"no such file {cell}"
        return f"cannot read {cell} ({' '.join(str(err).split())})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        source = "its bytes are" if isinstance(cell, bytes) else f"{cell} is"
        return f"{source} not an image Pillow can decode ({' '.join(str(err).split())})"
    return None
