"""The B3Job CustomResourceDefinition, generated from `b3.spec` (the one source of truth).

    python -m b3_operator.crd > charts/b3-operator/crds/b3jobs.b3.dev.yaml

`tests/test_operator_crd.py` fails when the chart's file drifts from this output.

The structural schema comes from `spec_openapi_schema()`. What pydantic checks across fields is
repeated here as CEL `x-kubernetes-validations`, so the API server refuses what `b3 validate`
refuses (the tests run both on the same manifests). An optional spec section defaults to the
section with every default filled in (not `{}`): the API server checks a default against the
section's CEL rules too, and `{}` has no `batchSize` for them to read.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from b3.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    parse_spec,
    spec_openapi_schema,
    spec_to_dict,
)  # fmt: skip

PLURAL = "b3jobs"
SHORT_NAME = "b3j"
# Queued: a stage's child waits for Kueue (or another controller) to admit it
PHASES = ["Pending", "Queued", "Ranking", "Partitioning", "Training", "Succeeded", "Failed", "Suspended"]

# (object path in the spec, CEL rule on that object, message); `self` is the object at the path
CEL_RULES: list[tuple[str, str, str]] = [
    ("dataset.split", "self.testBucket < self.buckets", "testBucket must be smaller than buckets"),
    ("dataset.columns", "!has(self.candidateImages) || has(self.candidates)", "candidateImages needs candidates"),
    ("mining", "self.batchSize % self.clusterSize == 0", "clusterSize must divide batchSize"),
    ("mining", "self.perTask || self.mixTasks",
     "perTask false builds communities across tasks: set mixTasks true, or keep perTask true"),
    ("mining", "self.partitioner == 'kaminpar' || self.partitionerThreads == 1",
     "partitionerThreads needs partitioner kaminpar: METIS (pymetis) runs on one thread"),
    ("training", "!(has(self.steps) && has(self.epochs))", "give steps or epochs, not both"),
    *((section, "!has(self.minPixels) || !has(self.maxPixels) || self.minPixels <= self.maxPixels",
       "minPixels must not exceed maxPixels") for section in ("teacher", "training")),
    ("", "self.mining.batchSize % (self.training.nodes * self.training.processesPerNode) == 0",
     "mining.batchSize must be divisible by training.nodes x training.processesPerNode"),
    ("", "!has(self.training.miniBatchSize) || self.training.miniBatchSize * "
         "self.training.nodes * self.training.processesPerNode <= self.mining.batchSize",
     "training.miniBatchSize must not exceed the per-process batch"),
]  # fmt: skip

# Everything but `suspend` and `runPolicy` is fixed once the job exists: a running job's
# artifacts were computed from it. (A transition rule: it sees the old object as `oldSelf`.)
MUTABLE = {"suspend", "runPolicy"}


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    for part in filter(None, path.split(".")):
        schema = schema["properties"][part]
    return schema


def spec_schema() -> dict[str, Any]:
    """The spec's structural schema with section defaults and CEL rules."""
    schema = spec_openapi_schema()
    defaults = spec_to_dict(parse_spec({"dataset": {"uri": "-"}, "workDir": "-"}))
    for name, prop in schema["properties"].items():
        section = prop.get("type") == "object" and "properties" in prop and not prop.get("nullable")
        if section and name not in schema["required"]:
            prop.setdefault("default", defaults[name])
    for path, rule, message in CEL_RULES:
        _at(schema, path).setdefault("x-kubernetes-validations", []).append(
            {"rule": rule, "message": message}
        )
    fixed = sorted(set(schema["properties"]) - MUTABLE)
    schema["x-kubernetes-validations"].append(
        {
            "rule": " && ".join(f"self.{f} == oldSelf.{f}" for f in fixed),
            "message": "the spec cannot change after the B3Job is created, except suspend and runPolicy",
        }
    )
    return schema


def status_schema() -> dict[str, Any]:
    time = {"type": "string", "format": "date-time"}
    return {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,  # kopf keeps its own bookkeeping here
        "properties": {
            "phase": {"type": "string", "enum": PHASES},
            "stage": {"type": "string"},
            "progress": {"type": "string", "description": "finished stages / all stages (and training's percent)"},
            "training": {
                "type": "object",
                "description": "training progress from rank 0's metrics, refreshed at most every 30 s",
                "properties": {
                    "step": {"type": "integer"}, "totalSteps": {"type": "integer"},
                    "percent": {"type": "number"}, "remainingSeconds": {"type": "integer"},
                    "loss": {"type": "number"}, "updateTime": time,
                },
            },
            "message": {"type": "string"},
            "restarts": {"type": "integer", "description": "training gang restarts counted against training.maxRestarts"},
            "observedGeneration": {"type": "integer", "format": "int64"},
            "specHash": {"type": "string"},
            "startTime": time,
            "completionTime": time,
            "stages": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "startTime": time,
                        "attemptStartTime": {**time, "description": "train: when the current gang started (after a restart)"},
                        "completionTime": time,
                        "child": {"type": "string"},
                    },
                },
            },
            "conditions": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "lastTransitionTime": time,
                    },
                },
            },
        },
    }


def crd_manifest() -> dict[str, Any]:
    spec = spec_schema()
    spec.setdefault("x-kubernetes-validations", [])
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {
                "app.kubernetes.io/name": "b3-operator",
                "app.kubernetes.io/part-of": "b3-operator",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
            },  # fmt: skip
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
                        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
                        {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A B3 smart-batch-mining training job: rank, partition, train.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                # the API server lets a CRD narrow metadata.name (and nothing else
                                # of metadata): every child name must be a valid DNS label
                                "metadata": {"type": "object", "properties": {"name": {
                                    "type": "string", "maxLength": MAX_NAME_LENGTH, "pattern": NAME_PATTERN}}},
                                "spec": spec,
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m b3_operator.crd` from b3.spec: do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
