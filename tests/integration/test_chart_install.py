"""The Helm chart against the real test API server: server-side validation, `helm install`, and proof
that the chart's RBAC is enough: the operator runs as a subprocess authenticated with a token of
the chart's ServiceAccount, reconciles a ServeDeployment, and never gets a 403.

No KubeRay operator runs here (and no kubelet), so the ServeDeployment stays Ready=False with
reason RayClusterNotReady; that is the expected end state.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayfleet.dev.toolchain import ensure_tools
from rayfleet.waiting import eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rayfleet"
CRD_NAME = "servedeployments.rayfleet.io"
FINALIZER = "rayfleet.io/drain-replicas"
FORBIDDEN = re.compile(r"forbidden|HTTP 403|'code': 403|\"code\": ?403", re.IGNORECASE)

SERVE_DEPLOYMENT = {
    "apiVersion": "rayfleet.io/v1alpha1",
    "kind": "ServeDeployment",
    "metadata": {"name": "echo"},
    "spec": {"handler": "examples.echo:Echo", "replicas": 2, "routePrefix": "/echo",
             "rayActorOptions": {"numCpus": 0.5}},
}


def run(cmd: list[str], *, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def kubectl(cp, *args: str, kubeconfig: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return run([str(ensure_tools().kubectl), f"--kubeconfig={kubeconfig or cp.kubeconfig}", *args], **kw)


def helm(cp, *args: str, **kw) -> subprocess.CompletedProcess:
    return run([str(ensure_tools().helm), f"--kubeconfig={cp.kubeconfig}", *args], **kw)


def get_json(cp, *args: str, **kw) -> dict | None:
    proc = kubectl(cp, "get", *args, "-o", "json", check=False, **kw)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def set_args(values: dict[str, str]) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def can_i(cp, sa: str, verb: str, resource: str, namespace: str | None) -> bool:
    ns = ["-n", namespace] if namespace else ["--all-namespaces"]
    proc = kubectl(cp, "auth", "can-i", verb, resource, f"--as={sa}", *ns, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stderr
    return proc.stdout.strip() == "yes"


@contextlib.contextmanager
def installed(cp, release: str, namespace: str, values: dict[str, str]):
    """`helm install` (the CRD too unless the cluster has it already), always uninstalled after:
    ClusterRoles are shared by the whole session's control plane."""
    crd_present = get_json(cp, "crd", CRD_NAME) is not None
    helm(cp, "install", release, str(CHART), "--namespace", namespace, *(["--skip-crds"] if crd_present else []),
         *set_args(values))
    try:
        kubectl(cp, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}", timeout=90)
        yield
    finally:
        helm(cp, "uninstall", release, "--namespace", namespace, check=False)


@pytest.mark.parametrize("watch", [False, True], ids=["cluster-wide", "namespaced"])
def test_rendered_manifests_pass_server_side_dry_run(control_plane, namespace, watch):
    values = {"watchNamespaces": f"{{{namespace}}}"} if watch else {}
    rendered = helm(control_plane, "template", f"rf-{namespace}", str(CHART), "--namespace", namespace,
                    "--include-crds", *set_args(values)).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered) if d)
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
    assert ("Role" in kinds) == watch
    # Server-side: schema validation, admission and RBAC escalation checks by the real API server.
    out = kubectl(control_plane, "apply", "--dry-run=server", "--namespace", namespace, "-f", "-", input=rendered).stdout
    assert out.count("(server dry run)") == len(kinds), out


def test_cluster_wide_install_grants_exactly_what_is_needed(control_plane, namespace):
    release = f"rf-{namespace}"
    with installed(control_plane, release, namespace, {}):
        sa = f"system:serviceaccount:{namespace}:{release}-rayfleet"
        for ns in ("default", namespace):
            assert can_i(control_plane, sa, "watch", "servedeployments.rayfleet.io", ns)
            assert can_i(control_plane, sa, "patch", "servedeployments.rayfleet.io/status", ns)
            assert can_i(control_plane, sa, "create", "rayclusters.ray.io", ns)
            assert can_i(control_plane, sa, "create", "events", ns)
        assert can_i(control_plane, sa, "list", "servedeployments.rayfleet.io", None)
        assert can_i(control_plane, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io", None)
        # Nothing more than it needs.
        for verb, resource in [("delete", "rayclusters.ray.io"), ("delete", "servedeployments.rayfleet.io"),
                               ("create", "servedeployments.rayfleet.io"), ("get", "secrets"), ("create", "pods"),
                               ("delete", "services"), ("update", "customresourcedefinitions.apiextensions.k8s.io"),
                               ("list", "namespaces")]:
            assert not can_i(control_plane, sa, verb, resource, "default"), f"{sa} may {verb} {resource}"


def test_operator_runs_with_the_charts_service_account(control_plane, namespace, tmp_path):
    cp, release = control_plane, f"rf-{namespace}"
    with installed(cp, release, namespace, {"watchNamespaces": f"{{{namespace}}}"}):
        sa_name = f"{release}-rayfleet"
        deployment = get_json(cp, "deployment", sa_name, "-n", namespace)
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][0] == f"--namespace={namespace}"
        sa = f"system:serviceaccount:{namespace}:{sa_name}"
        assert can_i(cp, sa, "create", "rayclusters.ray.io", namespace)
        assert not can_i(cp, sa, "create", "rayclusters.ray.io", "default"), "namespaced mode must not reach other namespaces"
        for verb, resource in [("list", "customresourcedefinitions.apiextensions.k8s.io"), ("list", "namespaces")]:
            assert not can_i(cp, sa, verb, resource, None), f"namespaced mode must grant nothing cluster-scoped: {verb} {resource}"

        # A real token for the ServiceAccount (TokenRequest API), in a kubeconfig of its own.
        token = kubectl(cp, "create", "token", sa_name, "-n", namespace, "--duration=1h").stdout.strip()
        sa_kubeconfig = tmp_path / "sa-kubeconfig"
        sa_kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "sa",
            "clusters": [{"name": "cp", "cluster": {
                "server": cp.server,
                "certificate-authority-data": base64.b64encode(Path(cp.ca_file).read_bytes()).decode()}}],
            "users": [{"name": "sa", "user": {"token": token}}],
            "contexts": [{"name": "sa", "context": {"cluster": "cp", "user": "sa", "namespace": namespace}}],
        }))
        whoami = kubectl(cp, "auth", "whoami", "-o", "json", kubeconfig=sa_kubeconfig).stdout
        assert json.loads(whoami)["status"]["userInfo"]["username"] == sa

        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env.update(KUBECONFIG=str(sa_kubeconfig), RAYFLEET_RESYNC_SECONDS="2", PYTHONUNBUFFERED="1")
        # The operator's key, as the pod gets it: from the chart's Secret (secretKeyRef in the Deployment).
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
                  if e["name"] == "RAYFLEET_CONTROL_KEY"]
        key = get_json(cp, "secret", ref["name"], "-n", namespace)["data"][ref["key"]]
        env["RAYFLEET_CONTROL_KEY"] = base64.b64decode(key).decode()
        log_path = tmp_path / "operator.log"
        with open(log_path, "wb") as log_file:
            operator = subprocess.Popen(
                [sys.executable, "-m", "rayfleet_operator", "-n", namespace, "--liveness", "", "--log-level", "DEBUG"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)

        def log() -> str:
            return log_path.read_text(errors="replace")

        def diagnostics() -> str:
            sd = get_json(cp, "sd", "echo", "-n", namespace)
            return f"ServeDeployment: {json.dumps(sd, indent=1)[-3000:]}\noperator log (tail):\n{log()[-6000:]}"

        try:
            kubectl(cp, "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(SERVE_DEPLOYMENT))

            def ready_condition():
                assert operator.poll() is None, f"operator exited with {operator.returncode}:\n{log()[-6000:]}"
                sd = get_json(cp, "sd", "echo", "-n", namespace) or {}
                conditions = (sd.get("status") or {}).get("conditions") or []
                return next((c for c in conditions if c["type"] == "Ready"), None)

            ready = eventually(what="status.conditions from the operator", timeout=60, check=ready_condition, diagnostics=diagnostics)
            assert ready["status"] == "False" and ready["reason"] == "RayClusterNotReady", ready

            sd = get_json(cp, "sd", "echo", "-n", namespace)
            assert FINALIZER in sd["metadata"].get("finalizers", [])
            uid = sd["metadata"]["uid"]
            cluster = get_json(cp, "raycluster", "echo", "-n", namespace)
            service = get_json(cp, "service", "echo", "-n", namespace)
            assert cluster and service, diagnostics()
            for obj in (cluster, service):
                assert [ref["uid"] for ref in obj["metadata"]["ownerReferences"]] == [uid]
            assert service["spec"]["selector"] == {"ray.io/cluster": "echo"}
            assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] >= 1
            # Events were posted as the ServiceAccount, too.
            events = eventually(what="an Event about echo", timeout=60, check=lambda: (get_json(
                cp, "events", "-n", namespace, "--field-selector", "involvedObject.name=echo") or {}).get("items"),
                diagnostics=diagnostics)
            assert any(e["reason"] == "RayClusterCreated" for e in events), [e["reason"] for e in events]

            # Spec changes reach the RayCluster (update verb).
            kubectl(cp, "patch", "sd", "echo", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"rayCluster": {"workers": {"minReplicas": 2, "maxReplicas": 4}}}}))
            eventually(what="the RayCluster update", timeout=60, check=lambda: (get_json(cp, "raycluster", "echo", "-n", namespace) or {})
                     .get("spec", {}).get("workerGroupSpecs", [{}])[0].get("minReplicas") == 2, diagnostics=diagnostics)

            # Deletion: the operator's finalizer runs and is removed; the GC removes what it owned.
            kubectl(cp, "delete", "sd", "echo", "-n", namespace, "--wait=false")
            eventually(what="the ServeDeployment to be finalized and deleted", timeout=60, check=lambda: get_json(cp, "sd", "echo", "-n", namespace) is None, diagnostics=diagnostics)
            eventually(what="the RayCluster to be garbage-collected", timeout=60, check=lambda: get_json(cp, "raycluster", "echo", "-n", namespace) is None, diagnostics=diagnostics)

            assert operator.poll() is None, f"operator exited with {operator.returncode}:\n{log()[-6000:]}"
            denied = [line for line in log().splitlines() if FORBIDDEN.search(line)]
            assert not denied, "the chart's RBAC is missing a permission:\n" + "\n".join(denied[:20])
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(operator.pid, signal.SIGTERM)
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(operator.pid, signal.SIGKILL)
                operator.wait()
            # Whatever is left must not wait on a finalizer nobody will remove once the operator is gone.
            kubectl(cp, "patch", "sd", "echo", "-n", namespace, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                    check=False)
