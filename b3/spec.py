"""The B3Job spec: one model for the CLI, the stage programs and the CRD schema.

A B3Job manifest is the YAML a user would `kubectl apply`:

    apiVersion: b3.dev/v1alpha1
    kind: B3Job
    metadata: {name: quickstart}
    spec:
      dataset: {uri: pairs.parquet, columns: {task: task}}
      mining: {batchSize: 64, clusterSize: 16}
      workDir: ./work

`load_manifest` parses and validates it; every problem in the file is reported together,
each naming its field (`spec.mining.clusterSize: ...`). `spec_openapi_schema` exports the
same model as a structural OpenAPI v3 schema for the Kubernetes CRD, so the cluster refuses
what the CLI refuses.

Field names are camelCase in YAML (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "b3.dev"
API_VERSION = "v1alpha1"
KIND = "B3Job"


class SpecError(ValueError):
    """A manifest that cannot run. `errors` lists every problem, each naming its field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid B3Job:\n  " + "\n  ".join(self.errors))


class _Model(BaseModel):
    # allow_inf_nan=False: `.nan` and `.inf` are refused as what they are ("Input should be a
    # finite number"), not by whichever bound they happen to fail
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
        allow_inf_nan=False,
    )


# --- dataset -----------------------------------------------------------------------------


class ColumnsSpec(_Model):
    query: str = Field("query", min_length=1, description="Column holding the query text.")
    positive: str = Field("positive", min_length=1, description="Column holding the positive text.")
    task: str | None = Field(
        None,
        min_length=1,
        description="Column naming each row's task (source dataset). Absent: one task.",
    )
    id: str | None = Field(
        None, min_length=1, description="Column with a unique row id. Absent: the row number."
    )
    query_image: str | None = Field(
        None,
        min_length=1,
        description="Column holding the query's image: encoded bytes, a path (relative to "
        "dataset.imageRoot) or a Hugging Face Image struct {bytes, path}; null where the query "
        "has none. A row's query needs its text, its image or both. Absent: text-only queries.",
    )
    positive_image: str | None = Field(
        None,
        min_length=1,
        description="Column holding the positive's image, as queryImage. Absent: text-only positives.",
    )
    candidates: str | None = Field(
        None,
        min_length=1,
        description="Column holding each query's candidate list for MMEB-style evaluation (b3 eval: "
        "accuracy@1, the positive scored above every other candidate): a list of texts (empty or null "
        "where a candidate is an image alone); entries equal to the row's positive (text and image) are "
        "the positive, so MMEB's tgt_text, which lists it first, fits as it is. Read on the test split "
        "only; a row whose list is null or empty is left out of accuracy@1. Absent: no accuracy@1.",
    )
    candidate_images: str | None = Field(
        None,
        min_length=1,
        description="Column holding the candidates' images (MMEB's tgt_img_path): per row a list as "
        "long as its candidates, each cell as queryImage (null: no image). Needs candidates.",
    )

    @model_validator(mode="after")
    def _candidate_texts(self) -> ColumnsSpec:
        if self.candidate_images is not None and self.candidates is None:
            raise ValueError("candidateImages needs candidates: the candidates' texts, a list per row "
                             "(empty or null where a candidate is an image alone)")  # fmt: skip
        return self


class SplitSpec(_Model):
    key: str = Field(
        ...,
        min_length=1,
        description="Column whose md5 hash assigns a row to a bucket. Rows that share a key "
        "(e.g. a source package) land in the same split, which prevents leaks.",
    )
    buckets: int = Field(10, ge=2, le=1000, description="Number of hash buckets.")
    test_bucket: int = Field(
        0, ge=0, description="Rows whose bucket equals this are held out from every stage."
    )

    @model_validator(mode="after")
    def _bucket_in_range(self) -> SplitSpec:
        if self.test_bucket >= self.buckets:
            raise ValueError(
                f"testBucket ({self.test_bucket}) must be smaller than buckets ({self.buckets})"
            )
        return self


class TaskPrompts(_Model):
    query: str | None = Field(None, description="Prefix for this task's queries.")
    positive: str | None = Field(None, description="Prefix for this task's positives.")


class PromptsSpec(_Model):
    query: str = Field("", description="Instruction prefixed to every query.")
    positive: str = Field("", description="Instruction prefixed to every positive.")
    by_task: dict[str, TaskPrompts] = Field(
        default_factory=dict, description="Per-task prompts that replace the defaults above."
    )

    def for_task(self, task: str | None) -> tuple[str, str]:
        """(query prompt, positive prompt) for a task."""
        override = self.by_task.get(task) if task is not None else None
        if override is None:
            return self.query, self.positive
        return (
            self.query if override.query is None else override.query,
            self.positive if override.positive is None else override.positive,
        )


class DatasetSpec(_Model):
    uri: str = Field(
        ...,
        min_length=1,
        description="Path or URI (file://, s3://, gs://, hdfs://) of the pairs file, or of a "
        "folder written by Hugging Face datasets' save_to_disk. "
        "Relative paths are resolved against the manifest's folder.",
    )
    format: Literal["auto", "parquet", "jsonl", "csv", "datasets"] = Field(
        "auto", description="File format; auto picks it from the extension, and `datasets` for "
        "a folder written by Hugging Face datasets' save_to_disk (one split's folder).",
    )
    columns: ColumnsSpec = Field(default_factory=ColumnsSpec, description="Which columns hold what.")
    split: SplitSpec | None = Field(
        None, description="Held-out test split. Absent: every row is used for training."
    )
    prompts: PromptsSpec = Field(
        default_factory=PromptsSpec,
        description="Instructions prefixed to the student's queries and positives (the teacher's too with teacher.usePrompts).",
    )
    image_root: str | None = Field(
        None,
        min_length=1,
        description="Folder (path or URI) that relative image paths are read from. Absent: the "
        "folder holding the dataset file. Relative paths are resolved against the manifest's folder.",
    )


# --- teacher and ranking -----------------------------------------------------------------


Pooling = Literal["mean", "cls", "last_token"]


def _pixels(bound: str, what: str) -> Any:
    """minPixels / maxPixels of a model that takes images (the teacher's, the student's)."""
    return Field(
        None,
        ge=1,
        description=f"{bound} pixels an image is resized to before the model sees it, for models that size "
        f"images by a pixel budget (Qwen2-VL and its successors; Qwen2-VL makes a token of each 28 x 28 pixels), {what}. "
        "Absent: the model's processor's own. Refused for text models and fixed-size ones (CLIP).",
    )


def _pixel_bounds_problem(low: int | None, high: int | None) -> str | None:
    if low is not None and high is not None and low > high:
        return f"minPixels ({low}) must not exceed maxPixels ({high})"
    return None


class TeacherSpec(_Model):
    model: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        min_length=1,
        description="Hugging Face model id or local path of the teacher.",
    )
    pooling: Pooling = Field("mean", description="How token states become one embedding.")
    max_length: int = Field(
        128, ge=8, le=32768, description="Tokens per text; longer texts are cut."
    )
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Compute dtype; auto is bfloat16 on GPUs that have it, else float32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto uses CUDA when present."
    )
    use_prompts: bool = Field(
        False, description="Prefix the dataset prompts to the teacher's inputs too."
    )
    embeddings: str | None = Field(
        None,
        min_length=1,
        description="Precomputed teacher embeddings to mine with (a ranking made elsewhere: a GPU "
        "job, VLM2Vec): a Parquet or Arrow IPC file (path or URI) with columns id, query and "
        "positive (lists of floats, one length), a row for every training row, matched by "
        "dataset id (the row number without an id column); other rows are ignored. The rank stage "
        "then embeds nothing and the other teacher fields are unused; b3 eval scores no teacher.",
    )
    min_pixels: int | None = _pixels("Fewest", "so small images keep detail")
    max_pixels: int | None = _pixels("Most", "which bounds each image's tokens (memory and time)")

    @model_validator(mode="after")
    def _pixel_bounds(self) -> TeacherSpec:
        if problem := _pixel_bounds_problem(self.min_pixels, self.max_pixels):
            raise ValueError(problem)
        return self


class RankSpec(_Model):
    workers: int = Field(
        1,
        ge=1,
        le=1024,
        description="Ray workers for embedding and ranking. 1 runs in-process; more start Ray "
        "(a Ray cluster when RAY_ADDRESS is set, else a local one).",
    )
    gpus_per_worker: float = Field(0, ge=0, le=16, description="GPUs each Ray worker claims.")
    memory_budget_mib: int = Field(
        1024,
        ge=16,
        description="Bound on the score block held at once by one worker (MiB); sets the block size.",
    )


# --- mining ------------------------------------------------------------------------------


class MiningSpec(_Model):
    p: int = Field(
        30, ge=0, description="Top teacher ranks skipped as likely false negatives (paper's p)."
    )
    m: int = Field(100, ge=1, description="Ranks kept after the skipped ones (paper's m).")
    cluster_size: int = Field(
        16,
        ge=2,
        description="Community size K (the partitioner gives exactly K). Default 16: |B|/4 at the default "
        "batchSize; K = |B| lost 0.9-1.2 nDCG@10 points against K = |B|/4 on Debian (docs/experiments.md).",
    )
    batch_size: int = Field(
        64, ge=2, description="Global batch size |B|; a multiple of clusterSize."
    )
    seed: int = Field(0, ge=0, description="Seed of the partition and of the batch order.")
    per_task: bool = Field(True, description="Rank and partition within each task.")
    mix_tasks: bool = Field(False, description="Allow batches to hold several tasks.")
    edges: Literal["mutual", "union"] = Field(
        "mutual",
        description="Keep an edge i-j when both rank each other (mutual) or either does (union).",
    )
    partitioner: Literal["kaminpar", "metis"] = Field(
        "kaminpar",
        description="Graph partitioner: kaminpar (KaMinPar, exact block sizes; the stage 3.5-3.8x faster "
        "than with METIS at 1M rows, with a 9% lower edge cut, in bench/partition_scale.py; wheels for "
        "Linux and macOS arm64) or metis (pymetis).",
    )
    partitioner_threads: int = Field(
        1,
        ge=1,
        le=1024,
        description="Threads for KaMinPar and the mutual-graph build. 1 is deterministic for a seed; more "
        "are faster (the stage 1.3-1.4x with 2 at 1M rows, 4.8-5.3x the METIS stage) but two KaMinPar runs may "
        "differ. METIS is sequential: metis needs 1.",
    )
    min_task_size: int | None = Field(
        None,
        ge=1,
        description="Tasks with fewer rows are pooled into one group. Default: batchSize.",
    )
    hard_negatives: int = Field(
        0, ge=0, le=1024, description="B3++: hard negatives h per query, shared by the batch."
    )

    @model_validator(mode="after")
    def _cross_field(self) -> MiningSpec:
        errors = []
        if self.batch_size % self.cluster_size:
            errors.append(
                f"clusterSize ({self.cluster_size}) must divide batchSize ({self.batch_size})"
            )
        if self.partitioner == "metis" and self.partitioner_threads > 1:
            errors.append(
                f"partitionerThreads ({self.partitioner_threads}) needs partitioner kaminpar: "
                "METIS (pymetis) runs on one thread"
            )
        if not self.per_task and not self.mix_tasks:
            errors.append(
                "perTask false builds communities across tasks, so batches would mix them: "
                "set mixTasks true, or keep perTask true"
            )
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def window(self) -> int:
        """p + m: how many ranks per query the rank stage keeps."""
        return self.p + self.m

    @property
    def pool_below(self) -> int:
        return self.batch_size if self.min_task_size is None else self.min_task_size


# --- training (consumed by the train stage) ----------------------------------------------


class LoraSpec(_Model):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: int = Field(16, ge=1, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt. Absent: chosen per model family."
    )


class TrainingSpec(_Model):
    student: str = Field(
        "sentence-transformers/all-MiniLM-L6-v2",
        min_length=1,
        description="Hugging Face model id or local path of the student.",
    )
    pooling: Pooling = Field("mean", description="How token states become one embedding.")
    max_length: int = Field(128, ge=8, le=32768, description="Tokens per text.")
    min_pixels: int | None = _pixels("Fewest", "so small images keep detail")
    max_pixels: int | None = _pixels("Most", "which bounds each image's tokens (memory and time)")
    sampler: Literal["b3", "random"] = Field(
        "b3", description="b3: mined batches; random: the baseline with the same batch size."
    )
    false_negatives: Literal["none", "top-p", "teacher"] = Field(
        "none",
        description="Mask likely false negatives in the loss: none; top-p (each query's teacher "
        "top-p ranked positives); teacher (columns the teacher scores above the query's positive).",
    )
    temperature: float = Field(0.02, gt=0, le=10, description="InfoNCE temperature (scale = 1/t).")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: int | None = Field(None, ge=1, description="Epochs to train. Give epochs or steps.")
    steps: int | None = Field(None, ge=1, description="Optimizer steps to train.")
    mini_batch_size: int | None = Field(
        None, ge=1, description="GradCache chunk per process. Absent: no GradCache."
    )
    symmetric: bool = Field(False, description="Add the positive-to-query InfoNCE term.")
    gather_across_devices: bool = Field(
        True, description="Score each query against the positives of every process."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    finetuning: Literal["lora", "full"] = Field(
        "lora",
        description="Which weights train: lora (adapters on the student, the rest frozen; merged "
        "into the exported model) or full (every weight; for students that are not embedders "
        "yet, e.g. a base model; choose learningRate on a validation split).",
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec, description="The LoRA adapters trained when finetuning is lora."
    )
    nodes: int = Field(1, ge=1, le=4096, description="Training nodes (pods).")
    processes_per_node: int = Field(1, ge=1, le=64, description="Processes (GPUs) per node.")
    max_restarts: int = Field(
        3, ge=0, le=100,
        description="Times a training pod's failure (other than bad input, exit 2) restarts every "
        "training pod from the newest checkpoint before the job fails; a disruption (preemption, "
        "eviction) restarts without counting.",
    )  # fmt: skip
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept on disk.")
    output_dir: str | None = Field(
        None,
        min_length=1,
        description="Where the train stage writes <outputDir>/train/ (checkpoints, final model); "
        "default workDir. Needed when workDir is an object store: checkpoints need a file system.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if problem := _pixel_bounds_problem(self.min_pixels, self.max_pixels):
            raise ValueError(problem)
        if self.finetuning == "full" and self.lora != LoraSpec():  # (a resolved spec has the default)
            raise ValueError("training.lora is set, but training.finetuning is full (every weight "
                             "trains, no adapters): remove training.lora, or set finetuning: lora")  # fmt: skip
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


# --- Kubernetes: how the operator runs the stages (ignored by `b3 run`) -----------------

# Free-form Kubernetes objects (resources, affinity, tolerations, env, volumes, ...) are kept
# as given; the API server validates them when the operator creates the pods.
K8sObject = dict[str, Any]


class PodTemplateSpec(_Model):
    image: str = Field(
        "ghcr.io/b3-operator/worker:0.1.0",
        min_length=1,
        description="Worker image of every stage pod.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls the image."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secret names for the registry."
    )
    service_account_name: str | None = Field(
        None, description="ServiceAccount of the stage pods (default: the namespace's default)."
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of the stage pods.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels to match.")
    tolerations: list[K8sObject] = Field(default_factory=list, description="Pod tolerations.")
    affinity: K8sObject | None = Field(None, description="Pod affinity (core/v1 Affinity).")
    env: list[K8sObject] = Field(
        default_factory=list, description="Extra container env (secrets by valueFrom reference)."
    )
    env_from: list[K8sObject] = Field(
        default_factory=list, description="ConfigMaps/Secrets as env."
    )
    volumes: list[K8sObject] = Field(
        default_factory=list, description="Pod volumes, e.g. the PVC that holds workDir."
    )
    volume_mounts: list[K8sObject] = Field(default_factory=list, description="Container mounts.")
    security_context: K8sObject | None = Field(
        None,
        description="Pod securityContext, merged over the default (non-root, uid/gid 1000, "
        "RuntimeDefault seccomp): give only what differs.",
    )
    automount_service_account_token: bool = Field(
        False,
        description="Mount the ServiceAccount's API token in stage pods (they need none to run).",
    )
    termination_grace_period_seconds: int = Field(
        60, ge=15, le=86400,
        description="Seconds between SIGTERM (preemption, eviction, suspend) and SIGKILL for stage pods. "
        "Training finishes the step in flight and checkpoints it in this window: give it a step plus a "
        "checkpoint save. The training launcher waits this minus 10 s for its workers.",
    )  # fmt: skip


class StagePolicySpec(_Model):
    resources: K8sObject | None = Field(
        None,
        description="Container resources. The GPU default is added unless nvidia.com/gpu is named: "
        "rank 1 GPU, train processesPerNode GPUs per node (0: the CPU); partition 2 CPU/8Gi.",
    )
    backoff_limit: int | None = Field(
        None, ge=0, le=100,
        description="Pod retries before the rank or partition stage fails (default 2). Not for "
        "train, which restarts all its pods together: see training.maxRestarts.",
    )  # fmt: skip
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Wall-clock limit of the stage's Job."
    )
    startup_deadline_seconds: int | None = Field(
        None, ge=1,
        description="Fail the stage when its pods have not all started this long after it "
        "began (they cannot be created, scheduled or pulled). Absent: wait, with a Stalled condition.",
    )  # fmt: skip


class RankStagePolicySpec(StagePolicySpec):
    head_resources: K8sObject | None = Field(
        None,
        description="Container resources of the Ray head when rank.workers > 1 (`resources` sizes "
        "the Ray workers): it runs the driver, which holds every embedding and the merged "
        "ranking, and no ranking task. Default: requests 2 CPU/8Gi, no GPU.",
    )


class StagesSpec(_Model):
    rank: RankStagePolicySpec = Field(default_factory=RankStagePolicySpec, description="The rank stage's pods.")
    partition: StagePolicySpec = Field(default_factory=StagePolicySpec, description="The partition stage's pod.")
    train: StagePolicySpec = Field(default_factory=StagePolicySpec, description="The training pods.")

    @model_validator(mode="after")
    def _train_restarts_the_gang(self) -> StagesSpec:
        # one failed training pod restarts all of them (training.maxRestarts): a per-pod retry
        # budget would replace one node while the others wait on it
        if self.train.backoff_limit is not None:
            raise ValueError("train.backoffLimit does not apply: the train stage restarts all its "
                             "pods together; set training.maxRestarts instead")  # fmt: skip
        return self


class RunPolicySpec(_Model):
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the B3Job's stage Jobs this long after it finishes."
    )
    queue_name: str | None = Field(
        None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name) for gang admission."
    )
    scheduler_name: str | None = Field(None, description="Pod scheduler, e.g. a gang scheduler.")


# --- the whole job -----------------------------------------------------------------------


class B3JobSpec(_Model):
    dataset: DatasetSpec = Field(..., description="The (query, positive) pairs: where, which columns, the held-out split, prompts.")
    teacher: TeacherSpec = Field(
        default_factory=TeacherSpec, description="The model that ranks every positive for every query."
    )
    rank: RankSpec = Field(default_factory=RankSpec, description="How the rank stage spreads its work (not what it computes).")
    mining: MiningSpec = Field(
        default_factory=MiningSpec,
        description="The S-graph (ranks p..p+m), its communities of clusterSize rows, and the batches made of them.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="The student, its loss, its schedule and its layout.")
    work_dir: str = Field(
        ...,
        min_length=1,
        description="Where stages write their artifacts: a path (a mounted volume on Kubernetes) "
        "or a URI (s3://bucket/prefix). Relative paths are resolved against the manifest's folder.",
    )
    suspend: bool = Field(
        False, description="Suspend the running stage (its Job is suspended); false resumes it."
    )
    template: PodTemplateSpec = Field(
        default_factory=PodTemplateSpec,
        description="Pod settings of every stage (Kubernetes only).",
    )
    stages: StagesSpec = Field(
        default_factory=StagesSpec, description="Per-stage resources and retries (Kubernetes only)."
    )
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Scheduling and cleanup (Kubernetes only)."
    )

    @model_validator(mode="after")
    def _cross_section(self) -> B3JobSpec:
        errors = []
        world = self.training.world_size
        if self.mining.batch_size % world:
            errors.append(
                f"mining.batchSize ({self.mining.batch_size}) must be divisible by the "
                f"{world} training processes (training.nodes x training.processesPerNode)"
            )
        local = self.mining.batch_size // world
        mbs = self.training.mini_batch_size
        if mbs is not None and mbs > local:
            errors.append(
                f"training.miniBatchSize ({mbs}) must not exceed the per-process batch ({local})"
            )
        if not _is_local(self.work_dir) and self.training.output_dir is None:
            errors.append(
                f"workDir {self.work_dir} is an object store, and training checkpoints need a file "
                "system: set training.outputDir to a local or mounted path"
            )
        errors += _train_gpu_problems(self.stages.train.resources, self.training.processes_per_node)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def train_dir(self) -> str:
        """The root under which the train stage writes train/ (outputDir, else workDir)."""
        return self.training.output_dir or self.work_dir


def _train_gpu_problems(resources: K8sObject | None, processes: int) -> list[str]:
    """Each training process drives one GPU: a training pod asks for processesPerNode GPUs, or
    none (the CPU, with gloo). Any other count leaves processes without a GPU or GPUs idle."""
    problems = []
    for kind, amounts in (resources or {}).items():
        if not isinstance(amounts, dict) or "nvidia.com/gpu" not in amounts:
            continue
        given = str(amounts["nvidia.com/gpu"])
        if given not in {str(processes), "0"}:
            problems.append(
                f"stages.train.resources.{kind}.nvidia.com/gpu ({given}) must equal "
                f"training.processesPerNode ({processes}), one GPU per process, or be 0 to train on the CPU"
            )
    return problems


# A B3Job's children are named <name>-spec, -rank, -partition, -train (and the train pods'
# hostnames <name>-train-<index>): each must be a DNS-1035 label of at most 63 characters, so
# the job's name starts with a letter and leaves room for the longest suffix, "-partition".
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME_LENGTH = 63 - len("-partition")
# A restarted training gang is a new Job, <name>-r<attempt> (hostnames <name>-r<attempt>-<index>):
# at most MAX_TRAIN_ATTEMPTS of them keep those within 63 characters too.
MAX_TRAIN_ATTEMPTS = 999


def hostname_problem(name: str, nodes: int) -> str | None:
    """Why the training pods' hostnames (<name>-train-<index>) would not be DNS labels."""
    longest = f"{name}-train-{nodes - 1}"
    if len(longest) > 63:
        return (f"metadata.name: {name!r} with training.nodes {nodes} makes the training pod "
                f"hostname {longest!r} longer than 63 characters; shorten the name")  # fmt: skip
    return None


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(
        "b3job", min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN,
        description="lowercase letters, digits and '-', starting with a letter; at most 53 "
        "characters, so that every child's name is a valid DNS label",
    )  # fmt: skip
    namespace: str | None = None


class B3Job(BaseModel):
    """A whole manifest: apiVersion, kind, metadata, spec."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    api_version: str = Field(f"{API_GROUP}/{API_VERSION}", alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: B3JobSpec

    @property
    def name(self) -> str:
        return self.metadata.name


# --- loading -----------------------------------------------------------------------------


def _format_errors(err: ValidationError, prefix: str) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        where = f"{prefix}.{loc}" if loc else prefix
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(f"{where}: {msg}")
    return out


def parse_spec(spec: dict[str, Any]) -> B3JobSpec:
    """Validate a bare spec dict (the manifest's `spec:`); raise SpecError listing every problem."""
    try:
        return B3JobSpec.model_validate(spec)
    except ValidationError as err:
        raise SpecError(_format_errors(err, "spec")) from None


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _resolve_against(uri: str, base: Path) -> str:
    if "://" in uri:
        return uri
    path = Path(os.path.expanduser(uri))
    return str(path if path.is_absolute() else (base / path).resolve())


def parse_manifest(doc: Any, base_dir: str | Path = ".") -> B3Job:
    """Validate a manifest document; relative local paths resolve against `base_dir`."""
    if not isinstance(doc, dict):
        raise SpecError(["manifest: expected a mapping with apiVersion, kind, metadata and spec"])
    errors = []
    api_version = doc.get("apiVersion", f"{API_GROUP}/{API_VERSION}")
    if api_version != f"{API_GROUP}/{API_VERSION}":
        errors.append(f"apiVersion: expected {API_GROUP}/{API_VERSION}, got {api_version!r}")
    if doc.get("kind", KIND) != KIND:
        errors.append(f"kind: expected {KIND}, got {doc.get('kind')!r}")
    if "spec" not in doc:
        errors.append("spec: required")
    spec = None
    try:
        spec = parse_spec(doc.get("spec") or {}) if "spec" in doc else None
    except SpecError as err:
        errors.extend(err.errors)
    try:
        metadata = ObjectMeta.model_validate(doc.get("metadata") or {})
    except ValidationError as err:
        errors.extend(_format_errors(err, "metadata"))
    else:
        if spec is not None and (problem := hostname_problem(metadata.name, spec.training.nodes)):
            errors.append(problem)
    if errors:
        raise SpecError(errors)
    base = Path(base_dir).resolve()
    resolved = spec.model_copy(
        update={
            "dataset": spec.dataset.model_copy(
                update={"uri": _resolve_against(spec.dataset.uri, base),
                        "image_root": spec.dataset.image_root and _resolve_against(spec.dataset.image_root, base)}
            ),
            "teacher": spec.teacher.model_copy(
                update={"embeddings": spec.teacher.embeddings and _resolve_against(spec.teacher.embeddings, base)}
            ),
            "work_dir": _resolve_against(spec.work_dir, base),
            "training": spec.training.model_copy(
                update={
                    "output_dir": spec.training.output_dir
                    and _resolve_against(spec.training.output_dir, base)
                }
            ),
        }
    )
    return B3Job(
        apiVersion=api_version,
        kind=KIND,
        metadata=metadata,
        spec=resolved,
    )


def apply_overrides(doc: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`KEY=VALUE` settings over a manifest document, as `b3 run job.yaml training.steps=100`
    gives them: KEY is a dotted path in the spec (or starts with spec. or metadata.), VALUE is
    read as YAML (100, 0.5, true, [query, value], "text"). The result is validated like any
    manifest, so an unknown key or a bad value is named by the usual error."""
    doc = copy.deepcopy(doc) if isinstance(doc, dict) else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip(". "):
            raise SpecError([f"override {item!r}: expected KEY=VALUE, e.g. training.steps=100"])
        path = key.split(".")
        if path[0] not in ("spec", "metadata"):
            path = ["spec", *path]
        try:
            value = read_yaml(text)
        except yaml.YAMLError as err:
            raise SpecError([f"override {key}: {text!r} is not a YAML value ({err})"]) from None
        node = doc
        for depth, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError([f"override {key}: {'.'.join(path[: depth + 1])} is not a mapping"])
        node[path[-1]] = value
    return doc


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last
    value silently; kubectl's strict field validation refuses such a manifest)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} on line {line} (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """One YAML document, keys unique in every mapping (yaml.YAMLError otherwise)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def load_manifest(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> B3Job:
    """Read and validate a B3Job manifest file, with `KEY=VALUE` overrides (apply_overrides)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError([f"manifest {path}: cannot read ({err.strerror or err})"]) from None
    try:
        doc = read_yaml(text)
    except yaml.YAMLError as err:
        raise SpecError([f"manifest {path}: {_yaml_problem(err)}"]) from None
    if overrides:
        doc = apply_overrides(doc, overrides)
    return parse_manifest(doc, base_dir=path.parent)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what and where."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem and problem.startswith("duplicate key"):
        return f"{problem}; every key may appear once"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML ({problem or err}{where})"


def manifest_to_dict(job: B3Job) -> dict[str, Any]:
    """A whole resolved manifest (absolute paths, defaults filled in): what the stage programs
    read when a command was given overrides."""
    return {"apiVersion": job.api_version, "kind": job.kind,
            "metadata": job.metadata.model_dump(exclude_none=True), "spec": spec_to_dict(job.spec)}  # fmt: skip


def spec_to_dict(spec: B3JobSpec) -> dict[str, Any]:
    """The spec as the camelCase mapping a manifest holds (defaults filled in)."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- CRD schema --------------------------------------------------------------------------

_KEEP = {
    "type", "description", "default", "enum", "minimum", "maximum", "minLength", "maxLength",
    "minItems", "maxItems", "pattern", "format", "items", "properties", "required",
    "additionalProperties", "nullable", "x-kubernetes-preserve-unknown-fields",
}  # fmt: skip


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Rewrite one pydantic JSON-schema node into Kubernetes' structural OpenAPI v3 subset."""
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**copy.deepcopy(target), **node}
    nullable = False
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise TypeError(f"a CRD field must have one type, got {options}")
        nullable = True
        node = {**_structural(options[0], defs), **{k: v for k, v in node.items() if k != "title"}}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "exclusiveMinimum":  # JSON Schema 2020 number -> OpenAPI 3.0 boolean form
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "additionalProperties":
            if value is True:  # a free-form Kubernetes object (K8sObject): keep it as given
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict) and value:  # a map; `false` (extra=forbid) is pruning
                out["additionalProperties"] = _structural(value, defs)
        elif key in _KEEP:
            out[key] = value
    if (
        "properties" in out
        or "additionalProperties" in out
        or "x-kubernetes-preserve-unknown-fields" in out
    ):
        out["type"] = "object"
    if nullable:
        out["nullable"] = True
        if out.get("default") is None:
            out.pop("default", None)
    if "type" not in out:
        raise TypeError(f"a CRD field needs a type: {node}")
    return out


def spec_openapi_schema() -> dict[str, Any]:
    """The B3Job `spec` as a structural OpenAPI v3 schema (for the CRD's openAPIV3Schema)."""
    raw = B3JobSpec.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))
