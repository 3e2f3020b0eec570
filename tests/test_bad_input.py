"""Every bad input a newcomer meets, in one table: manifest fields, YAML shape, data files,
models and paths. Each is refused by the command a user runs with exit 2 and a message naming
the field or file, before any compute (no progress bar, no model loaded, no training step), and
the case's folder, work directory included, is left exactly as it was."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import _tiny_clip, _tiny_qwen2_vl, make_pairs

from b3.cli import main

DELETE = object()  # a spec patch value: remove this key
# what any compute prints: a tqdm bar (embedding, ranking, partitioning, loading weights) or a
# training step's log line
COMPUTE_MARKERS = ("%|", '"step"', "done in")


@dataclass
class Case:
    name: str
    needle: str  # in the message: names the field or file (with {tmp}: the case's folder)
    spec: dict = field(default_factory=dict)  # deep-merged into a valid spec
    command: str = "run"
    extra: tuple[str, ...] = ()  # more arguments (overrides, options)
    manifest_text: str | None = None  # the manifest file as given (YAML shape)
    data: Callable[[pa.Table], pa.Table] | None = None  # the dataset, changed
    write_data: Callable[[Path, pa.Table], str] | None = None  # writes its own dataset; its uri
    setup: Callable[[Path], None] | None = None  # more files for the case

    def __str__(self) -> str:
        return self.name


def _column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, pa.array(values))


def _blank_row(table: pa.Table, column: str, row: int) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = "  "
    return _column(table, column, values)


def _write(suffix: str, writer) -> Callable[[Path, pa.Table], str]:
    def write(folder: Path, table: pa.Table) -> str:
        path = folder / f"pairs{suffix}"
        writer(path, table)
        return str(path)

    return write


def _jsonl(path: Path, table: pa.Table) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))


def _broken_jsonl(path: Path, table: pa.Table) -> None:
    _jsonl(path, table)
    with open(path, "a") as f:
        f.write('{"id": "x", "query": "unterminated\n')


def _model_folder(config: dict | None):
    def setup(folder: Path) -> None:
        (folder / "model").mkdir()
        if config is not None:
            (folder / "model" / "config.json").write_text(json.dumps(config))

    return setup


VALID_YAML_HEAD = "apiVersion: b3.dev/v1alpha1\nkind: B3Job\nmetadata: {name: bad}\n"

CASES = [
    # --- manifest fields ------------------------------------------------------------------------
    Case("cluster size does not divide the batch", "spec.mining: clusterSize (3) must divide batchSize (16)",
         {"mining": {"clusterSize": 3}}),
    Case("negative p", "spec.mining.p: Input should be greater than or equal to 0", {"mining": {"p": -1}}),
    Case("empty window", "spec.mining.m: Input should be greater than or equal to 1", {"mining": {"m": 0}}),
    Case("learning rate .nan", "spec.training.learningRate: Input should be a finite number",
         manifest_text=VALID_YAML_HEAD + "spec:\n  dataset: {uri: pairs.parquet}\n  workDir: work\n"
                                         "  training: {learningRate: .nan}\n"),
    Case("temperature .inf", "spec.training.temperature: Input should be a finite number",
         {"training": {"temperature": float("inf")}}),
    Case("temperature 0", "spec.training.temperature: Input should be greater than 0", {"training": {"temperature": 0}}),
    Case("steps and epochs", "give steps or epochs, not both", {"training": {"steps": 5, "epochs": 1}}),
    Case("LoRA settings under full fine-tuning", "training.lora is set, but training.finetuning is full",
         {"training": {"finetuning": "full", "lora": {"r": 16}}}),
    Case("finetuning mode", "spec.training.finetuning: Input should be 'lora' or 'full'",
         {"training": {"finetuning": "qlora"}}),
    Case("unknown sampler", "spec.training.sampler: Input should be 'b3' or 'random'", {"training": {"sampler": "hard"}}),
    Case("unknown field", "spec.mining.clustersize: unknown field", {"mining": {"clustersize": 8}}),
    Case("no work dir", "spec.workDir: Field required", {"workDir": DELETE}),
    Case("no dataset", "spec.dataset: Field required", {"dataset": DELETE}),
    Case("test bucket out of range", "testBucket (10) must be smaller than buckets (10)",
         {"dataset": {"split": {"key": "source", "buckets": 10, "testBucket": 10}}}),
    Case("name starts with a digit", "metadata.name: String should match pattern", manifest_text=VALID_YAML_HEAD.replace(
        "name: bad", "name: 1bad") + "spec: {dataset: {uri: pairs.parquet}, workDir: work}\n"),
    Case("metis on two threads", "partitionerThreads (2) needs partitioner kaminpar",
         {"mining": {"partitioner": "metis", "partitionerThreads": 2}}),
    Case("per-task off, mixing off", "perTask false builds communities across tasks",
         {"mining": {"perTask": False}}),
    Case("GradCache chunk above the batch", "training.miniBatchSize (32) must not exceed the per-process batch (16)",
         {"training": {"miniBatchSize": 32}}),
    Case("batch not divisible by the processes", "must be divisible by the 3 training processes",
         {"training": {"processesPerNode": 3}}),
    Case("wrong apiVersion", "apiVersion: expected b3.dev/v1alpha1, got 'b3.dev/v2'",
         manifest_text=VALID_YAML_HEAD.replace("v1alpha1", "v2") + "spec: {dataset: {uri: pairs.parquet}, workDir: w}\n"),
    Case("wrong kind", "kind: expected B3Job, got 'Job'",
         manifest_text=VALID_YAML_HEAD.replace("kind: B3Job", "kind: Job") + "spec: {dataset: {uri: p.parquet}, workDir: w}\n"),
    Case("max length below 8", "spec.teacher.maxLength: Input should be greater than or equal to 8",
         {"teacher": {"maxLength": 4}}),
    Case("object-store work dir without an output dir", "set training.outputDir to a local or mounted path",
         {"workDir": "s3://bucket/work"}),
    Case("train backoffLimit", "train.backoffLimit does not apply", {"stages": {"train": {"backoffLimit": 2}}}),
    Case("GPUs unlike the processes", "stages.train.resources.limits.nvidia.com/gpu (4) must equal training.processesPerNode (1)",
         {"stages": {"train": {"resources": {"limits": {"nvidia.com/gpu": 4}}}}}),
    Case("a stop window too short", "spec.template.terminationGracePeriodSeconds: Input should be greater than or equal to 15",
         {"template": {"terminationGracePeriodSeconds": 5}}),
    Case("LoRA dropout 1", "spec.training.lora.dropout: Input should be less than 1", {"training": {"lora": {"dropout": 1}}}),
    Case("unknown dtype", "spec.teacher.dtype: Input should be", {"teacher": {"dtype": "int4"}}),
    Case("override of an unknown key", "spec.mining.nope: unknown field", extra=("mining.nope=1",)),
    Case("override of a bad value", "spec.training.steps: Input should be greater than or equal to 1",
         extra=("training.steps=0",)),
    Case("two nodes on this machine", "training.nodes > 1 runs on Kubernetes", {"training": {"nodes": 2}},
         command="train"),
    # --- YAML shape -----------------------------------------------------------------------------
    Case("a key given twice", "duplicate key 'workDir' on line 7 (first on line 6); every key may appear once",
         manifest_text=VALID_YAML_HEAD + "spec:\n  dataset: {uri: pairs.parquet}\n  workDir: work\n  workDir: other\n"),
    Case("a nested key given twice", "duplicate key 'p' on line 9 (first on line 8)",
         manifest_text=VALID_YAML_HEAD + "spec:\n  dataset: {uri: pairs.parquet}\n  workDir: work\n  mining:\n"
                                         "    p: 2\n    p: 3\n"),
    Case("not YAML", "not valid YAML", manifest_text=VALID_YAML_HEAD + "spec: {dataset: [unclosed\n"),
    Case("a list, not a mapping", "manifest: expected a mapping with apiVersion, kind, metadata and spec",
         manifest_text="- apiVersion: b3.dev/v1alpha1\n- kind: B3Job\n"),
    Case("an empty file", "manifest: expected a mapping", manifest_text=""),
    Case("spec is text", "spec: Input should be a valid dictionary", manifest_text=VALID_YAML_HEAD + "spec: everything\n"),
    Case("no spec", "spec: required", manifest_text=VALID_YAML_HEAD),
    Case("no such manifest", "cannot read (No such file or directory)", manifest_text=None, command="validate",
         extra=("--preflight",), setup=lambda folder: (folder / "job.yaml").unlink()),
    # --- data files -----------------------------------------------------------------------------
    Case("no such dataset", "dataset {tmp}/nowhere.parquet: no such file", {"dataset": {"uri": "nowhere.parquet"}}),
    Case("no positive column", "missing column(s) 'positive' (positive)", data=lambda t: t.drop_columns(["positive"])),
    Case("no task column", "missing column(s) 'task' (task)", data=lambda t: t.drop_columns(["task"])),
    Case("no split key column", "missing column(s) 'source' (split key)",
         {"dataset": {"split": {"key": "source"}}}, data=lambda t: t.drop_columns(["source"])),
    Case("no image column named queryImage", "missing column(s) 'query_image' (query image)",
         {"dataset": {"columns": {"queryImage": "query_image"}}}),
    Case("an image column while the models embed text only",
         "embeds text only (its folder has no image processor), and dataset.columns.queryImage: 'query_image' holds images",
         {"dataset": {"columns": {"queryImage": "query_image"}}},
         data=lambda t: t.append_column("query_image", pa.array(["missing.png"] * t.num_rows))),
    Case("an empty query at row 7", "null or empty 'query' (query): file row 7 (id pkg7)",
         data=lambda t: _blank_row(t, "query", 7)),
    Case("an empty positive", "null or empty 'positive' (positive): file row 3 (id pkg3)",
         data=lambda t: _blank_row(t, "positive", 3)),
    Case("repeated ids", "'id' (id) has 1 repeated values: 'pkg0' at file rows 0 and 5",
         data=lambda t: _column(t, "id", ["pkg0" if i == 5 else x for i, x in enumerate(t.column("id").to_pylist())])),
    Case("numbers as queries", "column 'query' (query) must hold text, not int64",
         data=lambda t: _column(t, "query", list(range(t.num_rows)))),
    Case("nulls as tasks", "'task' (task) has nulls: file rows 0 (id pkg0)",
         data=lambda t: _column(t, "task", pa.nulls(t.num_rows, pa.string()))),
    Case("fewer rows than a batch", "10 train rows, fewer than one batch (mining.batchSize = 16)",
         data=lambda t: t.slice(0, 10)),
    Case("window wider than the data", "mining.p + mining.m (240) must be smaller than the number of candidates "
         "(239 other training rows)", {"mining": {"m": 238}}),
    Case("not a parquet file", "pairs.parquet: cannot read it as parquet",
         write_data=lambda folder, t: (folder / "pairs.parquet").write_bytes(b"not parquet at all") and str(folder / "pairs.parquet")),
    Case("unknown extension", "cannot tell the format from the extension; set dataset.format",
         write_data=_write(".xyz", lambda p, t: pq.write_table(t, p))),
    Case("CSV without the positive column", "missing column(s) 'positive' (positive)",
         write_data=_write(".csv", lambda p, t: __import__("pyarrow.csv").csv.write_csv(t.drop_columns(["positive"]), p))),
    Case("broken JSON Lines", "pairs.jsonl: cannot read it as jsonl", write_data=_write(".jsonl", _broken_jsonl)),
    Case("a folder that is no saved dataset", "a folder, but not one written by datasets' save_to_disk",
         write_data=lambda folder, t: (folder / "pairs").mkdir() or str(folder / "pairs")),
    # --- models ---------------------------------------------------------------------------------
    Case("teacher path that does not exist", "teacher.model: '/nonexistent/model' not found; tried: local folder "
         "/nonexistent/model: no such folder", {"teacher": {"model": "/nonexistent/model"}}),
    Case("student that no source has", "training.student: 'nosuch-org/nosuch-model' not found; tried: local folder",
         {"training": {"student": "nosuch-org/nosuch-model"}}),
    Case("the offline hub was not tried", "Hugging Face hub: not tried, offline (HF_HUB_OFFLINE)",
         {"training": {"student": "nosuch-org/nosuch-model"}}),
    Case("teacher folder without config.json", "teacher.model: '{tmp}/model' not found; tried: local folder "
         "{tmp}/model: has no config.json", {"teacher": {"model": "{tmp}/model"}}, setup=_model_folder(None)),
    Case("student whose config does not load", "training.student: '{tmp}/model' (local folder {tmp}/model): its "
         "config.json does not load", {"training": {"student": "{tmp}/model"}},
         setup=_model_folder({"model_type": "no-such-architecture"})),
    Case("a model id with a space", "Hugging Face: not a model id (org/name)", {"teacher": {"model": "my model"}}),
    Case("LoRA on Qwen2-VL with no target modules", "training.lora.targetModules: peft has no default for 'qwen2_vl' "
         "models ({tmp}/model)", {"training": {"student": "{tmp}/model", "lora": {"targetModules": DELETE}}},
         setup=lambda folder: _tiny_qwen2_vl(folder / "model")),
    Case("a pixel budget for a text model", "has no pixel budget to set (it embeds text only or resizes images to a "
         "fixed shape); minPixels and maxPixels apply to models that size images by one (Qwen2-VL and its successors)",
         {"training": {"maxPixels": 200704}}),
    Case("a pixel budget for CLIP", "teacher.minPixels: {tmp}/model has no pixel budget to set (it embeds text only "
         "or resizes images to a fixed shape)", {"teacher": {"model": "{tmp}/model", "minPixels": 3136}},
         setup=lambda folder: _tiny_clip(folder / "model")),
    Case("minPixels above maxPixels", "spec.training: minPixels (1003520) must not exceed maxPixels (200704)",
         {"training": {"minPixels": 1003520, "maxPixels": 200704}}),
    Case("teacher missing for the rank stage alone", "teacher.model: '/nonexistent/model' not found",
         {"teacher": {"model": "/nonexistent/model"}}, command="rank"),
    Case("student missing for the train stage alone", "training.student: '/nonexistent/student' not found",
         {"training": {"student": "/nonexistent/student"}}, command="train"),
    # --- paths ----------------------------------------------------------------------------------
    Case("work dir under /proc", "workDir: /proc/nope: cannot write there", {"workDir": "/proc/nope"}),
    Case("work dir is a file", "workDir: {tmp}/taken: {tmp}/taken is a file, not a folder", {"workDir": "taken"},
         setup=lambda folder: (folder / "taken").write_text("a file")),
    Case("output dir under /proc", "training.outputDir: /proc/nope-out: cannot write there",
         {"training": {"outputDir": "/proc/nope-out"}}),
    Case("partition before rank", "rank stage output missing in {tmp}/work/rank", command="partition"),
    Case("eval with no split", "dataset.split: not set, so there is no held-out split to evaluate on", command="eval"),
    Case("preflight of a bad work dir", "workDir: /proc/nope: cannot write there", {"workDir": "/proc/nope"},
         command="validate", extra=("--preflight",)),
]  # fmt: skip


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for key, value in patch.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _fill(value, tmp: Path):
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {k: _fill(v, tmp) for k, v in value.items()}
    return value


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in sorted(folder.rglob("*"))}  # fmt: skip


def test_the_table_is_long_enough_and_covers_the_reported_five():
    assert len(CASES) >= 45
    names = {case.name for case in CASES}
    assert {"teacher path that does not exist", "student that no source has", "work dir under /proc",
            "a key given twice", "learning rate .nan"} <= names  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_exits_2_naming_it_before_any_compute_and_changes_nothing(case, tmp_path, tiny_model_dir, capsys,
                                                                            caplog, monkeypatch):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    table = make_pairs(240)
    uri = case.write_data(tmp_path, table) if case.write_data else None
    if uri is None:
        pq.write_table(case.data(table) if case.data else table, tmp_path / "pairs.parquet")
    valid = {
        "dataset": {"uri": uri or "pairs.parquet", "columns": {"task": "task", "id": "id"}},
        "teacher": {"model": tiny_model_dir, "maxLength": 32, "batchSize": 32},
        "mining": {"p": 2, "m": 8, "clusterSize": 4, "batchSize": 16, "seed": 0},
        "training": {"student": tiny_model_dir, "steps": 2, "lora": {"targetModules": ["query", "value"]}},
        "workDir": "work",
    }
    manifest = tmp_path / "job.yaml"
    if case.manifest_text is not None:
        manifest.write_text(case.manifest_text)
    else:
        doc = {"apiVersion": "b3.dev/v1alpha1", "kind": "B3Job", "metadata": {"name": "bad"},
               "spec": _fill(_merge(valid, case.spec), tmp_path)}  # fmt: skip
        manifest.write_text(yaml.safe_dump(doc))
    if case.setup:
        case.setup(tmp_path)
        capsys.readouterr()  # what writing the case's files printed is not the command's
    before = _snapshot(tmp_path)

    with caplog.at_level(logging.INFO):
        try:
            code = main([case.command, str(manifest), *case.extra])
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
    captured = capsys.readouterr()
    said = captured.out + captured.err + caplog.text

    assert code == 2, said[-3000:]
    assert _fill(case.needle, tmp_path) in captured.err, captured.err[-3000:]
    assert "Traceback" not in said
    assert not [marker for marker in COMPUTE_MARKERS if marker in said], said[-3000:]
    assert _snapshot(tmp_path) == before
    assert not os.path.exists("/proc/nope")
