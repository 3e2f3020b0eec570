"""The job spec: defaults, validation messages, manifest loading, CRD schema."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from b3.spec import (
    SpecError,
    load_manifest,
    parse_manifest,
    parse_spec,
    spec_openapi_schema,
    spec_to_dict,
)

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"dataset": {"uri": "pairs.parquet"}, "workDir": "work"}


def errors_of(spec: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    return info.value.errors


def test_defaults_follow_the_paper():
    spec = parse_spec(MINIMAL)
    assert (spec.mining.p, spec.mining.m, spec.mining.cluster_size) == (30, 100, 16)
    assert spec.mining.per_task and not spec.mining.mix_tasks and spec.mining.edges == "mutual"
    assert spec.mining.hard_negatives == 0
    assert spec.training.temperature == 0.02
    assert (spec.training.lora.r, spec.training.lora.alpha) == (8, 16)
    assert spec.teacher.pooling == "mean"


def test_round_trip_through_the_manifest_form():
    spec = parse_spec(
        {**MINIMAL, "mining": {"clusterSize": 16, "batchSize": 128, "hardNegatives": 5}}
    )
    as_dict = spec_to_dict(spec)
    assert as_dict["mining"]["clusterSize"] == 16  # camelCase, like a Kubernetes manifest
    assert parse_spec(as_dict) == spec


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        (
            {"mining": {"clusterSize": 24, "batchSize": 64}},
            "spec.mining: clusterSize (24) must divide batchSize (64)",
        ),
        (
            {"training": {"temperature": 0}},
            "spec.training.temperature: Input should be greater than 0",
        ),
        ({"mining": {"p": -1}}, "spec.mining.p: Input should be greater than or equal to 0"),
        ({"dataset": {"uri": "x", "colums": {}}}, "spec.dataset.colums: unknown field"),
        (
            {"dataset": {"uri": "x", "split": {"key": "id", "buckets": 5, "testBucket": 5}}},
            "testBucket (5) must be smaller than buckets (5)",
        ),
        ({"training": {"steps": 10, "epochs": 1}}, "spec.training: give steps or epochs, not both"),
        ({"mining": {"perTask": False}}, "set mixTasks true, or keep perTask true"),
        (
            {"mining": {"partitioner": "metis", "partitionerThreads": 2}},
            "partitionerThreads (2) needs partitioner kaminpar: METIS (pymetis) runs on one thread",
        ),
        (
            {"training": {"nodes": 3}},
            "mining.batchSize (64) must be divisible by the 3 training processes",
        ),
        (
            {"training": {"miniBatchSize": 65}},
            "training.miniBatchSize (65) must not exceed the per-process batch (64)",
        ),
        (
            {"teacher": {"pooling": "max"}},
            "spec.teacher.pooling: Input should be 'mean', 'cls' or 'last_token'",
        ),
    ],
)
def test_bad_specs_name_the_field_and_rule(patch, needle):
    spec = {**MINIMAL, **patch}
    assert any(needle in e for e in errors_of(spec)), errors_of(spec)


def test_every_problem_is_reported_together():
    errors = errors_of(
        {"dataset": {"uri": ""}, "teacher": {"maxLength": 1}, "training": {"learningRate": -1}}
    )
    fields = {e.split(":")[0] for e in errors}
    assert {
        "spec.dataset.uri",
        "spec.teacher.maxLength",
        "spec.training.learningRate",
        "spec.workDir",
    } <= fields


def test_manifest_header_is_checked():
    with pytest.raises(SpecError) as info:
        parse_manifest({"apiVersion": "v1", "kind": "Pod", "spec": MINIMAL})
    assert any(e.startswith("apiVersion:") for e in info.value.errors)
    assert any(e.startswith("kind:") for e in info.value.errors)
    with pytest.raises(SpecError, match="spec: required"):
        parse_manifest({"kind": "B3Job"})


def test_relative_paths_resolve_against_the_manifest(tmp_path):
    (tmp_path / "jobs").mkdir()
    path = tmp_path / "jobs" / "job.yaml"
    path.write_text(
        yaml.safe_dump(
            {"kind": "B3Job", "spec": {**MINIMAL, "dataset": {"uri": "../data/p.parquet"}}}
        )
    )
    job = load_manifest(path)
    assert job.spec.dataset.uri == str(tmp_path / "data" / "p.parquet")
    assert job.spec.work_dir == str(tmp_path / "jobs" / "work")
    uri = parse_manifest(
        {"spec": {**MINIMAL, "dataset": {"uri": "s3://bucket/p.parquet"}}}
    ).spec.dataset.uri
    assert uri == "s3://bucket/p.parquet"


def test_unreadable_and_malformed_manifests(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_manifest(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_manifest(bad)


def _walk(node, path="spec"):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}[]")


def test_schema_is_structural():
    """Kubernetes structural schema rules: a type on every node, no $ref/anyOf/allOf/oneOf,
    OpenAPI 3.0 boolean exclusiveMinimum, and no additionalProperties beside properties."""
    for path, node in _walk(spec_openapi_schema()):
        assert "type" in node, path
        assert not {"$ref", "anyOf", "allOf", "oneOf", "not", "title", "$defs"} & set(node), path
        assert isinstance(node.get("exclusiveMinimum", True), bool), path
        assert not ("properties" in node and "additionalProperties" in node), path


def test_schema_agrees_with_the_model():
    validator = jsonschema.Draft4Validator(spec_openapi_schema())
    good = spec_to_dict(parse_spec(MINIMAL))
    assert not list(validator.iter_errors(good))
    for patch in (
        {"training": {**good["training"], "temperature": 0}},
        {"mining": {**good["mining"], "edges": "both"}},
        {"teacher": {**good["teacher"], "maxLength": 4}},
    ):
        bad = {**good, **patch}
        assert list(validator.iter_errors(bad)), patch
        with pytest.raises(SpecError):
            parse_spec(bad)


SHIPPED = sorted([*ROOT.glob("examples/**/*.yaml"), *ROOT.glob("bench/configs/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_manifest_validates(path):
    text = path.read_text()
    assert text.startswith("# "), "each example opens with the command that runs it"
    load_manifest(path)


def test_training_pod_hostnames_must_be_dns_labels():
    doc = {"metadata": {"name": "a" * 53}, "spec": {"dataset": {"uri": "/d.parquet"}, "workDir": "/w",
           "training": {"nodes": 1001}, "mining": {"batchSize": 1001, "clusterSize": 7}}}  # fmt: skip
    with pytest.raises(SpecError) as err:
        parse_manifest(doc)
    assert "'" + "a" * 53 + "-train-1000' longer than 63 characters" in str(err.value)
    doc["spec"]["training"]["nodes"] = 1000  # <name>-train-999: 63 characters
    doc["spec"]["mining"]["batchSize"] = 1000
    doc["spec"]["mining"]["clusterSize"] = 8
    assert parse_manifest(doc).spec.training.nodes == 1000


def test_the_train_stage_has_no_backoff_limit_but_max_restarts():
    spec = {"dataset": {"uri": "/d.parquet"}, "workDir": "/w"}
    with pytest.raises(SpecError, match="train.backoffLimit does not apply.*training.maxRestarts"):
        parse_spec({**spec, "stages": {"train": {"backoffLimit": 3}}})
    parsed = parse_spec({**spec, "stages": {"rank": {"backoffLimit": 3}}, "training": {"maxRestarts": 5}})
    assert parsed.stages.rank.backoff_limit == 3 and parsed.training.max_restarts == 5
