"""InfoNCE over in-batch negatives gathered across processes, and its GradCache variant."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

from b3.vision import rows_of, slice_rows


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate x from every process, in rank order."""
    rank, world = _world()
    if world == 1:
        return x
    if with_grad:
        return torch.cat(all_gather_with_grad(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class InfoNCELoss(nn.Module):
    """InfoNCE with in-batch negatives (MultipleNegativesRankingLoss), gathered across GPUs.

    For query i of the global batch, with the batch's positives P (|B| rows) and its hard
    negatives H (B3++; h per member, shared by the whole batch):

        loss_i = -log( exp(s * q_i . p_i) / sum_{c in P u H} exp(s * q_i . c) )

    where s = `scale` = 1 / temperature and embeddings are L2-normalised. Columns whose positive
    text is identical to the query's own (same `groups` id) are masked: they are not negatives.
    With `symmetric`, the positive-to-query term (p_i against all queries) is averaged in.

    Across processes: each process holds b = |B| / W rows. Positives and hard negatives of all
    processes are gathered with a differentiable all-gather, so the gradient of every column
    flows back to the process that embedded it. Process r's queries sit at rows
    r*b .. r*b+b-1 of the gathered matrix, so its labels are offset by r*b. Each process
    averages over its own b queries; the trainer then averages parameter gradients over the W
    processes, which gives exactly the gradient of the single-process loss on the whole
    global batch (tests/test_loss.py checks this).

    Args:
        scale: 1 / temperature (default 50.0, i.e. temperature 0.02).
        symmetric: add the positive-to-query term (default False).
        gather_across_devices: score against every process's columns (default True).

    Inputs:
        queries (b, d), positives (b, d), hard_negatives (n_h, d) or None,
        groups (b,) positive-text ids or None, hard_groups (n_h,) or None,
        mask (b, B + n_h) bool or None: more columns that are not negatives of a query (likely
        false negatives; `b3.false_negatives`), in gathered column order.

    Recommendations: feed it `B3BatchSampler` batches; `HardNegativeSampler` for B3++.

    Relations: `CachedInfoNCELoss` wraps it for batches larger than memory (GradCache).

    References: Oord et al. 2018 (InfoNCE); Thirukovalluru et al. 2025 (B3).
    """

    def __init__(
        self, scale: float = 50.0, symmetric: bool = False, gather_across_devices: bool = True
    ):
        super().__init__()
        self.scale = scale
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices
        self.last_accuracy = torch.tensor(0.0)

    def forward(
        self, queries, positives, hard_negatives=None, groups=None, hard_groups=None, mask=None
    ) -> torch.Tensor:
        return self.compute_loss_from_embeddings(
            queries, positives, hard_negatives, groups, hard_groups, mask
        )

    def compute_loss_from_embeddings(
        self,
        q: torch.Tensor,
        p: torch.Tensor,
        h: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
        hard_groups: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = q.shape[0]
        rank, world = _world() if self.gather_across_devices else (0, 1)
        gather = world > 1
        if groups is None:  # every row its own positive text
            groups = torch.arange(b, device=q.device) + rank * b
        columns = _gather(p, with_grad=True) if gather else p  # (B, d)
        col_groups = _gather(groups, with_grad=False) if gather else groups  # (B,)
        if h is not None and h.shape[0] > 0:
            h_all = _gather(h, with_grad=True) if gather else h  # (H, d)
            hg = (
                hard_groups
                if hard_groups is not None
                else torch.full((h.shape[0],), -1, device=q.device)
            )
            columns = torch.cat([columns, h_all])  # (B + H, d)
            col_groups = torch.cat(
                [col_groups, _gather(hg, with_grad=False) if gather else hg]
            )  # (B + H,)
        labels = torch.arange(b, device=q.device) + rank * b  # (b,) own positive's column
        logits = self.scale * q @ columns.T  # (b, B + H)
        false_negative = col_groups[None, :] == groups[:, None]  # (b, B + H) same positive text
        if mask is not None:
            false_negative |= mask
        false_negative[torch.arange(b), labels] = False
        logits = logits.masked_fill(false_negative, -torch.inf)
        loss = F.cross_entropy(logits, labels)
        self.last_accuracy = (logits.argmax(1) == labels).float().mean().detach()
        if self.symmetric:
            q_all = _gather(q, with_grad=True) if gather else q  # (B, d)
            q_groups = col_groups[: q_all.shape[0]]  # (B,)
            logits_t = self.scale * p @ q_all.T  # (b, B)
            mask_t = q_groups[None, :] == groups[:, None]  # (b, B)
            mask_t[torch.arange(b), labels] = False
            loss = (loss + F.cross_entropy(logits_t.masked_fill(mask_t, -torch.inf), labels)) / 2
        return loss


class _RandContext:
    """Captures the RNG state at a chunk's first forward so its re-forward draws the same
    dropout masks (GradCache needs the two passes to compute the same function)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class CachedInfoNCELoss:
    """GradCache: `InfoNCELoss` on global batches larger than memory.

    The wrapped loss owns the hyperparameters; this class only changes how gradients are
    computed, in three steps, and gives the same gradients as the plain loss:

        1. embed every chunk of `mini_batch_size` rows without building a graph;
        2. compute the loss on the detached embeddings and backpropagate to them only,
           caching d loss / d embedding;
        3. re-embed each chunk with the graph (same dropout masks) and backpropagate the
           cached gradient through the encoder: (embedding * cached_grad).sum().backward().

    Memory then scales with `mini_batch_size`, not with the batch.

    Args:
        loss: the InfoNCELoss to wrap.
        mini_batch_size: rows embedded at once.

    Example:
        >>> cached = CachedInfoNCELoss(InfoNCELoss(scale=50.0), mini_batch_size=32)  # doctest: +SKIP
        >>> value = cached.backward(encode, query_inputs, positive_inputs)  # doctest: +SKIP

    References: Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
    Setup", 2021.
    """

    def __init__(self, loss: InfoNCELoss, mini_batch_size: int):
        self.loss = loss
        self.mini_batch_size = mini_batch_size

    def _chunks(self, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        n = rows_of(inputs)
        return [slice_rows(inputs, i, i + self.mini_batch_size) for i in range(0, n, self.mini_batch_size)]

    def backward(
        self,
        encode: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        query_inputs: dict[str, torch.Tensor],
        positive_inputs: dict[str, torch.Tensor],
        hard_inputs: dict[str, torch.Tensor] | None = None,
        groups: torch.Tensor | None = None,
        hard_groups: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run steps 1-3, leaving parameter gradients in place; returns the (detached) loss."""
        parts = [query_inputs, positive_inputs] + ([hard_inputs] if hard_inputs is not None else [])
        chunks = [self._chunks(x) for x in parts]
        # 1. embed without a graph, remembering each chunk's RNG state
        states, embedded = [], []
        with torch.no_grad():
            for part in chunks:
                part_states, part_embs = [], []
                for chunk in part:
                    device = next(iter(chunk.values())).device
                    part_states.append(_RandContext(device))
                    part_embs.append(encode(chunk))
                states.append(part_states)
                embedded.append(torch.cat(part_embs).requires_grad_())
        # 2. loss on the detached embeddings; gradients stop at them
        loss = self.loss.compute_loss_from_embeddings(
            embedded[0],
            embedded[1],
            embedded[2] if hard_inputs is not None else None,
            groups,
            hard_groups,
            mask,
        )
        loss.backward()
        # 3. re-embed each chunk with a graph and push the cached gradient through the encoder
        for part, part_states, emb in zip(chunks, states, embedded, strict=True):
            grads = emb.grad.split(self.mini_batch_size)
            for chunk, state, grad in zip(part, part_states, grads, strict=True):
                state.restore()
                (encode(chunk) * grad).sum().backward()
        return loss.detach()
