"""The work directory's owner: each stage's fingerprint covers exactly what it reads, the
manifest protocol (removed first, written last, upstream checked), keyed checkpoints."""

from __future__ import annotations

import copy
import os

import pytest

from b3.artifacts import Artifacts
from b3.data import DataError
from b3.spec import parse_spec

BASE = {
    "dataset": {"uri": "PAIRS", "columns": {"task": "task"}},
    "workDir": "WORK",
    "mining": {"batchSize": 16, "clusterSize": 4, "p": 2, "m": 8, "mixTasks": True},
    "training": {"steps": 4},
}

# One valid change for every field of the spec (a test below keeps this table complete).
CHANGES = {
    "dataset.uri": "OTHER", "dataset.format": "parquet",
    "dataset.columns.query": "q", "dataset.columns.positive": "pos", "dataset.columns.task": "kind",
    "dataset.columns.id": "id", "dataset.split": {"key": "source"},
    "dataset.columns.queryImage": "query_image", "dataset.columns.positiveImage": "positive_image",
    "dataset.columns.candidates": "candidates", "dataset.columns.candidateImages": "candidate_images",
    "dataset.imageRoot": "/images",
    "dataset.prompts.query": "query: ", "dataset.prompts.positive": "passage: ",
    "dataset.prompts.byTask": {"t0": {"query": "find: "}},
    "teacher.model": "other/model", "teacher.pooling": "cls", "teacher.maxLength": 64,
    "teacher.batchSize": 8, "teacher.dtype": "float32", "teacher.device": "cpu",
    "teacher.usePrompts": "flip", "teacher.embeddings": "OTHER",
    "teacher.minPixels": 3136, "teacher.maxPixels": 200704,
    "rank.workers": 3, "rank.gpusPerWorker": 1.0, "rank.memoryBudgetMib": 64,
    "mining.p": 3, "mining.m": 9, "mining.clusterSize": 8, "mining.batchSize": 32, "mining.seed": 1,
    "mining.perTask": False, "mining.mixTasks": False, "mining.edges": "union", "mining.partitioner": "metis",
    "mining.partitionerThreads": 2,
    "mining.minTaskSize": "flip", "mining.hardNegatives": 2,
    "training.student": "other/student", "training.pooling": "cls", "training.maxLength": 64,
    "training.minPixels": 3136, "training.maxPixels": 200704,
    "training.sampler": "random", "training.falseNegatives": "top-p", "training.temperature": 0.05,
    "training.learningRate": 0.001, "training.warmupRatio": 0.2, "training.maxGradNorm": 2.0,
    "training.epochs": 2, "training.steps": 5, "training.miniBatchSize": 4,
    "training.symmetric": True, "training.gatherAcrossDevices": False,
    "training.gradientCheckpointing": True, "training.finetuning": "full", "training.lora.r": 4, "training.lora.alpha": 8,
    "training.lora.dropout": 0.1, "training.lora.targetModules": ["query"],
    "training.nodes": 2, "training.processesPerNode": 2, "training.checkpointEvery": 7,
    "training.keepCheckpoints": 1, "training.outputDir": "/elsewhere",
    "workDir": "/other-work", "suspend": True,
    "template.image": "img:2", "template.imagePullPolicy": "Always",
    "template.imagePullSecrets": ["s"], "template.serviceAccountName": "sa",
    "template.priorityClassName": "high", "template.nodeSelector": {"a": "b"},
    "template.tolerations": [{"key": "k"}], "template.affinity": {"nodeAffinity": {}},
    "template.env": [{"name": "A", "value": "1"}], "template.envFrom": [{"secretRef": {"name": "s"}}],
    "template.volumes": [{"name": "v", "emptyDir": {}}],
    "template.volumeMounts": [{"name": "v", "mountPath": "/v"}],
    "template.securityContext": {"runAsUser": 5}, "template.automountServiceAccountToken": True,
    "template.terminationGracePeriodSeconds": 300,
    **{f"stages.{s}.{f}": v for s in ("rank", "partition", "train")
       for f, v in (("resources", {"limits": {"cpu": "1"}}), ("backoffLimit", 5),
                    ("activeDeadlineSeconds", 60), ("startupDeadlineSeconds", 30))
       if (s, f) != ("train", "backoffLimit")},  # train restarts its gang: training.maxRestarts
    "stages.rank.headResources": {"requests": {"cpu": "1"}},  # the Ray head's pod
    "training.maxRestarts": 7,
    "runPolicy.ttlSecondsAfterFinished": 10, "runPolicy.queueName": "q",
    "runPolicy.schedulerName": "volcano",
}  # fmt: skip

# What each stage reads, classified by hand from its code (b3/stages.py, b3/train.py):
# a stage also "reads" what its upstream reads, through the upstream fingerprint.
RANK = {"dataset.uri", "dataset.format", "dataset.columns.query", "dataset.columns.positive",
        "dataset.columns.task", "dataset.columns.id", "dataset.split", "dataset.columns.queryImage",
        "dataset.columns.positiveImage", "dataset.imageRoot", "teacher.model",
        "teacher.pooling", "teacher.maxLength", "teacher.dtype", "teacher.usePrompts", "teacher.embeddings",
        "teacher.minPixels", "teacher.maxPixels",
        "mining.p", "mining.m", "mining.perTask", "mining.minTaskSize", "mining.batchSize"}  # fmt: skip
PROMPTS = {"dataset.prompts.query", "dataset.prompts.positive", "dataset.prompts.byTask"}
PARTITION = RANK | {"mining.clusterSize", "mining.seed", "mining.edges", "mining.partitioner"}
TRAIN = (PARTITION | PROMPTS | {"mining.mixTasks", "mining.hardNegatives"}
         | {f for f in CHANGES if f.startswith("training.")}) - {
    "training.nodes", "training.processesPerNode", "training.miniBatchSize",
    "training.gradientCheckpointing", "training.checkpointEvery", "training.keepCheckpoints",
    "training.outputDir", "training.maxRestarts"}  # fmt: skip


def expected_reads(stage: str, uses_prompts: bool) -> set[str]:
    reads = {"rank": RANK, "partition": PARTITION, "train": TRAIN}[stage]
    return reads | PROMPTS if uses_prompts else reads


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def _get(tree: dict, path: str):
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    free_form = {"byTask", "nodeSelector", "affinity", "resources", "headResources"}  # maps as one value
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in free_form:
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def _spec(doc: dict, tmp_path):
    doc = copy.deepcopy(doc)
    for path in ("dataset.uri", "teacher.embeddings", "workDir", "training.outputDir"):
        value = _get(doc, path)
        if isinstance(value, str) and not value.startswith("/"):
            _set(doc, path, str(tmp_path / value))
    return parse_spec(doc)


@pytest.fixture(scope="module")
def dataset_files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("artifacts")
    for name in ("PAIRS", "OTHER"):
        (tmp_path / name).write_bytes(b"pairs")
    return tmp_path


def test_the_change_table_covers_every_spec_field(dataset_files):
    spec = _spec(BASE, dataset_files)
    refused = {"stages.train.backoffLimit"}  # a valid spec never sets it (training.maxRestarts)
    assert _leaves(spec.model_dump(mode="json", by_alias=True)) - refused == set(CHANGES)


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_a_fingerprint_changes_exactly_when_a_field_its_stage_reads_changes(dataset_files, field):
    """Every field, from bases with and without teacher prompts and a minTaskSize (which
    change what the rank stage reads)."""
    for uses_prompts in (False, True):
        for min_task_size in (None, 5):
            _check_one_change(dataset_files, field, uses_prompts, min_task_size)


def _check_one_change(dataset_files, field, uses_prompts, min_task_size):
    base = copy.deepcopy(BASE)
    _set(base, "teacher.usePrompts", uses_prompts)
    _set(base, "mining.minTaskSize", min_task_size)
    changed = copy.deepcopy(base)
    value = CHANGES[field]
    if value == "flip":
        value = {"teacher.usePrompts": not uses_prompts,
                 "mining.minTaskSize": 7 if min_task_size is None else None}[field]  # fmt: skip
    _set(changed, field, value)
    if field == "training.epochs":
        _set(changed, "training.steps", None)  # steps and epochs are exclusive
    if field == "dataset.columns.candidateImages":  # the candidates' images need their texts
        _set(base, "dataset.columns.candidates", "candidates")
        _set(changed, "dataset.columns.candidates", "candidates")
    before = Artifacts(_spec(base, dataset_files))
    after = Artifacts(_spec(changed, dataset_files))
    for stage in ("rank", "partition", "train"):
        reads = expected_reads(stage, uses_prompts or field == "teacher.usePrompts")
        assert (before.fingerprint(stage) != after.fingerprint(stage)) == (field in reads), (
            f"{stage} and {field}"
        )


def test_the_dataset_file_itself_is_part_of_the_rank_fingerprint(tmp_path):
    (tmp_path / "PAIRS").write_bytes(b"pairs")
    before = {s: Artifacts(_spec(BASE, tmp_path)).fingerprint(s) for s in ("rank", "train")}
    (tmp_path / "PAIRS").write_bytes(b"new pairs")
    after = {s: Artifacts(_spec(BASE, tmp_path)).fingerprint(s) for s in ("rank", "train")}
    assert before["rank"] != after["rank"] and before["train"] != after["train"]


def test_given_teacher_embeddings_replace_the_teacher_fields_and_their_file_is_part_of_the_rank_fingerprint(tmp_path):
    (tmp_path / "PAIRS").write_bytes(b"pairs")
    (tmp_path / "EMB").write_bytes(b"embeddings")
    given = {**BASE, "teacher": {"embeddings": "EMB"}}
    rank = Artifacts(_spec(given, tmp_path)).fingerprint("rank")
    other_model = copy.deepcopy(given)
    other_model["teacher"].update(model="other/model", pooling="cls", usePrompts=True)
    assert Artifacts(_spec(other_model, tmp_path)).fingerprint("rank") == rank  # no teacher model runs
    (tmp_path / "EMB").write_bytes(b"other embeddings")
    assert Artifacts(_spec(given, tmp_path)).fingerprint("rank") != rank


def test_manifest_protocol_and_upstream_check_name_the_change(tmp_path):
    dataset_files = tmp_path
    (tmp_path / "PAIRS").write_bytes(b"pairs")
    spec = _spec(BASE, dataset_files)
    art = Artifacts(spec)
    with pytest.raises(DataError, match=r"rank stage output missing .*manifest.json.*run `b3 rank`"):
        art.require("rank")
    art.begin("rank")
    for name in ("embeddings.arrow", "topk.parquet"):
        art.work.write_bytes(b"x", "rank", name)
    art.finish("rank", {"rows": 1}, started=0.0)
    assert art.done("rank")["summary"] == {"rows": 1} and art.require("rank")
    art.begin("rank")  # a rerun starts: the old manifest no longer vouches for the folder
    assert art.done("rank") is None and not art.work.exists("rank", "manifest.json")
    art.finish("rank", {}, started=0.0)

    other = Artifacts(_spec({**BASE, "mining": {**BASE["mining"], "p": 5}}, dataset_files))
    assert other.done("rank") is None
    with pytest.raises(DataError, match=r"made for another spec \(mining.p: 2 -> 5\)"):
        other.require("rank")
    os.remove(art.work.path("rank", "topk.parquet"))
    assert art.done("rank") is None


def test_checkpoints_are_kept_per_train_fingerprint(dataset_files):
    a = Artifacts(_spec(BASE, dataset_files))
    lr = {**BASE, "training": {**BASE["training"], "learningRate": 0.5}}
    every = {**BASE, "training": {**BASE["training"], "checkpointEvery": 2, "keepCheckpoints": 9}}
    assert a.checkpoint_root() != Artifacts(_spec(lr, dataset_files)).checkpoint_root()
    assert a.checkpoint_root() == Artifacts(_spec(every, dataset_files)).checkpoint_root()
