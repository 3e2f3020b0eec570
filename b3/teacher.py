"""Embedding texts with any Hugging Face encoder or decoder (the teacher, and later the student),
and rows of text and image with a vision-language model (one with an image processor, `b3.vision`).

Texts are sorted by token length and batched in that order, so a batch pads to the length of
its own longest text rather than the corpus's; on real data this halves the work. Outputs are
L2-normalised float32 in the caller's order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch
from transformers import AutoModel, AutoTokenizer

from b3.data import DataError, side_keys, unique_texts
from b3.errors import TransientError
from b3.images import open_image
from b3.model_source import resolve_model_path
from b3.pooling import pool
from b3.progress import progress
from b3.raycluster import ensure_ray, use_ray
from b3.retry import is_transient, retrying
from b3.storage import resolve_filesystem
from b3.vision import embed_rows, embedding_dim, encode_rows, vision_processor


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("teacher.device is cuda but no CUDA device is visible")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


class TextEncoder:
    """A Hugging Face model that turns texts into unit vectors.

    Args:
        model: hub id or local path (see `resolve_model_path`).
        pooling: "mean", "cls" or "last_token".
        max_length: tokens per text; longer texts are truncated.
        batch_size: texts per forward pass.
        dtype: "auto", "float32", "float16" or "bfloat16".
        device: "auto", "cpu" or "cuda".
        min_pixels, max_pixels: the pixel budget of each image (a vision-language decoder's;
            None: its processor's own).
    """

    def __init__(
        self,
        model: str,
        pooling: str = "mean",
        max_length: int = 128,
        batch_size: int = 64,
        dtype: str = "auto",
        device: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        path = resolve_model_path(model)
        self.processor = vision_processor(path, min_pixels, max_pixels)  # None: the model embeds text only
        self.tokenizer = self.processor.tokenizer if self.processor is not None else AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:  # decoder models often ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return embedding_dim(self.model.config, self.processor)

    @torch.inference_mode()
    def encode(self, texts: list[str], desc: str = "embed", images: list | None = None) -> np.ndarray:
        """(len(texts), dim) float32, L2-normalised, in the order of `texts`. Every text is
        tokenised once, up front (the fast tokenizer's batch call); each batch is then only
        padded, so the loop is the model's forward. `images`: each row's image cell (bytes or a
        path, `b3.images`; None: no image), for a vision-language model."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if self.processor is not None:  # a vision-language model: rows through its processor
            return self._encode_rows(list(texts), list(images or [None] * len(texts)), desc, out)
        if images is not None and any(image is not None for image in images):
            raise DataError(f"{self.model.config.name_or_path} embeds text only (it has no image processor), and "
                            "the rows have images")  # fmt: skip
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 add_special_tokens=True, return_attention_mask=False)  # fmt: skip
        ids = encoded["input_ids"]
        extra = {k: v for k, v in encoded.items() if k == "token_type_ids"}
        order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first: OOM shows at once
        with progress(len(texts), desc, unit="text") as bar:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                features = {"input_ids": [ids[i] for i in idx], **{k: [v[i] for i in idx] for k, v in extra.items()}}
                batch = self.tokenizer.pad(features, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (b, t, d)
                emb = pool(hidden, batch["attention_mask"], self.pooling).float()  # (b, d)
                emb = torch.nn.functional.normalize(emb, dim=-1)
                out[idx] = emb.cpu().numpy()
                bar.update(len(idx))
        return out

    def _encode_rows(self, texts: list[str], images: list, desc: str, out: np.ndarray) -> np.ndarray:
        """Rows of text and image through the processor, a batch at a time: each image is
        decoded when its batch comes, so a large set's images never sit in memory together."""
        order = np.argsort([-len(text) for text in texts], kind="stable")
        with progress(len(texts), desc, unit="row") as bar:
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                rows = encode_rows(self.processor, [texts[i] for i in idx],
                                   [None if images[i] is None else open_image(images[i]) for i in idx], self.max_length)  # fmt: skip
                batch = {k: v.to(self.device) for k, v in rows.items()}
                if "pixel_values" in batch:
                    batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
                out[idx] = embed_rows(self.model, batch, self.pooling).cpu().numpy()  # (b, d)
                bar.update(len(idx))
        return out


def embed_texts(
    spec, texts: np.ndarray, desc: str, workers: int = 1, gpus_per_worker: float = 0, images: np.ndarray | None = None
) -> np.ndarray:
    """Embed rows (their texts, and their image cells when `images` is given) with the teacher
    described by `spec` (a TeacherSpec), each distinct row once.

    One worker and no RAY_ADDRESS: in this process. Otherwise the distinct rows are split
    into `workers` shards, each embedded by a Ray task holding its own copy of the model.
    """
    if images is None:
        unique, inverse = unique_texts(texts)
        unique_images = None
    else:  # a row is its text and its image
        _, inverse = unique_texts(side_keys(texts, images))
        first = np.unique(inverse, return_index=True)[1]  # ids are in first-seen order
        unique, unique_images = np.asarray(texts, dtype=object)[first], np.asarray(images, dtype=object)[first]
    args = (spec.model, spec.pooling, spec.max_length, spec.batch_size, spec.dtype, spec.device)
    pixels = {"min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}

    def images_of(rows) -> list | None:
        return None if unique_images is None else unique_images[rows].tolist()

    if not use_ray(workers):
        return TextEncoder(*args, **pixels).encode(unique.tolist(), desc=desc, images=images_of(slice(None)))[inverse]
    import ray

    ensure_ray(workers)
    device = "cuda" if gpus_per_worker > 0 else args[-1]

    @ray.remote(num_cpus=1, num_gpus=gpus_per_worker)
    def shard(chunk: list[str], chunk_images: list | None) -> np.ndarray:
        return TextEncoder(*args[:-1], device=device, **pixels).encode(chunk, desc=desc, images=chunk_images)

    shards = np.array_split(np.arange(len(unique)), workers)
    parts = ray.get([shard.remote(unique[s].tolist(), images_of(s)) for s in shards])
    return np.concatenate(parts)[inverse]


def read_teacher_embeddings(uri: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, positive) L2-normalised float32 embeddings of the rows `ids`, from a file of
    precomputed ones (`teacher.embeddings`: Parquet or Arrow IPC, columns id, query, positive).
    DataError naming the problem when the file does not fit the dataset; a store's transient
    fault is retried."""
    where = f"teacher.embeddings {uri}"

    def read() -> pa.Table:
        fs, path = resolve_filesystem(uri)
        if fs.get_file_info(path).type.name == "NotFound":
            raise DataError(f"{where}: no such file")
        with fs.open_input_file(path) as f:
            if path.endswith((".arrow", ".feather", ".ipc")):
                return ipc.open_file(f).read_all()
            return pq.read_table(f)

    try:
        table = retrying(f"{where}: read", read)
    except (DataError, TransientError):
        raise
    except (OSError, ValueError, pa.ArrowException) as err:
        if is_transient(err):
            raise
        raise DataError(f"{where}: cannot read it as Parquet or Arrow IPC ({' '.join(str(err).split())[:300]})") from None
    missing = [c for c in ("id", "query", "positive") if c not in table.column_names]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(map(repr, missing))} (it needs id, query and positive)")
    file_ids = table.column("id").cast(pa.string()).to_pylist()
    row_of = {}
    for i, id_ in enumerate(file_ids):
        if id_ in row_of:
            raise DataError(f"{where}: id {id_!r} appears twice (rows {row_of[id_]} and {i})")
        row_of[id_] = i
    absent = [id_ for id_ in ids if id_ not in row_of]
    if absent:
        raise DataError(f"{where}: {len(absent)} of the {len(ids)} training rows have no embeddings, e.g. id "
                        f"{', '.join(map(repr, absent[:3]))}")  # fmt: skip
    rows = np.asarray([row_of[id_] for id_ in ids], dtype=np.int64)

    def side(name: str) -> np.ndarray:
        column = table.column(name).combine_chunks()
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                or pa.types.is_fixed_size_list(column.type)) or not pa.types.is_floating(column.type.value_type):  # fmt: skip
            raise DataError(f"{where}: column {name!r} is {column.type}, not lists of floats")
        picked = column.take(pa.array(rows))
        lengths = set(pc.list_value_length(picked).to_pylist())
        if len(lengths) != 1 or 0 in lengths:
            raise DataError(f"{where}: column {name!r} holds vectors of lengths {sorted(lengths)[:5]}; they need one length")
        emb = picked.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(rows), -1)
        norms = np.linalg.norm(emb, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if len(bad):
            raise DataError(f"{where}: {len(bad)} {name} vector(s) are zero or not finite, e.g. id {ids[bad[0]]!r}")
        return emb / norms[:, None]

    query, positive = side("query"), side("positive")
    if query.shape[1] != positive.shape[1]:
        raise DataError(f"{where}: query vectors have {query.shape[1]} dimensions, positive ones {positive.shape[1]}")
    return query, positive

