"""What the e2e tests share: examples applied and served, the objects they own, replica PIDs."""
from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

from tests.traffic import Traffic, http_get  # noqa: F401 - the e2e tests take them from here

from .conftest import NAMESPACE

ROOT = Path(__file__).resolve().parents[2]


def example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())


def apply(cluster, sd: dict) -> None:
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(sd))


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


def auth_secret(cluster, name: str) -> str:
    """The Secret the RayCluster's pods take Ray's token from."""
    rc = cluster.get("raycluster", name, "-n", NAMESPACE)
    env = {e["name"]: e for e in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    return env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]


def replica_pids(sd: dict) -> dict[str, int]:
    return {r["id"]: r["pid"] for r in sd["status"]["replicaStatuses"]}
