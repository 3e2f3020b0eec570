"""Batch samplers: B3 mined batches, the random baseline, and B3++ hard negatives.

Both samplers yield global batches of row indices and are pure functions of
(their inputs, batch_size, seed, epoch): `set_epoch` picks the epoch, the generator is
seeded with `seed + epoch`, and two processes with the same arguments see the same batches.
In multi-process training give each process `rank` and `world_size`: it then yields its slice
`rank` of every global batch, so that an all-gather reassembles exactly the mined batch.

Remainder: every batch holds exactly `batch_size` rows. A group (task) whose size is not a
multiple of `batch_size` has `n % batch_size` rows left over each epoch; with
`drop_last=True` (the default) they sit out that epoch, and because the community order is
reshuffled every epoch (and the short community moves, see `B3BatchSampler`) a different set
sits out each time: no row sits out every epoch. With `drop_last=False` they form
one shorter last batch per group, and every row appears exactly once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def _as_array(values: Sequence | np.ndarray | None, n: int, name: str) -> np.ndarray:
    if values is None:
        return np.zeros(n, dtype=np.int64)
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have one entry per row ({n}), got shape {arr.shape}")
    return np.unique(arr, return_inverse=True)[1].astype(np.int64)


class _GroupedBatchSampler(Sampler[list[int]]):
    """Shared plumbing: groups (tasks), epochs, rank slices, resume position."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        groups: Sequence | np.ndarray | None = None,
        mix_tasks: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by world_size ({world_size})"
            )
        self.n = n
        self.batch_size = batch_size
        self.groups = np.zeros(n, dtype=np.int64) if mix_tasks else _as_array(groups, n, "groups")
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0  # batches of the current epoch already consumed (resume)
        sizes = np.bincount(self.groups)
        if drop_last and (sizes < batch_size).all():
            raise ValueError(
                f"no group has {batch_size} rows (largest: {sizes.max()}); lower batch_size, "
                "set drop_last=False, or allow mixed tasks"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}")
        self.epoch, self.start_batch = state["epoch"], state["start_batch"]

    def _group_order(self, rng: np.random.Generator, members: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """All global batches of an epoch, in order (pure function of inputs, seed, epoch)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng(self.seed + epoch)
        out = []
        for g in range(int(self.groups.max()) + 1 if self.n else 0):
            order = self._group_order(rng, np.flatnonzero(self.groups == g))
            cut = len(order) - len(order) % self.batch_size
            out.extend(np.split(order[:cut], cut // self.batch_size) if cut else [])
            if not self.drop_last and cut < len(order):
                out.append(order[cut:])
        return [out[i] for i in rng.permutation(len(out))]

    def local(self, batch: np.ndarray) -> np.ndarray:
        """This process's contiguous slice of a global batch (a short one is shared evenly)."""
        return np.array_split(batch, self.world_size)[self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        for i in range(self.start_batch, len(batches)):
            self.start_batch = i + 1
            yield self.local(batches[i]).tolist()

    def __len__(self) -> int:
        sizes = np.bincount(self.groups)
        full = int((sizes // self.batch_size).sum())
        return full + (0 if self.drop_last else int((sizes % self.batch_size > 0).sum()))


class B3BatchSampler(_GroupedBatchSampler):
    """Batches made of whole teacher-mined communities (B3).

    Each batch is `batch_size / K` communities drawn at random from one group (task): the
    communities are shuffled, their members shuffled within them, and the sequence is cut
    into batches. Communities of the full size K come first so that, when K divides
    `batch_size`, every batch is exactly `batch_size / K` whole communities; other sizes are
    packed into the remaining places so that batch sizes stay exact.

    The short community (the partition stage leaves one of `n % K` rows per group, s rows)
    would always land in the remainder and never train. So each epoch it joins a random full
    community D: the s rows and K - s of D's rows form one block of K at D's place, and D's
    other s rows take the short community's place at the end. One block per epoch mixes two
    communities; every row trains.

    Args:
        clusters: community id of each row (from the partition stage's clusters.parquet).
        batch_size: global batch size |B|.
        groups: task (or mining group) of each row; batches never mix groups unless
            `mix_tasks`. Default: one group.
        mix_tasks: allow batches across groups (default False).
        seed: base seed; epoch e uses seed + e.
        drop_last: drop each group's remainder this epoch (default True), see module docs.
        rank, world_size: yield slice `rank` of each global batch (default 0, 1).

    Raises:
        ValueError: a community spans two groups while mix_tasks is False, or a parameter
            is out of range (the message names it).

    Recommendations: pair with an in-batch-negatives loss (InfoNCE / MultipleNegativesRanking
    loss) gathered across devices; `HardNegativeSampler` adds B3++ negatives.

    Relations: `RandomBatchSampler` is the baseline with the same interface.

    Example:
        >>> sampler = B3BatchSampler(clusters=[0, 0, 1, 1, 2, 2, 3, 3], batch_size=4, seed=0)
        >>> [sorted(b) for b in sampler]  # each batch is two whole communities
        [[2, 3, 6, 7], [0, 1, 4, 5]]

    References: Thirukovalluru et al., "Breaking the Batch Barrier (B3) of Contrastive
    Learning via Smart Batch Mining", 2025.
    """

    def __init__(
        self,
        clusters: Sequence[int] | np.ndarray,
        batch_size: int,
        groups: Sequence | np.ndarray | None = None,
        mix_tasks: bool = False,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.clusters = _as_array(clusters, len(clusters), "clusters")
        super().__init__(
            len(self.clusters), batch_size, groups, mix_tasks, seed, drop_last, rank, world_size
        )
        if not mix_tasks and groups is not None:
            spans = np.unique(np.stack([self.clusters, self.groups]), axis=1)
            if len(np.unique(spans[0])) != spans.shape[1]:
                bad = spans[0][np.r_[False, spans[0][1:] == spans[0][:-1]]][0]
                raise ValueError(
                    f"clusters: community {bad} holds rows of several groups; partition per "
                    "task or pass mix_tasks=True"
                )
        sizes = np.bincount(self.clusters)
        self.cluster_size = int(np.bincount(sizes).argmax())  # the common size K

    def _group_order(self, rng: np.random.Generator, members: np.ndarray) -> np.ndarray:
        comms, inverse = np.unique(self.clusters[members], return_inverse=True)
        shuffled = rng.permutation(len(comms))
        sizes = np.bincount(inverse)
        # full-size communities first, then the odd ones, each in shuffled order
        comm_order = shuffled[np.argsort(sizes[shuffled] != self.cluster_size, kind="stable")]
        rank_of_comm = np.empty(len(comms), dtype=np.int64)
        rank_of_comm[comm_order] = np.arange(len(comms))
        within = rng.random(len(members))
        block = rank_of_comm[inverse].astype(np.float64)  # (rows,) sort key: the row's place
        short = np.flatnonzero(sizes < self.cluster_size)
        full = np.flatnonzero(sizes == self.cluster_size)
        if len(short) == 1 and len(full):  # the short community moves (class docs)
            s, donor = int(sizes[short[0]]), rng.choice(full)
            in_short, in_donor = inverse == short[0], np.flatnonzero(inverse == donor)
            block[in_short], within[in_short] = rank_of_comm[donor], -1.0  # first in D's block
            leaving = in_donor[np.argsort(within[in_donor])[self.cluster_size - s :]]
            block[leaving] = len(comms)  # D's last s rows go to the end
        return members[np.lexsort((within, block))]


class RandomBatchSampler(_GroupedBatchSampler):
    """Uniformly random batches (the baseline B3 is measured against).

    Same interface and remainder rules as `B3BatchSampler`, with the number of rows `n` in
    place of `clusters`; rows of one group (task) stay together unless `mix_tasks`.

    Example:
        >>> sampler = RandomBatchSampler(n=8, batch_size=4, seed=0)
        >>> sorted(sum(list(sampler), []))
        [0, 1, 2, 3, 4, 5, 6, 7]
    """

    def _group_order(self, rng: np.random.Generator, members: np.ndarray) -> np.ndarray:
        return rng.permutation(members)


class HardNegativeSampler:
    """B3++: `h` hard negatives per batch member, pooled and shared by all the batch's queries.

    For a batch B with kept-rank rows S_i = R[i, p:p+m]:

        Pr(j) ∝ c_j = |{i in B : j in S_i}|

    restricted to candidates j that are not batch members, do not share a member's positive
    text, and are not in any member's top p (those are likely false negatives of some
    member). A batch of b rows gets exactly h * b negatives (so that every process gathers
    the same number): drawn without replacement from the ranked candidates; when fewer have
    c_j > 0, the rest uniformly from the other rows of the batch's group, then from the whole
    set, under the same exclusions; a set too small even for that repeats rows. The draw is a
    pure function of (batch, seed, epoch, batch index).

    Args:
        neighbors: (N, p + m) ranked neighbours per row (global rows, -1 padded).
        skip: (N,) or int, p per row (rows of small tasks may have a clamped window).
        window: (N,) or int, m per row.
        positive_group: (N,) id of each row's exact positive text.
        num_negatives: h, negatives per batch member.
        groups: (N,) group of each row (fallback candidates stay in the batch's group).
        seed: base seed.
    """

    def __init__(
        self,
        neighbors: np.ndarray,
        skip: int | np.ndarray,
        window: int | np.ndarray,
        positive_group: np.ndarray,
        num_negatives: int,
        groups: np.ndarray | None = None,
        seed: int = 0,
    ):
        n, w = neighbors.shape
        self.neighbors = neighbors
        skip = np.broadcast_to(np.asarray(skip), (n,))
        window = np.broadcast_to(np.asarray(window), (n,))
        col = np.arange(w)[None, :]
        self.in_top = (col < skip[:, None]) & (neighbors >= 0)  # (N, w) top-p mask
        self.in_s = (col >= skip[:, None]) & (col < (skip + window)[:, None]) & (neighbors >= 0)
        self.positive_group = np.asarray(positive_group)
        self.groups = (
            np.zeros(n, dtype=np.int64) if groups is None else _as_array(groups, n, "groups")
        )
        self.h = num_negatives
        self.seed = seed

    def sample(self, batch: Sequence[int], epoch: int = 0, batch_index: int = 0) -> np.ndarray:
        """h * len(batch) row ids whose positives join the batch as extra negatives."""
        batch = np.asarray(batch, dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch, batch_index])
        rows = self.neighbors[batch]  # (b, w)
        forbidden_groups = np.unique(self.positive_group[batch])
        banned = np.union1d(batch, rows[self.in_top[batch]])
        cand, count = np.unique(rows[self.in_s[batch]], return_counts=True)
        ok = ~np.isin(cand, banned) & ~np.isin(self.positive_group[cand], forbidden_groups)
        cand, count = cand[ok], count[ok]
        want = self.h * len(batch)
        take = min(want, len(cand))
        chosen = (
            rng.choice(cand, size=take, replace=False, p=count / count.sum())
            if take
            else np.empty(0, np.int64)
        )
        if take == want:  # the usual case: enough ranked candidates
            return chosen.astype(np.int64)
        everyone = np.arange(len(self.groups))
        allowed = everyone[~np.isin(everyone, banned)
                           & ~np.isin(self.positive_group, forbidden_groups)]  # fmt: skip
        for pool in (allowed[self.groups[allowed] == self.groups[batch[0]]], allowed):
            if len(chosen) < want:  # too few ranked candidates: top up uniformly
                pool = pool[~np.isin(pool, chosen)]
                extra = rng.choice(pool, size=min(want - len(chosen), len(pool)), replace=False)
                chosen = np.concatenate([chosen, extra])
        if len(chosen) < want:  # fewer allowed rows than negatives wanted: repeat some
            if not len(allowed):
                raise ValueError(
                    f"mining.hardNegatives: no row can be a negative of a batch of {len(batch)} "
                    f"(every row is in the batch, a member's top p, or shares a positive)"
                )
            chosen = np.concatenate([chosen, rng.choice(allowed, size=want - len(chosen))])
        return chosen.astype(np.int64)
