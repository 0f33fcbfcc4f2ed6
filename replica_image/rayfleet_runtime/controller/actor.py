"""The controller: one named detached Ray actor that keeps every deployment's replicas as desired.

``rayfleet-controller`` (namespace ``rayfleet``) is pinned to the head node with ``num_cpus=0``. It
serves the HTTP API in ``api_server`` on its own event loop and runs ``deployment_state.ControllerCore``
there: the reconcile loop (probe replicas, ``planning.plan()``, start/drain/stop them) and the
``route_publisher.RoutePublisher`` that pushes the routing table of READY replicas to one
``IngressManager`` per node (``ingress_nodes="all"``) or only the head node (``"head"``, for local mode).
Both make their Ray calls through the ``ray_calls.RayBackend`` built here.

Entry points: ``ensure_controller(...)`` (idempotent) and
``python -m rayfleet_runtime.controller --address auto --control-port 8090 --ingress-port 8000
--ingress-nodes all|head --bind-host 0.0.0.0`` with the API's token in ``$RAYFLEET_CONTROL_TOKEN``, which
exits 0 once the HTTP API answers.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayfleet_api.constants import (CONTROL_PORT, CONTROL_TOKEN_ENV, CONTROLLER_NAME, INGRESS_PORT, METRICS_PORT,
                                    RAY_NAMESPACE)
from rayfleet_api.http_probe import wait_http
from rayfleet_runtime.controller.api_server import make_app
from rayfleet_runtime.controller.deployment_state import ControllerCore
from rayfleet_runtime.log_setup import configure_logging
from rayfleet_runtime.controller.ray_calls import RayBackend, alive_node_ids

logger = logging.getLogger("rayfleet.controller")


@ray.remote(max_restarts=-1)
class Controller:
    """Ray actor hosting ControllerCore and its HTTP API."""

    async def __init__(self, token: str, control_port: int = CONTROL_PORT, ingress_port: int = INGRESS_PORT,
                       ingress_nodes: str = "all", bind_host: str = "0.0.0.0", metrics_port: int | None = METRICS_PORT):
        from aiohttp import web  # noqa: PLC0415

        configure_logging()
        self.core = ControllerCore(RayBackend(metrics_port), ingress_port=ingress_port, ingress_nodes=ingress_nodes,
                                   bind_host=bind_host)
        self.control_port = control_port
        self.bind_host = bind_host
        await self.core.recover()
        self._runner = web.AppRunner(make_app(self.core, token), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, bind_host, control_port, reuse_address=True).start()
        self._loop_task = asyncio.get_running_loop().create_task(self.core.run())
        logger.info("rayfleet controller serving on %s:%d", bind_host, control_port)

    async def ready(self) -> dict[str, Any]:
        return {"controlPort": self.control_port, "bindHost": self.bind_host, "pid": os.getpid(),
                "nodeId": ray.get_runtime_context().get_node_id(), "ingressPort": self.core.ingress_port,
                "ingressNodes": self.core.ingress_nodes, "metricsPort": self.core.backend.metrics_port}

    async def drain_node(self, node_id: str, timeout_s: float) -> int:
        """A node's pod is terminating (its preStop hook asks, through the node's ingress): move its
        replicas away; how many are still there."""
        return self.core.drain_node(node_id, timeout_s)

    async def replicas_down(self, node_id: str, down: list[str]) -> None:
        """The ingress of ``node_id`` found these of its own replicas down (``ingress.health_watch``)."""
        self.core.replicas_down(node_id, down)

    async def metrics(self) -> list[Any]:
        """The controller's Prometheus metrics (``prometheus_client`` ``Metric`` objects), for the head node's
        ingress to serve. Async, so it reads the controller's state on the loop that changes it."""
        return self.core.metrics.collect()


def head_node_id() -> str:
    heads = alive_node_ids(head_only=True)
    if not heads:
        raise RuntimeError("no alive head node in this Ray cluster")
    return heads[0]


def ensure_controller(token: str, control_port: int = CONTROL_PORT, ingress_port: int = INGRESS_PORT,
                      ingress_nodes: str = "all", bind_host: str = "0.0.0.0", timeout_s: float = 60.0,
                      metrics_port: int | None = METRICS_PORT) -> Any:
    """Get or create the controller actor and wait until it serves; returns its handle (idempotent).
    ``token`` is the credential its API will require (an existing controller keeps the one it has);
    ``metrics_port``: where every node's ingress serves that node's Prometheus metrics (None: nowhere)."""
    if ingress_nodes not in ("all", "head"):
        raise ValueError(f"ingress_nodes must be 'all' or 'head', got {ingress_nodes!r}")
    for attempt in range(2):
        try:
            handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
            found = True
        except ValueError:
            found = False
            try:
                handle = Controller.options(
                    name=CONTROLLER_NAME, namespace=RAY_NAMESPACE, lifetime="detached", num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(head_node_id(), soft=False),
                ).remote(token, control_port, ingress_port, ingress_nodes, bind_host, metrics_port)
            except ValueError:  # somebody else created it just now
                handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
        try:
            info = ray.get(handle.ready.remote(), timeout=timeout_s)
            break
        except ray.exceptions.RayActorError:
            RayBackend().kill(handle)  # e.g. port in use: don't let Ray restart it forever
            # One found under its name may be the controller of a head that is gone (its GCS state kept
            # in Redis, its node dead): it can't come back, a new one on this head takes its place.
            if not found or attempt:
                raise
    if info["controlPort"] != control_port:
        logger.warning("controller already runs with control port %s (asked for %s)", info["controlPort"], control_port)
    return handle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayfleet_runtime.controller",
                                     description="Ensure the rayfleet controller runs in an existing Ray cluster.")
    parser.add_argument("--address", default="auto")
    parser.add_argument("--control-port", type=int, default=CONTROL_PORT)
    parser.add_argument("--ingress-port", type=int, default=INGRESS_PORT)
    parser.add_argument("--ingress-nodes", choices=("all", "head"), default="all")
    parser.add_argument("--bind-host", default="0.0.0.0")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    token = os.environ.get(CONTROL_TOKEN_ENV, "")
    if not token:
        parser.error(f"${CONTROL_TOKEN_ENV} must hold the token the controller's API will require")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ray.init(address=args.address, namespace=RAY_NAMESPACE, log_to_driver=False)
    try:
        info = ray.get(ensure_controller(token, args.control_port, args.ingress_port, args.ingress_nodes, args.bind_host,
                                         timeout_s=args.timeout, metrics_port=args.metrics_port).ready.remote())
        host = "127.0.0.1" if info["bindHost"] in ("0.0.0.0", "::", "") else info["bindHost"]
        wait_http(f"http://{host}:{info['controlPort']}/healthz", args.timeout)
        print(f"rayfleet controller ready on {host}:{info['controlPort']}", flush=True)
    finally:
        ray.shutdown()
    return 0

