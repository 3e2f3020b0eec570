"""How fast is our training step against a sentence-transformers fit, and does GradCache keep
memory flat as the batch grows?

1. Throughput: the same model (all-MiniLM-L6-v2), LoRA (r=8, alpha=16, dropout 0.05, peft's
   default target modules), batch, max length, steps and texts (Debian pairs), trained
   (a) by our step (`b3.train.compute_gradients` + AdamW, tokenisation inline) and
   (b) by `SentenceTransformerTrainer` with `MultipleNegativesRankingLoss(scale=50)`.
   Pairs per second over all steps, first ones included, for both.
2. Memory: one training step at |B| = 64, 256, 1024 with GradCache (miniBatchSize 32) and
   without, each in a fresh process; the peak RSS during the step (Linux VmHWM, reset just
   before it) over the RSS before it. On CPU, where this runs, activations live in RSS.

    python bench/train_throughput.py                       # both parts
    python bench/train_throughput.py --skip-memory --steps 10

Needs sentence-transformers, datasets and accelerate. Prints and saves JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "datasets" / "debian-descriptions.parquet"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
RESULTS = ROOT / "bench" / "results"


def load_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    import numpy as np
    import pyarrow.parquet as pq

    path = DATA if DATA.exists() else ROOT / "examples" / "data" / "debian-2k.parquet"
    table = pq.read_table(path, columns=["query", "positive"])
    rows = np.random.default_rng(seed).permutation(table.num_rows)[:n]
    return [table["query"][int(i)].as_py() for i in rows], [
        table["positive"][int(i)].as_py() for i in rows
    ]


def ours(queries, positives, batch, max_length, steps, mini_batch_size=None) -> float:
    import torch

    from b3.loss import InfoNCELoss
    from b3.model import build_student
    from b3.spec import LoraSpec
    from b3.train import compute_gradients

    torch.manual_seed(0)
    student = build_student(
        MODEL, "mean", max_length, LoraSpec(r=8, alpha=16, dropout=0.05)
    ).train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = InfoNCELoss(scale=50.0)
    start = time.perf_counter()
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        item = {"query": student.tokenize(queries[rows]), "positive": student.tokenize(positives[rows]),
                "groups": torch.arange(batch)}  # fmt: skip
        compute_gradients(student, loss_fn, item, mini_batch_size, 1)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def sentence_transformers_fit(queries, positives, batch, max_length, steps) -> float:
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from b3.model_source import resolve_model_path

    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    model.max_seq_length = max_length
    model.add_adapter(
        LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=8, lora_alpha=16, lora_dropout=0.05)
    )
    dataset = Dataset.from_dict(
        {"anchor": queries[: steps * batch], "positive": positives[: steps * batch]}
    )
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
            save_strategy="no", report_to="none", logging_steps=max(steps, 1), dataloader_drop_last=True,
            use_cpu=True, seed=0,
        )  # fmt: skip
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                             loss=MultipleNegativesRankingLoss(model, scale=50.0))  # fmt: skip
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def _status_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    return kib / 2**20


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux)
        f.write("5")


def _memory_child(batch: int, mini_batch_size: int | None, max_length: int, queue) -> None:
    import torch

    from b3.loss import InfoNCELoss
    from b3.model import build_student
    from b3.spec import LoraSpec
    from b3.train import compute_gradients

    queries, positives = load_texts(batch, seed=1)
    student = build_student(
        MODEL, "mean", max_length, LoraSpec(r=8, alpha=16, dropout=0.05)
    ).train()
    item = {
        "query": student.tokenize(queries),
        "positive": student.tokenize(positives),
        "groups": torch.arange(batch),
    }
    gc.collect()
    _reset_peak()
    before = _status_gib("VmRSS")
    start = time.perf_counter()
    compute_gradients(student, InfoNCELoss(scale=50.0), item, mini_batch_size, 1)
    seconds = time.perf_counter() - start
    peak = _status_gib("VmHWM")
    queue.put({"batch": batch, "mini_batch_size": mini_batch_size, "rss_before_gib": round(before, 3),
               "peak_rss_gib": round(peak, 3), "step_growth_gib": round(peak - before, 3),
               "seconds": round(seconds, 2)})  # fmt: skip


def memory(batches: list[int], mini_batch_size: int, max_length: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    rows = []
    for batch in batches:
        for mbs in (mini_batch_size, None):
            queue = ctx.Queue()
            proc = ctx.Process(target=_memory_child, args=(batch, mbs, max_length, queue))
            proc.start()
            while proc.is_alive() and queue.empty():
                proc.join(1)
            if queue.empty():  # killed, e.g. by the OOM killer: plain steps grow with |B|
                rows.append(
                    {
                        "batch": batch,
                        "mini_batch_size": mbs,
                        "error": f"process died (exit code {proc.exitcode}), most likely out of memory",
                    }
                )
            else:
                rows.append(queue.get())
                proc.join()
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--memory-batches", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--skip-throughput", action="store_true", help="memory only; merged into --out"
    )
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(args.out)
    result = json.loads(out.read_text()) if args.skip_throughput and out.exists() else {}
    if not args.skip_throughput:
        queries, positives = load_texts(args.batch * args.steps)
        st_seconds = sentence_transformers_fit(
            queries, positives, args.batch, args.max_length, args.steps
        )
        our_seconds = ours(queries, positives, args.batch, args.max_length, args.steps)
        pairs = args.batch * args.steps
        result = {
            "question": "pairs/s of our training step vs a sentence-transformers MNRL fit; GradCache memory vs |B|",
            "model": MODEL, "lora_r": 8, "batch": args.batch, "max_length": args.max_length, "steps": args.steps,
            "pairs_per_second": {"b3": round(pairs / our_seconds, 2), "sentence_transformers": round(pairs / st_seconds, 2)},
            "ratio_b3_over_sentence_transformers": round(st_seconds / our_seconds, 3),
            "torch_threads": __import__("torch").get_num_threads(),
            "versions": {name: metadata.version(name) for name in ("torch", "transformers", "peft", "sentence-transformers")},
            "machine": machine.describe(),
        }  # fmt: skip
        print(json.dumps(result, indent=2), flush=True)
    if not args.skip_memory:
        result["memory"] = memory(args.memory_batches, args.mini_batch_size, args.max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
