"""The mined training rows of a work directory, as every consumer of B3 batches reads them:
b3's own trainer and the sentence-transformers batch sampler (b3.sentence_transformers).

`MinedRows.load(spec, work)` reads the dataset's training rows, checks that the partition
stage's clusters were made for exactly these rows, and applies the prompts; `batch_sampler`
builds the global-batch sampler the spec asks for; `hard_negatives` the B3++ sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from b3.batches import B3BatchSampler, HardNegativeSampler, RandomBatchSampler
from b3.data import DataError, Pairs, load_pairs
from b3.spec import B3JobSpec
from b3.storage import WorkDir


@dataclass
class MinedRows:
    pairs: Pairs
    queries: list[str]  # with the prompts of each row's task
    positives: list[str]
    groups: np.ndarray  # (N,) mining group of each row (partition stage)
    clusters: np.ndarray  # (N,) community of each row (partition stage)

    @classmethod
    def load(cls, spec: B3JobSpec, work: WorkDir) -> MinedRows:
        pairs = load_pairs(spec.dataset, min_rows=spec.mining.batch_size)
        clusters = work.read_parquet("partition", "clusters.parquet")
        if clusters.column("id").to_pylist() != pairs.ids.tolist():
            raise DataError(
                f"{work.path('partition', 'clusters.parquet')} does not match dataset {spec.dataset.uri} "
                "(rows differ); run `b3 rank` and `b3 partition` again"
            )
        prompts = [spec.dataset.prompts.for_task(task) for task in pairs.tasks]
        return cls(
            pairs,
            [qp + q for (qp, _), q in zip(prompts, pairs.queries, strict=True)],
            [pp + p for (_, pp), p in zip(prompts, pairs.positives, strict=True)],
            clusters.column("group").to_numpy(zero_copy_only=False),
            clusters.column("cluster").to_numpy(),
        )

    def batch_sampler(self, spec: B3JobSpec, rank: int = 0, world_size: int = 1):
        """Global batches of mining.batchSize rows (this process's slice of each): B3
        communities, or random ones for `training.sampler: random`."""
        m = spec.mining
        common = dict(batch_size=m.batch_size, groups=self.groups, mix_tasks=m.mix_tasks, seed=m.seed,
                      drop_last=True, rank=rank, world_size=world_size)  # fmt: skip
        if spec.training.sampler == "b3":
            return B3BatchSampler(self.clusters, **common)
        return RandomBatchSampler(len(self.groups), **common)

    def hard_negatives(self, spec: B3JobSpec, topk, neighbors: np.ndarray) -> HardNegativeSampler:
        """B3++: mining.hardNegatives rows per batch member from the rank stage's windows."""
        return HardNegativeSampler(neighbors, topk.column("skip").to_numpy(), topk.column("window").to_numpy(),
                                   self.pairs.positive_group, spec.mining.hard_negatives, self.groups,
                                   spec.mining.seed)  # fmt: skip
