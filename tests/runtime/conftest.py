"""A real local Ray cluster (lean: 4 CPUs, no dashboard, 127.0.0.1) with the rayfleet controller on it."""
from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from rayfleet.ports import free_port
from rayfleet.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


class Api:
    """Tiny client for the controller's /v1 API plus helpers to wait for observed state."""

    def __init__(self, base: str, ingress: str, token: str, metrics: str):
        self.base = base
        self.ingress = ingress
        self.metrics = metrics  # the node's Prometheus endpoint
        self.token = token
        self.http = httpx.Client(base_url=base, timeout=10, headers={"Authorization": f"Bearer {token}"})

    def put(self, name: str, **desired):
        body = {"handler": "examples.echo:Echo", "replicas": 1, "version": "v1", "routePrefix": f"/{name}",
                "rayActorOptions": {"numCpus": 0.1}, "gracefulShutdownSeconds": 5,
                "healthCheck": {"periodSeconds": 1, "timeoutSeconds": 2, "failureThreshold": 2}, **desired}
        r = self.http.put(f"/v1/deployments/{name}", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def get(self, name: str):
        r = self.http.get(f"/v1/deployments/{name}")
        return None if r.status_code == 404 else r.json()

    def wait(self, name: str, pred, timeout: float = 60.0, what: str = ""):
        """The observed state of `name` once `pred` holds for it (a transport error, as while the controller
        restarts, is "not yet")."""
        def check():
            obs = self.get(name)
            return pred(obs) and (obs,)  # a tuple: "deleted" is observed as None
        return eventually(check, timeout=timeout, interval=0.2, what=what or name,
                          diagnostics=lambda: f"last observed: {self._last(name)}", ignoring=(httpx.TransportError,))[0]

    def _last(self, name: str):
        try:
            return self.get(name)
        except httpx.HTTPError as exc:
            return exc

    def wait_ready(self, name: str, n: int, timeout: float = 60.0):
        return self.wait(name, lambda o: o is not None and o["readyReplicas"] == n and o["status"] == "Running"
                         and all(r["state"] == "READY" for r in o["replicas"]), timeout, f"{name} {n} ready")

    def delete(self, name: str, wait: bool = True):
        r = self.http.delete(f"/v1/deployments/{name}")
        assert r.status_code in (202, 404), r.text
        if wait:
            self.wait(name, lambda o: o is None, 60, f"{name} deleted")


@pytest.fixture(scope="module")
def ray_cluster():
    """One fresh local Ray per test module (test_dataplane, test_ingress): module scope, not session,
    because both put an ingress actor on the head node under the same detached name."""
    import ray

    _connect_ray(ray, address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def connect_ray():
    """``connect_ray(ray, **init)``: for a module that starts a Ray cluster of its own."""
    return _connect_ray


def _connect_ray(ray, **init) -> None:
    """``ray.init(**init)`` with this repository's handlers importable in every worker."""
    pythonpath = os.pathsep.join(dict.fromkeys([str(REPO), str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    os.environ["PYTHONPATH"] = pythonpath
    sys.path[:0] = [p for p in (str(REPO), str(HERE)) if p not in sys.path]
    # Inherited by Ray's processes, as `rayfleet run` does it (rayfleet.local_run.worker_env): no runtime_env
    ray.init(namespace="rayfleet", log_to_driver=os.environ.get("RAYFLEET_TEST_LOGS") == "1", **init)


@pytest.fixture(scope="module")
def api(ray_cluster):
    from rayfleet_api.http_probe import wait_http
    from rayfleet_runtime.controller.actor import ensure_controller

    control_port, ingress_port, metrics_port, token = free_port(), free_port(), free_port(), secrets.token_urlsafe(32)
    ensure_controller(token, control_port=control_port, ingress_port=ingress_port, ingress_nodes="head",
                      bind_host="127.0.0.1", metrics_port=metrics_port)
    wait_http(f"http://127.0.0.1:{control_port}/healthz", 30)
    client = Api(f"http://127.0.0.1:{control_port}", f"http://127.0.0.1:{ingress_port}", token,
                 f"http://127.0.0.1:{metrics_port}/metrics")
    yield client
    client.http.close()


@pytest.fixture
def ray_tmpdir():
    """A ``RAY_TMPDIR`` of a `rayfleet run` of its own. Short: Ray puts unix sockets under it (108-byte limit),
    so not under pytest's long tmp_path."""
    path = tempfile.mkdtemp(prefix="rf-run-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
