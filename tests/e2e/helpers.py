"""What the e2e tests share: requests through a Service, traffic that counts its failures, examples."""
from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from .conftest import NAMESPACE

ROOT = Path(__file__).resolve().parents[2]


def http_get(url: str, timeout: float = 30, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}
    except OSError as exc:  # refused, reset, timed out: the client saw no HTTP answer
        return 0, {"error": repr(exc)}


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


class Traffic:
    """GETs in a loop on a background thread (a new connection each), counting what failed."""

    def __init__(self, url: str):
        self.url, self.answers, self.failures = url, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.answers + len(self.failures) < 100_000:
            code, body = http_get(self.url, timeout=30)
            if code == 200:
                self.answers += 1
                self.last = body
            else:
                self.failures.append((code, body))
            time.sleep(0.02)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)
