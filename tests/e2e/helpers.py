"""What the e2e tests share: examples applied and served, the objects they own, replica PIDs, faults
measured and reported."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import yaml

from rayfleet.waiting import eventually
from tests.traffic import Traffic, http_get  # noqa: F401 - the e2e tests take them from here

from .conftest import NAMESPACE, OPERATOR_NAMESPACE
from .images import TAG
from .kind import run

ROOT = Path(__file__).resolve().parents[2]
CLIENT_IMAGE = f"rayfleet/operator:{TAG}"
# The `[e2e] fault ...` lines of this session, repeated in pytest's summary (conftest) so that CI's log
# keeps the figures bench/README.md quotes.
FAULT_REPORTS: list[str] = []


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())


def apply(cluster, sd: dict) -> None:
    """Apply a ServeDeployment that this host (outside the cluster) may send requests to."""
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(cluster.admitting_this_host(sd)))


@contextlib.contextmanager
def serving(cluster, example_name: str):
    """An example ServeDeployment applied and ready; yields the URL of its route through the Service,
    and deletes it afterwards whatever the test did."""
    sd = example(example_name)
    name = sd["metadata"]["name"]
    apply(cluster, sd)
    try:
        cluster.wait_ready(name, sd["spec"]["replicas"])
        yield f"{cluster.service_url(name)}{sd['spec']['routePrefix']}"
    finally:
        cluster.kubectl("delete", "sd", name, "-n", NAMESPACE, "--timeout=300s", check=False, timeout=330)


def workers(cluster, name: str) -> list[dict]:
    return [p for p in cluster.pods(name) if p["metadata"]["labels"].get("ray.io/node-type") == "worker"
            and not p["metadata"].get("deletionTimestamp")]


def full_strength(cluster, name: str, started: float, *, gone_pod: str = "", off_node: str = "",
                  replicas: int = 2) -> float:
    """Seconds from a fault until `replicas` READY replicas serve on as many distinct live worker pods,
    `gone_pod` no longer exists and no replica is on `off_node` (a Kubernetes node)."""
    def back():
        status = cluster.sd(name).get("status") or {}
        ready = [r.get("node") for r in status.get("replicaStatuses") or [] if r["state"] == "READY"]
        live = {p["status"].get("podIP"): p["spec"].get("nodeName") for p in workers(cluster, name)}
        return (status.get("readyReplicas") == replicas and len(set(ready)) == replicas
                and all(ip in live and live[ip] != off_node for ip in ready)
                and not (gone_pod and gone_pod in {p["metadata"]["name"] for p in cluster.pods(name)}))
    eventually(back, timeout=600, interval=1, what=f"sd/{name} at full strength (gone: {gone_pod or '-'}, "
               f"off node: {off_node or '-'})", diagnostics=lambda: cluster.diagnostics(name))
    return time.monotonic() - started


def report_fault(fault: str, traffic: Traffic, seconds: float, detail: str = "") -> None:
    line = (f"[e2e] fault {fault!r}: {len(traffic.failures)} failed of {traffic.answers + len(traffic.failures)} "
            f"GETs; full strength after {seconds:.1f} s{'; ' + detail if detail else ''}")
    FAULT_REPORTS.append(line)
    print("\n" + line, flush=True)


def auth_secret(cluster, name: str) -> str:
    """The Secret the RayCluster's pods take Ray's token from."""
    rc = cluster.get("raycluster", name, "-n", NAMESPACE)
    env = {e["name"]: e for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    return env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]


def replica_pids(sd: dict) -> dict[str, int]:
    return {r["id"]: r["pid"] for r in sd["status"]["replicaStatuses"]}


_GET = ("import sys, urllib.request, urllib.error\n"
        "h = {'Authorization': 'Bearer ' + sys.argv[2]} if sys.argv[2] else {}\n"
        "try: print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=h), timeout=10).status)\n"
        "except urllib.error.HTTPError as e: print(e.code)\n"
        "except OSError: print(0)")
_CONNECT = ("import socket, sys\n"
            "try: socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close(); print(1)\n"
            "except OSError: print(0)")


def from_operator(cluster, url: str, token: str = "") -> int:
    """The HTTP status of a GET from inside the operator's pod (0: no HTTP answer)."""
    return int(cluster.kubectl("exec", "-n", OPERATOR_NAMESPACE, "deployment/rayfleet", "--", "python3", "-c", _GET,
                               url, token).stdout.strip())


def connects(cluster, namespace: str, pod: str, ip: str, port: int) -> bool:
    """Whether a TCP connection from `pod` to ip:port is accepted within 3 s (a policy drops the SYN)."""
    return cluster.kubectl("exec", "-n", namespace, pod, "--", "python3", "-c", _CONNECT, ip,
                           str(port)).stdout.strip() == "1"


def client_pod(cluster, namespace: str, name: str) -> str:
    """A running pod of the operator's image (it has Python), doing nothing, to send traffic from; it
    passes the `restricted` Pod Security Standard, as pods in the users' namespace must."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"containers": [{
            "name": "client", "image": CLIENT_IMAGE, "imagePullPolicy": "Never", "command": ["sleep", "infinity"],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                "runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}}}],
            "terminationGracePeriodSeconds": 0}}))
    cluster.kubectl("wait", "-n", namespace, f"pod/{name}", "--for=condition=Ready", "--timeout=120s", timeout=150)
    return name


def run_docker(*args: str, check: bool = True):
    """docker, for what the tests do to kind's nodes (they are containers)."""
    return run("docker", *args, check=check)
