"""The e2e suite's cluster: kind (one control plane, two workers) running our images, KubeRay's real
operator, the chart.

Fixture `cluster`: builds every image without a registry (tests/e2e/images.py), starts the kind
cluster (tests/e2e/kind.py), installs KubeRay's operator from its own kustomize manifests (the Go
module's config/default, image swapped for the one built here), then `helm install`s charts/rayfleet.

Without Docker and Go every test SKIPS with the reason, unless RAYFLEET_E2E_STRICT=1 (set by `make e2e`,
and by `make test` where it could start Docker), which turns that into a failure. When the cluster
fails to come up, `kind export logs` writes every node's logs into pytest's temporary directory
(e2e0/kind/logs).

The host is outside the cluster, as a user's client is: it reaches a ServeDeployment through a NodePort
twin of its Service on the control-plane node (kind's nodes are containers on a Docker network the host
routes to; ClusterIPs and pod IPs live inside the nodes), and the test deployments admit that network
in their `httpFrom`, as a deployment reached from outside through a NodePort would.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from rayfleet.dev.toolchain import ensure_tools, kuberay_module_dir
from rayfleet.waiting import eventually

from . import images as e2e_images
from .kind import KindCluster, run

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rayfleet"
NAMESPACE = "rayfleet-e2e"
OPERATOR_NAMESPACE = "rayfleet-system"


class Cluster:
    """kubectl/helm against the e2e cluster, and reads that the tests share."""

    def __init__(self, kind: KindCluster):
        self.kind = kind
        self.kubeconfig = kind.kubeconfig
        self.kubectl = kind.kubectl
        self.helm_bin = str(ensure_tools().helm)
        self.entry_ip = kind.node_ip(kind.nodes("control-plane")[0])  # never stopped by a test
        self.outside = kind.network_cidr()

    def helm(self, *args: str, timeout: float = 600):
        return run(self.helm_bin, f"--kubeconfig={self.kubeconfig}", *args, timeout=timeout)

    def get(self, *args: str) -> dict | None:
        proc = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def sd(self, name: str) -> dict:
        return self.get("sd", name, "-n", NAMESPACE) or {}

    def pods(self, cluster_name: str) -> list[dict]:
        return (self.get("pods", "-n", NAMESPACE, "-l", f"ray.io/cluster={cluster_name}") or {}).get("items", [])

    def service_url(self, name: str) -> str:
        """The ServeDeployment's Service from this host: a NodePort Service with the same selector and port
        (made once), on the control-plane node; kube-proxy there sends each connection to an endpoint of
        the Service on any node."""
        svc = self.get("service", name, "-n", NAMESPACE)
        assert svc, f"no Service {name}"
        twin = self.get("service", f"{name}-nodeport", "-n", NAMESPACE)
        if twin is None:
            self.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{name}-nodeport"},
                "spec": {"type": "NodePort", "selector": svc["spec"]["selector"],
                         "ports": [{k: v for k, v in port.items() if k != "nodePort"} for port in svc["spec"]["ports"]]}}))
            twin = self.get("service", f"{name}-nodeport", "-n", NAMESPACE)
        port = twin["spec"]["ports"][0]["nodePort"]
        eventually(lambda: _accepts(self.entry_ip, port), timeout=60, what=f"kube-proxy serving NodePort {port}",
                   diagnostics=lambda: self.diagnostics(name))
        return f"http://{self.entry_ip}:{port}"

    def admitting_this_host(self, sd: dict) -> dict:
        """`sd` with its HTTP port admitting this host too (its default peers, plus kind's network)."""
        spec = sd["spec"]
        spec.setdefault("httpFrom", [{"podSelector": {}}])
        spec["httpFrom"].append({"ipBlock": {"cidr": self.outside}})
        return sd

    def diagnostics(self, name: str | None = None) -> str:
        parts = [self.kubectl("get", "sd,raycluster,pods,svc", "-n", NAMESPACE, "-o", "wide", check=False).stdout,
                 self.kubectl("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False).stdout[-3000:],
                 self.kubectl("logs", "-n", OPERATOR_NAMESPACE, "deployment/rayfleet", "--tail=60", check=False).stdout]
        if name:
            parts.insert(1, json.dumps(self.sd(name).get("status"), indent=1))
        return "\n".join(parts)

    def wait_ready(self, name: str, replicas: int, timeout: float = 600) -> dict:
        def ready():
            sd = self.sd(name)
            status = sd.get("status") or {}
            cond = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
            done = (cond.get("status") == "True" and status.get("readyReplicas") == replicas
                    and status.get("updatedReplicas") == replicas and len(status.get("replicaStatuses") or []) == replicas
                    and status.get("observedGeneration") == sd["metadata"]["generation"])
            return sd if done else None
        return eventually(ready, timeout=timeout, interval=2, what=f"sd/{name} Ready with {replicas} replicas",
                          diagnostics=lambda: self.diagnostics(name))


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def _strict() -> bool:
    return os.environ.get("RAYFLEET_E2E_STRICT") == "1"


def _missing() -> list[str]:
    missing = [f"{tool} ({why})" for tool, why in (("docker", "kind's nodes are containers"),
                                                   ("go", "kind and Kubernetes are built from their modules"))
               if not shutil.which(tool)]
    if not missing and subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        missing.append("a running Docker engine (`docker info` fails; start dockerd)")
    return missing


def install_kuberay(cluster: Cluster, image: str, workdir: Path) -> None:
    """KubeRay's operator from its own manifests (config/default: CRDs, RBAC, Deployment)."""
    overlay = workdir / "kuberay"
    shutil.copytree(kuberay_module_dir() / "config", overlay / "config")
    for path in overlay.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # copies of the read-only module cache
    repo, tag = image.rsplit(":", 1)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "kuberay-system", "resources": ["config/default"],
        "images": [{"name": "quay.io/kuberay/operator", "newName": repo, "newTag": tag}],
    }))
    cluster.kubectl("create", "namespace", "kuberay-system")
    # Server-side: the CRDs exceed the 256 KiB last-applied annotation.
    cluster.kubectl("apply", "--server-side", "-k", str(overlay), timeout=300)
    cluster.kubectl("rollout", "status", "-n", "kuberay-system", "deployment/kuberay-operator", "--timeout=300s",
                    timeout=330)


def install_rayfleet(cluster: Cluster, images: e2e_images.Images) -> None:
    op_repo, op_tag = images.operator.rsplit(":", 1)
    replica_repo, replica_tag = images.replica.rsplit(":", 1)
    cluster.helm("install", "rayfleet", str(CHART), "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
                 "--set", f"image.repository={op_repo}", "--set", f"image.tag={op_tag}",
                 "--set", "image.pullPolicy=Never",
                 "--set", f"replicaImage.repository={replica_repo}", "--set", f"replicaImage.tag={replica_tag}",
                 # Small pods, so that a head and two workers fit the 2 CPUs of this machine.
                 "--set", "rayCluster.head.cpu=500m", "--set", "rayCluster.head.memory=2Gi",
                 "--set", "rayCluster.worker.cpu=500m", "--set", "rayCluster.worker.memory=2Gi",
                 "--set", "resyncSeconds=3", "--wait", "--timeout=5m")


# Module scope: the cluster (and its CPU and memory) is gone before the next suite starts.
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = _missing()
    if missing:
        message = "e2e needs " + "; ".join(missing)
        if _strict():
            pytest.fail(message)
        pytest.skip(message)

    workdir = tmp_path_factory.mktemp("e2e")
    images = e2e_images.build_all()
    kind = KindCluster(workdir / "kind").start(images.all())
    c = Cluster(kind)
    try:
        install_kuberay(c, images.kuberay, workdir)
        install_rayfleet(c, images)
        c.kubectl("create", "namespace", NAMESPACE)
        # The users' namespace enforces the `restricted` Pod Security Standard: every Ray pod must pass it.
        c.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
        eventually(lambda: c.get("serviceaccount", "default", "-n", NAMESPACE), timeout=30,
                   what="the namespace's default ServiceAccount")
        yield c
    except BaseException:
        print(f"[e2e] the nodes' logs: {kind.export_logs()}")
        raise
    finally:
        kind.stop()


def pytest_terminal_summary(terminalreporter):
    """The faults' counts, also when pytest keeps the tests' output to itself (`make test` in CI)."""
    from .helpers import FAULT_REPORTS  # helpers imports this module
    if FAULT_REPORTS:
        terminalreporter.section("faults measured (bench/README.md)")
        for line in FAULT_REPORTS:
            terminalreporter.write_line(line)
