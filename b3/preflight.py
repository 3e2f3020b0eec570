"""Checks before compute: everything a stage will load, read or write can be had, before it
spends any compute on the rest.

    rank       teacher.model resolves (or teacher.embeddings is a file); the dataset opens with
               the named columns; workDir writable
    partition  mining.partitioner is installed; workDir writable
    train      training.student resolves; the dataset opens; training.outputDir (or workDir) writable
    eval       teacher.model and training.student resolve; the dataset opens; workDir writable

`check(job, stages)` runs the checks of every stage given and raises PreflightError (a
DataError: exit 2) listing every problem at once, each naming its field and, for a model,
every source that was tried (`b3.model_source`). A dataset with an image column needs models
that take images (a processor with an image processor in the model's folder, `b3.vision`):
the teacher where it ranks or is evaluated, the student where it trains or is evaluated; a text
model is refused by name. So are `minPixels` / `maxPixels` for a model without a pixel budget
(a text model, CLIP), and LoRA without `training.lora.targetModules` on a model family peft has
no default targets for (Qwen2-VL). `b3 run` checks all its stages before the
first, each stage program its own, and `b3 validate --preflight` all of them with no compute.
A folder is probed by writing (and removing) a file in it, once everything else passed, by the
process that will write there (rank 0 of a training gang); the folders the probe had to make
are removed again, so a job refused now or by its own checks later (a data error found while
reading the rows) leaves the work directory as it was. On an object store only its bucket's
existence is checked: a probe object could trigger the bucket's notifications. Network faults
are retried (`b3.retry`), never reported as bad input.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from dataclasses import dataclass, field

from b3.data import DataError, dataset_columns, require_columns
from b3.model_source import Located, ModelNotFound, locate_model
from b3.retry import retrying
from b3.spec import B3Job
from b3.storage import WorkDir, resolve_filesystem
from b3.vision import pixel_budget, vision_processor

STAGES = ("rank", "partition", "train", "eval")


class PreflightError(DataError):
    """Problems found before compute, each naming its field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("cannot start; nothing was computed:\n  " + "\n  ".join(problems))


@dataclass
class Report:
    """What the checks found: where each model comes from, and the problems."""

    models: dict[str, Located] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _model(report: Report, field_name: str, name: str) -> None:
    try:
        located = locate_model(name)
    except ModelNotFound as err:
        report.problems.append(f"{field_name}: {err}")
        return
    if located.source != "Hugging Face hub":
        problem = _config_problem(located.path)
        if problem:
            report.problems.append(f"{field_name}: {name!r} ({located.source} {located.path}): {problem}")
            return
    report.models[field_name] = located


def _config_problem(folder: str) -> str | None:
    """Why transformers cannot read the model's config.json (None when it can)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        return f"its config.json does not load ({' '.join(str(err).split())[:300]})"
    return None


def _dataset(report: Report, job: B3Job, evaluates: bool) -> None:
    spec = job.spec.dataset
    try:
        require_columns(spec, dataset_columns(spec))
    except DataError as err:
        report.problems.append(f"dataset.uri: {err}")
    if evaluates and spec.split is None:
        report.problems.append("dataset.split: not set, so there is no held-out split to evaluate on")


def _embeddings_file(report: Report, uri: str) -> None:
    """The precomputed teacher embeddings exist (their content is checked when the rank stage
    reads them, against the rows, before it writes anything)."""
    fs, path = resolve_filesystem(uri)
    found = retrying(f"{uri}: stat", lambda: fs.get_file_info(path).type.name)
    if found != "File":
        report.problems.append(f"teacher.embeddings: {uri}: {'no such file' if found == 'NotFound' else 'not a file'}")


def _models_take_images(report: Report, job: B3Job) -> None:
    """With an image column, every model located for these stages must take images. A hub model
    not downloaded yet cannot be looked into offline; its stage refuses it when it loads."""
    columns = job.spec.dataset.columns
    named = [f"dataset.columns.{name}: {column!r}" for name, column in
             (("queryImage", columns.query_image), ("positiveImage", columns.positive_image)) if column]  # fmt: skip
    if not named:
        return
    for field_name, located in report.models.items():
        if located.source != "Hugging Face hub" and vision_processor(located.path) is None:
            report.problems.append(
                f"{field_name}: {located.path} embeds text only (its folder has no image processor), and "
                f"{' and '.join(named)} {'hold' if len(named) > 1 else 'holds'} images: use a model that takes "
                "images (a vision-language decoder such as Qwen2-VL, or a CLIP-style dual encoder), or unset "
                "the image columns to train on the texts alone")  # fmt: skip


def _pixel_limits(report: Report, job: B3Job) -> None:
    """minPixels / maxPixels only for a located model that sizes images by a pixel budget."""
    spec = job.spec
    for field_name, settings in (("teacher.model", spec.teacher), ("training.student", spec.training)):
        located = report.models.get(field_name)
        limits = [name for name, value in (("minPixels", settings.min_pixels), ("maxPixels", settings.max_pixels)) if value]
        if not limits or located is None or located.source == "Hugging Face hub":
            continue
        if pixel_budget(vision_processor(located.path)) is None:
            section = field_name.split(".")[0]
            report.problems.append(f"{section}.{limits[0]}: {located.path} has no pixel budget to set (it embeds text "
                                   "only or resizes images to a fixed shape); minPixels and maxPixels apply to "
                                   "models that size images by one (Qwen2-VL and its successors): unset them")  # fmt: skip


def _lora_targets(report: Report, job: B3Job) -> None:
    """LoRA needs its target modules named where peft has no default for the student's family."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    from transformers import AutoConfig

    t = job.spec.training
    located = report.models.get("training.student")
    if t.finetuning != "lora" or t.lora.target_modules or located is None or located.source == "Hugging Face hub":
        return
    family = AutoConfig.from_pretrained(located.path).model_type
    if family not in DEFAULTS:
        report.problems.append(f"training.lora.targetModules: peft has no default for {family!r} models "
                               f"({located.path}); name the modules, e.g. [q_proj, v_proj]")  # fmt: skip


def _probe_folder(field_name: str, uri: str, created: list[str]) -> str | None:
    """Why nothing can be written under `uri` (None when a file can be). Folders made on the
    way are appended to `created`, parents first."""
    work = WorkDir(uri)
    if not work.local:
        bucket = work.root.strip("/").split("/", 1)[0]
        found = retrying(
            f"{uri}: look up bucket {bucket}", lambda: work.fs.get_file_info(bucket).type.name
        )
        if found == "NotFound":
            return f"{field_name}: {uri}: bucket {bucket!r} does not exist"
        return None
    folder = work.root
    missing = []
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{field_name}: {uri}: {folder} is a file, not a folder"
    try:
        for path in reversed(missing):
            try:
                os.mkdir(path)
            except FileExistsError:  # another process of the gang made it just now
                continue
            created.append(path)
        probe = os.path.join(work.root, f".b3-preflight-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as f:
            f.write(b"b3")
        os.remove(probe)
    except OSError as err:
        return f"{field_name}: {uri}: cannot write there ({err.strerror or err})"
    return None


def check(job: B3Job, stages: list[str] | tuple[str, ...]) -> Report:
    """Run the checks of `stages` (of STAGES); PreflightError when any fails."""
    spec, stages = job.spec, set(stages)
    report = Report()
    if stages & {"rank", "eval"} and not spec.teacher.embeddings:  # given embeddings: no teacher model runs
        _model(report, "teacher.model", spec.teacher.model)
    if "rank" in stages and spec.teacher.embeddings:
        _embeddings_file(report, spec.teacher.embeddings)
    if stages & {"train", "eval"}:
        _model(report, "training.student", spec.training.student)
    if "train" in stages:
        _lora_targets(report, job)
    if stages & {"rank", "train", "eval"}:
        _dataset(report, job, evaluates="eval" in stages)
        _models_take_images(report, job)
        _pixel_limits(report, job)
    if "partition" in stages and spec.mining.partitioner == "kaminpar" and importlib.util.find_spec("kaminpar") is None:
        report.problems.append("mining.partitioner: kaminpar is not installed here (its wheels cover Linux and "
                               "macOS arm64): pip install kaminpar, or set mining.partitioner: metis")  # fmt: skip
    if report.problems:  # write nothing for a job that cannot start anyway
        raise PreflightError(report.problems)
    folders = []
    if stages & {"rank", "partition", "eval"}:
        folders.append(("workDir", spec.work_dir))
    if "train" in stages and os.environ.get("RANK", "0") == "0":  # rank 0 alone writes train/
        folders.append(("training.outputDir" if spec.training.output_dir else "workDir", spec.train_dir))
    created: list[str] = []
    for field_name, uri in dict.fromkeys(folders):
        if problem := _probe_folder(field_name, uri, created):
            report.problems.append(problem)
    for path in reversed(created):  # the stage makes them when it writes
        with contextlib.suppress(OSError):
            os.rmdir(path)
    if report.problems:
        raise PreflightError(report.problems)
    return report
