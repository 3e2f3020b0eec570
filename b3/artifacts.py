"""The work directory's one owner: where each stage's artifacts live, which part of the spec
each stage's fingerprint covers, and when a stage's outputs may be trusted.

    <workDir>/rank/embeddings.arrow       teacher embeddings (float16), + embeddings.json
                                          (write_embeddings, read_embeddings)
    <workDir>/rank/topk.parquet           p+m ranked neighbours per row (read_topk)
    <workDir>/partition/clusters.parquet  community of each row, + stats.json
    <outputDir>/train/checkpoints/<train fingerprint>/step-N/
    <outputDir>/train/final/model/            merged model; + adapter/ under LoRA
    <workDir>/eval/results.json
    <each stage folder>/manifest.json     written last: fingerprint, inputs, outputs, summary

A stage's **fingerprint** hashes exactly the spec fields that stage reads (`stage_inputs`),
the identity of the dataset file (rank) and the fingerprint of the stage it reads from
(partition: rank; train: partition). So a change to `mining.clusterSize` re-partitions and
retrains but keeps the ranking, and a change to `training.checkpointEvery` changes nothing.

The **protocol**, for every stage: `begin` removes the stage's manifest before its first
write (a crash between new outputs and a new manifest then leaves no manifest, never an old
one vouching for new files); outputs are written atomically (`b3.storage`); `finish` writes
the manifest last. `require` is how a stage reads its upstream: the outputs must exist and
the upstream manifest must carry the fingerprint the current spec gives, else DataError
(exit 2) naming the fields that differ. Training checkpoints sit in a folder named by the
train fingerprint, so a changed config never resumes another config's weights, while
settings that do not change the result keep resuming.
"""

from __future__ import annotations

import os
import shutil
import time
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from b3.data import DataError, dataset_identity
from b3.spec import B3JobSpec, DatasetSpec
from b3.storage import WorkDir, fingerprint

# Bump when a stage's outputs change meaning for the same inputs (a new algorithm, a new
# column): every existing output of that stage and below is then recomputed.
VERSIONS = {"embed": 1, "rank": 2, "partition": 2, "train": 2}

# Dotted paths into the camelCase spec (`spec.model_dump(by_alias=True)`); a section path
# covers the whole section. Fields of no stage: rank.* and mining.partitionerThreads (workers,
# threads and memory change how, not what), teacher.batchSize and teacher.device, workDir,
# the candidate columns (read by b3 eval alone) and the Kubernetes sections.
_DATASET = ["dataset.uri", "dataset.format", "dataset.columns.query", "dataset.columns.positive",
            "dataset.columns.task", "dataset.columns.id", "dataset.columns.queryImage",
            "dataset.columns.positiveImage", "dataset.split", "dataset.imageRoot"]  # fmt: skip
_TEACHER = ["teacher.model", "teacher.pooling", "teacher.maxLength", "teacher.dtype",
            "teacher.usePrompts", "teacher.minPixels", "teacher.maxPixels"]  # fmt: skip
_MINING_GROUPS = ["mining.p", "mining.m", "mining.perTask", "mining.minTaskSize",
                  "mining.batchSize"]  # fmt: skip
_PARTITION = ["mining.clusterSize", "mining.seed", "mining.edges", "mining.partitioner"]
# The trainer reads all of `training` except how the same computation is laid out over
# processes and memory, or how often it is saved: those may change and keep resuming.
TRAINING_LAYOUT = {"nodes", "processesPerNode", "miniBatchSize", "gradientCheckpointing",
                   "checkpointEvery", "keepCheckpoints", "outputDir", "maxRestarts"}  # fmt: skip
_TRAIN_MINING = ["mining.batchSize", "mining.seed", "mining.mixTasks", "mining.hardNegatives"]

STAGES = ("rank", "partition", "train")
UPSTREAM = {"rank": None, "partition": "rank", "train": "partition"}
OUTPUTS = {
    "rank": ["embeddings.arrow", "topk.parquet"],
    "partition": ["clusters.parquet", "stats.json"],
    "train": ["final/model/config.json"],
}
LORA_OUTPUTS = ["final/adapter/adapter_config.json"]  # the train stage's under finetuning: lora


def _get(tree: dict, path: str) -> Any:
    for key in path.split("."):
        tree = tree[key]
    return tree


def stage_reads(stage: str, spec: B3JobSpec) -> list[str]:
    """The spec fields (dotted camelCase paths) that `stage` reads, for this spec."""
    prompts = ["dataset.prompts"]
    if stage == "embed":
        if spec.teacher.embeddings:  # read, not computed: no other teacher field matters
            return _DATASET + ["teacher.embeddings"]
        return _DATASET + _TEACHER + (prompts if spec.teacher.use_prompts else [])
    if stage == "rank":
        return stage_reads("embed", spec) + _MINING_GROUPS
    if stage == "partition":
        return list(_PARTITION)
    if stage == "train":
        training = sorted(
            f"training.{key}"
            for key in spec.model_dump(by_alias=True)["training"]
            if key not in TRAINING_LAYOUT
        )
        return prompts + _TRAIN_MINING + training
    raise ValueError(f"unknown stage {stage!r}")


def stage_inputs(stage: str, spec: B3JobSpec) -> dict[str, Any]:
    """{field path: value} of what `stage` reads (the part of its fingerprint from the spec)."""
    tree = spec.model_dump(mode="json", by_alias=True)
    return {path: _get(tree, path) for path in stage_reads(stage, spec)}


class Artifacts:
    """The artifacts of one job's spec: fingerprints, paths, manifests, upstream checks.

    Args:
        spec: the validated spec; `workDir` holds rank, partition and eval, and
            `training.outputDir` (default workDir) holds train.

    Raises (from `require`): DataError when an upstream output is missing or was made for
        another spec; the message names the fields that differ and the command to run.

    Example:
        >>> art = Artifacts(spec)
        >>> if not art.done("partition"):
        ...     rank = art.require("rank")  # DataError unless rank matches this spec
        ...     art.begin("partition")
        ...     art.work.write_parquet(clusters, "partition", "clusters.parquet")
        ...     art.finish("partition", summary, started)
    """

    def __init__(self, spec: B3JobSpec):
        self.spec = spec
        self.work = WorkDir(spec.work_dir)  # rank, partition, eval
        self.out = WorkDir(spec.train_dir)  # train

    def root(self, stage: str) -> WorkDir:
        return self.out if stage == "train" else self.work

    # --- fingerprints ----------------------------------------------------------------------

    def inputs(self, stage: str) -> dict[str, Any]:
        """What the stage's fingerprint covers: its spec fields, the dataset file (rank) and
        its upstream stage's fingerprint."""
        record = stage_inputs(stage, self.spec)
        if stage in ("embed", "rank"):
            record["dataset file"] = self._dataset_identity
            if self.spec.teacher.embeddings:  # an input file like the dataset: the same identity
                record["teacher embeddings file"] = dataset_identity(DatasetSpec(uri=self.spec.teacher.embeddings))
        upstream = UPSTREAM.get(stage)
        if upstream is not None:
            record[f"{upstream} fingerprint"] = self.fingerprint(upstream)
        return record

    def fingerprint(self, stage: str) -> str:
        return fingerprint(VERSIONS[stage], self.inputs(stage))

    @cached_property
    def _dataset_identity(self) -> dict:
        return dataset_identity(self.spec.dataset)

    # --- the stage protocol ----------------------------------------------------------------

    def manifest(self, stage: str) -> dict | None:
        """The stage's manifest as written, or None (absent or unreadable)."""
        root = self.root(stage)
        if not root.exists(stage, "manifest.json"):
            return None
        try:
            return root.read_json(stage, "manifest.json")
        except (OSError, ValueError):
            return None

    def done(self, stage: str) -> dict | None:
        """The manifest if the stage finished for this spec and all its outputs exist."""
        record = self.manifest(stage)
        if record is None or record.get("fingerprint") != self.fingerprint(stage):
            return None
        root = self.root(stage)
        if not all(root.exists(stage, name) for name in record.get("outputs", [])):
            return None
        return record

    def invalidate(self, stage: str) -> None:
        """Make the stage run again for this spec (`b3 run --force/--from`): its manifest goes,
        and for train this config's checkpoints too, so that it trains from the start."""
        self.begin(stage)
        if stage == "train" and self.out.local and os.path.isdir(self.checkpoint_root()):
            shutil.rmtree(self.checkpoint_root())

    def begin(self, stage: str) -> None:
        """Call before a stage's first write: from now on nothing vouches for its folder."""
        root = self.root(stage)
        if root.exists(stage, "manifest.json"):
            root.delete(stage, "manifest.json")

    def outputs(self, stage: str) -> list[str]:
        """The files that show `stage` done, under its folder."""
        lora = stage == "train" and self.spec.training.finetuning == "lora"
        return OUTPUTS[stage] + (LORA_OUTPUTS if lora else [])

    def finish(self, stage: str, summary: dict, started: float) -> dict:
        """Write the manifest that marks the stage done; call it after every output is written."""
        record = {
            "stage": stage,
            "fingerprint": self.fingerprint(stage),
            "inputs": self.inputs(stage),
            "outputs": self.outputs(stage),
            "summary": summary,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 3),
        }
        self.root(stage).write_json(record, stage, "manifest.json")
        return record

    def require(self, stage: str) -> dict:
        """The manifest of a stage whose outputs another stage is about to read; DataError
        unless they exist and were made for this spec."""
        root = self.root(stage)
        missing = [n for n in ["manifest.json", *self.outputs(stage)] if not root.exists(stage, n)]
        if missing:
            raise DataError(
                f"{stage} stage output missing in {root.path(stage)}: {', '.join(missing)}; "
                f"run `b3 {stage}` first"
            )
        record = self.manifest(stage) or {}
        if record.get("fingerprint") != self.fingerprint(stage):
            raise DataError(
                f"{stage} stage output in {root.path(stage)} was made for another spec "
                f"({'; '.join(self.changes(stage)) or 'another version of b3'}); run "
                f"`b3 {stage}` again (`b3 run` redoes every stale stage)"
            )
        return record

    def changes(self, stage: str) -> list[str]:
        """What differs between the stage's manifest and the current spec, by field; an
        upstream change is named by the upstream's own differences."""
        old, new = (self.manifest(stage) or {}).get("inputs", {}), self.inputs(stage)
        out = []
        for key in sorted(set(old) | set(new)):
            if old.get(key) == new.get(key):
                continue
            upstream = UPSTREAM.get(stage)
            if key == f"{upstream} fingerprint":
                out.append(f"{upstream} stage: {'; '.join(self.changes(upstream)) or 'rerun'}")
            else:
                out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
        return out

    # --- rank: embeddings are kept on their own, so a failure while ranking keeps them ------

    def embeddings_current(self) -> bool:
        if not (
            self.work.exists("rank", "embeddings.json")
            and self.work.exists("rank", "embeddings.arrow")
        ):
            return False
        return self.work.read_json("rank", "embeddings.json").get(
            "fingerprint"
        ) == self.fingerprint("embed")

    def write_embeddings(self, ids: np.ndarray, q: np.ndarray, p: np.ndarray) -> None:
        """The teacher's (N, d) query and positive embeddings of rows `ids`, stored float16."""
        if self.work.exists("rank", "embeddings.json"):  # same protocol as a stage manifest
            self.work.delete("rank", "embeddings.json")
        self.work.write_arrow(_embeddings_table(ids, q, p), "rank", "embeddings.arrow")
        self.work.write_json({"fingerprint": self.fingerprint("embed")}, "rank", "embeddings.json")

    # --- train -----------------------------------------------------------------------------

    def checkpoint_root(self) -> str:
        """This config's checkpoint folder: another train fingerprint never resumes here."""
        return self.out.local_path("train", "checkpoints", self.fingerprint("train")[:16])

    def final_dir(self) -> str:
        return self.out.local_path("train", "final")

    def trained_model(self) -> str | None:
        """The exported model if the train stage is done for this spec (else None)."""
        if not self.out.local or self.done("train") is None:
            return None
        return os.path.join(self.final_dir(), "model")


# --- readers and writers of the rank stage's outputs ------------------------------------


def _embeddings_table(ids: np.ndarray, q: np.ndarray, p: np.ndarray) -> pa.Table:
    """rank/embeddings.arrow: row, id and the (N, d) query and positive embeddings as
    fixed-size float16 vectors."""
    d = q.shape[1]
    vec = pa.list_(pa.float16(), d)
    return pa.table(
        {
            "row": pa.array(np.arange(len(ids)), pa.int64()),
            "id": pa.array(list(ids), pa.string()),
            "query": pa.FixedSizeListArray.from_arrays(
                pa.array(q.astype(np.float16).ravel()), d
            ).cast(vec),
            "positive": pa.FixedSizeListArray.from_arrays(
                pa.array(p.astype(np.float16).ravel()), d
            ).cast(vec),
        }
    )


def read_embeddings(work: WorkDir) -> tuple[np.ndarray, np.ndarray]:
    """(query, positive) float32 embeddings per row from rank/embeddings.arrow."""
    table = work.read_arrow("rank", "embeddings.arrow")

    def column(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        d = col.type.list_size
        return col.flatten().to_numpy().reshape(-1, d).astype(np.float32)

    return column("query"), column("positive")


def read_topk(work: WorkDir, columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray]:
    """topk.parquet (the given columns, plus neighbours) and the neighbours as an
    (N, max window) array padded with -1."""
    if columns is not None and "neighbors" not in columns:
        columns = [*columns, "neighbors"]
    path = work.path("rank", "topk.parquet")
    table = work.read_parquet("rank", "topk.parquet", columns=columns)
    lists = table.column("neighbors").combine_chunks()
    flat = lists.flatten().to_numpy()
    if len(flat) and (flat.min() < -1 or flat.max() >= table.num_rows):
        bad = flat[(flat < -1) | (flat >= table.num_rows)][0]
        raise DataError(f"{path}: neighbour id {bad} is not a row of its {table.num_rows} rows; the "
                        "rank output is damaged: run `b3 rank` again")  # fmt: skip
    lengths = np.diff(lists.offsets.to_numpy())
    width = int(lengths.max()) if len(lengths) else 0
    if (lengths == width).all():  # the usual case: every row kept its full window
        return table, flat.reshape(len(lengths), width)
    dense = np.full((len(lengths), width), -1, dtype=flat.dtype)
    dense[np.arange(width)[None, :] < lengths[:, None]] = flat
    return table, dense
