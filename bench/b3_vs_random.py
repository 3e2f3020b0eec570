"""B3 batches against random batches: the same student, steps and seeds, evaluated on the test split.

For each seed and batch size: rank and partition (K = --cluster-size; the teacher embeddings are
computed once and shared), then train one LoRA student per arm and evaluate it (nDCG@10, R@1/10,
MRR@10 on the held-out source packages):

    b3                B3 batches: |B|/K whole communities of one task
    random            uniformly random batches over the whole training split (a plain trainer)
    random-same-task  random batches drawn within one task (B3's task purity without the mining)
    b3++ h=5          B3 batches plus 5 mined hard negatives per member (at --hard-negative-batch)

each optionally with a `training.falseNegatives` rule ("b3:teacher": mask the in-batch columns
the teacher scores above the query's own positive; "b3:top-p": mask the query's top-p ranks)

at every batch size in --batch-sizes. The arms of one (seed, |B|) share its rank and partition
outputs; `minTaskSize` is pinned to the largest batch size so the tasks pooled for mining do not
change with |B| (the rank stage reads |B| too, see b3.artifacts, so each |B| has its own).
Each finished training and evaluation is kept under --work, so an interrupted run continues.

    python bench/b3_vs_random.py bench/configs/debian-train.yaml --steps 500 --seeds 0 1

writes bench/results/b3_vs_random.json and bench/results/b3_vs_random.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from b3.data import load_pairs  # noqa: E402
from b3.evaluation import evaluate_encoder  # noqa: E402
from b3.spec import B3Job, load_manifest  # noqa: E402
from b3.stages import partition_stage, rank_stage  # noqa: E402
from b3.teacher import TextEncoder  # noqa: E402
from b3.train import train_stage  # noqa: E402

SAMPLERS = {  # arm -> (training.sampler, mining.mixTasks)
    "b3": ("b3", False),
    "random": ("random", True),
    "random-same-task": ("random", False),
}


def variant(job: B3Job, work: Path, **changes: dict) -> B3Job:
    """A copy of the job with some spec sections updated and its own work dir."""
    spec = job.spec.model_copy(
        update={
            section: getattr(job.spec, section).model_copy(update=fields)
            for section, fields in changes.items()
        }
        | {"work_dir": str(work)}
    )
    return job.model_copy(update={"spec": spec})


def share_embeddings(source: Path, rank_dir: Path) -> None:
    """Hard links to another rank folder's teacher embeddings: the rank stage reuses them when
    their fingerprint matches (b3.artifacts replaces files by rename, never in place)."""
    rank_dir.mkdir(parents=True, exist_ok=True)
    for name in ("embeddings.arrow", "embeddings.json"):
        if (source / name).exists() and not (rank_dir / name).exists() and source != rank_dir:
            os.link(source / name, rank_dir / name)


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if not link_path.is_symlink():
        link_path.symlink_to(target.resolve(), target_is_directory=True)


def evaluate(model: str, job: B3Job, test_pairs, cache: Path) -> dict:
    if cache.exists():
        return json.loads(cache.read_text())
    t = job.spec.training
    # float32 on any device: fp16 rounding must not decide between arms
    encoder = TextEncoder(model, pooling=t.pooling, max_length=t.max_length, batch_size=256,
                          dtype="float32")  # fmt: skip
    metrics = evaluate_encoder(encoder, test_pairs, job.spec.dataset.prompts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(metrics, indent=2))
    return metrics


def plan(
    names: list[str], batch_sizes: list[int], hard_negative_batch: int, hard_negatives: int
) -> list[dict]:
    """Arms in the order they run: every name at each batch size in turn, then the B3++ arms.

    A name is a sampler arm or "b3++", optionally with a `training.falseNegatives` rule after a
    colon ("b3:teacher")."""

    def arm(name: str, batch_size: int, h: int) -> dict:
        sampler, _, rule = name.partition(":")
        return {"arm": name.replace("b3++", f"b3++ h={h}"), "sampler": "b3" if h else sampler,
                "false_negatives": rule or "none", "batch_size": batch_size, "hard_negatives": h}  # fmt: skip

    plain = [arm(n, b, 0) for b in batch_sizes for n in names if not n.startswith("b3++")]
    plus = [arm(n, hard_negative_batch, hard_negatives) for n in names if n.startswith("b3++")]
    return plain + plus


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"b3": ("tab:blue", "o"), "random": ("tab:red", "s"),
              "random-same-task": ("tab:orange", "^"), "b3++": ("tab:green", "*")}  # fmt: skip
    by_arm: dict[str, dict[int, list[float]]] = {}
    for run in results["runs"]:
        by_arm.setdefault(run["arm"], {}).setdefault(run["batch_size"], []).append(run["ndcg@10"])
    for arm, points in by_arm.items():
        sizes = sorted(points)
        mean = np.array([np.mean(points[b]) for b in sizes])
        low = mean - np.array([min(points[b]) for b in sizes])
        high = np.array([max(points[b]) for b in sizes]) - mean
        sampler, _, rule = arm.partition(":")
        color, marker = styles["b3++" if sampler.startswith("b3++") else sampler]
        line = {"": "-", "teacher": "--", "top-p": ":"}[rule]
        ax.errorbar(sizes, mean, yerr=[low, high], color=color, marker=marker, capsize=3,
                    markersize=10 if marker == "*" else 6, label=arm, alpha=1.0 if not rule else 0.6,
                    linestyle="none" if len(sizes) == 1 else line)  # fmt: skip
    ax.axhline(results["untrained"]["ndcg@10"], color="gray", linestyle="--", label="untrained")
    ax.set_xscale("log", base=2)
    sizes = sorted({run["batch_size"] for run in results["runs"]})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("batch size |B|")
    ax.set_ylabel("nDCG@10 (test split)")
    seeds = ", ".join(str(seed) for seed in results["seeds"])
    ax.set_title(
        f"{results['steps']} steps; seeds {seeds} (points: mean, bars: min-max)", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(paths: list[str], out: Path) -> None:
    """One results file from several runs of this script (same steps); a later file's run of the
    same arm, batch size and seed replaces an earlier one's."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    if len({part["steps"] for part in parts}) > 1:
        raise SystemExit(f"--merge: the files were trained for different steps: {paths}")
    runs = {}
    for part in parts:
        for run in part["runs"]:
            run.setdefault("false_negatives", "none")
            runs[(run["arm"], run["batch_size"], run["seed"])] = run
    results = {**parts[0], "seeds": sorted({seed for _, _, seed in runs}), "runs": list(runs.values()),
               "seconds": sum(part.get("seconds", 0) for part in parts), "merged_from": paths}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}: {len(runs)} runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "manifest", nargs="?", help="base B3Job (dataset with a split, teacher, student)"
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 32])
    parser.add_argument("--cluster-size", type=int, default=16, help="K; must divide every |B|")
    parser.add_argument("--hard-negatives", type=int, default=5, help="h of the B3++ arm (0: none)")
    parser.add_argument("--hard-negative-batch", type=int, default=64)
    parser.add_argument("--arms", nargs="+", default=[*SAMPLERS, "b3++"],
                        help="sampler arms, each optionally with a training.falseNegatives rule: "
                        "b3 random random-same-task b3++ b3:teacher random:top-p ...")  # fmt: skip
    parser.add_argument("--model", help="teacher and student (default: the manifest's)")
    parser.add_argument("--dataset", help="dataset URI (default: the manifest's)")
    parser.add_argument("--work", default=str(ROOT / "runs" / "b3-vs-random"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "b3_vs_random"))
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no training: merge the runs of earlier results files into --out and plot them")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.merge:
        merge(args.merge, Path(args.out))
        return
    if not args.manifest:
        parser.error("a manifest is needed unless --merge is given")

    base = load_manifest(args.manifest)
    if base.spec.dataset.split is None:
        parser.error(f"{args.manifest}: the experiment needs dataset.split for a test split")
    bad_k = [b for b in args.batch_sizes if b % args.cluster_size]
    if bad_k:
        parser.error(f"--cluster-size {args.cluster_size} does not divide batch sizes {bad_k}")
    if args.model and os.path.exists(args.model):
        args.model = os.path.abspath(args.model)
    base = variant(base, Path(base.spec.work_dir),
                   **({"teacher": {"model": args.model}} if args.model else {}),
                   **({"dataset": {"uri": os.path.abspath(args.dataset)}} if args.dataset else {}),
                   mining={"cluster_size": args.cluster_size, "min_task_size": max(args.batch_sizes)},
                   training={"steps": args.steps, "checkpoint_every": args.steps, "keep_checkpoints": 1,
                             **({"student": args.model} if args.model else {})})  # fmt: skip
    work = Path(args.work)
    test_pairs = load_pairs(base.spec.dataset, min_rows=1, split="test")
    unknown = [a for a in args.arms if a.partition(":")[0] not in [*SAMPLERS, "b3++"]
               or a.partition(":")[2] not in ("", "none", "top-p", "teacher")]  # fmt: skip
    if unknown:
        parser.error(f"unknown arms {unknown}")
    arms = plan(args.arms, args.batch_sizes, args.hard_negative_batch, args.hard_negatives)

    started = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    results = {
        "manifest": os.path.relpath(args.manifest, ROOT),
        "steps": args.steps,
        "seeds": args.seeds,
        "cluster_size": args.cluster_size,
        "min_task_size": max(args.batch_sizes),
        "p": base.spec.mining.p,
        "m": base.spec.mining.m,
        "learning_rate": base.spec.training.learning_rate,
        "temperature": base.spec.training.temperature,
        "device": device,
        "torch": torch.__version__,
        "runs": [],
    }
    untrained = evaluate(base.spec.training.student, base, test_pairs, work / "untrained.json")
    print(
        f"untrained student: nDCG@10 {untrained['ndcg@10']:.4f} on {untrained['queries']} test queries"
    )
    results["untrained"] = untrained
    for seed in args.seeds:
        # the mining groups may depend on |B| (b3.artifacts: rank reads mining.batchSize), so
        # rank and partition once per |B|; the teacher embeddings are shared (same inputs)
        sizes = sorted({a["batch_size"] for a in arms})
        for size in sizes:
            ranked = work / f"rank-{size}"
            share_embeddings(work / f"rank-{sizes[0]}" / "rank", ranked / "rank")
            mining = variant(base, work / f"seed{seed}" / f"mining-{size}", mining={"seed": seed, "batch_size": size})
            link(ranked / "rank", work / f"seed{seed}" / f"mining-{size}" / "rank")  # not seeded
            rank = rank_stage(variant(base, ranked, mining={"batch_size": size}))
            partition = partition_stage(mining)
            print(f"seed {seed}, |B|={size}: rank {rank.get('seconds', 0):.0f}s, "
                  f"partition {partition.get('seconds', 0):.0f}s")  # fmt: skip
        for a in arms:
            name = (
                f"{a['arm'].replace(' ', '').replace('=', '').replace(':', '-')}-{a['batch_size']}"
            )
            arm_work = work / f"seed{seed}" / name
            mined = work / f"seed{seed}" / f"mining-{a['batch_size']}"
            for stage in ("rank", "partition"):
                link(mined / stage, arm_work / stage)
            sampler, mix = SAMPLERS[a["sampler"]]
            job = variant(base, arm_work, training={"sampler": sampler, "false_negatives": a["false_negatives"]},
                          mining={"seed": seed, "batch_size": a["batch_size"], "mix_tasks": mix,
                                  "hard_negatives": a["hard_negatives"]})  # fmt: skip
            t0 = time.time()
            record = train_stage(job, env={})
            train_seconds = record.get("seconds", time.time() - t0)
            metrics = evaluate(str(arm_work / "train" / "final" / "model"), job, test_pairs,
                               arm_work / "eval.json")  # fmt: skip
            results["runs"].append(
                {**a, "seed": seed, "train_seconds": round(train_seconds, 1), **metrics}
            )
            # after every arm, so an interrupted experiment still leaves its results
            out.with_suffix(".json").write_text(json.dumps(results, indent=2))
            plot(results, out.with_suffix(".png"))
            print(f"  {a['arm']:<24} |B|={a['batch_size']:<4} nDCG@10 {metrics['ndcg@10']:.4f}  "
                  f"R@1 {metrics['recall@1']:.4f}  train {train_seconds:.0f}s", flush=True)  # fmt: skip

    results["seconds"] = round(time.time() - started, 1)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(
        f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {time.time() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
