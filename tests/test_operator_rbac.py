"""RBAC: every Kubernetes API call the handlers make is allowed by `b3_operator.rbac`, and the
ClusterRole is a valid object."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from b3_operator import rbac

HANDLERS = Path(rbac.__file__).with_name("handlers.py")
# client method -> (api group, resource, verb)
CALLS = {
    "read_namespaced_config_map": ("", "configmaps", "get"),
    "create_namespaced_config_map": ("", "configmaps", "create"),
    "create_namespaced_service": ("", "services", "create"),
    "read_namespaced_service": ("", "services", "get"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "create_namespaced_job": ("batch", "jobs", "create"),
    "patch_namespaced_job": ("batch", "jobs", "patch"),
    "list_namespaced_pod": ("", "pods", "list"),
    "list_namespaced_event": ("", "events", "list"),
    "get_namespaced_custom_object": ("ray.io", "rayjobs", "get"),
    "create_namespaced_custom_object": ("ray.io", "rayjobs", "create"),
    # RayJobs, and Kueue Workloads (spec.active suspends and resumes a queued child)
    "patch_namespaced_custom_object": [("ray.io", "rayjobs", "patch"), ("kueue.x-k8s.io", "workloads", "patch")],
    "list_namespaced_custom_object": ("kueue.x-k8s.io", "workloads", "list"),
}


def allowed(group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
        for r in rbac.RULES
    )


def test_every_client_call_in_the_handlers_is_allowed():
    tree = ast.parse(HANDLERS.read_text())
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.endswith(
        ("_namespaced_job", "_namespaced_pod", "_config_map", "_service", "_custom_object", "_namespaced_event"))}  # fmt: skip
    assert called, "no client calls found: did handlers.py change shape?"
    unknown = called - set(CALLS)
    assert not unknown, f"add these calls to CALLS and rbac.RULES: {unknown}"
    for method in called:
        for call in CALLS[method] if isinstance(CALLS[method], list) else [CALLS[method]]:
            assert allowed(*call), (method, call)
    # the B3Job re-trigger patches the parent through the custom-objects API too
    assert allowed("b3.dev", "b3jobs", "patch") and allowed("b3.dev", "b3jobs/status", "patch")
    assert allowed("", "events", "create")


def test_the_operator_cannot_delete_or_touch_secrets():
    verbs = {v for r in rbac.RULES + rbac.CLUSTER_RULES for v in r["verbs"]}
    resources = {res for r in rbac.RULES + rbac.CLUSTER_RULES for res in r["resources"]}
    assert "delete" not in verbs and "*" not in verbs and "secrets" not in resources


def test_cluster_role_is_valid():
    kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (pip)")
    kv.validate(rbac.cluster_role(), "1.33", strict=True)
