"""The API permissions the operator uses, as RBAC PolicyRules (the chart renders them into its
ClusterRole or per-namespace Roles). One list, next to the code that makes the calls: a test
checks each API call in `handlers` against it."""

from __future__ import annotations

from b3.spec import API_GROUP

RULES = [
    # the jobs themselves: watch, status, finalizer and the children annotation (kopf + handlers)
    {"apiGroups": [API_GROUP], "resources": ["b3jobs"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [API_GROUP], "resources": ["b3jobs/status"], "verbs": ["get", "patch"]},
    # children: created once by name, suspended/resumed by patch; never deleted (garbage collection
    # deletes them with the B3Job through ownerReferences)
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]},
    # get: whether a train Service whose creation met 409 is ours (made just before a restart)
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list", "watch", "create", "patch"]},
    # rank RayJobs: watched like stage Jobs (KubeRay's status changes arrive at once)
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # a queued child's Kueue Workload: why it waits; spec.active to suspend and resume it
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list", "watch", "patch"]},
    # the failing pod's termination message
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    # Events on every transition; the Job controller's FailedCreate Events of a stage Job
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
]

# cluster-scoped, for kopf itself: discovery of CRDs, and peering between replicas
CLUSTER_RULES = [
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["clusterkopfpeerings"],
        "verbs": ["list", "watch", "patch", "get"],
    },
]
# kopf observes namespaces only to serve a list of them (--namespace=...); an operator that
# watches all namespaces never asks (the audit log of tests/test_cluster.py shows it)
NAMESPACE_OBSERVATION = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}
NAMESPACED_PEERING = {
    "apiGroups": ["kopf.dev"],
    "resources": ["kopfpeerings"],
    "verbs": ["list", "watch", "patch", "get"],
}


def cluster_role(name: str = "b3-operator") -> dict:
    """A ClusterRole with every rule, for an operator that watches all namespaces."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "rules": [*RULES, *CLUSTER_RULES]}  # fmt: skip
