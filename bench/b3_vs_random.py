"""B3 batches against random batches: the same student, budget and seeds, evaluated two ways.

For each seed and batch size: rank and partition (K = --cluster-size, or |B| / --communities;
the teacher embeddings are computed once and shared), then train one LoRA student per arm and
evaluate it on the held-out split, mixed (every query against every held-out document) and per
task (each query against its own task's documents, as MMEB scores each dataset):

    random            uniformly random batches over the whole training split (a plain trainer)
    random-same-task  random batches drawn within one task (task purity without the mining)
    b3                B3 batches: |B|/K whole communities of one task (mined per task)
    b3-mixed          the same per-task communities, batches mixing tasks
    b3-whole          mined over the whole training split as one task (perTask false): the
                      analogue of one MMEB dataset
    b3++ h=5          B3 batches plus 5 mined hard negatives per member (at --hard-negative-batch;
                      each step embeds |B| x 6 documents instead of |B|)

each optionally with a `training.falseNegatives` rule ("b3:teacher", "b3:top-p").

Two framings come out of the same runs. F1, the training split as one task: `b3-whole` against
`random`, evaluated mixed. F2, tasks as tasks: `b3`, `b3-mixed` against `random` and
`random-same-task`, evaluated per task and mixed. The budget is equal epochs (--epochs: each
arm's steps = epochs x training rows / |B|) or equal steps (--steps). Each arm's nDCG@10 is
compared with each random arm by a paired bootstrap over the test queries of the seed-averaged
per-query nDCG@10 (b3.evaluation.paired_bootstrap), in all three views (mixed, per-task micro
and macro).

--preset cpu answers the main question on a 2-core CPU in about an hour (see PRESETS);
--preset gpu is the full protocol for one GPU. --validation holds out the test bucket entirely
and evaluates on the next bucket instead: choose p, K and the learning rate there, never on the
test split. Each finished training and evaluation is kept under --work, so an interrupted run
continues.

    python bench/b3_vs_random.py bench/configs/debian-train.yaml --preset cpu

writes bench/results/b3_vs_random_cpu.json and .png (--out sets the name).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import machine
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from b3.data import load_pairs, read_table, split_bucket  # noqa: E402
from b3.evaluation import Ranks, paired_bootstrap, per_query, rank_encoder  # noqa: E402
from b3.spec import B3Job, SplitSpec, load_manifest  # noqa: E402
from b3.stages import partition_stage, rank_stage  # noqa: E402
from b3.storage import fingerprint  # noqa: E402
from b3.teacher import TextEncoder  # noqa: E402
from b3.train import train_stage  # noqa: E402

ARMS = {  # arm -> (training.sampler, mining.mixTasks, mining.perTask)
    "random": ("random", True, True),
    "random-same-task": ("random", False, True),
    "b3": ("b3", False, True),
    "b3-mixed": ("b3", True, True),
    "b3-whole": ("b3", True, False),
}
BASELINES = ("random", "random-same-task")
VIEWS = ("mixed", "per_task_micro", "per_task_macro")

# What each preset runs. cpu: the main question (does B3 beat both random baselines at a small
# |B| under the evaluation that matches the notion of task?) on 2 cores in about an hour. Cut:
# one |B| (32), 1 epoch, 64 tokens per text, 3 Debian sections (their ~5k training rows; 20% of
# source packages held out, so ~1.2k test queries keep the intervals near +-1 point), no
# b3-mixed, no B3++ (6x the documents per step) and no false-negative masks (they lost 0.8-2.1
# points in the GPU run). Kept: both random baselines, B3 per task and over the whole set, 3
# seeds, K tied to |B| (4 communities per batch), both evaluations.
# gpu: one prepared run for 15 minutes of one GPU: the whole Debian split (55k training rows,
# 6,079 test queries), |B| = 64 with K = 16, 1 epoch (861 steps), 128 tokens, 3 seeds, the four
# arms of both framings: 12 trainings, about 70 s each at the 800 pairs/s an H100 gave |B| = 64
# in the earlier run, plus mining (~1 min) and 13 evaluations. Larger |B|, B3++ (about 3x the
# time per step) and b3-mixed are further runs of it (--batch-sizes, --arms).
PRESETS = {
    "cpu": {"tasks": ["rust", "golang", "haskell"], "buckets": 5, "batch_sizes": [32],
            "communities": 4, "epochs": 1.0, "seeds": [0, 1, 2], "max_length": 64,
            "arms": ["random", "random-same-task", "b3", "b3-whole"]},
    "gpu": {"tasks": None, "buckets": 10, "batch_sizes": [64], "communities": 4,
            "epochs": 1.0, "seeds": [0, 1, 2], "max_length": 128,
            "arms": ["random", "random-same-task", "b3", "b3-whole"]},
}  # fmt: skip


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


def subset(job: B3Job, tasks: list[str] | None, buckets: int, validation: bool, work: Path) -> B3Job:
    """The job on the chosen tasks and split. With `validation` the test bucket's rows are
    removed from the data and the next bucket is held out instead, so nothing tuned on this
    run ever saw the test split."""
    split = job.spec.dataset.split
    test = SplitSpec(key=split.key, buckets=buckets, test_bucket=split.test_bucket % buckets)
    if tasks is None and buckets == split.buckets and not validation:
        return variant(job, Path(job.spec.work_dir), dataset={"split": test})
    table = read_table(job.spec.dataset)
    if tasks is not None:
        found = set(table.column(job.spec.dataset.columns.task).to_pylist())
        if missing := sorted(set(tasks) - found):
            raise SystemExit(f"--tasks: {missing} are not tasks of {job.spec.dataset.uri}")
        table = table.filter(pc.is_in(table.column(job.spec.dataset.columns.task), pa.array(tasks)))
    if validation:
        bucket = split_bucket(table.column(split.key).cast("string").to_pylist(), buckets)
        table = table.filter(bucket != test.test_bucket)
        test = test.model_copy(update={"test_bucket": (test.test_bucket + 1) % buckets})
    work.mkdir(parents=True, exist_ok=True)
    path = work / "data.parquet"
    # rewritten only when the rows change: the file's modification time is part of the rank
    # stage's fingerprint, so a rerun with the same data (another learning rate) reuses mining
    if not (path.exists() and pq.read_table(path).equals(table)):
        pq.write_table(table, path)
    return variant(job, Path(job.spec.work_dir), dataset={"uri": str(path), "format": "parquet", "split": test})


class TrainingCurve(logging.Handler):
    """The trainer's log lines (b3.train: a JSON line per 10 steps, means over those steps),
    kept while an arm trains: how far in-batch accuracy and loss got in each epoch shows
    whether random batches saturate (experiment C)."""

    def __init__(self):
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("{"):
            line = json.loads(message)
            if "accuracy" in line:
                self.lines.append(line)

    def by_epoch(self) -> list[dict]:
        """Per epoch: its steps' mean in-batch accuracy and loss (window means weighted by
        their steps), in epoch order."""
        epochs: dict[int, list[dict]] = {}
        for line in self.lines:
            epochs.setdefault(line["epoch"], []).append(line)
        out = []
        for epoch, lines in sorted(epochs.items()):
            steps = np.array([line["steps_averaged"] for line in lines], dtype=float)
            out.append({"epoch": epoch, "steps": int(steps.sum()),
                        **{key: round(float(np.average([line[key] for line in lines], weights=steps)), 4)
                           for key in ("accuracy", "loss")}})  # fmt: skip
        return out


def load_ranks(path: Path) -> Ranks:
    saved = np.load(path, allow_pickle=True)
    return Ranks(mixed=saved["mixed"], task=saved["task"], tasks=saved["tasks"], corpus=int(saved["corpus"]))


def evaluate(model: str, job: B3Job, test_pairs, cache: Path, trained: str | None = None) -> Ranks:
    """Per-query ranks of one model on the test split, cached as .npz under a key: the train
    stage's fingerprint of a `trained` model, else the model, its settings and the test split
    (a cache found under another key, e.g. another learning rate in the same --work, is redone)."""
    t = job.spec.training
    key = trained or fingerprint(model, t.pooling, t.max_length, job.spec.dataset.prompts, len(test_pairs),
                                 job.spec.dataset.split)  # fmt: skip
    if cache.exists() and str(np.load(cache).get("key", "")) == key:
        return load_ranks(cache)
    # float32 on any device: fp16 rounding must not decide between arms
    encoder = TextEncoder(model, pooling=t.pooling, max_length=t.max_length, batch_size=256,
                          dtype="float32")  # fmt: skip
    ranks = rank_encoder(encoder, test_pairs, job.spec.dataset.prompts)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, mixed=ranks.mixed, task=ranks.task, tasks=ranks.tasks, corpus=ranks.corpus, key=key)
    return ranks


def headline(ranks: Ranks) -> dict:
    """The numbers a run records: mixed metrics and per-task nDCG@10 micro and macro."""
    summary = ranks.summary()
    per_task = summary.pop("per_task")
    return summary | {"per_task_micro": per_task["micro"]["ndcg@10"],
                      "per_task_macro": per_task["macro"]["ndcg@10"]}  # fmt: skip


def plan(
    names: list[str], batch_sizes: list[int], hard_negative_batch: int, hard_negatives: int
) -> list[dict]:
    """Arms in the order they run: every name at each batch size in turn, then the B3++ arms.

    A name is an arm of ARMS or "b3++", optionally with a `training.falseNegatives` rule after a
    colon ("b3:teacher")."""

    def arm(name: str, batch_size: int, h: int) -> dict:
        sampler, _, rule = name.partition(":")
        return {"arm": name.replace("b3++", f"b3++ h={h}"), "kind": "b3" if h else sampler,
                "false_negatives": rule or "none", "batch_size": batch_size, "hard_negatives": h}  # fmt: skip

    plain = [arm(n, b, 0) for b in batch_sizes for n in names if not n.startswith("b3++")]
    plus = [arm(n, hard_negative_batch, hard_negatives) for n in names if n.startswith("b3++")]
    return plain + plus


def earlier_baselines(work: Path, seeds: list[int], sizes: list[int], reference: Ranks) -> dict:
    """Per-query ranks of the random arms that an earlier run (its --work) trained, for the
    same seeds and sizes; refused when that run evaluated other queries."""
    found = {}
    for base in BASELINES:
        for size in sizes:
            runs = [work / f"seed{seed}" / f"{base}-{size}" / "eval.npz" for seed in seeds]
            if missing := [str(r) for r in runs if not r.exists()]:
                raise SystemExit(f"--baselines-from: no evaluation at {', '.join(missing)}")
            found[(base, size)] = [load_ranks(r) for r in runs]
            if any(not np.array_equal(r.tasks, reference.tasks) or r.corpus != reference.corpus
                   for r in found[(base, size)]):  # fmt: skip
                raise SystemExit(f"--baselines-from {work}: evaluated on other test queries than this run")
    return found


def comparisons(per_seed: dict[tuple[str, int], list[Ranks]], resamples: int = 10_000) -> list[dict]:
    """Every arm against each random arm at the same |B|: the paired bootstrap of the
    seed-averaged per-query nDCG@10, in each view."""

    def averaged(runs: list[Ranks], view: str) -> np.ndarray:
        ranks = [r.mixed if view == "mixed" else r.task for r in runs]
        return np.mean([per_query(r)["ndcg@10"] for r in ranks], axis=0)

    rows = []
    for (arm, size), runs in per_seed.items():
        for base in BASELINES:
            if arm in BASELINES[: BASELINES.index(base) + 1] or (base, size) not in per_seed:
                continue
            baseline = per_seed[(base, size)]
            row = {"arm": arm, "baseline": base, "batch_size": size,
                   "seeds": min(len(runs), len(baseline))}  # fmt: skip
            for view in VIEWS:
                strata = runs[0].tasks if view == "per_task_macro" else None
                row[view] = paired_bootstrap(averaged(baseline, view), averaged(runs, view),
                                             strata=strata, resamples=resamples)  # fmt: skip
            rows.append(row)
    return rows


STYLES = {"b3": ("tab:blue", "o"), "random": ("tab:red", "s"), "random-same-task": ("tab:orange", "^"),
          "b3-mixed": ("tab:purple", "D"), "b3-whole": ("tab:cyan", "v"), "b3++": ("tab:green", "*")}  # fmt: skip


def plot(results: dict, path: Path) -> None:
    """nDCG@10 against |B| per arm (mixed; per task micro when recorded); with comparisons,
    a second panel of each arm's difference from the random arms with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_views = any("per_task_micro" in run for run in results["runs"])
    panels = (["ndcg@10", "per_task_micro"] if has_views else ["ndcg@10"]) + (["diff"] if results.get("comparisons") else [])
    widths = [1.6 if panel == "diff" else 1 for panel in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * sum(widths), 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})  # fmt: skip
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "diff":
            _plot_differences(ax, results["comparisons"])
            continue
        by_arm: dict[str, dict[int, list[float]]] = {}
        for run in results["runs"]:
            by_arm.setdefault(run["arm"], {}).setdefault(run["batch_size"], []).append(run[panel])
        for arm, points in by_arm.items():
            sizes = sorted(points)
            mean = np.array([np.mean(points[b]) for b in sizes])
            low = mean - np.array([min(points[b]) for b in sizes])
            high = np.array([max(points[b]) for b in sizes]) - mean
            kind, _, rule = arm.partition(":")
            color, marker = STYLES["b3++" if kind.startswith("b3++") else kind]
            line = {"": "-", "teacher": "--", "top-p": ":"}[rule]
            ax.errorbar(sizes, mean, yerr=[low, high], color=color, marker=marker, capsize=3,
                        markersize=10 if marker == "*" else 6, label=arm, alpha=1.0 if not rule else 0.6,
                        linestyle="none" if len(sizes) == 1 else line)  # fmt: skip
        untrained = results["untrained"]
        ax.axhline(untrained.get(panel, untrained["ndcg@10"]), color="gray", linestyle="--", label="untrained")
        ax.set_xscale("log", base=2)
        sizes = sorted({run["batch_size"] for run in results["runs"]})
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size |B|")
        ax.set_ylabel("nDCG@10, " + ("mixed corpus" if panel == "ndcg@10" else "per task (micro)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = ", ".join(str(seed) for seed in results["seeds"])
    budget = f"{results['epochs']} epoch(s)" if results.get("epochs") else f"{results['steps']} steps"
    fig.suptitle(f"{budget}; seeds {seeds} (points: mean, bars: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_differences(ax, rows: list[dict]) -> None:
    labels = []
    for y, row in enumerate(rows):
        for i, view in enumerate(VIEWS):
            d = row[view]
            color = STYLES[row["arm"].partition(":")[0]][0]
            ax.errorbar([100 * d["difference"]], [y - 0.25 * (i - 1)], color=color,
                        xerr=[[100 * (d["difference"] - d["low"])], [100 * (d["high"] - d["difference"])]],
                        marker=["o", "s", "^"][i], capsize=2, markersize=4)  # fmt: skip
        labels.append(f"{row['arm']} - {row['baseline']} (|B|={row['batch_size']})")
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@10 difference x100, 95% paired bootstrap\n(o mixed, s per task micro, ^ per task macro)")
    ax.grid(alpha=0.3, axis="x")


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


def print_comparisons(rows: list[dict]) -> None:
    print("nDCG@10 difference x100 [95% paired bootstrap], seed-averaged per query:")
    print(f"  {'arm':<18}{'baseline':<18}{'|B|':>5}" + "".join(f"{v:>24}" for v in VIEWS))
    for row in rows:
        cells = "".join(f"{100 * row[v]['difference']:+.2f} [{100 * row[v]['low']:+.2f}, {100 * row[v]['high']:+.2f}]".rjust(24)
                        for v in VIEWS)  # fmt: skip
        print(f"  {row['arm']:<18}{row['baseline']:<18}{row['batch_size']:>5}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "manifest", nargs="?", help="base B3Job (dataset with a split, teacher, student)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="defaults for everything below (see PRESETS)")
    parser.add_argument("--epochs", type=float, help="budget: epochs per arm (steps = epochs x rows / |B|)")
    parser.add_argument("--steps", type=int, help="budget: steps per arm (instead of --epochs)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--cluster-size", type=int, help="K at every |B|")
    parser.add_argument("--communities", type=int, help="K = |B| / this (K tied to |B|)")
    parser.add_argument("--tasks", nargs="+", help="train and evaluate on these tasks only")
    parser.add_argument("--buckets", type=int, help="split buckets (the manifest's key and test bucket)")
    parser.add_argument("--validation", action="store_true",
                        help="drop the test bucket and evaluate on the next one (for tuning)")  # fmt: skip
    parser.add_argument("--hard-negatives", type=int, default=5, help="h of the B3++ arm (0: none)")
    parser.add_argument("--hard-negative-batch", type=int, default=64)
    parser.add_argument("--arms", nargs="+",
                        help="arms, each optionally with a training.falseNegatives rule: "
                        f"{' '.join(ARMS)} b3++ b3:teacher random:top-p ...")  # fmt: skip
    parser.add_argument("--learning-rate", type=float, help="default: the manifest's")
    parser.add_argument("--max-length", type=int, help="tokens per text, teacher and student (default: the manifest's)")
    parser.add_argument("--model", help="teacher and student (default: the manifest's)")
    parser.add_argument("--teacher", help="the teacher only, e.g. a student trained with random batches (T1)")
    parser.add_argument("--baselines-from", metavar="WORK",
                        help="compare with the random arms an earlier run trained (its --work; same split and seeds)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="manifest override, as `b3 run` takes them: --set 'training.lora.targetModules=[query, key, value, dense]'")  # fmt: skip
    parser.add_argument("--dataset", help="dataset URI (default: the manifest's)")
    parser.add_argument("--work", help="default: runs/b3-vs-random[-PRESET]")
    parser.add_argument("--out", help="default: bench/results/b3_vs_random[_PRESET][_validation]")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="no training: merge the runs of earlier results files into --out and plot them")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    suffix = (f"_{args.preset}" if args.preset else "") + ("_validation" if args.validation else "")
    out = Path(args.out or ROOT / "bench" / "results" / f"b3_vs_random{suffix}")
    if args.merge:
        merge(args.merge, out)
        return
    if not args.manifest:
        parser.error("a manifest is needed unless --merge is given")
    defaults = {"tasks": None, "buckets": None, "batch_sizes": [64, 256, 32], "communities": None,
                "epochs": None, "seeds": [0], "max_length": None, "arms": [*ARMS, "b3++"]} | PRESETS.get(args.preset, {})  # fmt: skip
    if args.cluster_size:  # an explicit K wins over a preset's K = |B| / communities
        defaults["communities"] = None
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps is not None:
        args.epochs = None  # an explicit step budget wins over a preset's epochs
    if args.epochs is None and args.steps is None:
        args.steps = 500
    if args.cluster_size and args.communities:
        parser.error("give --cluster-size or --communities, not both")
    def k_of(batch_size: int) -> int:
        """K at this |B|: --cluster-size, else |B| / --communities, else 16."""
        if args.cluster_size:
            return args.cluster_size
        return batch_size // args.communities if args.communities else 16

    bad_k = [b for b in args.batch_sizes if k_of(b) < 2 or b % k_of(b)]
    if bad_k:
        parser.error(f"K does not divide (or is below 2 at) batch sizes {bad_k}")
    unknown = [a for a in args.arms if a.partition(":")[0] not in [*ARMS, "b3++"]
               or a.partition(":")[2] not in ("", "none", "top-p", "teacher")]  # fmt: skip
    if unknown:
        parser.error(f"unknown arms {unknown}")

    base = load_manifest(args.manifest, args.set)
    if base.spec.dataset.split is None:
        parser.error(f"{args.manifest}: the experiment needs dataset.split for a test split")
    if args.model and os.path.exists(args.model):
        args.model = os.path.abspath(args.model)
    work = Path(args.work or ROOT / "runs" / f"b3-vs-random{suffix.replace('_', '-')}")
    if args.teacher and os.path.exists(args.teacher):
        args.teacher = os.path.abspath(args.teacher)
    teacher = ({"model": args.teacher or args.model} if args.teacher or args.model else {}) | (
        {"max_length": args.max_length} if args.max_length else {})  # fmt: skip
    base = variant(base, Path(base.spec.work_dir), **({"teacher": teacher} if teacher else {}),
                   **({"dataset": {"uri": os.path.abspath(args.dataset)}} if args.dataset else {}),
                   mining={"min_task_size": max(args.batch_sizes)},
                   training={"checkpoint_every": 10**6, "keep_checkpoints": 1,
                             **({"max_length": args.max_length} if args.max_length else {}),
                             **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
                             **({"student": args.model} if args.model else {})})  # fmt: skip
    base = subset(base, args.tasks, args.buckets or base.spec.dataset.split.buckets, args.validation, work)
    train_rows = len(load_pairs(base.spec.dataset, min_rows=1))
    test_pairs = load_pairs(base.spec.dataset, min_rows=1, split="test")
    arms = plan(args.arms, args.batch_sizes, args.hard_negative_batch, args.hard_negatives)

    def steps_for(batch_size: int) -> int:
        return args.steps or math.ceil(args.epochs * train_rows / batch_size)

    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else machine.describe()
    results = {
        "manifest": os.path.relpath(args.manifest, ROOT),
        "preset": args.preset,
        "evaluated_on": "validation bucket" if args.validation else "test bucket",
        "split": base.spec.dataset.split.model_dump(by_alias=True),
        "tasks": args.tasks,
        "train_rows": train_rows,
        "test_queries": len(test_pairs),
        "epochs": args.epochs,
        "steps": args.steps,
        "seeds": args.seeds,
        "cluster_size": {b: k_of(b) for b in args.batch_sizes},
        "min_task_size": max(args.batch_sizes),
        "p": base.spec.mining.p,
        "m": base.spec.mining.m,
        "teacher": base.spec.teacher.model,
        "student": base.spec.training.student,
        "finetuning": base.spec.training.finetuning,
        "lora": base.spec.training.lora.model_dump(by_alias=True) if base.spec.training.finetuning == "lora" else None,
        "overrides": args.set,
        "learning_rate": base.spec.training.learning_rate,
        "temperature": base.spec.training.temperature,
        "max_length": base.spec.training.max_length,
        "device": device,
        "torch": torch.__version__,
        "mining_seconds": {},
        "runs": [],
    }
    untrained_ranks = evaluate(base.spec.training.student, base, test_pairs, work / "untrained.npz")
    results["untrained"] = headline(untrained_ranks)
    print(f"{train_rows} training rows, {len(test_pairs)} test queries; untrained student: nDCG@10 "
          f"{results['untrained']['ndcg@10']:.4f} mixed, {results['untrained']['per_task_micro']:.4f} per task")  # fmt: skip
    per_seed: dict[tuple[str, int], list[Ranks]] = {}
    if args.baselines_from:  # the random arms of an earlier run on the same split and seeds
        per_seed |= earlier_baselines(Path(args.baselines_from), args.seeds, args.batch_sizes, untrained_ranks)
    for seed in args.seeds:
        # rank and partition once per |B| and mining scope (per task or whole set): the mining
        # groups may depend on |B| (b3.artifacts: rank reads mining.batchSize); the teacher
        # embeddings are shared (same inputs)
        scopes = sorted({(a["batch_size"], ARMS[a["kind"]][2]) for a in arms}, key=lambda s: (s[0], not s[1]))
        first = f"rank-{scopes[0][0]}" + ("" if scopes[0][1] else "-whole")
        for size, per_task in scopes:
            scope = f"{size}" + ("" if per_task else "-whole")
            ranked = work / f"rank-{scope}"
            share_embeddings(work / first / "rank", ranked / "rank")
            mining = {"batch_size": size, "cluster_size": k_of(size), "per_task": per_task, "mix_tasks": not per_task}
            mined = variant(base, work / f"seed{seed}" / f"mining-{scope}", mining={**mining, "seed": seed})
            link(ranked / "rank", work / f"seed{seed}" / f"mining-{scope}" / "rank")  # not seeded
            rank = rank_stage(variant(base, ranked, mining=mining))
            partition = partition_stage(mined)
            results["mining_seconds"][f"seed{seed}-{scope}"] = {
                "rank": round(rank.get("seconds", 0), 1), "partition": round(partition.get("seconds", 0), 1)}
            print(f"seed {seed}, |B|={size}, {'per task' if per_task else 'whole set'}: rank "
                  f"{rank.get('seconds', 0):.0f}s, partition {partition.get('seconds', 0):.0f}s")  # fmt: skip
        for a in arms:
            name = f"{a['arm'].replace(' ', '').replace('=', '').replace(':', '-')}-{a['batch_size']}"
            arm_work = work / f"seed{seed}" / name
            sampler, mix, per_task = ARMS[a["kind"]]
            scope = f"{a['batch_size']}" + ("" if per_task else "-whole")
            for stage in ("rank", "partition"):
                link(work / f"seed{seed}" / f"mining-{scope}" / stage, arm_work / stage)
            steps = steps_for(a["batch_size"])
            job = variant(base, arm_work, training={"sampler": sampler, "false_negatives": a["false_negatives"], "steps": steps},
                          mining={"seed": seed, "batch_size": a["batch_size"], "cluster_size": k_of(a["batch_size"]),
                                  "mix_tasks": mix, "per_task": per_task, "hard_negatives": a["hard_negatives"]})  # fmt: skip
            t0 = time.time()
            curve = TrainingCurve()
            logging.getLogger("b3.train").addHandler(curve)
            try:
                record = train_stage(job, env={})
            finally:
                logging.getLogger("b3.train").removeHandler(curve)
            train_seconds = record.get("seconds", time.time() - t0)
            ranks = evaluate(str(arm_work / "train" / "final" / "model"), job, test_pairs, arm_work / "eval.npz",
                             trained=record["fingerprint"])  # fmt: skip
            per_seed.setdefault((a["arm"], a["batch_size"]), []).append(ranks)
            metrics = headline(ranks)
            results["runs"].append({**a, "seed": seed, "steps": steps, "train_seconds": round(train_seconds, 1), **metrics,
                                    **({"by_epoch": curve.by_epoch()} if curve.lines else {})})  # a skipped run logs none
            results["comparisons"] = comparisons(per_seed)
            # after every arm, so an interrupted experiment still leaves its results
            out.with_suffix(".json").write_text(json.dumps(results, indent=2))
            plot(results, out.with_suffix(".png"))
            print(f"  {a['arm']:<18} |B|={a['batch_size']:<4} {steps} steps  nDCG@10 mixed {metrics['ndcg@10']:.4f}  "
                  f"per task {metrics['per_task_micro']:.4f} / {metrics['per_task_macro']:.4f}  train {train_seconds:.0f}s",
                  flush=True)  # fmt: skip

    results["seconds"] = round(time.time() - started, 1)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print_comparisons(results["comparisons"])
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
