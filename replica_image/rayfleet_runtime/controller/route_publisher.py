"""Publishing the routing table: the controller's READY replicas -> one ``IngressManager`` (HAProxy) per node.

``RoutePublisher.changed()`` says the table may differ now and returns a *routes version*. A background
loop (``run()``) builds the ``routing.RoutingTable`` with the ``table`` callback and pushes it to every ingress node that
has not yet applied that exact table (one ``IngressManager`` per alive node for ``ingress_nodes="all"``,
only the head node for ``"head"``; the node list is refreshed every ``NODES_REFRESH_S``, which is also
how often a failed push is retried at the latest). The ingress actors and the node list come from the
injected ``ensure_ingress`` and ``node_ids`` (``ray_calls.RayBackend``'s, or a unit test's fakes). Every push
that sends a table is reported to ``pushed`` (the controller's metrics): outcome ``ok`` when every node it
was sent to applied it, else ``error``, and how long until the last node answered.

``wait_applied(version)`` returns once every ingress has *applied* (validated the config and reloaded
HAProxy) a table at least that new. A graceful stop waits for it before it drains the replica, so no
proxy still routes new requests to a replica that is about to go away.

``waiting_requests()`` reads, from every ingress it pushes to, the requests each deployment waits with
there (the autoscaler's share of the load that no replica counts yet).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

from rayfleet_api.constants import INGRESS_PORT
from rayfleet_runtime.routing import RoutingTable

NODES_REFRESH_S = 5.0
PUSH_TIMEOUT_S = 30.0
RETRY_BASE_S, RETRY_MAX_S = 0.5, 30.0  # a failing ingress is retried with doubling waits, not in a loop

logger = logging.getLogger("rayfleet.controller")


class NodeIngress(Protocol):
    """One node's ingress, as ``ensure_ingress`` returns it."""

    def update(self, table: RoutingTable) -> Awaitable[dict[str, Any]]:
        """Send ``table`` at once; the awaitable answers ``{"applied": bool, ...}``."""

    def stats(self) -> Awaitable[dict[str, Any]]:
        """HAProxy's counters per deployment (``{"deployments": {name: {"queue": n, ...}}, "held": {name: n}}``)."""


EnsureIngress = Callable[[str, int, str], Awaitable[NodeIngress]]  # (node id, port, bind host) -> that node's ingress
NodeIds = Callable[[bool], Awaitable[list[str]]]  # (head only?) -> alive node ids
PushObserver = Callable[[str, float], None]  # (outcome "ok" | "error", seconds)


class RoutePublisher:
    """Pushes ``table()`` to the ingress of every node, only when it changed; tracks what was applied."""

    def __init__(self, table: Callable[[], RoutingTable], ensure_ingress: EnsureIngress, node_ids: NodeIds,
                 pushed: PushObserver, ingress_port: int = INGRESS_PORT, ingress_nodes: str = "all",
                 bind_host: str = "0.0.0.0"):
        self._table = table
        self._ensure_ingress = ensure_ingress
        self._node_ids = node_ids
        self._report_push = pushed
        self.ingress_port = ingress_port
        self.ingress_nodes = ingress_nodes
        self.bind_host = bind_host
        self._changed = asyncio.Event()
        self._version = 0  # bumped by every changed()
        self._applied = 0  # newest version that every ingress node has applied
        self._ingress: dict[str, NodeIngress] = {}  # node id -> its IngressManager
        self._pushed: dict[str, RoutingTable] = {}  # node id -> the routing table it last applied
        self._nodes: list[str] = []
        self._nodes_at = 0.0
        self._failures: dict[str, int] = {}  # node id -> consecutive failed pushes
        self._retry_at: dict[str, float] = {}  # node id -> not before (monotonic)
        self._waiting: dict[str, dict[str, float]] = {}  # node id -> deployment -> requests waiting there
        self._stats_calls: dict[str, asyncio.Task] = {}  # node id -> its stats() call in flight

    def changed(self) -> int:
        """The table may have changed: push it soon. Returns the version that covers this change."""
        self._version += 1
        self._changed.set()
        return self._version

    async def wait_applied(self, version: int, timeout_s: float) -> bool:
        """True once every ingress applied a table of at least ``version``; False after ``timeout_s``."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self._applied < version:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.05, left))
        return True

    async def waiting_requests(self, wait_s: float) -> dict[str, float]:
        """Requests each deployment waits with in the ingresses, summed over nodes: HAProxy's queue for its
        backend plus those the ingress holds while it has no replica. An ingress that does not answer within
        ``wait_s`` counts with its previous answer (one call per ingress at a time: a slow one piles up none)."""
        for gone in (set(self._waiting) | set(self._stats_calls)) - set(self._ingress):
            self._waiting.pop(gone, None)
            self._stats_calls.pop(gone, None)
        for node_id, ingress in self._ingress.items():
            call = self._stats_calls.get(node_id)
            if call is None or call.done():
                self._stats_calls[node_id] = asyncio.ensure_future(self._read_waiting(node_id, ingress))
        pending = [call for call in self._stats_calls.values() if not call.done()]
        if pending:
            await asyncio.wait(pending, timeout=wait_s)
        total: dict[str, float] = {}
        for per_node in self._waiting.values():
            for name, count in per_node.items():
                total[name] = total.get(name, 0) + count
        return total

    async def _read_waiting(self, node_id: str, ingress: NodeIngress) -> None:
        try:
            stats = await asyncio.wait_for(ingress.stats(), PUSH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the push loop judges and recreates a failing ingress
            logger.debug("stats of the ingress on node %s: %s", node_id[:12], str(exc)[:300])
            return
        if node_id in self._ingress:
            self._waiting[node_id] = waiting_per_deployment(stats)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), NODES_REFRESH_S)
            except asyncio.TimeoutError:
                pass
            self._changed.clear()
            try:
                await self.push()
            except Exception:  # noqa: BLE001
                logger.exception("pushing routes failed; will retry")
                await asyncio.sleep(1.0)
                self._changed.set()

    async def _ingress_node_ids(self) -> list[str]:
        if time.time() - self._nodes_at > NODES_REFRESH_S or not self._nodes:
            self._nodes = await self._node_ids(self.ingress_nodes == "head")
            self._nodes_at = time.time()
        return self._nodes

    def _failed(self, node_id: str, exc: BaseException) -> None:
        """Forget the node's ingress and retry it later: sooner at first, at most every RETRY_MAX_S."""
        failures = self._failures[node_id] = self._failures.get(node_id, 0) + 1
        delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (failures - 1))
        logger.warning("routing update to node %s failed (%d in a row; retry in %.1fs): %s", node_id[:12], failures,
                       delay, str(exc)[:300])
        self._ingress.pop(node_id, None)
        self._pushed.pop(node_id, None)
        self._retry_at[node_id] = time.monotonic() + delay
        asyncio.get_running_loop().call_later(delay, self._changed.set)

    async def push(self) -> None:
        # No await between reading the version and rendering the table: the table reflects every
        # change up to ``version``.
        version = self._version
        table = self._table()
        nodes = await self._ingress_node_ids()
        for gone in set(self._ingress) - set(nodes):
            self._ingress.pop(gone, None)
            self._pushed.pop(gone, None)
        pending = []
        everywhere = True
        sent, failed = False, False  # to any node / not applied by one of those
        started = time.monotonic()
        for node_id in nodes:
            if self._pushed.get(node_id) == table:
                continue
            if time.monotonic() < self._retry_at.get(node_id, 0.0):  # backing off after failures
                everywhere = False
                continue
            sent = True
            try:
                ingress = self._ingress.get(node_id)
                if ingress is None:
                    ingress = self._ingress[node_id] = await self._ensure_ingress(node_id, self.ingress_port,
                                                                                  self.bind_host)
                pending.append((node_id, ingress.update(table)))
            except Exception as exc:  # noqa: BLE001 - e.g. Ray refused to create it
                self._failed(node_id, exc)
                everywhere, failed = False, True
        for node_id, ref in pending:
            try:
                result = await asyncio.wait_for(ref, PUSH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - ingress died or is slow: recreate it, after a while
                self._failed(node_id, exc)
                everywhere, failed = False, True
                continue
            self._failures.pop(node_id, None)
            # The ingress answers (it did not raise) also when it kept its old config: an invalid
            # config or a failed HAProxy reload is ``applied: False``. Then HAProxy still routes by the
            # previous table: don't record this one as pushed, so it is retried (at the latest after
            # NODES_REFRESH_S), and don't let graceful stops believe the replica was unrouted.
            if isinstance(result, dict) and result.get("applied") is False:
                logger.warning("ingress on node %s kept its previous routing table: %s", node_id[:12],
                               str(result.get("error"))[:300])
                self._pushed.pop(node_id, None)
                everywhere, failed = False, True
                continue
            self._pushed[node_id] = table
        if sent:
            self._report_push("error" if failed else "ok", time.monotonic() - started)
        if everywhere:
            self._applied = max(self._applied, version)


def waiting_per_deployment(stats: dict[str, Any]) -> dict[str, float]:
    """From one ingress's ``stats()``: each deployment's queued requests plus those held for it (an ingress
    without a ``held`` entry holds none)."""
    waiting = {name: backend.get("queue", 0) for name, backend in (stats.get("deployments") or {}).items()}
    for name, held in (stats.get("held") or {}).items():
        waiting[name] = waiting.get(name, 0) + held
    return waiting
