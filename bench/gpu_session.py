"""One command for a lent GPU: embedding, ranking and training throughput against the
hardware's bf16 rate, then the GPU cells of the experiments, in about 10 minutes on one H200.

The device has no network and takes at most 64 MiB of files beyond the tracked tree, so the
teacher travels as a float16 copy (all-MiniLM-L6-v2: 44 MiB) with the Debian dataset (10 MiB):

    python bench/gpu_session.py --prepare runs/gpu-carry          # here: write the carry
    python bench/gpu_session.py --carry runs/gpu-carry            # on the device, carry=[runs/gpu-carry]
    python bench/gpu_session.py --dry                             # CPU, tiny: what the tests run

Parts, in order, each written to the JSON as soon as it is done (a run cut short keeps them):

  device       torch, CUDA, the GPU, its bf16 peak (PEAK_BF16), the packages the run needs
  embed        the teacher in bfloat16 over --texts descriptions (b3.teacher.TextEncoder):
               texts/s, tokens/s, and forward FLOP/s (2 x parameters x tokens) against the peak
  rank         exact top-(p+m) ranking of those embeddings within tasks (b3.ranking.rank_topk)
  train        --train-steps of our training step (b3.train.compute_gradients + AdamW, bf16
               autocast) at |B| = 64 and 256, LoRA and full fine-tuning: pairs/s, tokens/s,
               and training FLOP/s (6 x parameters x tokens, an upper bound under LoRA)
  experiments  bench/b3_vs_random.py on the whole Debian split, |B| = 64, K = 16: random,
               random same task and B3 for the strong student (experiment B's whole-set arm
               too), and the weak student of experiment A (bench/weak_student.py, full
               fine-tuning); each a subprocess with the time left, its JSON under
               bench/results/

Expected on one H200 (not yet run there: estimates from the CPU runs and the GPU's rate):
device and throughput under 2 minutes, the strong-student cells 3-4 minutes, the weak-student
cells 3-4 minutes. --budget (default 540 s) stops starting parts that would not finish.
Results: bench/results/gpu_session.json (--out).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import machine
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "datasets" / "debian-descriptions.parquet"
SMALL_DATA = ROOT / "examples" / "data" / "debian-2k.parquet"
MANIFEST = ROOT / "bench" / "configs" / "debian-train.yaml"
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
# dense bf16 tensor FLOP/s by GPU name (vendor data sheets, SXM parts); None: unknown here
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
OPTIONAL = ("ray", "tokenizers", "flash-attn")  # reported, not needed


def required_packages() -> list[str]:
    """The project's own dependencies (pyproject.toml), but Ray: what a run here imports."""
    text = (ROOT / "pyproject.toml").read_text()  # (no tomllib before Python 3.11)
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    names = re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block, re.M)
    return [n for n in names if n not in OPTIONAL]


def prepare(folder: Path, data: Path) -> None:
    """The carry: a float16 teacher and the dataset, checked against the device's 64 MiB."""
    from transformers import AutoModel, AutoTokenizer

    from b3.model_source import resolve_model_path

    path = resolve_model_path(TEACHER)
    model = AutoModel.from_pretrained(path, dtype=torch.float16)
    model.save_pretrained(folder / "teacher")
    AutoTokenizer.from_pretrained(path).save_pretrained(folder / "teacher")
    shutil.copy(data, folder / "debian.parquet")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: {size / 2**20:.1f} MiB (the device takes 64 MiB); on the device run\n"
          f"  python bench/gpu_session.py --carry {folder}   with carry=[{folder}]")  # fmt: skip
    if size > 64 * 2**20:
        raise SystemExit(f"{folder} is over 64 MiB")


def device_report() -> dict:
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else None
    peak = next((rate for key, rate in PEAK_BF16.items() if name and key in name), None)
    packages = {}
    for package in [*required_packages(), *OPTIONAL]:
        try:
            packages[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            packages[package] = None
    return {"machine": machine.describe(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": name, "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "peak_bf16_flops": peak, "packages": packages}  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _non_embedding_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def embed_part(model: str, texts: list[str], device: str, peak: float | None) -> tuple[dict, np.ndarray]:
    from b3.teacher import TextEncoder

    encoder = TextEncoder(model, max_length=128, batch_size=256, dtype="bfloat16" if device == "cuda" else "float32",
                          device=device)  # fmt: skip
    encoder.encode(texts[:256], desc="warm-up")
    tokens = sum(len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=128)["input_ids"])
    _sync()
    started = time.perf_counter()
    embeddings = encoder.encode(texts, desc="embed")
    _sync()
    seconds = time.perf_counter() - started
    flops = 2 * _non_embedding_parameters(encoder.model) * tokens / seconds
    return {"texts": len(texts), "seconds": round(seconds, 3), "texts_per_s": round(len(texts) / seconds, 1),
            "tokens_per_s": round(tokens / seconds), "flops": flops,
            "share_of_peak": flops / peak if peak else None}, embeddings  # fmt: skip


def rank_part(embeddings: np.ndarray, k: int, device: str) -> dict:
    """The embeddings as one task, each row its own query and positive."""
    from b3.ranking import rank_topk

    groups = np.arange(len(embeddings))  # each row's own positive is excluded
    run = lambda: rank_topk(embeddings, embeddings, k, groups, groups, device=device)  # noqa: E731
    run()  # warm-up
    _sync()
    started = time.perf_counter()
    run()
    _sync()
    seconds = time.perf_counter() - started
    return {"rows": len(embeddings), "k": k, "seconds": round(seconds, 3),
            "queries_per_s": round(len(embeddings) / seconds, 1)}  # fmt: skip


def train_part(model: str, queries: list[str], positives: list[str], batch: int, finetuning: str, steps: int,
               device: str, peak: float | None) -> dict:  # fmt: skip
    from b3.loss import InfoNCELoss
    from b3.model import build_student
    from b3.spec import LoraSpec
    from b3.train import compute_gradients

    torch.manual_seed(0)
    student = build_student(model, "mean", 128, LoraSpec() if finetuning == "lora" else None).to(device).train()
    if device == "cuda":
        student.autocast_dtype = torch.bfloat16
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = InfoNCELoss(scale=50.0)
    tokens, seconds = 0, 0.0
    for step in range(steps + 1):  # step 0 warms up, uncounted
        rows = [(step * batch + i) % len(queries) for i in range(batch)]
        item = {"query": student.tokenize([queries[i] for i in rows]),
                "positive": student.tokenize([positives[i] for i in rows]), "groups": torch.arange(batch)}  # fmt: skip
        item = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
                for k, v in item.items()}  # fmt: skip
        _sync()
        started = time.perf_counter()
        compute_gradients(student, loss_fn, item, None, 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        if step:
            seconds += time.perf_counter() - started
            tokens += int(item["query"]["attention_mask"].sum() + item["positive"]["attention_mask"].sum())
    flops = 6 * _non_embedding_parameters(student) * tokens / seconds
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"batch": batch, "finetuning": finetuning, "steps": steps, "pairs_per_s": round(steps * batch / seconds, 1),
            "tokens_per_s": round(tokens / seconds), "flops": flops, "share_of_peak": flops / peak if peak else None,
            "peak_memory_gib": peak_memory}  # fmt: skip


def experiment(out: Path, args: list[str], seconds_left: float) -> dict:
    """bench/b3_vs_random.py with `args` within the time left, writing `out`.json."""
    command = [sys.executable, str(ROOT / "bench" / "b3_vs_random.py"), str(MANIFEST), *args, "--out", str(out)]
    started = time.time()
    try:
        ran = subprocess.run(command, capture_output=True, text=True, timeout=max(seconds_left, 1))
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[1:]), "status": "out of time", "seconds": round(time.time() - started)}
    return {"command": " ".join(command[1:]), "status": "done" if ran.returncode == 0 else f"exit {ran.returncode}",
            "results": f"{out}.json" if ran.returncode == 0 else None,
            "seconds": round(time.time() - started), "tail": ran.stderr[-1500:] if ran.returncode else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, metavar="FOLDER", help="write the carry to FOLDER and stop")
    parser.add_argument("--carry", type=Path, help="the folder --prepare wrote (teacher/, debian.parquet)")
    parser.add_argument("--dry", action="store_true", help="CPU, a few texts and steps, every part")
    parser.add_argument("--budget", type=float, default=540, help="seconds; parts that would not fit are skipped")
    parser.add_argument("--texts", type=int, default=50_000)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_session.json")
    args = parser.parse_args(argv)
    if args.prepare:
        if not DATA.exists():
            parser.error(f"--prepare: {DATA} not found (the shared Debian dataset)")
        prepare(args.prepare, DATA)
        return 0
    started = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="b3-gpu-session-"))
    if args.dry:
        prepare(scratch / "carry", SMALL_DATA)
        args.carry, args.texts, args.train_steps, device = scratch / "carry", 64, 2, "cpu"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device here: run it where a GPU is lent, or --dry to check it on the CPU")
    else:
        device = "cuda"
    if args.carry is None or not (args.carry / "teacher" / "config.json").exists():
        parser.error("--carry: a folder written by --prepare (teacher/, debian.parquet)")
    teacher, data = str(args.carry / "teacher"), str(args.carry / "debian.parquet")
    result = {"dry": args.dry, "device": device_report(), "parts": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    missing = [name for name in required_packages() if result["device"]["packages"][name] is None]
    if missing:  # say what the device lacks, in the JSON too, before any part fails on it
        result["missing_packages"] = missing
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"the device lacks {', '.join(missing)}: nothing ran", file=sys.stderr)
        return 3

    def save() -> None:
        args.out.write_text(json.dumps({**result, "seconds": round(time.time() - started, 1)}, indent=2) + "\n")

    save()
    peak = result["device"]["peak_bf16_flops"]
    import pyarrow.parquet as pq

    table = pq.read_table(data, columns=["query", "positive"])
    rows = np.random.default_rng(0).permutation(table.num_rows)[: args.texts]
    queries = [table["query"][int(i)].as_py() for i in rows]
    positives = [table["positive"][int(i)].as_py() for i in rows]
    result["parts"]["embed"], embeddings = embed_part(teacher, positives, device, peak)
    save()
    result["parts"]["rank"] = rank_part(embeddings, 130, device)  # p + m of the Debian configs
    save()
    result["parts"]["train"] = []
    for batch in (8,) if args.dry else (64, 256):
        for finetuning in ("lora", "full"):
            result["parts"]["train"].append(train_part(teacher, queries, positives, batch, finetuning,
                                                       args.train_steps, device, peak))  # fmt: skip
            save()
    small = ["--steps", "2", "--batch-sizes", "16", "--tasks", "python", "perl", "--buckets", "5",
             "--arms", "random", "b3"] if args.dry else []  # fmt: skip
    weak = scratch / "weak-student"
    subprocess.run([sys.executable, str(ROOT / "bench" / "weak_student.py"), str(weak), "--model", teacher], check=True,
                   capture_output=True)  # fmt: skip
    cells = {
        "strong": ["--preset", "gpu", "--seeds", "0", "--arms", "random", "random-same-task", "b3", "b3-whole"],
        "weak_full": ["--preset", "gpu", "--seeds", "0", "--arms", "random", "random-same-task", "b3",
                      "--set", f"training.student={weak}", "--set", "training.finetuning=full",
                      "--learning-rate", "2e-4"],  # chosen on the validation bucket (docs/experiments.md)
    }  # fmt: skip
    result["parts"]["experiments"] = {}
    for name, cell in cells.items():
        cell = [*cell, "--model" if name == "strong" else "--teacher", teacher, "--dataset", data,
                "--work", str(scratch / name), *small]  # fmt: skip
        left = args.budget - (time.time() - started)
        out = args.out.with_name(f"{args.out.stem}_{name}")
        result["parts"]["experiments"][name] = experiment(out, cell, left)
        save()
    shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
