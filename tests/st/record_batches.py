"""Run by tests/test_sentence_transformers.py, alone or under torchrun: fit a SentenceTransformer
on B3 batches for a few steps and write, per process, the anchors of every batch it was handed
(the data collator's input) to OUT.<rank>.json.

    python record_batches.py MANIFEST OUT STEPS
"""

import json
import os
import sys

from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from b3.sentence_transformers import MinedBatches

manifest, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
world = int(os.environ.get("WORLD_SIZE", 1))
mined = MinedBatches(manifest)
model = SentenceTransformer(mined.spec.training.student, device="cpu")
args = SentenceTransformerTrainingArguments(
    output_dir=os.path.dirname(out), per_device_train_batch_size=mined.per_device_batch_size(world),
    batch_sampler=mined.batch_sampler, max_steps=steps, learning_rate=1e-3, warmup_steps=0,
    save_strategy="no", report_to="none", use_cpu=True, seed=0, ddp_backend="gloo" if world > 1 else None,
)
trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=mined.dataset(),
                                     loss=MultipleNegativesRankingLoss(model, gather_across_devices=True))
seen = []


class Recording(type(trainer.data_collator)):
    def __call__(self, features):
        seen.append([f["anchor"] for f in features])
        return super().__call__(features)


trainer.data_collator.__class__ = Recording  # the trainer's own collator, recording its input
before = [p.detach().clone() for p in model.parameters()]
trainer.train()
changed = any((a != b.detach()).any().item() for a, b in zip(before, model.parameters(), strict=True))
with open(f"{out}.{int(os.environ.get('RANK', 0))}.json", "w") as f:
    json.dump({"batches": seen, "weights_changed": changed, "world": world}, f)
