"""The Helm chart, rendered and linted with the real Helm Go SDK (helm-python-sdk): default and
non-default values, a values schema that refuses bad values, every object valid for Kubernetes,
and RBAC equal to what the operator's code uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from b3_operator import rbac

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (pip): the Helm v4 Go SDK")
kv = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (pip)")

CHART = Path(__file__).resolve().parents[1] / "charts" / "b3-operator"
K8S_VERSION = "1.33"
NAMESPACED = {"watch": {"allNamespaces": False, "namespaces": ["ml-team", "research"]}, "replicaCount": 1,
              "image": {"repository": "registry.example.com/b3/operator", "tag": "0.1.0-rc1"},
              "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
              "serviceAccount": {"create": False, "name": "existing-operator"}}  # fmt: skip
TUNED = {"operator": {"logFormat": "plain", "metricsPort": 9100, "env": [{"name": "TZ", "value": "UTC"}]},
         "nodeSelector": {"kubernetes.io/os": "linux"}, "dashboard": {"enabled": False},
         "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}]}  # fmt: skip
VALUE_SETS = {"default": {}, "namespaced": NAMESPACED, "tuned": TUNED}
CUSTOM_KINDS = {
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
    "KopfPeering",
    "ClusterKopfPeering",
}


def render(values: dict) -> list[dict]:
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="b3", namespace="b3-system")
    return [doc for path, text in manifests.items() if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_clean(values):
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.33.0")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_is_valid_kubernetes(values):
    objects = render(values)
    with helm.Chart.load(str(CHART)) as chart:
        crds = [
            yaml.safe_load(c["data"]) if isinstance(c, dict) and "data" in c else c
            for c in chart.crds
        ]
    assert objects
    for obj in objects:
        if obj["kind"] not in CUSTOM_KINDS:
            kv.validate(obj, K8S_VERSION, strict=True)
    assert crds is not None


def test_default_install_is_cluster_wide_hardened_and_peered():
    objects = render({})
    (deployment,) = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 2 and "--all-namespaces" in container["args"]
    assert "--peering=b3-b3-operator" in container["args"] and by_kind(
        objects, "ClusterKopfPeering"
    )
    assert container["image"] == "ghcr.io/b3-operator/operator:0.1.0"  # appVersion
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert not by_kind(objects, "ServiceMonitor") and not by_kind(objects, "Role")


def test_rbac_is_what_the_operator_uses():
    objects = render({})
    roles = {r["metadata"]["name"]: r["rules"] for r in by_kind(objects, "ClusterRole")}
    assert roles["b3-b3-operator"] == rbac.RULES
    assert roles["b3-b3-operator-kopf"] == rbac.CLUSTER_RULES
    worker = [
        sa for sa in by_kind(objects, "ServiceAccount") if sa["metadata"]["name"] == "b3-worker"
    ]
    assert worker and worker[0]["automountServiceAccountToken"] is False
    bound = {s["name"] for b in by_kind(objects, "ClusterRoleBinding") for s in b["subjects"]}
    assert "b3-worker" not in bound


def test_namespaced_install_binds_roles_only_where_it_watches():
    objects = render(NAMESPACED)
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-team", "research"]
    assert all(r["rules"] == [*rbac.RULES, rbac.NAMESPACED_PEERING] for r in roles)
    kopf_role = next(r for r in by_kind(objects, "ClusterRole") if r["metadata"]["name"].endswith("-kopf"))
    assert kopf_role["rules"] == [*rbac.CLUSTER_RULES, rbac.NAMESPACE_OBSERVATION]
    assert {b["subjects"][0]["name"] for b in by_kind(objects, "RoleBinding")} == {
        "existing-operator"
    }
    (container,) = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    assert (
        "--namespace=ml-team" in container["args"] and "--all-namespaces" not in container["args"]
    )
    assert container["image"] == "registry.example.com/b3/operator:0.1.0-rc1"
    assert len(by_kind(objects, "KopfPeering")) == 2
    (monitor,) = by_kind(objects, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-team", "research"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # of a training gang only node 0 serves metrics; pods of other stages have no index label
    (keep,) = endpoint["relabelings"]
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__meta_kubernetes_pod_label_batch_kubernetes_io_job_completion_index"]
    assert [i for i in ("", "0", "1", "10") if re.fullmatch(keep["regex"], i)] == ["", "0"]
    (service_monitor,) = by_kind(objects, "ServiceMonitor")
    # the operator's series keep each B3Job's namespace, not the operator's
    assert service_monitor["spec"]["endpoints"][0]["honorLabels"] is True
    workers = by_kind(objects, "ServiceAccount")
    assert {a["metadata"]["namespace"] for a in workers if a["metadata"]["name"] == "b3-worker"} == {"ml-team", "research"}


def test_every_service_account_an_example_names_is_one_the_chart_creates_there():
    """A B3Job naming a ServiceAccount its namespace lacks never gets pods (the Job controller
    cannot create them): the examples name only accounts the default install creates."""
    accounts = {(a["metadata"]["namespace"], a["metadata"]["name"]) for a in by_kind(render({}), "ServiceAccount")}
    examples = sorted((CHART.parents[1] / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "B3Job" and "serviceAccountName" in doc["spec"].get("template", {}):
                where = (doc["metadata"].get("namespace", "default"), doc["spec"]["template"]["serviceAccountName"])
                assert where in accounts, f"{path.name} names ServiceAccount {where[1]} in {where[0]}"


@pytest.mark.parametrize("values, where", [
    ({"replicaCount": 0}, "/replicaCount"),
    ({"watch": {"allNamespaces": False}}, "/watch/namespaces"),
    ({"operator": {"logFormat": "yaml"}}, "/operator/logFormat"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"replicas": 2}, "replicas"),
    ({"watch": {"namespaces": ["Bad_Name"]}}, "/watch/namespaces/0"),
])  # fmt: skip
def test_values_schema_refuses_bad_values(values, where):
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError) as refused:
        chart.validate_schema(values)
    assert where in str(refused.value)


def test_crds_are_shipped():
    names = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert names == [
        "b3jobs.b3.dev.yaml",
        "clusterkopfpeerings.kopf.dev.yaml",
        "kopfpeerings.kopf.dev.yaml",
    ]
    for path in (CHART / "crds").glob("*.yaml"):
        kv.validate(yaml.safe_load(path.read_text()), K8S_VERSION, strict=True)


def test_versions_agree_across_chart_project_and_worker_image():
    from b3.spec import PodTemplateSpec

    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+")

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((CHART.parents[1] / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    assert PodTemplateSpec().image.endswith(f":{chart['appVersion']}")


def test_both_images_install_every_package_at_the_version_ci_tests():
    """The images take their versions from constraints.txt, which the build context admits;
    what the built images hold is checked on the real node (test_real_node.py)."""
    repo = CHART.parents[1]
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in (repo / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}  # fmt: skip
    wanted = [line.strip() for line in (repo / "images" / "operator-requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]  # fmt: skip
    assert wanted and all(name.lower() in pinned for name in wanted)
    assert "!constraints.txt" in (repo / ".dockerignore").read_text().splitlines()
    for dockerfile in ("operator.Dockerfile", "worker.Dockerfile"):
        installs = [line for line in (repo / "images" / dockerfile).read_text().splitlines() if "pip install" in line]
        assert installs and all("-c " in line or "--no-deps" in line for line in installs), dockerfile
