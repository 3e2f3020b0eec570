"""The mining stages end to end through the CLI on a tiny model: artifacts, skip on rerun,
nothing recomputed after a failure, and exit code 2 for every kind of bad input."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_pairs, write_manifest

import b3.stages
from b3.artifacts import Artifacts
from b3.cli import main
from b3.spec import load_manifest
from b3.storage import WorkDir


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_rank_partition_inspect(tmp_path, tiny_spec, capsys):
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("rank", manifest) == 0
    assert run("partition", manifest) == 0
    capsys.readouterr()
    assert run("inspect", manifest, "--json") == 0
    result = json.loads(capsys.readouterr().out)

    work = WorkDir(str(tmp_path / "work"))
    emb = work.read_arrow("rank", "embeddings.arrow")
    assert emb.num_rows == 240 and emb.schema.field("query").type == pa.list_(pa.float16(), 32)
    topk = work.read_parquet("rank", "topk.parquet").to_pydict()
    tasks = np.asarray(topk["task"])
    pos_group = np.asarray(topk["positive_group"])
    for row, neighbors in enumerate(topk["neighbors"]):
        assert len(neighbors) == 10 and row not in neighbors
        assert (tasks[neighbors] == tasks[row]).all()  # ranked within its task
        assert (pos_group[neighbors] != pos_group[row]).all()  # never its own positive's duplicates
        assert all(np.diff(topk["scores"][row]) <= 1e-6)
    clusters = work.read_parquet("partition", "clusters.parquet").to_pydict()
    sizes = np.bincount(clusters["cluster"])
    assert (sizes == 4).all()  # 80 rows per task, K = 4
    by_cluster = {}
    for c, t in zip(clusters["cluster"], clusters["task"], strict=True):
        by_cluster.setdefault(c, set()).add(t)
    assert all(len(t) == 1 for t in by_cluster.values())
    stats = work.read_json("partition", "stats.json")
    assert stats["communities"] == 60 and 0 < stats["s_edges_inside_share"] <= 1
    assert result["batches"]["b3"]["count"] == 15
    assert result["batches"]["b3"]["topk_negative"] > result["batches"]["random"]["topk_negative"]

    # a second run finds both stages done
    assert run("rank", manifest) == 0 and run("partition", manifest) == 0
    assert capsys.readouterr().out.count("up to date") == 2
    # a new cluster size re-partitions without re-ranking
    changed = write_manifest(
        tmp_path, {**tiny_spec, "mining": {**tiny_spec["mining"], "clusterSize": 8}}
    )
    assert run("rank", changed) == 0 and run("partition", changed) == 0
    out = capsys.readouterr().out
    assert "rank: up to date" in out and "partition: done" in out


def test_a_failed_ranking_keeps_the_embeddings(tmp_path, tiny_spec, monkeypatch):
    manifest = write_manifest(tmp_path, tiny_spec)

    def broken(*args, **kwargs):
        raise RuntimeError("node lost")

    monkeypatch.setattr(b3.stages, "rank_groups", broken)
    with pytest.raises(RuntimeError, match="node lost"):
        run("rank", manifest)
    work = WorkDir(str(tmp_path / "work"))
    assert work.exists("rank", "embeddings.arrow") and not work.exists("rank", "manifest.json")
    monkeypatch.undo()

    def no_embedding(*args, **kwargs):
        raise AssertionError("embeddings were computed again")

    monkeypatch.setattr(b3.stages, "embed_texts", no_embedding)
    assert run("rank", manifest) == 0


def test_tiny_tasks_are_pooled_and_small_windows_clamped(tmp_path, tiny_spec, capsys):
    table = make_pairs(120, tasks=2)
    tasks = table.column("task").to_pylist()
    tasks[:6] = ["rare"] * 6  # a task far smaller than one batch
    pq.write_table(table.set_column(3, "task", pa.array(tasks)), tmp_path / "p.parquet")
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "uri": str(tmp_path / "p.parquet")},
            "mining": {**tiny_spec["mining"], "p": 10, "m": 60}}  # fmt: skip
    manifest = write_manifest(tmp_path, spec)
    assert run("rank", manifest) == 0 and run("partition", manifest) == 0
    out = capsys.readouterr().out
    assert "joined the smallest task" in out and "window p=" in out


BAD_INPUTS = [
    ("missing column", lambda t: t.drop_columns(["positive"]), {}, "missing column(s) 'positive'"),
    (
        "empty text",
        lambda t: t.set_column(1, "query", pa.array([""] + t.column("query").to_pylist()[1:])),
        {},
        "null or empty 'query'",
    ),
    ("too few rows", lambda t: t.slice(0, 12), {}, "12 train rows, fewer than one batch"),
    (
        "window too large",
        lambda t: t.slice(0, 40),
        {"mining": {"p": 30, "m": 100, "clusterSize": 4, "batchSize": 16}},
        "mining.p + mining.m (130) must be smaller than the number of candidates (39",
    ),
    (
        "bad manifest",
        lambda t: t,
        {"mining": {"clusterSize": 5, "batchSize": 16}},
        "clusterSize (5) must divide batchSize (16)",
    ),
]


@pytest.mark.parametrize(
    ("name", "mutate", "patch", "needle"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_exits_2_naming_the_problem(
    tmp_path, tiny_spec, capsys, monkeypatch, name, mutate, patch, needle
):
    pq.write_table(mutate(make_pairs(60)), tmp_path / "p.parquet")
    log = tmp_path / "termination-log"
    monkeypatch.setenv("B3_TERMINATION_LOG", str(log))
    spec = {
        **tiny_spec,
        "dataset": {**tiny_spec["dataset"], "uri": str(tmp_path / "p.parquet")},
        **patch,
    }
    assert run("rank", write_manifest(tmp_path, spec)) == 2
    assert needle in capsys.readouterr().err
    assert needle in log.read_text()


def test_unreadable_dataset_and_missing_stage_exit_2(tmp_path, tiny_spec, capsys):
    (tmp_path / "p.parquet").write_bytes(b"\x00garbage")
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "uri": str(tmp_path / "p.parquet")}}
    manifest = write_manifest(tmp_path, spec)
    assert run("rank", manifest) == 2
    assert "cannot read it as parquet" in capsys.readouterr().err
    assert run("partition", manifest) == 2
    assert "rank stage output missing" in capsys.readouterr().err
    assert run("inspect", manifest) == 2


def test_stage_program_in_a_subprocess_writes_the_termination_log(tmp_path, tiny_spec):
    pq.write_table(make_pairs(60).drop_columns(["task"]), tmp_path / "p.parquet")
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "uri": str(tmp_path / "p.parquet")}}
    log = tmp_path / "termination-log"
    proc = subprocess.run(
        [sys.executable, "-m", "b3_jobs.rank", str(write_manifest(tmp_path, spec))],
        capture_output=True, text=True, env={**os.environ, "B3_TERMINATION_LOG": str(log)}, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "missing column(s) 'task' (task)" in log.read_text()


def test_validate_prints_a_summary_or_the_resolved_spec(tmp_path, tiny_spec, capsys):
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("validate", manifest) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("test-job: valid\n") and "clusterSize=4 batchSize=16" in summary
    assert f"workDir:    {tmp_path / 'work'}" in summary
    assert run("validate", manifest, "--json") == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["spec"]["workDir"] == str(tmp_path / "work")
    assert load_manifest(tmp_path / "test-job.yaml").spec.mining.cluster_size == 4
    given = {**tiny_spec, "teacher": {"embeddings": "emb.parquet"},
             "dataset": {**tiny_spec["dataset"], "columns": {**tiny_spec["dataset"]["columns"], "queryImage": "image"}}}  # fmt: skip
    assert run("validate", write_manifest(tmp_path, given)) == 0
    summary = capsys.readouterr().out
    assert f"teacher:    embeddings from {tmp_path / 'emb.parquet'} (no teacher model runs)" in summary
    assert "id=id queryImage=image\n" in summary


def test_overrides_change_the_spec_and_are_validated_like_the_manifest(tmp_path, tiny_spec, capsys):
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("validate", manifest, "--json", "training.steps=7", "mining.clusterSize=8",
               "training.lora.targetModules=[query, value]", "spec.teacher.maxLength=16") == 0  # fmt: skip
    spec = json.loads(capsys.readouterr().out)["spec"]
    assert spec["training"]["steps"] == 7 and spec["mining"]["clusterSize"] == 8
    assert spec["training"]["lora"]["targetModules"] == ["query", "value"] and spec["teacher"]["maxLength"] == 16
    assert spec["workDir"] == str(tmp_path / "work")  # relative paths still resolve against the manifest
    for override, named in [("training.stepz=5", "spec.training.stepz: unknown field"),
                            ("training.steps=-1", "spec.training.steps: Input should be greater than or equal to 1"),
                            ("mining.clusterSize=5", "clusterSize"),
                            ("steps", "override 'steps': expected KEY=VALUE"),
                            ("mining.batchSize.x=1", "spec.mining.batchSize is not a mapping")]:  # fmt: skip
        for command in ("validate", "run", "rank"):
            assert run(command, manifest, override) == 2, (command, override)
            assert named in capsys.readouterr().err, (command, override)


def test_overrides_reach_every_stage_and_from_or_force_run_stages_again(tmp_path, tiny_spec, capsys, caplog):
    """The stages read the overridden spec (the rank stage sees m=8 through its fingerprint);
    --from partition runs partition and train again, --force all three; train from step 0."""
    from b3.artifacts import Artifacts

    caplog.set_level(logging.INFO)
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("run", manifest, "mining.m=6", "training.steps=2") == 0
    job = load_manifest(manifest, ["mining.m=6", "training.steps=2"])
    artifacts = Artifacts(job.spec)
    assert all(artifacts.done(stage) for stage in ("rank", "partition", "train"))
    assert artifacts.done("rank")["inputs"]["mining.m"] == 6
    assert not Artifacts(load_manifest(manifest).spec).done("rank")  # the file's own spec: not run
    finished = {s: artifacts.done(s)["started_at"] + str(artifacts.done(s)["seconds"]) for s in ("rank", "partition", "train")}
    capsys.readouterr()
    assert run("run", manifest, "mining.m=6", "training.steps=2", "--from", "partition") == 0
    out = capsys.readouterr().out
    assert "rank: up to date" in out and "partition: done" in out and "train: done" in out
    assert artifacts.done("rank")["started_at"] + str(artifacts.done("rank")["seconds"]) == finished["rank"]
    assert "global batch" in caplog.text and "resumed from" not in caplog.text  # its checkpoints went
    assert run("run", manifest, "mining.m=6", "training.steps=2", "--force") == 0
    assert "up to date" not in capsys.readouterr().out


@pytest.mark.slow
def test_rank_stage_on_ray_workers_matches_in_process(tmp_path, tiny_spec, monkeypatch):
    """workers: 2 embeds shards and ranks units as Ray tasks; the artifacts must match."""
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = write_manifest(tmp_path, {**tiny_spec, "workDir": "local"}, name="local")
    distributed = write_manifest(
        tmp_path, {**tiny_spec, "workDir": "ray", "rank": {"workers": 2}}, name="ray"
    )
    assert run("rank", local) == 0
    try:
        assert run("rank", distributed) == 0
    finally:
        ray.shutdown()
    a = WorkDir(str(tmp_path / "local")).read_parquet("rank", "topk.parquet")
    b = WorkDir(str(tmp_path / "ray")).read_parquet("rank", "topk.parquet")
    assert a.column("neighbors").to_pylist() == b.column("neighbors").to_pylist()
    np.testing.assert_allclose(
        np.concatenate(a.column("scores").to_pylist()),
        np.concatenate(b.column("scores").to_pylist()),
        atol=2e-3,
    )


def test_b3_run_does_every_stage_then_skips_them(tmp_path, tiny_spec, capsys, monkeypatch):
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source"}},
            "training": {**tiny_spec["training"], "steps": 3, "maxLength": 32, "lora": {"targetModules": ["query", "value"]}}}  # fmt: skip
    manifest = write_manifest(tmp_path, spec)
    assert run("run", manifest) == 0
    out = capsys.readouterr().out
    assert "rank: done" in out and "partition: done" in out and "train: done" in out
    assert "student (trained)" in out and "run test-job: rank" in out
    report = WorkDir(str(tmp_path / "work")).read_json("eval", "results.json")
    assert report["split"]["key"] == "source" and set(report["models"]) == {
        "teacher",
        "student (untrained)",
        "student (trained)",
    }
    # the trained student is compared with the untrained one (the teacher is the same model)
    assert set(report["comparisons"]) == {"student (trained)"}
    gain = report["comparisons"]["student (trained)"]["mixed"]
    models = report["models"]
    assert gain["difference"] == pytest.approx(
        models["student (trained)"]["ndcg@10"] - models["student (untrained)"]["ndcg@10"])
    assert gain["low"] <= gain["difference"] <= gain["high"]
    ranks = WorkDir(str(tmp_path / "work")).read_parquet("eval", "ranks.parquet")
    assert ranks.num_rows == models["teacher"]["queries"]
    task_ranks = np.array(ranks.column("student (trained)/task").to_pylist())
    assert (task_ranks <= np.array(ranks.column("student (trained)/mixed").to_pylist())).all()
    assert run("run", manifest) == 0
    assert capsys.readouterr().out.count("up to date") == 3  # rank, partition, train
    # eval embeds the test split once per distinct model: the teacher is the untrained student
    import b3.teacher

    encoders = []
    real_encoder = b3.teacher.TextEncoder

    def counting_encoder(model, *args, **kwargs):
        encoders.append(model)
        return real_encoder(model, *args, **kwargs)

    monkeypatch.setattr(b3.teacher, "TextEncoder", counting_encoder)
    assert run("eval", manifest) == 0
    assert len(encoders) == 2, encoders


def test_b3_run_stops_at_the_first_failing_stage(tmp_path, tiny_spec, capsys):
    pq.write_table(make_pairs(10), tmp_path / "p.parquet")  # fewer rows than a batch: rank's own check
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "uri": str(tmp_path / "p.parquet")}}
    assert run("run", write_manifest(tmp_path, spec)) == 2
    out = capsys.readouterr().out
    assert "rank" in out and "(exit 2)" in out and "partition" not in out.split("run test-job:")[1]


def test_b3_run_checks_every_stage_before_the_first(tmp_path, tiny_spec, capsys):
    pq.write_table(make_pairs(60).drop_columns(["task"]), tmp_path / "p.parquet")
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "uri": str(tmp_path / "p.parquet")},
            "training": {**tiny_spec["training"], "student": str(tmp_path / "no-such-student")}}  # fmt: skip
    assert run("run", write_manifest(tmp_path, spec)) == 2
    captured = capsys.readouterr()
    assert "run test-job:" not in captured.out  # no stage started
    assert "cannot start; nothing was computed" in captured.err
    assert "dataset.uri: dataset" in captured.err and "missing column(s) 'task' (task)" in captured.err
    assert f"training.student: '{tmp_path}/no-such-student' not found" in captured.err


def test_every_command_refuses_bad_input_with_exit_2(tmp_path, tiny_spec, capsys):
    no_split = write_manifest(tmp_path, tiny_spec, "nosplit")
    assert run("eval", no_split) == 2
    assert "dataset.split: not set, so there is no held-out split" in capsys.readouterr().err
    with_split = write_manifest(tmp_path, {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source"}}}, "split")
    assert run("eval", with_split, "--baseline", "nobody") == 2
    assert "--baseline 'nobody' is not one of the models: teacher, student (untrained)" in capsys.readouterr().err
    multi_node = write_manifest(
        tmp_path, {**tiny_spec, "training": {**tiny_spec["training"], "nodes": 2}}, "multinode"
    )
    assert run("train", multi_node) == 2
    assert "training.nodes > 1 runs on Kubernetes" in capsys.readouterr().err
    bad = write_manifest(
        tmp_path, {**tiny_spec, "mining": {"clusterSize": 3, "batchSize": 16}}, "bad"
    )
    for command in ("run", "train", "eval", "validate", "inspect"):
        assert run(command, bad) == 2
        assert f"{command}: invalid B3Job" in capsys.readouterr().err


def test_held_out_rows_never_reach_the_mining_artifacts(tmp_path, tiny_spec, pairs_path):
    import pyarrow.parquet as pq_

    from b3.data import split_bucket

    spec = {
        **tiny_spec,
        "dataset": {**tiny_spec["dataset"], "split": {"key": "source", "buckets": 4}},
    }
    manifest = write_manifest(tmp_path, spec)
    assert run("rank", manifest) == 0 and run("partition", manifest) == 0
    table = pq_.read_table(pairs_path)
    held_out = set(
        np.asarray(table.column("id").to_pylist())[
            split_bucket(table.column("source").to_pylist(), 4) == 0
        ]
    )
    assert held_out  # the fixture has test rows
    work = WorkDir(str(tmp_path / "work"))
    topk = work.read_parquet("rank", "topk.parquet")
    clusters = work.read_parquet("partition", "clusters.parquet")
    emb = work.read_arrow("rank", "embeddings.arrow")
    for artifact in (topk, clusters, emb):
        ids = set(artifact.column("id").to_pylist())
        assert not ids & held_out and len(ids) == 240 - len(held_out)
    rows_ranked = np.concatenate(topk.column("neighbors").to_pylist())
    assert rows_ranked.max() < topk.num_rows  # neighbours index training rows only


def test_b3_run_killed_in_training_finishes_on_the_next_run(tmp_path, tiny_spec):
    """SIGKILL `b3 run` right after training step 6 (checkpoints every 4): the next `b3 run`
    skips rank and partition, resumes training from step 4 and evaluates."""
    spec = {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source"}},
            "training": {**tiny_spec["training"], "steps": 10, "checkpointEvery": 4,
                         "lora": {"targetModules": ["query", "value"]}}}  # fmt: skip
    manifest = str(write_manifest(tmp_path, spec))

    def b3_run(**env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "b3.cli", "run", manifest], capture_output=True,
                              text=True, env={**os.environ, **env}, timeout=600)  # fmt: skip

    killed = b3_run(B3_FAULT_AT_STEP="6")
    assert killed.returncode == -9, killed.stderr[-2000:]
    work = WorkDir(str(tmp_path / "work"))
    checkpoints = Artifacts(load_manifest(manifest).spec).checkpoint_root()
    assert os.listdir(checkpoints) == ["step-0000004"]
    assert not work.exists("train", "manifest.json") and not work.exists("eval", "results.json")

    finished = b3_run()
    assert finished.returncode == 0, finished.stderr[-2000:]
    out, logs = finished.stdout, finished.stderr
    assert "rank: up to date" in out and "partition: up to date" in out
    assert "resumed from" in logs and "step-0000004" in logs
    assert "train: done" in out and "student (trained)" in out
    assert work.read_json("train", "manifest.json")["summary"]["steps"] == 10
    assert "student (trained)" in work.read_json("eval", "results.json")["models"]


def test_stage_pods_serve_progress_partition_quality_and_hardness(tmp_path, tiny_spec, monkeypatch):
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from b3 import stage_metrics
    from b3.cli import stage_main

    monkeypatch.setattr(stage_metrics, "_job", None)  # restored after the test
    manifest = write_manifest(tmp_path, tiny_spec)
    assert main(["rank", str(manifest)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("B3_METRICS_PORT", str(port))
    monkeypatch.setenv("B3_METRICS_LINGER_SECONDS", "0")
    assert stage_main("partition", [str(manifest)]) == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    stats = WorkDir(str(tmp_path / "work")).read_json("partition", "stats.json")
    job = (("b3job", "test-job"),)
    assert samples[("b3_partition_edge_cut_share", job)] == pytest.approx(stats["edge_cut_share"])
    assert samples[("b3_partition_communities", job)] == stats["communities"]
    step = (("b3job", "test-job"), ("step", "partition"))
    assert (
        samples[("b3_stage_progress_done", step)] == samples[("b3_stage_progress_total", step)] > 0
    )
    b3 = samples[("b3_batch_hardness", (("b3job", "test-job"), ("batches", "b3")))]
    rnd = samples[("b3_batch_hardness", (("b3job", "test-job"), ("batches", "random")))]
    assert b3 > rnd  # mined batches are harder by the teacher's measure


def test_a_saved_hugging_face_dataset_mines_like_its_parquet_file(tmp_path, tiny_spec, pairs_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset(pq.read_table(pairs_path)).save_to_disk(str(tmp_path / "saved"))
    from_file = write_manifest(tmp_path, {**tiny_spec, "workDir": "file"}, "file")
    from_folder = write_manifest(tmp_path, {**tiny_spec, "workDir": "folder",
                                            "dataset": {**tiny_spec["dataset"], "uri": "saved"}}, "folder")  # fmt: skip
    for manifest in (from_file, from_folder):
        assert run("rank", manifest) == 0 and run("partition", manifest) == 0
    clusters = [pq.read_table(tmp_path / w / "partition" / "clusters.parquet") for w in ("file", "folder")]
    assert clusters[0].equals(clusters[1])
    assert run("rank", from_folder) == 0  # its identity is stable: up to date


def test_the_partition_stage_with_kaminpar(tmp_path, tiny_spec, monkeypatch, capsys):
    """mining.partitioner: kaminpar gives the same contract (exact K, one short community),
    recorded in stats; where kaminpar is not installed the stage refuses at once, exit 2."""
    pytest.importorskip("kaminpar")
    spec = {**tiny_spec, "mining": {**tiny_spec["mining"], "partitioner": "kaminpar"}}
    manifest = write_manifest(tmp_path, spec)
    assert run("rank", manifest) == 0 and run("partition", manifest) == 0
    stats = json.loads((tmp_path / "work" / "partition" / "stats.json").read_text())
    assert stats["partitioner"] == "kaminpar" and stats["community_size"]["max"] == 4
    sizes = np.bincount(pq.read_table(tmp_path / "work" / "partition" / "clusters.parquet").column("cluster").to_numpy())
    assert (sizes == 4).all()  # 240 rows in groups of multiples of 4
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kaminpar" else real(name, *a))
    other = write_manifest(tmp_path, {**spec, "workDir": "other"}, "other")
    assert run("rank", other) == 0
    capsys.readouterr()
    assert run("partition", other) == 2
    assert "mining.partitioner: kaminpar is not installed here" in capsys.readouterr().err


def test_a_damaged_rank_output_stops_the_partition_stage_with_its_reason(tmp_path, tiny_spec, capsys):
    """A neighbour id outside topk.parquet's rows would reach the partitioner as an invalid
    graph (KaMinPar segfaults on one): exit 2 naming the file and the id, rank kept."""
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("rank", manifest) == 0
    path = tmp_path / "work" / "rank" / "topk.parquet"
    table = pq.read_table(path)
    lists = table.column("neighbors").combine_chunks()
    flat = lists.flatten().to_numpy().copy()
    flat[7] = table.num_rows + 3
    damaged = pa.ListArray.from_arrays(lists.offsets, pa.array(flat, lists.type.value_type))
    pq.write_table(table.set_column(table.schema.get_field_index("neighbors"), "neighbors", damaged), path)
    capsys.readouterr()
    assert run("partition", manifest) == 2
    err = capsys.readouterr().err
    assert f"neighbour id {table.num_rows + 3} is not a row of its {table.num_rows} rows" in err
    assert "topk.parquet" in err and "run `b3 rank` again" in err
    assert path.exists() and not (tmp_path / "work" / "partition" / "clusters.parquet").exists()


def test_a_large_group_logs_each_step_of_its_partition(tmp_path, tiny_spec, monkeypatch, caplog):
    """The partition bar moves once per group; a group of LOG_GROUP_ROWS or more says in the
    log when its graph is built and when it is cut, so a long cut is not a silent one."""
    manifest = write_manifest(tmp_path, tiny_spec)
    assert run("rank", manifest) == 0
    monkeypatch.setattr(b3.stages, "LOG_GROUP_ROWS", 50)
    with caplog.at_level(logging.INFO, logger="b3.stages"):
        assert run("partition", manifest) == 0
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("partition: group")]
    groups = json.loads((tmp_path / "work" / "partition" / "stats.json").read_text())["groups"]
    assert len(steps) == 2 * groups  # every tiny group has more than 50 rows
    assert "80 rows: graph of" in steps[0] and "kaminpar with 1 thread(s)" in steps[0]
    assert "cut in" in steps[1] and "edge cut" in steps[1]
