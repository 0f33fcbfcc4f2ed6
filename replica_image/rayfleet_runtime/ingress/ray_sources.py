"""What the ingress's metrics endpoint, drain hook and health watch ask Ray for: the metrics of the replicas
on this node and of the controller if it runs here, the controller's drain of this node, and telling the
controller which of this node's replicas are down. Ray calls, made
from the metrics server's (or the drain socket's) thread, never the actor's event loop."""
from __future__ import annotations

import os
from typing import Any

from rayfleet_api.constants import CONTROLLER_NAME, RAY_NAMESPACE
from rayfleet_runtime.actor_names import replica_actor_name
from rayfleet_runtime.ingress.metrics import SOURCE_TIMEOUT_S
from rayfleet_runtime.routing import RoutingTable


class NodeRaySources:
    """The Ray side of one node's ingress (None outside a Ray actor: ``for_this_actor``)."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        # Ray warns of any blocking get in an async actor; these run on the metrics server's thread.
        os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
        self._replicas: dict[tuple[str, str], Any] = {}  # (deployment, replica id) -> actor handle
        self._controller: Any = None  # its handle once known to run on this node; False: elsewhere

    @classmethod
    def for_this_actor(cls) -> "NodeRaySources | None":
        try:
            import ray

            if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
                return None
            return cls(ray.get_runtime_context().get_node_id())
        except ImportError:
            return None

    def replicas(self, table: RoutingTable) -> list[Any]:
        """The families of the replicas in ``table`` that run on this node (a replica that is gone or slow
        is left out of this scrape; the controller replaces a dead one, the next scrape has its successor)."""
        import ray

        here = [(be.deployment, s.replica_id) for be in table.backends for revision in be.revisions()
                for s in revision.servers if s.node_id == self.node_id]
        handles = {}
        for key in here:
            try:
                handles[key] = self._replicas.get(key) or ray.get_actor(replica_actor_name(*key), namespace=RAY_NAMESPACE)
            except ValueError:
                continue  # died since the table was pushed
        self._replicas = handles
        refs = [handle.metrics.remote() for handle in handles.values()]
        if not refs:
            return []
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=SOURCE_TIMEOUT_S)
        out: list[Any] = []
        for ref in done:
            try:
                out.extend(ray.get(ref))
            except ray.exceptions.RayError:
                pass
        return out

    def drain(self, timeout_s: float) -> int:
        """Have the controller move this node's replicas away; how many are still here."""
        import ray

        handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
        return ray.get(handle.drain_node.remote(self.node_id, timeout_s), timeout=SOURCE_TIMEOUT_S)

    def report_down(self, down: list[str]) -> None:
        """Tell the controller which of this node's replicas this node's HAProxy finds down (it answers
        nothing: the table it pushes next says what every ingress does)."""
        import ray

        ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE).replicas_down.remote(self.node_id, down)

    def controller(self) -> list[Any]:
        import ray

        if self._controller is False:
            return []
        try:
            if self._controller is None:
                handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
                info = ray.get(handle.ready.remote(), timeout=SOURCE_TIMEOUT_S)
                self._controller = handle if info.get("nodeId") == self.node_id else False
                if self._controller is False:
                    return []
            return ray.get(self._controller.metrics.remote(), timeout=SOURCE_TIMEOUT_S)
        except Exception:
            self._controller = None  # restarted, or not up yet: look again next time
            raise
