"""The B3-vs-random experiment's own logic (bench/b3_vs_random.py): the data it trains and
evaluates on, and how it compares arms. The trainings themselves are the stages' tests."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import load_bench, write_manifest

from b3.data import load_pairs, split_bucket
from b3.evaluation import Ranks, paired_bootstrap, per_query
from b3.spec import load_manifest

experiment = load_bench("b3_vs_random")


def test_validation_never_sees_the_test_bucket(tmp_path, tiny_spec):
    manifest = write_manifest(tmp_path, {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source", "buckets": 4}}})
    job = load_manifest(manifest)
    test_ids = set(load_pairs(job.spec.dataset, 1, split="test").ids)
    valid = experiment.subset(job, ["task0", "task1"], 4, True, tmp_path / "v")
    train = load_pairs(valid.spec.dataset, 1)
    held = load_pairs(valid.spec.dataset, 1, split="test")
    assert valid.spec.dataset.split.test_bucket == 1
    seen = set(train.ids) | set(held.ids)
    assert not seen & test_ids  # the test bucket's rows are gone from training and validation
    assert set(train.tasks) | set(held.tasks) == {"task0", "task1"}
    sources = load_manifest(manifest).spec.dataset  # the held-out rows are exactly bucket 1
    import pyarrow.parquet as pq

    table = pq.read_table(sources.uri)
    bucket = dict(zip(table.column("id").to_pylist(), split_bucket(table.column("source").to_pylist(), 4), strict=True))
    assert {bucket[i] for i in held.ids} == {1} and 1 not in {bucket[i] for i in train.ids}


def test_a_rerun_on_the_same_rows_keeps_the_subset_file_and_so_the_mining(tmp_path, tiny_spec):
    manifest = write_manifest(tmp_path, {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source", "buckets": 4}}})
    first = experiment.subset(load_manifest(manifest), ["task0"], 4, True, tmp_path / "v")
    mtime = Path(first.spec.dataset.uri).stat().st_mtime_ns
    again = experiment.subset(load_manifest(manifest), ["task0"], 4, True, tmp_path / "v")
    assert Path(again.spec.dataset.uri).stat().st_mtime_ns == mtime
    other = experiment.subset(load_manifest(manifest), ["task1"], 4, True, tmp_path / "v")
    assert set(load_pairs(other.spec.dataset, 1).tasks) == {"task1"}


def test_subset_refuses_unknown_tasks(tmp_path, tiny_spec):
    manifest = write_manifest(tmp_path, {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source"}}})
    with pytest.raises(SystemExit, match=r"\['nope'\] are not tasks"):
        experiment.subset(load_manifest(manifest), ["task0", "nope"], 10, False, tmp_path / "s")


def test_comparisons_bootstrap_the_seed_average_against_each_random_arm():
    tasks = np.array(["a", "a", "b", "b"], dtype=object)

    def ranks(mixed, task):
        return Ranks(mixed=np.array(mixed), task=np.array(task), tasks=tasks, corpus=4)

    per_seed = {
        ("random", 32): [ranks([1, 3, 2, 5], [1, 2, 1, 3]), ranks([2, 3, 1, 4], [1, 1, 1, 2])],
        ("random-same-task", 32): [ranks([2, 2, 2, 2], [1, 1, 1, 1])],
        ("b3", 32): [ranks([1, 1, 2, 2], [1, 1, 1, 1]), ranks([1, 2, 1, 1], [1, 1, 1, 1])],
    }
    rows = experiment.comparisons(per_seed, resamples=500)
    pairs = {(r["arm"], r["baseline"]) for r in rows}
    # each arm once against each random arm; the two baselines once, not both ways
    assert pairs == {("b3", "random"), ("b3", "random-same-task"), ("random-same-task", "random")}
    row = next(r for r in rows if (r["arm"], r["baseline"]) == ("b3", "random"))
    b3 = np.mean([per_query(r.mixed)["ndcg@10"] for r in per_seed[("b3", 32)]], axis=0)
    rnd = np.mean([per_query(r.mixed)["ndcg@10"] for r in per_seed[("random", 32)]], axis=0)
    assert row["mixed"] == paired_bootstrap(rnd, b3, resamples=500)
    # per task by hand: b3 ranks every query first (nDCG 1); random's seed averages are
    # q0 1, q1 (1/log2(3) + 1)/2, q2 1, q3 (ranks 3 and 2) (1/2 + 1/log2(3))/2
    gain = np.array([0, 1 - (1 / np.log2(3) + 1) / 2, 0, 1 - (1 / 2 + 1 / np.log2(3)) / 2])
    assert row["per_task_micro"]["difference"] == pytest.approx(gain.mean())
    assert row["per_task_macro"]["difference"] == pytest.approx((gain[:2].mean() + gain[2:].mean()) / 2)
    assert row["seeds"] == 2


def test_plan_puts_b3_plus_plus_at_its_own_batch_size():
    arms = experiment.plan(["random", "b3:teacher", "b3++"], [32, 64], 64, 5)
    assert [(a["arm"], a["batch_size"]) for a in arms] == [
        ("random", 32), ("b3:teacher", 32), ("random", 64), ("b3:teacher", 64), ("b3++ h=5", 64)]
    assert arms[1]["false_negatives"] == "teacher" and arms[-1]["hard_negatives"] == 5


def test_baselines_from_an_earlier_run_must_share_its_test_queries(tmp_path):
    tasks = np.array(["a", "b"], dtype=object)
    earlier = Ranks(mixed=np.array([1, 2]), task=np.array([1, 1]), tasks=tasks, corpus=2)
    for arm in experiment.BASELINES:
        path = tmp_path / "seed0" / f"{arm}-32" / "eval.npz"
        path.parent.mkdir(parents=True)
        np.savez(path, mixed=earlier.mixed, task=earlier.task, tasks=earlier.tasks, corpus=earlier.corpus)
    found = experiment.earlier_baselines(tmp_path, [0], [32], earlier)
    assert set(found) == {("random", 32), ("random-same-task", 32)}
    assert found[("random", 32)][0].mixed.tolist() == [1, 2]
    other = Ranks(mixed=np.array([1]), task=np.array([1]), tasks=tasks[:1], corpus=1)
    with pytest.raises(SystemExit, match="other test queries"):
        experiment.earlier_baselines(tmp_path, [0], [32], other)
    with pytest.raises(SystemExit, match="no evaluation at"):
        experiment.earlier_baselines(tmp_path, [0, 1], [32], earlier)


def test_an_evaluation_is_reused_only_for_the_model_it_was_made_for(tmp_path, tiny_spec, monkeypatch):
    """Two learning rates in one --work train two models into the same arm folder: the second
    must be evaluated, not read from the first's cache (it was, and both reported one nDCG)."""
    made = []

    def rank_encoder(encoder, pairs, prompts):
        made.append(encoder)
        return Ranks(mixed=np.array([len(made)]), task=np.array([1]), tasks=np.array(["a"], dtype=object), corpus=1)

    monkeypatch.setattr(experiment, "TextEncoder", lambda model, **kw: model)
    monkeypatch.setattr(experiment, "rank_encoder", rank_encoder)
    job = load_manifest(write_manifest(tmp_path, {**tiny_spec, "dataset": {**tiny_spec["dataset"], "split": {"key": "source"}}}))
    cache = tmp_path / "arm" / "eval.npz"
    assert experiment.evaluate("m", job, [1], cache, trained="lr-5e-5").mixed.tolist() == [1]
    assert experiment.evaluate("m", job, [1], cache, trained="lr-5e-5").mixed.tolist() == [1]  # reused
    assert experiment.evaluate("m", job, [1], cache, trained="lr-2e-4").mixed.tolist() == [2]
    untrained = tmp_path / "untrained.npz"
    assert experiment.evaluate("student-a", job, [1], untrained).mixed.tolist() == [3]
    assert experiment.evaluate("student-a", job, [1], untrained).mixed.tolist() == [3]
    assert experiment.evaluate("student-b", job, [1], untrained).mixed.tolist() == [4]


def test_the_training_curve_averages_each_epochs_log_lines_by_their_steps():
    curve = experiment.TrainingCurve()
    lines = [{"step": 1, "epoch": 0, "accuracy": 0.2, "loss": 3.0, "steps_averaged": 1},
             {"step": 10, "epoch": 0, "accuracy": 0.5, "loss": 2.0, "steps_averaged": 9},
             {"step": 12, "epoch": 1, "accuracy": 0.9, "loss": 1.0, "steps_averaged": 2}]  # fmt: skip
    for line in lines:
        curve.emit(logging.makeLogRecord({"msg": json.dumps(line)}))
    curve.emit(logging.makeLogRecord({"msg": "resuming from step-10"}))  # not a curve line
    assert curve.by_epoch() == [{"epoch": 0, "steps": 10, "accuracy": 0.47, "loss": 2.1},
                                {"epoch": 1, "steps": 2, "accuracy": 0.9, "loss": 1.0}]  # fmt: skip


def test_the_training_curve_reads_the_trainers_own_log_lines(tmp_path, tiny_spec):
    """The trainer's JSON lines are what the curve parses: a real run's steps all show up."""
    from b3.stages import partition_stage, rank_stage
    from b3.train import train_stage

    spec = {**tiny_spec, "workDir": str(tmp_path / "work"), "training": {**tiny_spec["training"], "steps": 12}}
    job = load_manifest(write_manifest(tmp_path, spec))
    rank_stage(job), partition_stage(job)
    curve = experiment.TrainingCurve()
    logger = logging.getLogger("b3.train")
    logger.addHandler(curve)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        train_stage(job, env={})
    finally:
        logger.removeHandler(curve)
        logger.setLevel(level)
    epochs = curve.by_epoch()
    assert sum(e["steps"] for e in epochs) == 12 and [e["epoch"] for e in epochs] == list(range(len(epochs)))
    assert all(0 <= e["accuracy"] <= 1 and e["loss"] > 0 for e in epochs)
