"""Can a CPU teacher run in a cheaper precision and keep its neighbour sets? float32 against
float16, bfloat16, int8 dynamic quantisation (every Linear layer; per-tensor and per-channel
weight scales) and ONNX Runtime in float32, same model, texts, batch and length.

Rows of the Debian descriptions (default: the sections of the experiment's CPU preset) are
embedded with each, timed (`--repeats`, the median counts); then each is ranked as the rank
stage ranks (`b3.ranking.rank_topk` within each section, a query's own positive and its
duplicates excluded, the top p + m kept) and its lists are compared with float32's:

  window agreement: |S ∩ S_fp32| / m per query, S = ranks [p, p + m) (what the graph uses)
  top agreement:    the same over all p + m ranks
  query cosine:     each query embedding against its float32 embedding

    python bench/teacher_precision.py                 # rust, golang, haskell; p=30, m=100
    python bench/teacher_precision.py --precisions float32 float16 --tasks libs

The issue's bar for a faster CPU runtime: neighbour sets within 1% of float32 (window
agreement >= 0.99). int8 here is torch's dynamic quantisation (fbgemm/oneDNN kernels; torch
2.13 marks torch.ao's quantisation deprecated in favour of torchao). onnxruntime runs the
model exported by torch.onnx (in a child process: the export leaves the exporting model
changed) with all graph optimisations, on the same threads; our loop, pooling and
normalisation around it. Results: bench/results/teacher_precision.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import machine
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "datasets" / "debian-descriptions.parquet"
PRECISIONS = ["float32", "float16", "bfloat16", "int8", "int8-per-channel", "onnxruntime"]
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def export_onnx(model: str, path: str) -> None:
    """The model's forward (token ids -> last hidden states) as ONNX, batch and length dynamic."""
    from b3.teacher import TextEncoder

    encoder = TextEncoder(model, dtype="float32", device="cpu")
    sample = encoder.tokenizer(["a short text", "x"], padding=True, return_tensors="pt")
    names = [k for k in INPUTS if k in sample]

    class Forward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            return self.inner(**dict(zip(names, tensors, strict=True))).last_hidden_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Forward(encoder.model), tuple(sample[k] for k in names), path, input_names=names,
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={k: {0: "batch", 1: "tokens"} for k in [*names, "last_hidden_state"]})  # fmt: skip


class OnnxForward:
    """Stands in for the Hugging Face model inside `TextEncoder`: same call, same output field."""

    def __init__(self, path: str, config):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.config = config

    def __call__(self, **batch):
        (hidden,) = self.session.run(None, {k: batch[k].numpy() for k in self.names})
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


def encoder_for(model: str, precision: str, max_length: int, batch_size: int, folder: str):
    """A `TextEncoder` computing in `precision`: int8 quantises a float32 model's Linear layers,
    onnxruntime swaps its forward for an ONNX Runtime session."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    from b3.teacher import TextEncoder

    dtype = precision if precision in ("float32", "float16", "bfloat16") else "float32"
    encoder = TextEncoder(model, max_length=max_length, batch_size=batch_size, dtype=dtype, device="cpu")
    if precision == "onnxruntime":
        path = os.path.join(folder, "model.onnx")
        child = mp.get_context("spawn").Process(target=export_onnx, args=(model, path))
        child.start()
        child.join()
        encoder.model = OnnxForward(path, encoder.model.config)
    if precision.startswith("int8"):
        qconfig = per_channel_dynamic_qconfig if precision == "int8-per-channel" else default_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            encoder.model = quantize_dynamic(encoder.model, {torch.nn.Linear: qconfig})
    return encoder


def rank_per_task(q: np.ndarray, p: np.ndarray, tasks: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """(N, k) neighbour rows, ranked within each task like the rank stage."""
    from b3.ranking import rank_topk

    neighbors = np.full((len(q), k), -1, dtype=np.int64)
    for task in np.unique(tasks):
        rows = np.flatnonzero(tasks == task)
        idx, _ = rank_topk(q[rows], p[rows], k, query_groups=groups[rows], positive_groups=groups[rows])
        neighbors[rows] = np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)
    return neighbors


def agreement(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per row: the share of the reference's listed neighbours that `other` lists too."""
    out = np.empty(len(reference))
    for i, (x, y) in enumerate(zip(reference, other, strict=True)):
        x = x[x >= 0]
        out[i] = len(np.intersect1d(x, y)) / max(len(x), 1)
    return out


def summary(values: np.ndarray) -> dict:
    return {"mean": round(float(values.mean()), 4), "p05": round(float(np.quantile(values, 0.05)), 4),
            "min": round(float(values.min()), 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--tasks", nargs="+", default=["rust", "golang", "haskell"])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS)
    parser.add_argument("--p", type=int, default=30)
    parser.add_argument("--m", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "teacher_precision.json"))
    args = parser.parse_args()
    precisions = ["float32", *[p for p in args.precisions if p != "float32"]]

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(args.data, columns=["query", "positive", "task"])
    wanted = pc.cast(pa.array(args.tasks), table.column("task").type)
    table = table.filter(pc.is_in(table.column("task"), value_set=wanted))
    queries, positives = table.column("query").to_pylist(), table.column("positive").to_pylist()
    tasks = np.asarray(table.column("task").to_pylist())
    _, groups = np.unique(positives, return_inverse=True)  # rows with one positive text share it
    k, window = args.p + args.m, slice(args.p, args.p + args.m)

    rows, reference = {}, None
    folder = tempfile.mkdtemp(prefix="b3-precision-")
    for precision in precisions:
        encoder = encoder_for(args.model, precision, args.max_length, args.batch_size, folder)
        encoder.encode(queries[:256], desc="warm-up")
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            q = encoder.encode(queries, desc=f"{precision} queries")
            p = encoder.encode(positives, desc=f"{precision} positives")
            seconds.append(time.perf_counter() - start)
        neighbors = rank_per_task(q, p, tasks, groups, k)
        if reference is None:
            reference = (q, neighbors, statistics.median(seconds))
        row = {"texts_per_second": round(2 * len(queries) / statistics.median(seconds), 1),
               "speedup_vs_float32": round(reference[2] / statistics.median(seconds), 2),
               "seconds": [round(s, 2) for s in seconds]}  # fmt: skip
        if precision != "float32":
            row["window_agreement"] = summary(agreement(reference[1][:, window], neighbors[:, window]))
            row["top_agreement_mean"] = round(float(agreement(reference[1], neighbors).mean()), 4)
            row["query_cosine"] = summary(np.sum(reference[0] * q, axis=1))
            row["within_1pct_of_float32"] = row["window_agreement"]["mean"] >= 0.99
        rows[precision] = row
        print(precision, json.dumps(row), flush=True)
        del encoder

    result = {
        "question": "CPU teacher precisions vs float32: embedding speed and the rank stage's neighbour sets",
        "model": args.model,
        "tasks": args.tasks,
        "rows": len(queries),
        "p": args.p,
        "m": args.m,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "torch_threads": torch.get_num_threads(),
        "precisions": rows,
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "machine": machine.describe(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
