"""Did training lower the loss? The same mined batches, scored by the untrained and the trained
student (dropout off), so batch-to-batch hardness does not hide the trend.

Two sets of epoch-0 batches: the first `--batches` (trained on) and the next `--batches` after
the last trained step (never seen). Mean InfoNCE loss and in-batch accuracy of each model.

    python bench/train_loss.py bench/configs/debian-train.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from b3.batches import B3BatchSampler  # noqa: E402
from b3.data import load_pairs  # noqa: E402
from b3.loss import InfoNCELoss  # noqa: E402
from b3.spec import load_manifest  # noqa: E402
from b3.storage import WorkDir  # noqa: E402
from b3.teacher import TextEncoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_loss_debian.json"))
    args = parser.parse_args()

    job = load_manifest(args.manifest)
    spec, t, mining = job.spec, job.spec.training, job.spec.mining
    work = WorkDir(spec.work_dir)
    pairs = load_pairs(spec.dataset, min_rows=mining.batch_size)
    clusters = work.read_parquet("partition", "clusters.parquet")
    sampler = B3BatchSampler(clusters.column("cluster").to_numpy(), mining.batch_size,
                             clusters.column("group").to_numpy(zero_copy_only=False), seed=mining.seed)  # fmt: skip
    batches = sampler.batches(0)
    out = WorkDir(spec.train_dir)  # the train stage's root
    trained_steps = out.read_json("train", "manifest.json")["summary"]["steps"]
    sets = {
        "trained_on": batches[: args.batches],
        "unseen": batches[trained_steps : trained_steps + args.batches],
    }
    loss_fn = InfoNCELoss(scale=1.0 / t.temperature)
    models = {"untrained": t.student, "trained": out.local_path("train", "final", "model")}
    result = {"batches_per_set": args.batches, "trained_steps": trained_steps, "models": {}}
    for name, model in models.items():
        encoder = TextEncoder(
            model, pooling=t.pooling, max_length=t.max_length, batch_size=mining.batch_size
        )
        result["models"][name] = {}
        for set_name, chosen in sets.items():
            losses, accs = [], []
            for batch in chosen:
                q = torch.as_tensor(
                    encoder.encode([pairs.queries[i] for i in batch], desc=f"{name} {set_name}")
                )
                p = torch.as_tensor(
                    encoder.encode([pairs.positives[i] for i in batch], desc=f"{name} {set_name}")
                )
                losses.append(
                    loss_fn(q, p, groups=torch.as_tensor(pairs.positive_group[batch])).item()
                )
                accs.append(loss_fn.last_accuracy.item())
            result["models"][name][set_name] = {
                "loss": round(float(np.mean(losses)), 4),
                "accuracy": round(float(np.mean(accs)), 4),
            }
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
