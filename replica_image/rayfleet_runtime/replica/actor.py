"""The replica: a Ray actor (its own OS process) that serves one deployment's handler over HTTP itself.

No Python process stands between the client and a replica: HAProxy connects straight to the HTTP
server that runs on the actor's own event loop (uvloop inside Ray workers): an httptools protocol of
our own for the plain contract (``http_server.py``), uvicorn's for an ASGI app (``asgi.py``). Ray method calls are only
for the controller: ``info()``, ``health()`` and ``drain()`` run in the ``control`` concurrency group,
which has its own thread and event loop, so a replica whose handler keeps the data-plane loop busy still
answers them (and a wedged loop shows up as a failed health check instead of a hung controller).

A handler that fails to import or construct does not kill the actor: the actor stays up, serves no
traffic, and ``info()`` returns ``{"error": {"reason", "message", "traceback"}}`` for the controller.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import ray

from rayfleet_api.desired import DesiredState
from rayfleet_runtime.local_socket import bind_local, local_name
from rayfleet_runtime.replica.asgi import AsgiRunner, AsgiServer, is_asgi_app
from rayfleet_runtime.replica.admission import replica_max_queued
from rayfleet_runtime.replica.handler import HandlerLoadError, HandlerRunner, load_handler
from rayfleet_runtime.replica.http_server import PlainServer
from rayfleet_runtime.log_setup import configure_logging
from rayfleet_runtime.replica.metrics import ReplicaMetrics

logger = logging.getLogger("rayfleet.replica")


class ReplicaServer:
    """Handler + HTTP server, independent of Ray (the actor below wraps it)."""

    def __init__(self, desired: DesiredState):
        self.desired = desired
        self.version = desired.version
        self.runner: HandlerRunner | AsgiRunner | None = None
        self.error: dict[str, str] | None = None
        self.draining = False
        self.host: str | None = None
        self.port: int | None = None
        self.local_socket: str | None = None  # its node's ingress connects here (local_socket)
        self.started_at = time.time()
        self._http: PlainServer | AsgiServer | None = None

    async def start(self, bind_host: str = "0.0.0.0", port: int = 0, advertise_host: str | None = None) -> None:
        try:
            handler = load_handler(self.desired.handler, self.desired.handler_args)
        except HandlerLoadError as exc:
            self._failed(exc)
            return
        sock = socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_host, port))
        name = local_name(sock.getsockname()[1])
        local = bind_local(name)
        sockets = [sock] if local is None else [sock, local]
        if is_asgi_app(handler):
            self.runner = AsgiRunner(handler, self.desired, lambda: self.draining)
            self._http = AsgiServer(self.runner)
            try:
                await self._http.start(sockets)  # the app's lifespan startup, before the replica is ready
            except HandlerLoadError as exc:
                self.runner, self._http = None, None
                for s in sockets:
                    s.close()
                self._failed(exc)
                return
        else:
            self.runner = HandlerRunner(handler, max_concurrency=self.desired.max_concurrency,
                                        sync_threads=self.desired.sync_threads,
                                        max_queued=replica_max_queued(self.desired))
            self._http = PlainServer(self.runner, self.desired.max_request_body_bytes, self.desired.access_log,
                                     lambda: self.draining)
            await self._http.start(sockets)
        self.port = sock.getsockname()[1]
        self.local_socket = None if local is None else name
        wildcard = bind_host in ("0.0.0.0", "::", "")
        self.host = (advertise_host or "127.0.0.1") if wildcard else bind_host

    def _failed(self, exc: HandlerLoadError) -> None:
        self.error = exc.as_dict()
        logger.error("%s: %s\n%s", exc.reason, exc.message, exc.traceback)

    def stats(self) -> dict[str, Any]:
        r = self.runner
        return {
            "version": self.version,
            "host": self.host,
            "port": self.port,
            "localSocket": self.local_socket,
            "pid": os.getpid(),
            "inFlight": r.in_flight if r else 0,
            "queued": r.queued if r else 0,
            "totalRequests": r.total_requests if r else 0,
            "errors": r.errors if r else 0,
            "rejected": r.rejected if r else 0,
            "cancelled": r.cancelled if r else 0,
            "lastError": r.last_error if r else None,
            "draining": self.draining,
            "startedAt": self.started_at,
            "error": self.error,
        }

    async def stop(self) -> None:
        """Stop serving; an ASGI app's lifespan shutdown runs here."""
        if self._http is not None:
            await self._http.stop()
        if self.runner is not None:
            self.runner.close()


# The controller's pending ``watch()`` call fails the moment the process dies: how it learns of a
# death at once. A call left by a controller that restarted returns within WATCH_S.
WATCH_S = 300.0


@ray.remote(concurrency_groups={"control": 4, "watch": 1}, max_restarts=0, max_task_retries=0)
class Replica:
    """One replica of a deployment; created by the controller as a named detached actor."""

    async def __init__(self, deployment: str, replica_id: str, desired: DesiredState, bind_host: str):
        configure_logging()
        self.deployment = deployment
        self.replica_id = replica_id
        self._loop = asyncio.get_running_loop()  # the data-plane loop (default concurrency group)
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.server = ReplicaServer(desired)
        self.metrics_registry = ReplicaMetrics(deployment, replica_id, lambda: self.server.runner)
        await self.server.start(bind_host, 0, self.node_ip)
        if self.server.runner is not None:
            self.metrics_registry.attach(self.server.runner)

    def _info(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "id": self.replica_id, "nodeId": self.node_id,
                "nodeIp": self.node_ip, **self.server.stats()}

    @ray.method(concurrency_group="control")
    async def info(self) -> dict[str, Any]:
        """Where it serves, what it runs, its counters; ``error`` is set if the handler failed to load."""
        return self._info()

    @ray.method(concurrency_group="control")
    async def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Ping the data-plane loop and run the handler's ``check_health()`` there, within ``timeout_s``."""
        healthy, message = True, None
        if self.server.error is not None:
            healthy, message = False, self.server.error["message"]
        elif self.server.runner is not None:
            fut = asyncio.run_coroutine_threadsafe(self.server.runner.check_health(), self._loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
            except asyncio.TimeoutError:
                fut.cancel()
                healthy, message = False, f"health check timed out after {timeout_s}s (event loop busy or check_health slow)"
            except Exception as exc:  # noqa: BLE001
                healthy, message = False, f"check_health: {type(exc).__name__}: {exc}"[:500]
        return {"healthy": healthy, "message": message, **self._info()}

    @ray.method(concurrency_group="control")
    async def metrics(self) -> list[Any]:
        """This replica's Prometheus families (prometheus_client ``Metric`` objects), for its node's ingress."""
        return self.metrics_registry.families()

    @ray.method(concurrency_group="watch")
    async def watch(self) -> None:
        """Returns after ``WATCH_S``; its caller learns of this process's death from the call failing."""
        await asyncio.sleep(WATCH_S)

    @ray.method(concurrency_group="control")
    async def drain(self, grace_s: float = 30.0) -> dict[str, Any]:
        """Stop being ready, then wait (at most ``grace_s``) until no request is in flight.

        Requests that still arrive while draining are served (a proxy may not have reloaded yet);
        the controller has already removed this replica from the routing table.
        """
        self.server.draining = True
        deadline = time.monotonic() + max(0.0, grace_s)
        runner = self.server.runner
        while runner is not None and (runner.in_flight or runner.queued) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if isinstance(runner, AsgiRunner):  # the app's lifespan shutdown, on its own loop, before the kill
            stopping = asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop)
            try:
                await asyncio.wait_for(asyncio.wrap_future(stopping), max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 - the app's shutdown hook is its own business
                logger.warning("ASGI shutdown of %s: %s: %s", self.replica_id, type(exc).__name__, exc)
        return self._info()
