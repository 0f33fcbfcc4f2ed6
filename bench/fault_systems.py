"""The systems ``bench.faults`` compares, as ``bench.run`` starts them (``bench.systems``), plus what a fault
scenario needs of each: deploy the ``bench.handlers:Faulty`` handler without waiting, report its replicas'
pids and whether it has converged, find and ask its controller."""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any

import ray

from bench.systems import HOST, RAYFLEET_MAX_CONCURRENCY, REPLICAS, Rayfleet, Serve
from rayfleet.procs import cmdline, descendants
from rayfleet_api.constants import CONTROLLER_NAME, RAY_NAMESPACE
from rayfleet_api.controller_client import ControllerUnreachable
from rayfleet_api.desired import ActorOptions, DesiredState
from rayfleet_api.states import DeploymentStatus, ReplicaState

SYSTEMS = ("rayfleet", "serve-default", "serve-haproxy")


@dataclass(frozen=True)
class Spec:
    """What a scenario deploys."""

    replicas: int = REPLICAS
    num_cpus: float = 1
    version: str = "v1"  # reaches the replicas as $BENCH_VERSION: a new one is a rollout (new processes)


@dataclass(frozen=True)
class Snapshot:
    """A deployment as its system reports it."""

    ready: frozenset[int]  # pids of replicas serving the desired version
    settled: bool  # the system says it is done converging
    message: str  # its status in words, for "never recovered" notes


class FleetFaults(Rayfleet):
    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def apply(self, name: str, spec: Spec) -> None:
        """Send the desired state and return at once (a rollout or scale is then under way)."""
        self.api.put_deployment(name, DesiredState(
            handler="bench.handlers:Faulty", handler_args={"record_dir": self.record_dir}, replicas=spec.replicas,
            route_prefix=f"/{name}", max_concurrency=RAYFLEET_MAX_CONCURRENCY,
            ray_actor_options=ActorOptions(num_cpus=spec.num_cpus), env={"BENCH_VERSION": spec.version}))

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ingress_port}/{name}"

    def snapshot(self, name: str) -> Snapshot:
        obs = self.api.get_deployment(name) or {}
        reps = obs.get("replicas", [])
        ready = frozenset(r["pid"] for r in reps
                          if r.get("state") == ReplicaState.READY and r.get("version") == obs.get("version") and r.get("pid"))
        why = sorted({r["lastError"] for r in reps if r.get("lastError")})
        if obs.get("error"):
            why.insert(0, obs["error"].get("message", ""))
        return Snapshot(ready, obs.get("status") == DeploymentStatus.RUNNING,
                        f"{obs.get('status')}, {obs.get('readyReplicas')}/{obs.get('targetReplicas')} ready"
                        + (f": {'; '.join(why)}" if why else ""))

    def controller_pid(self) -> int:
        handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
        return ray.get(handle.ready.remote(), timeout=10)["pid"]

    def controller_answers(self, name: str) -> bool:
        try:
            return self.api.get_deployment(name) is not None
        except ControllerUnreachable:
            return False


class ServeFaults(Serve):
    def __init__(self, mode: str, record_dir: str):
        super().__init__(mode)
        self.record_dir = record_dir

    def apply(self, name: str, spec: Spec) -> None:
        from bench.serve_app import faulty_app

        self.serve._run(faulty_app(spec.replicas, self.max_ongoing, spec.num_cpus, spec.version, self.record_dir),
                        _blocking=False, name=name, route_prefix=f"/{name}")

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.port}/{name}"

    def _controller(self) -> Any:
        from ray.serve.context import _get_global_client

        return _get_global_client()._controller

    def snapshot(self, name: str) -> Snapshot:
        details = ray.get(self._controller().get_serve_instance_details.remote(), timeout=10)
        app = details.get("applications", {}).get(name)
        dep = (app or {}).get("deployments", {}).get("FaultyHandler")
        if not dep:
            return Snapshot(frozenset(), False, f"app {app and app.get('status')}, no deployment yet")
        ready = frozenset(r["pid"] for r in dep["replicas"] if r["state"] == "RUNNING" and r.get("pid"))
        states = collections.Counter(_plain(r["state"]) for r in dep["replicas"])
        msg = f"app {_plain(app['status'])}, deployment {_plain(dep['status'])}, replicas {dict(states)}"
        return Snapshot(ready, app["status"] == "RUNNING" and dep["status"] == "HEALTHY",
                        msg + (f": {dep['message']}" if dep.get("message") else ""))

    def controller_pid(self) -> int:
        return next(p for p in descendants(os.getpid()) if cmdline(p).startswith("ray::ServeController"))

    def controller_answers(self, name: str) -> bool:
        try:
            ray.get(self._controller().get_serve_instance_details.remote(), timeout=2)
            return True
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return False


def _plain(value: Any) -> str:
    """Serve's status enums as their bare value ("RUNNING", not "<ReplicaState.RUNNING: 'RUNNING'>")."""
    return str(getattr(value, "value", value))


def converged(system: Any, name: str, replicas: int, old: frozenset[int] = frozenset()) -> bool:
    """The system calls the deployment converged, with exactly ``replicas`` ready, none of them an ``old`` pid."""
    snap = system.snapshot(name)
    return snap.settled and len(snap.ready) == replicas and snap.ready.isdisjoint(old)
