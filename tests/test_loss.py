"""The loss: hand-computed values, masking, and the equivalences that make it trustworthy:
2 gloo processes == 1 process on the global batch, GradCache == plain, for every gradient."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest
import torch

from b3.loss import CachedInfoNCELoss, InfoNCELoss
from b3.model import build_student
from b3.spec import LoraSpec
from b3.train import compute_gradients

RNG = np.random.default_rng(0)


def unit(x):
    return torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float32), dim=-1)


def reference_infonce(q, p, h, groups, hard_groups, scale, symmetric):
    """Plain numpy InfoNCE, one query at a time."""
    q, p = q.numpy().astype(np.float64), p.numpy().astype(np.float64)
    cols = p if h is None else np.concatenate([p, h.numpy()])
    col_groups = groups if h is None else np.concatenate([groups, hard_groups])
    losses = []
    for i in range(len(q)):
        keep = [j for j in range(len(cols)) if j == i or col_groups[j] != groups[i]]
        logits = scale * cols[keep] @ q[i]
        losses.append(-(logits[keep.index(i)] - np.log(np.exp(logits).sum())))
    loss = np.mean(losses)
    if symmetric:
        back = []
        for i in range(len(p)):
            keep = [j for j in range(len(q)) if j == i or groups[j] != groups[i]]
            logits = scale * q[keep] @ p[i]
            back.append(-(logits[keep.index(i)] - np.log(np.exp(logits).sum())))
        loss = (loss + np.mean(back)) / 2
    return loss


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_hard", [False, True])
def test_loss_matches_the_formula(symmetric, with_hard):
    q, p = unit(RNG.standard_normal((6, 8))), unit(RNG.standard_normal((6, 8)))
    h = unit(RNG.standard_normal((4, 8))) if with_hard else None
    groups = np.array([0, 1, 2, 2, 3, 4])  # rows 2 and 3 share a positive text
    hard_groups = (
        np.array([5, 6, 1, 7]) if with_hard else None
    )  # a hard negative duplicating row 1's positive
    loss_fn = InfoNCELoss(scale=20.0, symmetric=symmetric)
    got = loss_fn(
        q, p, h, torch.as_tensor(groups), None if h is None else torch.as_tensor(hard_groups)
    )
    assert got.item() == pytest.approx(
        reference_infonce(q, p, h, groups, hard_groups, 20.0, symmetric), rel=1e-5
    )


def test_masking_duplicates_changes_the_loss_and_accuracy_is_top1():
    q = unit(np.eye(4))
    p = unit(np.eye(4) + 0.1)
    plain = InfoNCELoss(scale=10.0)
    assert plain(q, p).item() > plain(q, p, groups=torch.tensor([0, 0, 1, 1])).item()
    assert plain.last_accuracy.item() == 1.0


# --- equivalences ------------------------------------------------------------------------


def make_student(model_dir: str, dropout: float = 0.0):
    torch.manual_seed(0)
    student = build_student(
        model_dir,
        "mean",
        24,
        LoraSpec(r=4, alpha=8, dropout=dropout, target_modules=["query", "value"]),
    )
    gen = torch.Generator().manual_seed(
        1
    )  # LoRA B starts at zero: randomise so every grad is non-trivial
    for p in student.parameters():
        if p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return student.train()


def batch_texts(n: int, h: int, seed: int = 42):
    """The same texts in every process for the same seed."""
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    q = [" ".join(rng.choice(words, 3)) for _ in range(n)]
    p = [t + " " + " ".join(rng.choice(words, 5)) for t in q]
    hard = [" ".join(rng.choice(words, 6)) for _ in range(h)]
    groups = np.arange(n)
    groups[3] = groups[1]  # a duplicate positive inside the batch
    return q, p, hard, groups


def item_for(student, q, p, hard, groups, rows, hard_rows):
    item = {"query": student.tokenize([q[i] for i in rows]), "positive": student.tokenize([p[i] for i in rows]),
            "groups": torch.as_tensor(groups[rows])}  # fmt: skip
    if hard_rows is not None:
        item["hard"] = student.tokenize([hard[i] for i in hard_rows])
        item["hard_groups"] = torch.as_tensor(np.arange(100, 100 + len(hard))[hard_rows])
    return item


def grads_of(student):
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}


def _worker(rank, world, init_file, model_dir, with_hard, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student = make_student(model_dir)
    q, p, hard, groups = batch_texts(8, 4)
    rows = np.array_split(np.arange(8), world)[rank]
    hard_rows = np.array_split(np.arange(4), world)[rank] if with_hard else None
    loss, acc, _ = compute_gradients(
        student,
        InfoNCELoss(scale=20.0, symmetric=True),
        item_for(student, q, p, hard, groups, rows, hard_rows),
        None,
        world,
    )
    if rank == 0:
        torch.save({"grads": grads_of(student), "loss": loss, "acc": acc}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("with_hard", [False, True], ids=["in-batch", "hard-negatives"])
def test_two_gloo_processes_give_the_single_process_gradients(
    tmp_path, tiny_model_no_dropout, with_hard
):
    q, p, hard, groups = batch_texts(8, 4)
    student = make_student(tiny_model_no_dropout)
    loss, acc, _ = compute_gradients(student, InfoNCELoss(scale=20.0, symmetric=True),
                                  item_for(student, q, p, hard, groups, np.arange(8), np.arange(4) if with_hard else None), None, 1)  # fmt: skip
    expected = grads_of(student)

    ctx = mp.get_context("spawn")
    out = tmp_path / "rank0.pt"
    procs = [
        ctx.Process(
            target=_worker, args=(r, 2, tmp_path / "init", tiny_model_no_dropout, with_hard, out)
        )
        for r in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert all(proc.exitcode == 0 for proc in procs)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(loss, rel=1e-5) and got["acc"] == pytest.approx(acc)
    assert (
        expected.keys() == got["grads"].keys() and len(expected) == 4
    )  # A and B of query and value
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("with_hard", [False, True], ids=["in-batch", "hard-negatives"])
def test_gradcache_gives_the_plain_gradients(tiny_model_no_dropout, with_hard):
    q, p, hard, groups = batch_texts(8, 4)
    hard_rows = np.arange(4) if with_hard else None
    student = make_student(tiny_model_no_dropout)
    item = item_for(student, q, p, hard, groups, np.arange(8), hard_rows)
    plain_loss, _, _ = compute_gradients(student, InfoNCELoss(scale=20.0), item, None, 1)
    plain = grads_of(student)
    student.zero_grad()
    cached_loss, _, _ = compute_gradients(
        student, InfoNCELoss(scale=20.0), item, 3, 1
    )  # chunks of 3, 3, 2
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, grad in plain.items():
        torch.testing.assert_close(grads_of(student)[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradcache_replays_dropout_masks(tiny_model_dir, monkeypatch):
    """With dropout on, each chunk's re-forward must reproduce its first forward exactly;
    without the RNG replay (negative control) it does not."""
    q, p, _, groups = batch_texts(8, 0)
    student = make_student(tiny_model_dir, dropout=0.3)
    item = item_for(student, q, p, [], groups, np.arange(8), None)

    def run() -> list[torch.Tensor]:
        seen = []

        def encode(chunk):
            emb = student(chunk)
            seen.append(emb.detach().clone())
            return emb

        torch.manual_seed(5)
        CachedInfoNCELoss(InfoNCELoss(scale=20.0), 4).backward(
            encode, item["query"], item["positive"], groups=item["groups"]
        )
        return seen  # 4 first passes (2 query + 2 positive chunks), then 4 re-forwards

    seen = run()
    for first, again in zip(seen[:4], seen[4:], strict=True):
        torch.testing.assert_close(first, again)
    monkeypatch.setattr("b3.loss._RandContext.restore", lambda self: None)
    seen = run()
    assert not all(torch.allclose(a, b) for a, b in zip(seen[:4], seen[4:], strict=True))


def test_loss_without_process_group_ignores_gather_flag():
    assert not torch.distributed.is_initialized()
    q = unit(RNG.standard_normal((4, 8)))
    a = InfoNCELoss(gather_across_devices=True)(q, q)
    b = InfoNCELoss(gather_across_devices=False)(q, q)
    assert a.item() == b.item()
    assert os.environ.get("WORLD_SIZE") in (None, "1")
