"""End to end on a real cluster: kind + both images + KubeRay v1.5.0 + the Helm chart + the examples.

Needs a Docker engine and `kind` (https://kind.sigs.k8s.io); kubectl and helm come from the pinned
PyPI wheel (rayfleet.dev.controlplane.ensure_tools) or PATH. Without Docker or kind every test here
is SKIPPED with the reason (never passed); `make e2e` sets RAYFLEET_E2E_STRICT=1, which turns a
missing prerequisite into a failure.

    make e2e                                 # or: .venv/bin/python -m pytest tests/e2e -m e2e -v -rs

Knobs (environment): RAYFLEET_E2E_CLUSTER (kind cluster name, default rayfleet-e2e),
RAYFLEET_E2E_KEEP=1 (keep the cluster afterwards), KIND_NODE_IMAGE (kindest/node image),
RAYFLEET_E2E_READY_TIMEOUT (seconds to wait for Ready, default 900).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rayfleet"
KUBERAY_CHART_REPO = "https://ray-project.github.io/kuberay-helm/"
KUBERAY_VERSION = "1.5.0"
OPERATOR_IMAGE = ("rayfleet/operator", "e2e")
REPLICA_IMAGE = ("rayfleet/replica", "e2e")
NAMESPACE = "rayfleet-e2e"
READY_TIMEOUT = float(os.environ.get("RAYFLEET_E2E_READY_TIMEOUT", "900"))

# Image builds, `kind load` of the ~3 GB replica image and RayCluster start-up take a while.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]


def missing_prerequisite() -> str | None:
    """Why this suite cannot run here, or None."""
    if not shutil.which("docker"):
        return "the docker CLI is not on PATH"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` timed out: no usable Docker engine"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["?"])[-1]
        return f"`docker info` failed, no Docker engine reachable: {last}"
    if not shutil.which("kind"):
        return "`kind` is not on PATH (install: go install sigs.k8s.io/kind@latest, or see https://kind.sigs.k8s.io)"
    return None


def tools() -> tuple[str, str]:
    try:
        from rayfleet.dev.controlplane import ensure_tools
        found = ensure_tools()
        return str(found.kubectl), str(found.helm)
    except Exception:
        kubectl, helm = shutil.which("kubectl"), shutil.which("helm")
        if not (kubectl and helm):
            pytest.fail("kubectl and helm: neither the pinned PyPI wheel nor PATH provides them")
        return kubectl, helm


def sh(*cmd: str, input: str | None = None, check: bool = True, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


class Cluster:
    def __init__(self, name: str, kubeconfig: Path):
        self.name, self.kubeconfig = name, kubeconfig
        self.kubectl_bin, self.helm_bin = tools()

    def kubectl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return sh(self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args, **kw)

    def helm(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return sh(self.helm_bin, f"--kubeconfig={self.kubeconfig}", *args, **kw)

    def get(self, *args: str) -> dict | None:
        proc = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def sd(self, name: str) -> dict:
        return self.get("sd", name, "-n", NAMESPACE) or {}

    def diagnostics(self, name: str) -> str:
        parts = [self.kubectl("get", "sd,raycluster,pods,svc", "-n", NAMESPACE, "-o", "wide", check=False).stdout,
                 json.dumps(self.sd(name).get("status"), indent=1),
                 self.kubectl("logs", "-n", "rayfleet-system", "deployment/rayfleet", "--tail=80", check=False).stdout]
        return "\n".join(parts)

    def wait_ready(self, name: str, replicas: int) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            sd = self.sd(name)
            status = sd.get("status") or {}
            ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
            if (ready.get("status") == "True" and status.get("readyReplicas") == replicas
                    and status.get("observedGeneration") == sd["metadata"]["generation"]):
                return sd
            time.sleep(3)
        raise AssertionError(f"{name} not Ready with {replicas} replicas after {READY_TIMEOUT}s\n{self.diagnostics(name)}")

    @contextlib.contextmanager
    def port_forward(self, service: str, port: int = 8000):
        """`kubectl port-forward svc/<service>` on a free local port; yields the base URL."""
        proc = subprocess.Popen([self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", "port-forward", "-n", NAMESPACE,
                                 f"svc/{service}", f":{port}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 30)
            line = proc.stdout.readline() if ready else ""
            match = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert match, f"kubectl port-forward did not start: {line!r}"
            yield f"http://127.0.0.1:{match.group(1)}"
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


def http_get(url: str, timeout: float = 30) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def example(name: str) -> dict:
    path = ROOT / "examples" / f"{name}.yaml"
    if not path.exists():
        pytest.fail(f"{path} is missing")
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_prerequisite()
    if reason:
        if os.environ.get("RAYFLEET_E2E_STRICT") == "1":
            pytest.fail(f"e2e prerequisites missing: {reason}")
        pytest.skip(f"e2e needs Docker and kind: {reason}")

    name = os.environ.get("RAYFLEET_E2E_CLUSTER", "rayfleet-e2e")
    c = Cluster(name, tmp_path_factory.mktemp("kind") / "kubeconfig")
    sh("kind", "delete", "cluster", "--name", name, check=False)  # a leftover from an interrupted run
    node_image = os.environ.get("KIND_NODE_IMAGE")
    sh("kind", "create", "cluster", "--name", name, f"--kubeconfig={c.kubeconfig}", "--wait=180s",
       *([f"--image={node_image}"] if node_image else []), timeout=900)
    try:
        for (repo, tag), dockerfile in ((OPERATOR_IMAGE, "operator/Dockerfile"), (REPLICA_IMAGE, "replica_image/Dockerfile")):
            sh("docker", "build", "-f", dockerfile, "-t", f"{repo}:{tag}", ".", timeout=1800)
            sh("kind", "load", "docker-image", "--name", name, f"{repo}:{tag}", timeout=1800)

        # KubeRay first, then rayfleet (whose chart installs the ServeDeployment CRD).
        c.helm("install", "kuberay-operator", "kuberay-operator", "--repo", KUBERAY_CHART_REPO,
               "--version", KUBERAY_VERSION, "--namespace", "kuberay-system", "--create-namespace")
        c.kubectl("rollout", "status", "deployment/kuberay-operator", "-n", "kuberay-system", "--timeout=300s", timeout=330)
        c.helm("install", "rayfleet", str(CHART), "--namespace", "rayfleet-system", "--create-namespace",
               "--set", f"image.repository={OPERATOR_IMAGE[0]}", "--set", f"image.tag={OPERATOR_IMAGE[1]}",
               "--set", "image.pullPolicy=Never",
               "--set", f"replicaImage.repository={REPLICA_IMAGE[0]}", "--set", f"replicaImage.tag={REPLICA_IMAGE[1]}",
               # Small pods, so that a laptop fits a head and a few workers.
               "--set", "rayCluster.head.cpu=500m", "--set", "rayCluster.head.memory=1536Mi",
               "--set", "rayCluster.worker.cpu=1", "--set", "rayCluster.worker.memory=1536Mi",
               "--set", "resyncSeconds=3")
        c.kubectl("rollout", "status", "deployment/rayfleet", "-n", "rayfleet-system", "--timeout=180s", timeout=210)
        c.kubectl("create", "namespace", NAMESPACE)
        yield c
    finally:
        if os.environ.get("RAYFLEET_E2E_KEEP") == "1":
            print(f"keeping kind cluster {name}; KUBECONFIG={c.kubeconfig}")
        else:
            sh("kind", "delete", "cluster", "--name", name, check=False, timeout=300)


@pytest.fixture(scope="module")
def echo(cluster):
    sd = example("echo")
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(sd))
    return sd


def test_echo_serves_from_distinct_replica_processes(cluster, echo):
    name, replicas = echo["metadata"]["name"], echo["spec"].get("replicas", 1)
    sd = cluster.wait_ready(name, replicas)
    pids = [r["pid"] for r in sd["status"]["replicaStatuses"]]
    assert len(pids) == replicas and len(set(pids)) == replicas and all(pids), sd["status"]["replicaStatuses"]

    prefix = echo["spec"].get("routePrefix", "/").rstrip("/")
    with cluster.port_forward(name) as base:
        status, body = http_get(f"{base}{prefix}/hello?x=1")
        assert status == 200, body
        assert body["path"] == f"{prefix}/hello" and body["query"] == {"x": "1"}
        assert body["greeting"] == echo["spec"].get("handlerArgs", {}).get("greeting", "hello")
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: http_get(f"{base}{prefix}/n/{i}"), range(64)))
    assert all(code == 200 for code, _ in answers), answers
    served_by = {body["pid"] for _, body in answers}
    # Every replica is its own OS process, and the ingress spreads requests over all of them.
    assert served_by <= set(pids) and len(served_by) == replicas, (served_by, pids)


def test_scale_to_three(cluster, echo):
    name = echo["metadata"]["name"]
    cluster.kubectl("scale", f"sd/{name}", "-n", NAMESPACE, "--replicas=3")
    sd = cluster.wait_ready(name, 3)
    pids = [r["pid"] for r in sd["status"]["replicaStatuses"]]
    assert len(set(pids)) == 3, sd["status"]["replicaStatuses"]
    assert cluster.get("sd", name, "-n", NAMESPACE)["spec"]["replicas"] == 3


def test_delete_cleans_up(cluster, echo):
    name = echo["metadata"]["name"]
    cluster.kubectl("delete", "sd", name, "-n", NAMESPACE, "--timeout=300s", timeout=330)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        left = [kind for kind in ("raycluster", "service") if cluster.get(kind, name, "-n", NAMESPACE)]
        pods = (cluster.get("pods", "-n", NAMESPACE, "-l", f"ray.io/cluster={name}") or {}).get("items", [])
        if not left and not pods:
            break
        time.sleep(3)
    else:
        raise AssertionError(f"after deleting sd/{name}, still present: {left} and {len(pods)} pods\n{cluster.diagnostics(name)}")


def test_async_handler_overlaps_concurrent_requests(cluster):
    sd = example("async_io")
    name = sd["metadata"]["name"]
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(sd))
    try:
        cluster.wait_ready(name, sd["spec"].get("replicas", 1))
        prefix = sd["spec"].get("routePrefix", "/").rstrip("/")
        with cluster.port_forward(name) as base:
            url = f"{base}{prefix}?seconds=1"
            assert http_get(url)[0] == 200  # warm up: connections, imports
            with ThreadPoolExecutor(5) as pool:
                started = time.monotonic()
                answers = list(pool.map(lambda _: http_get(url), range(5)))
                elapsed = time.monotonic() - started
        assert all(code == 200 for code, _ in answers), answers
        # One replica, five 1-second awaits: concurrent, not 5 s in a row.
        assert elapsed < 2.5, f"5 concurrent 1 s requests took {elapsed:.2f}s"
    finally:
        cluster.kubectl("delete", "sd", name, "-n", NAMESPACE, "--timeout=300s", check=False, timeout=330)
