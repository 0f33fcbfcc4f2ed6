"""The systems ``bench.run`` and ``bench.faults`` compare, each started in a worker's own fresh local Ray:
rayfleet (controller + HAProxy ingress), Ray Serve in one of its modes, and a bare uvicorn (no Ray at all).

Each has ``start()``, ``deploy(name, handler, replicas) -> url``, ``replica_pids(name)``, ``undeploy(name)``
and ``stop()``, and a ``config`` for the report.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from rayfleet.ports import free_port
from rayfleet.procs import cmdline, descendants
from rayfleet_api.constants import RAY_NAMESPACE
from rayfleet_api.controller_client import ControllerClient
from rayfleet_api.desired import ActorOptions, DesiredState
from rayfleet_api.http_probe import wait_http
from rayfleet_api.states import DeploymentStatus

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("rayfleet", "serve-default", "serve-tuned", "serve-haproxy", "uvicorn-bare")
# The limit for the per-request cost: a bare Python server (no Ray, no proxy) with the same answer.
BARE = "uvicorn-bare"
ASGI_APPS = {"asgi_bare": "bench.asgi_app:bare", "asgi": "bench.asgi_app:app"}
REPLICAS = 2
RAYFLEET_MAX_CONCURRENCY = 1000  # same per-replica cap as the tuned Serve peers (max_ongoing_requests=1000)
TUNED_MAX_ONGOING = 1000
CLUSTER_CPUS = 8  # the local Ray's logical CPUs: scheduling never limits (rollout-full asks for all of them)
HOST = "127.0.0.1"


def repo_on_pythonpath() -> str:
    """This checkout first on $PYTHONPATH, for the processes started from here (Ray's workers import
    ``bench.handlers``); returns the new value."""
    pythonpath = os.pathsep.join(dict.fromkeys([str(REPO)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    os.environ["PYTHONPATH"] = pythonpath
    return pythonpath


def start_local_ray(system: str, pythonpath: str) -> None:
    """A fresh local Ray for ``system``, with ``pythonpath`` for every worker."""
    import ray  # here: bench.run imports this module for its names and never starts Ray

    # In the environment Ray's processes inherit, as `rayfleet run` does (rayfleet.local_run.worker_env): a
    # job runtime_env would send every worker start, either system's, through Ray's runtime-env agent.
    os.environ["PYTHONPATH"] = pythonpath
    # address="local": always a fresh cluster of our own, never a Ray someone else started on this machine
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, _node_ip_address=HOST,
             namespace=RAY_NAMESPACE if system == "rayfleet" else "bench-serve", log_to_driver=False)


def wait_serving(url: str) -> None:
    """Until ``url`` answers 200 five times in a row (routes pushed to every proxy)."""
    wait_http(url, 120, streak=5)


class Rayfleet:
    name = "rayfleet"

    def start(self) -> None:
        from rayfleet_runtime.controller.actor import ensure_controller

        self.control_port, self.ingress_port, self.metrics_port = free_port(), free_port(), free_port()
        token = secrets.token_urlsafe(32)
        ensure_controller(token, control_port=self.control_port, ingress_port=self.ingress_port, ingress_nodes="head",
                          bind_host="127.0.0.1", metrics_port=self.metrics_port)
        self.api = ControllerClient(f"http://127.0.0.1:{self.control_port}", token, timeout_s=10)
        self.api.wait_healthy(60)
        self.config = {"maxConcurrency": RAYFLEET_MAX_CONCURRENCY, "syncThreads": 1, "numCpus": 1}

    def deploy(self, name: str, handler: str, replicas: int, env: dict[str, str] | None = None) -> str:
        target = ASGI_APPS.get(handler, f"bench.handlers:{handler}")
        self.api.put_deployment(name, DesiredState(
            handler=target, replicas=replicas, version="v1", route_prefix=f"/{name}",
            max_concurrency=RAYFLEET_MAX_CONCURRENCY, ray_actor_options=ActorOptions(num_cpus=1),
            graceful_shutdown_seconds=2, env=env or {}))
        deadline = time.monotonic() + 120
        while True:
            obs = self.api.get_deployment(name) or {}
            if obs.get("readyReplicas") == replicas and obs.get("status") == DeploymentStatus.RUNNING:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {obs}")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{self.ingress_port}/{name}"
        wait_serving(url)
        return url

    def replica_pids(self, name: str) -> list[int]:
        return [r["pid"] for r in (self.api.get_deployment(name) or {}).get("replicas", []) if r.get("pid")]

    def undeploy(self, name: str) -> None:
        self.api.delete_deployment(name)
        deadline = time.monotonic() + 60
        while self.api.get_deployment(name) is not None and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        pass


class Serve:
    def __init__(self, mode: str):
        self.name = mode
        self.max_ongoing = None if mode == "serve-default" else TUNED_MAX_ONGOING
        self.config = {"max_ongoing_requests": self.max_ongoing or 5, "num_cpus": 1,
                       "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0"),
                       "RAY_SERVE_ENABLE_HA_PROXY": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0")}

    def start(self) -> None:
        from ray import serve

        self.serve = serve
        self.port = free_port()
        host = "0.0.0.0" if self.name == "serve-haproxy" else "127.0.0.1"  # HAProxy mode forces all interfaces
        serve.start(http_options={"host": host, "port": self.port})

    def deploy(self, name: str, handler: str, replicas: int) -> str:
        from bench.serve_app import app

        self.serve.run(app(handler, replicas, self.max_ongoing), name=name, route_prefix=f"/{name}")
        url = f"http://127.0.0.1:{self.port}/{name}"
        wait_serving(url)
        return url

    def replica_pids(self, name: str) -> list[int]:
        me = descendants(os.getpid())
        return sorted(p for p in me if cmdline(p).startswith(f"ray::ServeReplica:{name}:"))

    def undeploy(self, name: str) -> None:
        # Serve replicas take ~30 s to exit after a delete on this Ray (even with graceful_shutdown_timeout_s=1),
        # so don't wait that long: they are idle (no traffic is routed to them any more) while the next
        # scenario runs under another app name, and the cluster is thrown away at the end.
        pids = self.replica_pids(name)
        self.serve.delete(name, _blocking=False)
        deadline = time.monotonic() + 3
        while any(os.path.exists(f"/proc/{p}") and cmdline(p).startswith("ray::ServeReplica") for p in pids) \
                and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        pass  # no serve.shutdown(): it waits ~30 s for a graceful controller stop; ray.shutdown() ends this throwaway cluster


class BareUvicorn:
    """uvicorn with as many workers as replicas elsewhere, httptools + uvloop, the raw ASGI app that
    answers "ok" (``bench.asgi_app:bare``): what one request costs a Python server with nothing else."""

    name = BARE

    def start(self) -> None:
        self.config = {"workers": REPLICAS, "http": "httptools", "loop": "uvloop"}
        self.proc: subprocess.Popen | None = None

    def deploy(self, name: str, handler: str, replicas: int) -> str:
        assert handler == "trivial" and self.proc is None, "the bare server runs the trivial answer only"
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", ASGI_APPS["asgi_bare"], "--workers", str(replicas), "--http", "httptools",
             "--loop", "uvloop", "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"],
            cwd=REPO)
        url = f"http://127.0.0.1:{port}/{name}"
        wait_serving(url)
        return url

    def replica_pids(self, name: str) -> list[int]:
        return sorted(p for p in descendants(self.proc.pid) if "multiprocessing" in cmdline(p)) if self.proc else []

    def undeploy(self, name: str) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None
