"""The training recipe: LoRA (or full fine-tuning) of the student, InfoNCE over mined batches, on 1..N processes.

    b3 train job.yaml                                    # one process, or a local torchrun
    torchrun --nnodes N --nproc-per-node G -m b3_jobs.train job.yaml   # what pods run

Read top to bottom: `Trainer.__init__` takes scalars from the spec and refuses bad
combinations, `setup` builds data, model, optimizer and metrics in that order and resumes
from the newest checkpoint, `train` is the loop, `save_checkpoint` / `export` write results.

Multi-process: every process builds the same sampler, takes the same global batch, and embeds
its contiguous slice `rank` of it; the loss gathers all slices (see `b3.loss`), and gradients
of the trained parameters are averaged over processes (all-reduces of flattened buckets)
before the optimizer step, so every process holds identical weights and rank 0 alone writes
checkpoints. Whatever must be one decision for the gang (skip a finished stage, which
checkpoint to resume, stop on SIGTERM) is rank 0's, or agreed in a collective.

Checkpoints live in `b3.artifacts`' folder of this config's train fingerprint: a changed
config starts afresh instead of resuming another config's weights.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, load_model, save_model
from transformers import get_linear_schedule_with_warmup

from b3.artifacts import Artifacts, read_embeddings, read_topk
from b3.batches import HardNegativeSampler
from b3.data import DataError
from b3.errors import TrainingError, TrainingStopped
from b3.false_negatives import TeacherScoreFilter, TopPFilter
from b3.images import open_image
from b3.loss import CachedInfoNCELoss, InfoNCELoss
from b3.metrics import TrainMetrics, linger_for_last_scrape
from b3.mined import MinedRows
from b3.model import EmbeddingModel, build_student, export_sentence_transformer
from b3.model_card import model_card, st_prompts
from b3.spec import B3Job, spec_to_dict
from b3.storage import fsync_dir

log = logging.getLogger("b3.train")

FULL_WEIGHTS = "model.safetensors"  # a full fine-tuning checkpoint's weights
# Gradient values per all-reduce: one for a LoRA model's hundreds of small adapter tensors (a
# collective each would cost a latency each), and a bounded extra copy for a full model.
BUCKET_VALUES = 1 << 25  # 128 MiB of fp32


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Dist:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain process is rank 0 of 1."""
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )


# --- data --------------------------------------------------------------------------------


def _loader_worker_ignores_sigterm(_worker_id: int) -> None:
    """torchrun forwards SIGTERM to each worker's whole process group, DataLoader workers
    included; killed, they would crash the step in flight ("DataLoader worker ... is killed by
    signal: Terminated") instead of letting it finish and be checkpointed. They stop with the
    loader, or when their parent is gone."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class EpochBatches(torch.utils.data.Dataset):
    """This process's tokenised slices of one epoch's global batches, from `start` on.

    Item i is global batch start+i: its local rows' queries and positives, and (B3++) the
    local share of the batch's hard negatives. DataLoader workers tokenise ahead of the step,
    and with image columns decode each row's image there too (`images`: the query and positive
    image cells, each None without that column).
    """

    def __init__(
        self,
        sampler,
        hard: HardNegativeSampler | None,
        texts,
        positive_group,
        epoch: int,
        start: int,
        tokenize,
        false_negatives=None,
        gathered: bool = True,
        images=(None, None),
    ):
        self.batches = sampler.batches(epoch)[start:]
        self.false_negatives = false_negatives
        self.sampler, self.hard = sampler, hard
        self.texts, self.images = texts, images
        self.positive_group = positive_group
        self.epoch, self.start = epoch, start
        self.tokenize = tokenize
        self.gathered = gathered  # the loss scores every process's columns, or only its own

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        batch = self.batches[i]
        rows = self.sampler.local(batch)
        item = {"query": self._inputs(0, rows), "positive": self._inputs(1, rows),
                "groups": torch.as_tensor(self.positive_group[rows])}  # fmt: skip
        if self.hard is not None:
            hard_rows = self.hard.sample(batch, self.epoch, self.start + i)
            negs = self.sampler.local(hard_rows)
            item["hard"] = self._inputs(1, negs)
            item["hard_groups"] = torch.as_tensor(self.positive_group[negs])
        if self.false_negatives is not None:  # in the loss's column order: positives, then hard
            pos, neg = (batch, hard_rows if self.hard is not None else []) if self.gathered else (
                rows, negs if self.hard is not None else [])  # fmt: skip
            columns = np.concatenate([pos, neg]).astype(np.int64)
            item["mask"] = torch.as_tensor(self.false_negatives.mask(np.asarray(rows), columns))
        return item

    def _inputs(self, side: int, rows) -> dict:
        """The model input of one side (0: queries, 1: positives) of `rows`."""
        texts, cells = [self.texts[side][r] for r in rows], self.images[side]
        if cells is None:
            return self.tokenize(texts)
        return self.tokenize(texts, [None if cells[r] is None else open_image(cells[r]) for r in rows])


def _to(item: dict, device: torch.device) -> dict:
    return {
        k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
        for k, v in item.items()
    }


# --- one step's gradients ----------------------------------------------------------------


def average_gradients(params: list[torch.nn.Parameter], world: int, bucket_values: int = BUCKET_VALUES) -> None:
    """Mean of each gradient over processes (each process's loss is a mean over its slice):
    one all-reduce per bucket of consecutive gradients flattened together, each bucket at most
    `bucket_values` values unless one tensor alone is larger."""
    if world == 1:
        return
    bucket, values = [], 0
    for i, p in enumerate(params):
        if p.grad is None:  # a parameter this batch did not reach still takes the others' mean
            p.grad = torch.zeros_like(p)
        bucket.append(p.grad)
        values += p.numel()
        if i + 1 == len(params) or values + params[i + 1].numel() > bucket_values:
            _all_reduce_mean(bucket, world)
            bucket, values = [], 0


def _all_reduce_mean(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def compute_gradients(
    student: EmbeddingModel,
    loss_fn: InfoNCELoss,
    item: dict,
    mini_batch_size: int | None,
    world: int,
    stop: bool = False,
) -> tuple[float, float, bool]:
    """Forward and backward for one global batch (this process's slice); returns the global
    mean loss, in-batch accuracy, and whether any process asked to stop (`stop`, e.g. it got
    SIGTERM). Parameter gradients are left averaged over processes."""
    hard, hard_groups, mask = item.get("hard"), item.get("hard_groups"), item.get("mask")
    if mini_batch_size is None:
        q = student(item["query"])  # (b, d)
        p = student(item["positive"])  # (b, d)
        h = student(hard) if hard is not None else None  # (h*b, d)
        loss = loss_fn(q, p, h, item["groups"], hard_groups, mask)
        loss.backward()
        loss = loss.detach()
    else:
        loss = CachedInfoNCELoss(loss_fn, mini_batch_size).backward(
            student, item["query"], item["positive"], hard, item["groups"], hard_groups, mask
        )
    average_gradients([p for p in student.parameters() if p.requires_grad], world)
    # the stop request rides on the statistics' all-reduce: the gang agrees without a collective more
    stats = torch.stack([loss.float(), loss_fn.last_accuracy.float().to(loss.device),
                         torch.tensor(float(stop), device=loss.device)])  # fmt: skip
    if world > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return float(stats[0]) / world, float(stats[1]) / world, bool(stats[2] > 0)


# --- the recipe --------------------------------------------------------------------------


class Trainer:
    """LoRA contrastive training of the student on the partition stage's batches."""

    def __init__(
        self,
        job: B3Job,
        dist_env: Dist,
        metrics_port: int | None = None,
        fault_at_step: int | None = None,
        nan_loss_at_step: int | None = None,
    ):
        spec, t, mining = job.spec, job.spec.training, job.spec.mining
        self.job, self.spec, self.dist = job, spec, dist_env
        self.artifacts = Artifacts(spec)
        self.work = self.artifacts.work  # rank and partition outputs
        self.out = self.artifacts.out  # checkpoints, final model, the stage manifest
        if not self.out.local:
            raise DataError(
                f"training.outputDir {spec.train_dir}: training checkpoints need a local or mounted path (a PVC), not an object store"
            )
        if mining.batch_size % dist_env.world:
            raise DataError(
                f"mining.batchSize ({mining.batch_size}) must be divisible by the {dist_env.world} training processes"
            )
        self.local_batch = mining.batch_size // dist_env.world
        if t.mini_batch_size is not None and t.mini_batch_size > self.local_batch:
            raise DataError(
                f"training.miniBatchSize ({t.mini_batch_size}) exceeds the per-process batch ({self.local_batch})"
            )
        self.device = torch.device(
            f"cuda:{dist_env.local_rank}" if torch.cuda.is_available() else "cpu"
        )
        self.metrics_port = metrics_port
        self.fault_at_step = fault_at_step
        self.nan_loss_at_step = nan_loss_at_step
        self.step = self.epoch = self.batch_in_epoch = 0
        self.started = time.time()
        self.stop_requested = False  # set by SIGTERM; the gang stops after the current step

    # --- one decision for the gang ---------------------------------------------------------

    def init_distributed(self) -> None:
        if self.dist.world > 1 and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _from_rank0(self, value):
        """Rank 0's value on every process (each process may see another file system)."""
        if self.dist.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def finished(self) -> dict | None:
        """The train manifest if this config already finished (rank 0 decides for all)."""
        return self._from_rank0(self.artifacts.done("train") if self.dist.rank == 0 else None)

    # --- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        self.init_distributed()
        self.artifacts.require("partition")  # DataError unless it was made for this spec
        self._setup_data()
        self.student = self._setup_model()
        if self.student.processor is None and any(cells is not None for cells in self.images):
            # preflight says so for a local model; a hub model is only known once it is loaded
            raise DataError(f"training.student: {self.spec.training.student} embeds text only (it has no image "
                            "processor), and the dataset has image columns")  # fmt: skip
        if self.dist.rank == 0:  # only now: a job refused above leaves the last training's manifest
            self.artifacts.begin("train")
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = self._setup_optimizer(self.params, self.total_steps)
        self.loss_fn = InfoNCELoss(
            1.0 / self.spec.training.temperature,
            self.spec.training.symmetric,
            self.spec.training.gather_across_devices,
        )
        self.metrics = TrainMetrics(self.job.name, self.total_steps)
        self.serving_metrics = self.dist.rank == 0 and self.metrics_port is not None
        if self.serving_metrics:
            self.metrics.serve(self.metrics_port)
        self._resume()
        h = self.spec.mining.hard_negatives
        log.info(
            "global batch %d = %d process(es) x %d pairs%s; %d steps/epoch, %d steps in all",
            self.spec.mining.batch_size, self.dist.world, self.local_batch,
            f" + {h * self.spec.mining.batch_size} hard negatives" if h else "", self.steps_per_epoch, self.total_steps,
        )  # fmt: skip

    def _setup_data(self) -> None:
        spec, mining = self.spec, self.spec.mining
        rows = MinedRows.load(spec, self.work)
        self.texts = (rows.queries, rows.positives)
        self.images = (rows.pairs.query_images, rows.pairs.positive_images)
        self.positive_group = rows.pairs.positive_group
        self.data_summary = {"rows": len(rows.pairs), "tasks": len(set(rows.pairs.tasks.tolist()))}
        self.sampler = rows.batch_sampler(spec, self.dist.rank, self.dist.world)
        self.hard = self.false_negatives = None
        rule = spec.training.false_negatives
        if mining.hard_negatives > 0 or rule == "top-p":
            topk, neighbors = read_topk(self.work, ["skip", "window"])
            skip = topk.column("skip").to_numpy()
        if mining.hard_negatives > 0:
            self.hard = rows.hard_negatives(spec, topk, neighbors)
        if rule == "top-p":
            self.false_negatives = TopPFilter(neighbors, skip)
        elif rule == "teacher":
            self.false_negatives = TeacherScoreFilter(*read_embeddings(self.work))
        self.steps_per_epoch = len(self.sampler)
        t = spec.training
        self.total_steps = (
            t.steps if t.steps is not None else (t.epochs or 1) * self.steps_per_epoch
        )

    def _setup_model(self) -> EmbeddingModel:
        t = self.spec.training
        torch.manual_seed(self.spec.mining.seed)  # same LoRA init on every process
        lora = t.lora if t.finetuning == "lora" else None  # None: every weight trains
        student = build_student(t.student, t.pooling, t.max_length, lora, t.gradient_checkpointing,
                                t.min_pixels, t.max_pixels)
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            student.autocast_dtype = torch.bfloat16  # fp32 master weights, bf16 compute
        return student.to(self.device).train()

    def _setup_optimizer(self, params, total_steps: int):
        t = self.spec.training
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=0.01)
        scheduler = get_linear_schedule_with_warmup(
            optimizer, int(t.warmup_ratio * total_steps), total_steps
        )
        return optimizer, scheduler

    # --- checkpoints -----------------------------------------------------------------------

    def checkpoint_dirs(self) -> list[str]:
        """This config's complete checkpoints, oldest first (a folder is renamed into place
        when complete; `step-N.tmp-PID` is one being written, or left by a crash)."""
        root = self.artifacts.checkpoint_root()
        if not os.path.isdir(root):
            return []
        names = sorted(n for n in os.listdir(root) if n.startswith("step-") and "." not in n)
        return [os.path.join(root, n) for n in names]

    def _remove_stale_temporaries(self) -> None:
        """Half-written checkpoints of crashed runs (rank 0 is the only writer, and it is us)."""
        root = self.artifacts.checkpoint_root()
        if os.path.isdir(root):
            for name in os.listdir(root):
                if ".tmp-" in name:
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    def _resume(self) -> None:
        """Load the checkpoint rank 0 chose; every process must be able to read it."""
        if self.dist.rank == 0:
            self._remove_stale_temporaries()
        found = self.checkpoint_dirs() if self.dist.rank == 0 else []
        name = self._from_rank0(os.path.basename(found[-1]) if found else None)
        if name is None:
            return
        path = os.path.join(self.artifacts.checkpoint_root(), name)  # as this process sees it
        readable = os.path.isfile(os.path.join(path, "trainer_state.pt"))
        everyone = [readable] * self.dist.world
        if self.dist.world > 1:
            dist.all_gather_object(everyone, readable)
        blind = [rank for rank, ok in enumerate(everyone) if not ok]
        if blind:
            raise TrainingError(
                f"rank 0 resumes from checkpoint {name}, which process(es) {blind} cannot read "
                f"in {self.artifacts.checkpoint_root()}: "
                "training.outputDir must be one volume that every training node mounts "
                "(e.g. a ReadWriteMany PVC)"
            )
        state = torch.load(
            os.path.join(path, "trainer_state.pt"), weights_only=True, map_location="cpu"
        )
        self._load_weights(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = (
            state["step"], state["epoch"], state["batch_in_epoch"]
        )  # fmt: skip
        rng = state["rng"][self.dist.rank] if self.dist.rank < len(state["rng"]) else state["rng"][0]
        _set_rng_state(rng)
        if state["world_size"] != self.dist.world:
            log.warning("checkpoint %s was written by %d processes, this run has %d: weights, optimizer "
                        "and batch position carry over; dropout draws differ", path, state["world_size"], self.dist.world)  # fmt: skip
        log.info(
            "resumed from %s (step %d, epoch %d, batch %d)",
            path, self.step, self.epoch, self.batch_in_epoch,
        )  # fmt: skip

    def _save_weights(self, folder: str) -> None:
        """The trained weights into a checkpoint folder: peft's adapter files under LoRA, else
        the whole model as one safetensors file (tied weights once; no shards to reassemble)."""
        if self.spec.training.finetuning == "lora":
            self.student.backbone.save_pretrained(folder)
        else:
            save_model(self.student.backbone, os.path.join(folder, FULL_WEIGHTS))

    def _load_weights(self, folder: str) -> None:
        if self.spec.training.finetuning == "lora":
            adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))
            set_peft_model_state_dict(self.student.backbone, adapter)
        else:
            load_model(self.student.backbone, os.path.join(folder, FULL_WEIGHTS))

    def save_checkpoint(self) -> None:
        rng = _get_rng_state()
        states = [None] * self.dist.world
        if self.dist.world > 1:
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if self.dist.rank == 0:
            root = self.artifacts.checkpoint_root()
            final = os.path.join(root, f"step-{self.step:07d}")
            tmp = f"{final}.tmp-{os.getpid()}"
            try:
                os.makedirs(tmp, exist_ok=True)
                self._save_weights(tmp)
                # tensors and plain data only: it loads with torch.load(weights_only=True)
                torch.save({
                    "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                    "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": states, "seed": self.spec.mining.seed, "config": spec_to_dict(self.spec),
                    "world_size": self.dist.world, "sampler": self.sampler.state_dict(),
                }, os.path.join(tmp, "trainer_state.pt"))  # fmt: skip
                _fsync_tree(tmp)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(root)  # the rename itself survives a power cut
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for old in self.checkpoint_dirs()[: -self.spec.training.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.metrics.checkpoint_saved()
        if self.dist.world > 1:
            dist.barrier()

    # --- the loop --------------------------------------------------------------------------

    def _log_window(
        self, window: list[tuple[float, float, float]], lr: float, grad_norm: float
    ) -> None:
        """One JSON line: means over the steps since the last line (single batches are noisy)."""
        if self.dist.rank != 0:
            return
        loss, accuracy, seconds = (float(np.mean(col)) for col in zip(*window, strict=True))
        log.info(json.dumps({
            "step": self.step, "epoch": self.epoch, "loss": round(loss, 5), "accuracy": round(accuracy, 4),
            "lr": lr, "grad_norm": round(grad_norm, 4), "pairs_per_s": round(self.spec.mining.batch_size / seconds, 1),
            "steps_averaged": len(window),
        }))  # fmt: skip

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM: stopping after the current step with a checkpoint")
        self.stop_requested = True

    def train(self) -> None:
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._loop()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _loop(self) -> None:
        t = self.spec.training
        window: list = []  # (loss, accuracy, seconds) of the steps since the last log line
        while self.step < self.total_steps:
            self.sampler.set_epoch(self.epoch)
            data = EpochBatches(
                self.sampler,
                self.hard,
                self.texts,
                self.positive_group,
                self.epoch,
                self.batch_in_epoch,
                self.student.tokenize,
                self.false_negatives,
                gathered=t.gather_across_devices,
                images=self.images,
            )
            # its own generator: creating a loader must not draw from the global RNG, or a resumed
            # run would get other dropout masks than an uninterrupted one
            loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=min(2, os.cpu_count() or 1), prefetch_factor=2,
                                                 generator=torch.Generator().manual_seed(self.spec.mining.seed + self.epoch),
                                                 worker_init_fn=_loader_worker_ignores_sigterm)  # fmt: skip
            last_step_end = time.perf_counter()  # a step's time includes waiting for its batch
            for item in loader:
                loss, accuracy, stop = compute_gradients(
                    self.student,
                    self.loss_fn,
                    _to(item, self.device),
                    t.mini_batch_size,
                    self.dist.world,
                    self.stop_requested,
                )
                if self.nan_loss_at_step == self.step + 1:  # testing: the model diverged
                    loss = float("nan")
                if not np.isfinite(loss):
                    self.metrics.loss.set(loss)  # so the alert on a non-finite loss can see it
                    if self.serving_metrics:
                        linger_for_last_scrape()  # ... in a scrape before the pod exits
                    last = self.checkpoint_dirs()
                    raise TrainingError(
                        f"loss is {loss} at step {self.step + 1}; stopped. Last good checkpoint: "
                        f"{last[-1] if last else 'none'}. Lower training.learningRate or raise training.temperature."
                    )
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm))
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.batch_in_epoch += 1
                seconds, last_step_end = time.perf_counter() - last_step_end, time.perf_counter()
                self.metrics.observe_step(
                    self.step, loss, accuracy, lr, grad_norm, self.spec.mining.batch_size, seconds
                )
                window.append((loss, accuracy, seconds))
                if self.step % 10 == 0 or self.step == 1 or self.step == self.total_steps:
                    self._log_window(window, lr, grad_norm)
                    window.clear()
                if self.step % t.checkpoint_every == 0 or self.step == self.total_steps or stop:
                    self.save_checkpoint()
                if stop:
                    raise TrainingStopped(
                        f"stopped by SIGTERM after step {self.step} of {self.total_steps}; "
                        f"checkpoint {self.checkpoint_dirs()[-1] if self.dist.rank == 0 else 'written'}; "
                        "the next run resumes there"
                    )
                if self.fault_at_step == self.step:  # testing: a node dies without any cleanup
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch += 1
                self.batch_in_epoch = 0

    def export(self) -> dict:
        """The model (LoRA merged in) and, under LoRA, the adapter under <outputDir>/train/final/,
        then the stage manifest."""
        if self.dist.rank != 0:
            return {}
        final = self.artifacts.final_dir()
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if self.spec.training.finetuning == "lora":
                self.student.backbone.save_pretrained(os.path.join(tmp, "adapter"))
            prompts = st_prompts(self.spec.dataset.prompts)
            export_sentence_transformer(self.student, os.path.join(tmp, "model"), prompts)
            card = model_card(self.job, {**self.data_summary, "steps": self.step, "epochs": self.epoch,
                                         "world": self.dist.world}, prompts)  # fmt: skip
            with open(os.path.join(tmp, "model", "README.md"), "w") as f:
                f.write(card)
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(os.path.dirname(final))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        summary = {"steps": self.step, "epochs": self.epoch, "model": os.path.join(final, "model")}
        return self.artifacts.finish("train", summary, self.started)

    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _get_rng_state() -> dict:
    """Every generator's state as tensors and plain data (what weights_only loading allows)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def _fsync_tree(folder: str) -> None:
    for base, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def train_stage(job: B3Job, env: dict[str, str] | None = None) -> dict:
    """Run (or skip, when its manifest matches) the train stage in this process.

    Environment: torchrun's RANK/WORLD_SIZE/LOCAL_RANK; B3_METRICS_PORT serves metrics from
    rank 0; B3_FAULT_AT_STEP=N SIGKILLs the process right after step N (fault injection, for
    the resume tests); B3_NAN_LOSS_AT_STEP=N makes step N's loss NaN (for the alert tests)."""
    env = dict(os.environ) if env is None else env
    dist_env = Dist.from_env(env)
    port = int(env["B3_METRICS_PORT"]) if env.get("B3_METRICS_PORT") else None
    fault = int(env["B3_FAULT_AT_STEP"]) if env.get("B3_FAULT_AT_STEP") else None
    nan_at = int(env["B3_NAN_LOSS_AT_STEP"]) if env.get("B3_NAN_LOSS_AT_STEP") else None
    trainer = Trainer(job, dist_env, metrics_port=port, fault_at_step=fault, nan_loss_at_step=nan_at)
    try:
        trainer.init_distributed()
        done = trainer.finished()
        if done:
            return {**done, "skipped": True} if dist_env.rank == 0 else {}
        trainer.setup()
        trainer.train()
        return trainer.export()
    finally:
        trainer.cleanup()
