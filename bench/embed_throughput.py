"""Is the teacher's embedding path at the hardware's pace? Ours against the raw Hugging Face
forward and against sentence-transformers' `encode`, same model, texts, batch, length, precision.

    python bench/embed_throughput.py                     # all-MiniLM-L6-v2, 2,000 Debian descriptions, CPU
    python bench/embed_throughput.py --texts 4000 --device cuda --dtype bfloat16

  ours:   `b3.teacher.TextEncoder.encode` (tokenise every text once, sort by length, pad each
          batch, forward, pool, normalise, back to numpy in the caller's order)
  raw:    the model's forward + pooling + normalisation alone, on the same length-sorted
          batches already tokenised and padded before the clock starts: the ceiling
  st:     `SentenceTransformer.encode(..., normalize_embeddings=True)` with max_seq_length set
          to the same length (it sorts by length too)

Each path runs `--repeats` times, interleaved, after one warm-up; the median counts. The three
outputs must agree (max abs difference printed). Results: bench/results/embed_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import machine
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def texts_from(path: Path, n: int) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["positive"])
    texts = table.column("positive").to_pylist()
    return (texts * (n // len(texts) + 1))[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(ROOT / "examples" / "data" / "debian-2k.parquet"))
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "embed_throughput.json"))
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from b3.model_source import resolve_model_path
    from b3.pooling import pool
    from b3.teacher import TextEncoder

    texts = texts_from(Path(args.data), args.texts)
    ours = TextEncoder(args.model, max_length=args.max_length, batch_size=args.batch_size,
                       dtype=args.dtype, device=args.device)  # fmt: skip
    st = SentenceTransformer(resolve_model_path(args.model), device=args.device,
                             model_kwargs={"dtype": getattr(torch, args.dtype)})  # fmt: skip
    st.max_seq_length = args.max_length

    # the raw path's batches: tokenised, sorted and padded before the clock
    ids = ours.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    batches = [ours.tokenizer.pad({"input_ids": [ids[i] for i in order[s : s + args.batch_size]]},
                                  return_tensors="pt").to(ours.device)
               for s in range(0, len(texts), args.batch_size)]  # fmt: skip

    @torch.inference_mode()
    def raw() -> np.ndarray:
        out = np.empty((len(texts), ours.dim), dtype=np.float32)
        for start, batch in zip(range(0, len(texts), args.batch_size), batches, strict=True):
            hidden = ours.model(**batch).last_hidden_state
            emb = torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], "mean").float(), dim=-1)
            out[order[start : start + args.batch_size]] = emb.cpu().numpy()
        return out

    paths = {
        "ours": lambda: ours.encode(texts, desc="ours"),
        "raw": raw,
        "st": lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False),
    }  # fmt: skip

    def sync() -> None:
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            torch.cuda.synchronize()

    outputs = {name: run() for name, run in paths.items()}  # warm-up, and the outputs compared
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds[name].append(time.perf_counter() - start)
    rate = {name: len(texts) / statistics.median(s) for name, s in seconds.items()}
    tokens = sum(len(x) for x in ids)
    result = {
        "question": "teacher embedding throughput: ours vs the raw forward vs sentence-transformers encode",
        "model": args.model, "texts": len(texts), "tokens": tokens, "batch_size": args.batch_size,
        "max_length": args.max_length, "device": args.device, "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "texts_per_second": {k: round(v, 1) for k, v in rate.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "ours_vs_raw": round(rate["ours"] / rate["raw"], 3),
        "ours_vs_st": round(rate["ours"] / rate["st"], 3),
        "max_abs_difference": {"ours_vs_raw": float(np.abs(outputs["ours"] - outputs["raw"]).max()),
                               "ours_vs_st": float(np.abs(outputs["ours"] - outputs["st"]).max())},
        "machine": f"{machine.describe()}, torch {torch.__version__}",
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
