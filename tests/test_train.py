"""The trainer: kill-and-resume equals straight through, a live metrics scrape, failure
behaviour, and an export that sentence-transformers loads."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from conftest import write_manifest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

import b3.metrics
import b3.train
from b3.artifacts import Artifacts
from b3.cli import main
from b3.metrics import TRAIN_METRICS
from b3.spec import load_manifest


@pytest.fixture
def mined(tmp_path, tiny_spec):
    """A work dir whose rank and partition stages are done; returns a function that writes a
    manifest with training overrides into a fresh copy of it."""
    base = tmp_path / "base"
    spec = {**tiny_spec, "mining": {**tiny_spec["mining"], "hardNegatives": 1},
            "training": {"student": tiny_spec["teacher"]["model"], "lora": {"targetModules": ["query", "value"]}}}  # fmt: skip
    assert (
        main(["rank", str(write_manifest(tmp_path, {**spec, "workDir": str(base)}, "mine"))]) == 0
    )
    assert (
        main(["partition", str(write_manifest(tmp_path, {**spec, "workDir": str(base)}, "mine"))])
        == 0
    )

    def make(name: str, **training) -> tuple[str, str]:
        work = tmp_path / name
        shutil.copytree(base, work)
        manifest = write_manifest(
            tmp_path,
            {**spec, "workDir": str(work), "training": _merged(spec["training"], training)},
            name,
        )
        return str(manifest), str(work)

    return make


def _merged(training: dict, overrides: dict) -> dict:
    """`training` with `overrides`; an override of None removes the key."""
    return {k: v for k, v in {**training, **overrides}.items() if v is not None}


def train_process(manifest: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "b3_jobs.train", manifest], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)  # fmt: skip


def checkpoint_root(manifest: str) -> str:
    return Artifacts(load_manifest(manifest).spec).checkpoint_root()


def final_state(manifest: str) -> tuple[dict, dict]:
    ckpt = os.path.join(checkpoint_root(manifest), "step-0000020")
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    return load_file(os.path.join(ckpt, "adapter_model.safetensors")), state


def test_killed_and_resumed_equals_straight_through(mined):
    straight, _ = mined("straight", steps=20, checkpointEvery=10)
    resumed, _ = mined("resumed", steps=20, checkpointEvery=10)
    assert train_process(straight).returncode == 0
    killed = train_process(resumed, B3_FAULT_AT_STEP="10")
    assert killed.returncode == -9, killed.stderr  # SIGKILL right after the step-10 checkpoint
    assert sorted(os.listdir(checkpoint_root(resumed))) == ["step-0000010"]
    again = train_process(resumed)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and "step 10" in again.stderr
    weights_a, state_a = final_state(straight)
    weights_b, state_b = final_state(resumed)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-7, msg=name)
    assert (
        (state_a["epoch"], state_a["batch_in_epoch"])
        == (state_b["epoch"], state_b["batch_in_epoch"])
        == (1, 5)
    )
    assert state_a["sampler"] == state_b["sampler"]


def test_full_finetuning_trains_every_weight_and_resumes_like_straight_through(mined):
    straight, work = mined("full-straight", steps=20, checkpointEvery=10, finetuning="full", lora=None)
    resumed, _ = mined("full-resumed", steps=20, checkpointEvery=10, finetuning="full", lora=None)
    lora, lora_work = mined("lora", steps=20, checkpointEvery=10)
    assert train_process(straight).returncode == 0 and train_process(lora).returncode == 0
    assert train_process(resumed, B3_FAULT_AT_STEP="10").returncode == -9
    again = train_process(resumed)
    assert again.returncode == 0 and "resumed from" in again.stderr, again.stderr
    checkpoints = [os.path.join(checkpoint_root(m), "step-0000020") for m in (straight, resumed)]
    assert sorted(os.listdir(checkpoints[0])) == ["model.safetensors", "trainer_state.pt"]
    a, b = (load_file(os.path.join(c, "model.safetensors")) for c in checkpoints)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=name)
    # the export: no adapter; against the student it started from, every weight the loss reaches
    # has moved under full fine-tuning, and only the adapted query and value weights under LoRA
    assert sorted(os.listdir(os.path.join(work, "train", "final"))) == ["model"]
    student = load_manifest(straight).spec.training.student
    start = load_file(os.path.join(student, "model.safetensors"))
    full = load_file(os.path.join(work, "train", "final", "model", "model.safetensors"))
    merged = load_file(os.path.join(lora_work, "train", "final", "model", "model.safetensors"))
    reached = [n for n in start if not n.startswith("pooler.")]  # mean pooling skips the pooler
    moved = {n for n in reached if not torch.equal(full[n], start[n])}
    assert moved == set(reached)
    moved_by_lora = {n for n in reached if not torch.allclose(merged[n], start[n], atol=1e-7)}
    assert moved_by_lora and all(".query." in n or ".value." in n for n in moved_by_lora)
    assert all(torch.equal(full[n], start[n]) for n in start if n.startswith("pooler."))
    with open(os.path.join(work, "train", "final", "model", "README.md")) as f:
        card = f.read()
    assert "in full (every weight trained)" in card and "- lora" not in card


def _average_two_processes(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(3,), (2, 2), (7,), (1,)]]
    for i, p in enumerate(params):
        if not (rank == 1 and i == 2):  # rank 1's batch did not reach parameter 2
            p.grad = torch.full(p.shape, float(10 * rank + i))
    b3.train.average_gradients(params, 2, bucket_values=5)  # buckets [3], [4], [7], [1]
    torch.save([p.grad for p in params], f"{out}-{rank}.pt")
    torch.distributed.destroy_process_group()


def test_gradients_are_averaged_bucket_by_bucket_over_processes(tmp_path):
    out = str(tmp_path / "grads")
    torch.multiprocessing.spawn(_average_two_processes, args=(free_port(), out), nprocs=2)
    expected = [torch.full(s, v) for s, v in [((3,), 5.0), ((2, 2), 6.0), ((7,), 1.0), ((1,), 8.0)]]
    for rank in (0, 1):
        for got, want in zip(torch.load(f"{out}-{rank}.pt"), expected, strict=True):
            torch.testing.assert_close(got, want)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint_is_scraped_during_a_run(mined):
    manifest, _ = mined("metrics", steps=400, checkpointEvery=100)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "b3_jobs.train", manifest], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "B3_METRICS_PORT": str(port)})  # fmt: skip
    try:
        deadline, families = time.time() + 120, {}
        while time.time() < deadline and proc.poll() is None:
            try:
                text = (
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                    .read()
                    .decode()
                )
            except OSError:
                time.sleep(0.2)
                continue
            families = {f.name: f for f in text_string_to_metric_families(text)}
            if "b3_train_step" in families and families["b3_train_step"].samples[0].value >= 3:
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert families, "the endpoint never answered while training ran"
    for name in TRAIN_METRICS:
        assert name in families, name
    value = {f.name: f.samples[0] for f in families.values()}
    assert (
        value["b3_train_step"].labels == {"b3job": "metrics"} and value["b3_train_step"].value >= 3
    )
    assert value["b3_train_total_steps"].value == 400
    assert np.isfinite(value["b3_train_loss"].value) and value["b3_train_loss"].value > 0
    assert 0 <= value["b3_train_inbatch_accuracy"].value <= 1
    assert value["b3_train_examples_per_second"].value > 0
    buckets = [s for s in families["b3_train_step_seconds"].samples if s.name.endswith("_count")]
    assert buckets[0].value >= 3


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(mined, monkeypatch, capsys):
    manifest, work = mined("nan", steps=10, checkpointEvery=2)
    real = b3.train.compute_gradients
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss, acc, stop = real(*args, **kwargs)
        return (float("nan"), acc, stop) if calls["n"] == 5 else (loss, acc, stop)

    monkeypatch.setattr(b3.train, "compute_gradients", sometimes_nan)
    made = []
    monkeypatch.setattr(b3.train, "TrainMetrics", lambda *a, **k: made.append(b3.metrics.TrainMetrics(*a, **k)) or made[-1])
    assert main(["train", manifest]) == 1
    # the gauge holds the bad loss before training stops: B3TrainingLossNotFinite can fire
    loss = made[0].registry.get_sample_value("b3_train_loss", {"b3job": "nan"})
    assert loss is not None and np.isnan(loss)
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and "step-0000004" in err
    assert sorted(os.listdir(checkpoint_root(manifest))) == ["step-0000002", "step-0000004"]
    assert not os.path.exists(os.path.join(work, "train", "manifest.json"))


def test_missing_or_stale_artifacts_exit_2(mined, tmp_path, capsys, pairs_path):
    manifest, work = mined("stale", steps=2)
    shutil.rmtree(os.path.join(work, "partition"))
    assert main(["train", manifest]) == 2
    assert "partition stage output missing" in capsys.readouterr().err
    manifest, work = mined("changed", steps=2)
    import pyarrow.parquet as pq

    table = pq.read_table(pairs_path)
    pq.write_table(table.slice(1), pairs_path)  # the dataset lost a row after mining
    assert main(["train", manifest]) == 2
    err = capsys.readouterr().err
    assert "partition stage output" in err and "was made for another spec" in err
    assert "(rank stage: dataset file: {" in err  # the cause, named


def test_export_loads_in_sentence_transformers_and_b3_embed(mined, tmp_path, capsys):
    st = pytest.importorskip("sentence_transformers")
    manifest, work = mined("export", steps=3, learningRate=0.01, warmupRatio=0)
    assert main(["train", manifest]) == 0
    model_dir = os.path.join(work, "train", "final", "model")
    texts = ["tool for parsing fonts", "audio driver module", "a python library"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert (
        main(
            [
                "embed",
                model_dir,
                "--input",
                str(tmp_path / "texts.txt"),
                "--output",
                str(tmp_path / "e.npy"),
            ]
        )
        == 0
    )
    ours = np.load(tmp_path / "e.npy")
    theirs = st.SentenceTransformer(model_dir, device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # the export carries the trained adapter: it embeds differently from the untrained student
    from b3.spec import load_manifest
    from b3.teacher import TextEncoder

    untrained = TextEncoder(load_manifest(manifest).spec.training.student, max_length=128).encode(
        texts
    )
    assert np.abs(untrained - ours).max() > 1e-4
    assert main(["train", manifest]) == 0 and "up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one(tmp_path, tiny_spec, tiny_model_no_dropout):
    """`b3 train` with processesPerNode: 2 goes through torchrun (gloo); without dropout the
    two-process run must end with the one-process run's weights."""
    spec = {**tiny_spec, "teacher": {**tiny_spec["teacher"], "model": tiny_model_no_dropout},
            "training": {"student": tiny_model_no_dropout, "steps": 4, "learningRate": 0.01,
                         "lora": {"dropout": 0.0, "targetModules": ["query", "value"]}}}  # fmt: skip
    base = write_manifest(tmp_path, {**spec, "workDir": "base"}, "base")
    assert main(["rank", str(base)]) == 0 and main(["partition", str(base)]) == 0
    shutil.copytree(tmp_path / "base", tmp_path / "two")
    one = write_manifest(tmp_path, {**spec, "workDir": "base"}, "one")
    two = write_manifest(
        tmp_path,
        {**spec, "workDir": "two", "training": {**spec["training"], "processesPerNode": 2}},
        "two",
    )
    assert main(["train", str(one)]) == 0
    assert main(["train", str(two)]) == 0
    a = load_file(tmp_path / "base" / "train" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "train" / "final" / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    state = torch.load(
        os.path.join(checkpoint_root(str(two)), "step-0000004", "trainer_state.pt"),
        weights_only=True,
    )
    assert state["world_size"] == 2 and len(state["rng"]) == 2


@pytest.mark.slow
def test_full_finetuning_on_two_processes_with_gradcache_trains_like_one(tmp_path, tiny_spec, tiny_model_no_dropout):
    """Every weight trained, on two torchrun processes that embed in GradCache chunks: the
    same weights as one process taking the plain loss over the whole batch."""
    spec = {**tiny_spec, "teacher": {**tiny_spec["teacher"], "model": tiny_model_no_dropout},
            "training": {"student": tiny_model_no_dropout, "steps": 4, "learningRate": 0.001,
                         "finetuning": "full"}}  # fmt: skip
    one = write_manifest(tmp_path, {**spec, "workDir": "one"}, "one")
    assert main(["rank", str(one)]) == 0 and main(["partition", str(one)]) == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    two_training = {**spec["training"], "processesPerNode": 2, "miniBatchSize": 3}
    two = write_manifest(tmp_path, {**spec, "workDir": "two", "training": two_training}, "two")
    assert main(["train", str(one)]) == 0 and main(["train", str(two)]) == 0
    a = load_file(tmp_path / "one" / "train" / "final" / "model" / "model.safetensors")
    b = load_file(tmp_path / "two" / "train" / "final" / "model" / "model.safetensors")
    start = load_file(os.path.join(tiny_model_no_dropout, "model.safetensors"))
    assert a.keys() == b.keys() and not torch.equal(a["embeddings.word_embeddings.weight"],
                                                    start["embeddings.word_embeddings.weight"])  # fmt: skip
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("rule", ["top-p", "teacher"])
def test_false_negative_masks_reach_the_loss_in_gathered_column_order(mined, rule):
    from b3.spec import load_manifest
    from b3.train import Dist, EpochBatches, Trainer

    manifest, work = mined(rule, steps=2, falseNegatives=rule)
    # process 1 of 2: its queries against the whole global batch, then the hard negatives
    trainer = Trainer(load_manifest(manifest), Dist(rank=1, world=2, local_rank=0))
    trainer._setup_data()
    data = EpochBatches(trainer.sampler, trainer.hard, trainer.texts, trainer.positive_group,
                        0, 0, lambda texts: {"n": torch.tensor(len(texts))}, trainer.false_negatives)  # fmt: skip
    batch = trainer.sampler.batches(0)[0]
    hard = trainer.hard.sample(batch, 0, 0)
    item = data[0]
    expected = trainer.false_negatives.mask(batch[len(batch) // 2 :], np.concatenate([batch, hard]))
    assert item["mask"].shape == (len(batch) // 2, len(batch) + len(hard))
    assert item["mask"].numpy().tolist() == expected.tolist()
    assert main(["train", manifest]) == 0


def test_output_dir_takes_the_train_stage_and_an_object_store_work_dir_needs_it(mined, tmp_path):
    from b3.spec import SpecError, parse_spec

    manifest, work = mined("out", steps=2, outputDir=str(tmp_path / "ckpt"))
    assert main(["train", manifest]) == 0
    assert os.path.exists(tmp_path / "ckpt" / "train" / "final" / "model" / "config.json")
    assert os.path.exists(tmp_path / "ckpt" / "train" / "manifest.json")
    assert not os.path.exists(os.path.join(work, "train"))
    spec = {"dataset": {"uri": "s3://b/p.parquet"}, "workDir": "s3://b/run"}
    with pytest.raises(SpecError, match="set training.outputDir"):
        parse_spec(spec)
    assert parse_spec({**spec, "training": {"outputDir": "/ckpt"}}).train_dir == "/ckpt"


def _two_process_spec(tiny_spec, model: str, **mining) -> dict:
    return {**tiny_spec, "teacher": {**tiny_spec["teacher"], "model": model},
            "mining": {**tiny_spec["mining"], **mining},
            "training": {"student": model, "steps": 4, "learningRate": 0.01,
                         "lora": {"dropout": 0.0, "targetModules": ["query", "value"]}}}  # fmt: skip


@pytest.mark.slow
def test_two_processes_with_b3pp_in_a_group_too_small_match_one(tmp_path, tiny_spec, tiny_model_no_dropout):
    """80 rows per task, |B| = 16, h = 5: 80 hard negatives wanted, 64 rows left in the group.
    The sampler tops up to exactly h x |B| (the two processes gather equal shapes: no hang)
    and the two-process gradients equal the one-process ones."""
    spec = _two_process_spec(tiny_spec, tiny_model_no_dropout, hardNegatives=5)
    one = write_manifest(tmp_path, {**spec, "workDir": "one"}, "one")
    assert main(["rank", str(one)]) == 0 and main(["partition", str(one)]) == 0
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    two = write_manifest(tmp_path, {**spec, "workDir": "two",
                                    "training": {**spec["training"], "processesPerNode": 2}}, "two")  # fmt: skip
    assert main(["train", str(one)]) == 0
    started = time.time()
    assert main(["train", str(two)]) == 0
    assert time.time() - started < 240  # finished, not stuck in a collective
    a = load_file(tmp_path / "one" / "train" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "train" / "final" / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def _torchrun_per_rank(tmp_path, manifests: list, **env) -> subprocess.CompletedProcess:
    """torchrun with 2 gloo processes, process r reading manifests[r] (e.g. another outputDir:
    what a node without the shared volume sees)."""
    script = tmp_path / "per_rank.py"
    script.write_text("import os, sys\nfrom b3.cli import stage_main\n"
                      f"manifests = {[str(m) for m in manifests]!r}\n"
                      "sys.exit(stage_main('train', [manifests[int(os.environ['RANK'])]]))\n")  # fmt: skip
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})  # fmt: skip


@pytest.mark.slow
def test_two_processes_resume_the_checkpoint_rank_0_chose_or_stop_clearly(mined, tmp_path):
    manifest, work = mined("gang", steps=4, checkpointEvery=2)
    assert train_process(manifest, B3_FAULT_AT_STEP="2").returncode == -9  # a checkpoint at 2
    blind, _ = mined("blind", steps=4, checkpointEvery=2, outputDir=str(tmp_path / "empty"))
    failed = _torchrun_per_rank(tmp_path, [manifest, blind])
    assert failed.returncode != 0
    assert "which process(es) [1] cannot read" in failed.stderr
    assert "training.outputDir must be one volume" in failed.stderr

    agreed = _torchrun_per_rank(tmp_path, [manifest, manifest])
    assert agreed.returncode == 0, agreed.stderr[-3000:]
    assert "resumed from" in agreed.stderr and "step 2" in agreed.stderr
    assert os.path.exists(os.path.join(work, "train", "final", "model", "config.json"))


@pytest.mark.slow
def test_false_negatives_without_gathering_train_on_two_processes(mined):
    from b3.spec import load_manifest as load
    from b3.train import Dist, EpochBatches, Trainer

    manifest, _ = mined("local", steps=2, falseNegatives="top-p", gatherAcrossDevices=False,
                        processesPerNode=2)  # fmt: skip
    # process 1's mask covers its own columns only: its positives, then its hard negatives
    trainer = Trainer(load(manifest), Dist(rank=1, world=2, local_rank=0))
    trainer._setup_data()
    data = EpochBatches(trainer.sampler, trainer.hard, trainer.texts, trainer.positive_group, 0, 0,
                        lambda texts: {"n": torch.tensor(len(texts))}, trainer.false_negatives, gathered=False)  # fmt: skip
    batch = trainer.sampler.batches(0)[0]
    local, hard = batch[len(batch) // 2 :], trainer.hard.sample(batch, 0, 0)
    assert data[0]["mask"].shape == (len(local), len(local) + len(hard) // 2)
    assert main(["train", manifest]) == 0


def test_the_export_carries_its_prompts_and_a_model_card_with_the_eval_table(tmp_path, tiny_spec, capsys):
    """`b3 run` with prompts and a held-out split: SentenceTransformer(model) encodes with the
    training prompts by name (encode_query = `b3 embed --prompt-name query`), max length and
    similarity come along, and README.md is a model card that `b3 eval` completed."""
    st = pytest.importorskip("sentence_transformers")
    import json

    spec = {**tiny_spec, "training": {"student": tiny_spec["teacher"]["model"], "steps": 2, "maxLength": 24,
                                      "lora": {"targetModules": ["query", "value"]}},
            "dataset": {**tiny_spec["dataset"], "split": {"key": "id", "buckets": 4, "testBucket": 0},
                        "prompts": {"query": "query: ", "positive": "passage: ",
                                    "byTask": {"t1": {"query": "t1 query: "}}}}}  # fmt: skip
    manifest = write_manifest(tmp_path, spec, "prompted")
    assert main(["run", str(manifest)]) == 0
    model_dir = tmp_path / "work" / "train" / "final" / "model"
    config = json.loads((model_dir / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "query: ", "document": "passage: ", "query_t1": "t1 query: ",
                                 "document_t1": "passage: "}  # fmt: skip
    assert config["similarity_fn_name"] == "cosine" and config["default_prompt_name"] is None
    model = st.SentenceTransformer(str(model_dir), device="cpu")
    assert model.max_seq_length == 24
    texts = ["tool for parsing fonts", "audio driver module"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    for name, theirs in [("query", model.encode_query(texts)), ("document", model.encode_document(texts)),
                         ("query_t1", model.encode(texts, prompt_name="query_t1"))]:  # fmt: skip
        assert main(["embed", str(model_dir), "--input", str(tmp_path / "texts.txt"),
                     "--output", str(tmp_path / f"{name}.npy"), "--prompt-name", name]) == 0  # fmt: skip
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), theirs, atol=1e-5)
    plain = model.encode(texts)
    assert np.abs(plain - np.load(tmp_path / "query.npy")).max() > 1e-4  # the prompt mattered
    assert main(["embed", str(model_dir), "--input", str(tmp_path / "texts.txt"), "--output",
                 str(tmp_path / "x.npy"), "--prompt-name", "passage"]) == 2  # fmt: skip
    assert "the model has prompts query, document, query_t1, document_t1" in capsys.readouterr().err

    card = (model_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "LoRA r=8, alpha=16, dropout=0.05 on query, value" in card and "p=2 (skipped top ranks), m=8" in card
    assert "| `query_t1` | `t1 query: ` |" in card and "2 steps" in card
    results = json.loads((tmp_path / "work" / "eval" / "results.json").read_text())
    trained = results["models"]["student (trained)"]
    assert f"| student (trained) | {trained['ndcg@10']:.4f} |" in card  # b3 eval's own numbers
    assert "Not evaluated yet" not in card
