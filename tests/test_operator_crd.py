"""The CRD: generated from b3.spec (the chart's copy must not drift), and it accepts and refuses
the same manifests as `b3 validate`: structural schema (jsonschema, with the API server's
defaulting and strict field validation emulated) plus its CEL rules (cel-python)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from b3.spec import SpecError, parse_manifest
from b3_operator import crd

celpy = pytest.importorskip("celpy", reason="needs cel-python (pip) for the CRD's CEL rules")

ROOT = Path(__file__).resolve().parents[1]
CHART_CRD = ROOT / "charts" / "b3-operator" / "crds" / "b3jobs.b3.dev.yaml"
EXAMPLES = sorted(ROOT.glob("examples/*.yaml"))
INVALID = sorted((ROOT / "tests" / "manifests" / "invalid").glob("*.yaml"))
SCHEMA = crd.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _as_json_schema(node: dict) -> dict:
    """OpenAPI v3 (structural) -> JSON Schema draft 4: nullable, and strict field validation."""
    node = {k: v for k, v in node.items() if not k.startswith("x-kubernetes")} | {
        k: v for k, v in node.items() if k == "x-kubernetes-preserve-unknown-fields"
    }
    out = dict(node)
    if node.pop("nullable", False):
        out["type"] = [node["type"], "null"]
        out.pop("nullable")
    if "properties" in node:
        out["properties"] = {k: _as_json_schema(v) for k, v in node["properties"].items()}
        if (
            not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node
        ):
            out["additionalProperties"] = False  # kubectl's default --validate=strict
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _as_json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = _as_json_schema(node["items"])
    return out


def _apply_defaults(schema: dict, value):
    """What the API server does before validation: fill `default`s, outside in."""
    if isinstance(value, dict):
        for key, prop in schema.get("properties", {}).items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                _apply_defaults(prop, value[key])
    elif isinstance(value, list) and "items" in schema:
        for item in value:
            _apply_defaults(schema["items"], item)
    return value


def _cel_rules(schema: dict, path: tuple = ()):
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for key, prop in schema.get("properties", {}).items():
        yield from _cel_rules(prop, (*path, key))


def _at(value, path):
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def crd_errors(manifest: dict, old: dict | None = None) -> list[str]:
    """What the API server would answer to creating `manifest` (or updating `old` to it)."""
    obj = _apply_defaults(SCHEMA, copy.deepcopy(manifest))
    validator = jsonschema.Draft4Validator(_as_json_schema(SCHEMA))
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)
    ]
    if errors:
        return errors
    old_obj = _apply_defaults(SCHEMA, copy.deepcopy(old)) if old else None
    env = celpy.Environment()
    for path, rule in _cel_rules(SCHEMA):
        value = _at(obj, path)
        transition = "oldSelf" in rule["rule"]
        if value is None or (transition and old_obj is None):
            continue
        activation = {"self": celpy.json_to_cel(value)}
        if transition:
            activation["oldSelf"] = celpy.json_to_cel(_at(old_obj, path))
        if not env.program(env.compile(rule["rule"])).evaluate(activation):
            errors.append(f"{'.'.join(path)}: {rule['message']}")
    return errors


def test_the_chart_crd_is_generated_from_the_spec():
    assert CHART_CRD.read_text() == crd.render(), (
        "charts/b3-operator/crds/b3jobs.b3.dev.yaml drifted from b3.spec: run "
        "`python -m b3_operator.crd > charts/b3-operator/crds/b3jobs.b3.dev.yaml`"
    )


def test_crd_names_columns_and_status_subresource():
    doc = yaml.safe_load(CHART_CRD.read_text())
    assert doc["metadata"]["name"] == "b3jobs.b3.dev"
    assert doc["spec"]["names"]["shortNames"] == ["b3j"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Stage", "Progress", "Restarts", "Message", "Age"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_the_crd_schema_and_cel_rules(path):
    assert crd_errors(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("path", INVALID, ids=[p.name for p in INVALID])
def test_malformed_manifests_are_refused_by_the_crd_and_by_b3_naming_the_field(path):
    text = path.read_text()
    field = text.splitlines()[0].removeprefix("# expect: ").strip()
    doc = yaml.safe_load(text)
    errors = crd_errors(doc)
    assert errors and any(field in e for e in errors), errors
    with pytest.raises(SpecError) as refused:
        parse_manifest(doc)
    assert any(field in e for e in refused.value.errors), refused.value.errors


def test_the_spec_is_fixed_after_creation_except_suspend_and_run_policy():
    created = yaml.safe_load((ROOT / "examples" / "single-gpu.yaml").read_text())
    suspended = copy.deepcopy(created)
    suspended["spec"]["suspend"] = True
    suspended["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 60}
    assert crd_errors(suspended, old=created) == []
    for section, change in [("mining", {"batchSize": 128}), ("training", {"steps": 5}),
                            ("workDir", "/elsewhere"), ("template", {"image": "other:1"})]:  # fmt: skip
        changed = copy.deepcopy(created)
        if isinstance(change, dict):
            changed["spec"].setdefault(section, {}).update(change)
        else:
            changed["spec"][section] = change
        errors = crd_errors(changed, old=created)
        assert errors == [
            "spec: the spec cannot change after the B3Job is created, except suspend and runPolicy"
        ]


def test_cel_rules_agree_with_b3_spec_on_edge_cases():
    base = yaml.safe_load((ROOT / "examples" / "single-gpu.yaml").read_text())
    cases = [
        ({"mining": {"batchSize": 64, "clusterSize": 16}, "training": {"nodes": 2, "processesPerNode": 4, "miniBatchSize": 8}}, True),
        ({"mining": {"batchSize": 64, "clusterSize": 16}, "training": {"nodes": 2, "processesPerNode": 4, "miniBatchSize": 9}}, False),
        ({"mining": {"batchSize": 48, "clusterSize": 16, "perTask": False, "mixTasks": True}}, True),
        ({"mining": {"batchSize": 48, "clusterSize": 16, "perTask": False}}, False),
        ({"mining": {"partitioner": "kaminpar", "partitionerThreads": 4}}, True),
        ({"mining": {"partitioner": "metis", "partitionerThreads": 4}}, False),
        ({"mining": {"partitioner": "metis", "partitionerThreads": 1}}, True),
    ]  # fmt: skip
    for change, ok in cases:
        doc = copy.deepcopy(base)
        doc["spec"].update(change)
        assert (crd_errors(doc) == []) is ok, change
        try:
            parse_manifest(doc)
            accepted = True
        except SpecError:
            accepted = False
        assert accepted is ok, change
