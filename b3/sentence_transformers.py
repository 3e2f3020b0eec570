"""B3 batches in `SentenceTransformerTrainer`: the mined communities of a b3 work directory as
a batch sampler, so that sentence-transformers users get B3 batches without b3's trainer.

    from b3.sentence_transformers import MinedBatches

    mined = MinedBatches("job.yaml")              # after `b3 rank job.yaml && b3 partition job.yaml`
    args = SentenceTransformerTrainingArguments(
        per_device_train_batch_size=mined.per_device_batch_size(world_size),
        batch_sampler=mined.batch_sampler, ...)
    loss = MultipleNegativesRankingLoss(model, gather_across_devices=True)
    SentenceTransformerTrainer(model, args, train_dataset=mined.dataset(), loss=loss).train()

How the pieces fit: the trainer calls `batch_sampler(dataset, batch_size=<per device>, ...)` in
every process, and accelerate hands process i the sampler's batches whose index is i modulo
the world size W. So each mined global batch of mining.batchSize rows comes out as W
consecutive per-device chunks of batchSize / W rows: in every optimizer step the processes
together hold exactly one mined batch, and a loss that gathers across devices sees all of it
as in-batch negatives (without gathering each process sees only its chunk). The trainer calls
`set_epoch`, which reshuffles the batch order as b3's trainer does. One dataset only: the
multi-dataset samplers would mix tasks across processes in one step.

`dataset()` holds the training rows in the work directory's order (what the sampler's indices
mean), the prompts of `dataset.prompts` already applied (as b3's trainer applies them; do not
pass `prompts=` to the training arguments too). With `mining.hardNegatives: h` (B3++) it adds
columns negative_1..negative_h: the rows b3's trainer would add to each row's batch in the
first epoch (MultipleNegativesRankingLoss scores every anchor against all of a batch's
negatives, as B3++ shares them); unlike b3's trainer they stay fixed in later epochs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import BatchSampler

from b3.artifacts import Artifacts
from b3.mined import MinedRows
from b3.spec import load_manifest


class MinedBatches:
    """The mined rows and batches of a B3Job whose partition stage is done for its spec."""

    def __init__(self, manifest: str | Path, overrides: list[str] | tuple[str, ...] = ()):
        job = load_manifest(manifest, overrides)
        self.spec = job.spec
        artifacts = Artifacts(self.spec)
        artifacts.require("partition")  # made for this spec, or a DataError naming why not
        self.work = artifacts.work
        self.rows = MinedRows.load(self.spec, self.work)
        self.batch_size = self.spec.mining.batch_size

    def per_device_batch_size(self, world_size: int) -> int:
        if self.batch_size % world_size:
            raise ValueError(f"mining.batchSize {self.batch_size} is not divisible by {world_size} processes")
        return self.batch_size // world_size

    def dataset(self):
        """A `datasets.Dataset` of (anchor, positive[, negative_1..h]) in the mined row order."""
        import datasets

        columns = {"anchor": self.rows.queries, "positive": self.rows.positives}
        h = self.spec.mining.hard_negatives
        if h:
            from b3.artifacts import read_topk

            hard = self.rows.hard_negatives(self.spec, *read_topk(self.work, ["skip", "window"]))
            negatives = np.zeros((len(self.rows.queries), h), dtype=np.int64)
            for index, batch in enumerate(self.rows.batch_sampler(self.spec).batches(epoch=0)):
                negatives[batch] = hard.sample(batch, epoch=0, batch_index=index).reshape(len(batch), h)
            for j in range(h):
                columns[f"negative_{j + 1}"] = [self.rows.positives[i] for i in negatives[:, j]]
        return datasets.Dataset.from_dict(columns)

    def batch_sampler(self, dataset, batch_size: int, drop_last: bool = True, valid_label_columns=None,
                      generator=None, seed: int = 0) -> B3SentenceTransformersSampler:  # fmt: skip
        """What `SentenceTransformerTrainingArguments(batch_sampler=...)` calls in each process."""
        return B3SentenceTransformersSampler(self, dataset, batch_size)


class B3SentenceTransformersSampler(BatchSampler):
    """Each mined global batch as W consecutive chunks of `batch_size` row indices (W = the
    processes, mining.batchSize / batch_size); the order of global batches follows mining.seed
    and the epoch, exactly as b3's trainer draws them."""

    def __init__(self, mined: MinedBatches, dataset, batch_size: int):
        if len(dataset) != len(mined.rows.queries):
            raise ValueError(f"the training dataset has {len(dataset)} rows, the mined work directory "
                             f"{len(mined.rows.queries)}: train on MinedBatches.dataset()")  # fmt: skip
        if mined.batch_size % batch_size:
            raise ValueError(f"per-device batch size {batch_size} does not divide mining.batchSize "
                             f"{mined.batch_size}: give per_device_train_batch_size = batchSize / processes")  # fmt: skip
        self.world = mined.batch_size // batch_size
        self._check_world_size()
        super().__init__(range(len(dataset)), batch_size=batch_size, drop_last=True)
        self.global_batches = mined.rows.batch_sampler(mined.spec)  # every process draws all of them
        self.epoch = 0

    def _check_world_size(self) -> None:
        import torch.distributed as dist

        running = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
        if running is not None and running != self.world:
            raise ValueError(f"{running} processes train, but mining.batchSize / per-device batch size "
                             f"= {self.world}: each step must hold exactly one mined batch")  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.global_batches.set_epoch(epoch)

    def __iter__(self):
        for batch in self.global_batches.batches(epoch=self.epoch):
            for i in range(self.world):
                yield batch[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return len(self.global_batches) * self.world
