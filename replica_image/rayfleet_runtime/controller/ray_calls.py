"""Every Ray call the controller's logic makes, behind one class (as Ray Serve's ``ActorReplicaWrapper``:
"all Ray API calls should be made here").

``deployment_state`` and ``route_publisher`` decide; ``RayBackend`` talks to Ray. Ray's many exceptions
from a replica call become the few that matter to a decision (``ReplicaDied``, ``ReplicaUnavailable``,
``ReplicaTimeout``), so the callers never import Ray and unit tests drive them with a fake backend.

Nothing here blocks the controller's event loop on a replica or a proxy: actor calls are awaitables
with timeouts, ``ray.nodes()`` and ingress creation run in threads; only short GCS requests (the KV
checkpoint, named-actor lookups, ``ray.kill``) are made inline, as Ray Serve's controller does.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import ray
from ray._private import state as ray_state
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayfleet_api.constants import METRICS_PORT, RAY_NAMESPACE
from rayfleet_api.desired import DesiredState
from rayfleet_runtime.ingress.actor import ensure_ingress
from rayfleet_runtime.controller.placement import NodeView
from rayfleet_runtime.actor_names import parse_replica_actor_name, replica_actor_name
from rayfleet_runtime.replica.actor import Replica
from rayfleet_runtime.routing import RoutingTable

# Where the deployments' checkpoints live in the GCS KV: one key per deployment.
KV_NAMESPACE = "rayfleet"
KV_PREFIX = "deployment/"


class ReplicaCallError(Exception):
    """A call to a replica actor failed. ``str()`` is Ray's message and ``ray_error`` the name of Ray's
    exception (what the observed state and the logs show); a fake backend may leave it to the class name."""

    def __init__(self, message: str, ray_error: str | None = None):
        super().__init__(message)
        self.ray_error = ray_error or type(self).__name__


class ReplicaDied(ReplicaCallError):
    """The actor is gone for good: its process died or was killed, or it never came up."""


class RuntimeEnvFailed(ReplicaDied):
    """The actor never came up because Ray could not set up its ``runtime_env``."""


class ReplicaUnavailable(ReplicaCallError):
    """The actor can't be reached now (e.g. its node is unreachable); it may come back."""


class ReplicaTimeout(ReplicaCallError):
    """The actor did not answer within the timeout."""


async def _call(method: Callable[[], Any], timeout_s: float | None) -> Any:
    """Await ``method()`` (an actor method call) for at most ``timeout_s``, translating Ray's exceptions."""
    try:
        return await asyncio.wait_for(method(), timeout_s)
    except (asyncio.TimeoutError, ray.exceptions.GetTimeoutError) as exc:
        raise ReplicaTimeout(str(exc), type(exc).__name__) from exc
    except ray.exceptions.RuntimeEnvSetupError as exc:
        raise RuntimeEnvFailed(str(exc), type(exc).__name__) from exc
    except ray.exceptions.ActorUnavailableError as exc:  # a RayActorError: catch it first
        raise ReplicaUnavailable(str(exc), type(exc).__name__) from exc
    except ray.exceptions.RayActorError as exc:
        raise ReplicaDied(str(exc), type(exc).__name__) from exc
    except Exception as exc:  # noqa: BLE001 - the method raised, the worker failed to start, ...
        raise ReplicaCallError(str(exc), type(exc).__name__) from exc


def replica_actor_options(name: str, replica_id: str, desired: DesiredState, node_id: str | None = None) -> dict[str, Any]:
    """Ray actor options for one replica of a deployment, on ``node_id`` (placement.choose_node's pick:
    soft, so a node that died meanwhile costs nothing) or, with none, wherever Ray spreads it."""
    opts = desired.ray_actor_options
    runtime_env = dict(desired.runtime_env or {})
    env_vars = {**(runtime_env.get("env_vars") or {}), **desired.env}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    options: dict[str, Any] = {
        "name": replica_actor_name(name, replica_id),
        "namespace": RAY_NAMESPACE,
        "lifetime": "detached",
        "num_cpus": opts.num_cpus,
        "num_gpus": opts.num_gpus,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True) if node_id else "SPREAD",
        "max_restarts": 0,
    }
    if opts.memory:
        options["memory"] = opts.memory
    if runtime_env:
        options["runtime_env"] = runtime_env
    return options


def alive_nodes() -> list[NodeView]:
    """The alive Ray nodes and their total resources (blocking)."""
    return [NodeView(n["NodeID"], {k: float(v) for k, v in (n.get("Resources") or {}).items()
                                   if k in ("CPU", "GPU", "memory")})
            for n in ray.nodes() if n.get("Alive")]


def alive_node_ids(head_only: bool = False) -> list[str]:
    """IDs of the alive Ray nodes (blocking), or only the head node's."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if head_only:
        alive = [n for n in alive if "node:__internal_head__" in (n.get("Resources") or {})]
    return [n["NodeID"] for n in alive]


class IngressActor:
    """One node's ``IngressManager`` actor (``ingress.actor``)."""

    def __init__(self, handle: Any):
        self._handle = handle

    def update(self, table: RoutingTable) -> Awaitable[dict[str, Any]]:
        """Send ``table`` now (so that several nodes apply it at once); await the answer
        (``{"applied": bool, ...}``). Raises whatever Ray raises: any failure means recreate the handle."""
        return self._handle.update.remote(table)

    def stats(self) -> Awaitable[dict[str, Any]]:
        """HAProxy's counters per deployment and the requests held for each (``Ingress.stats``)."""
        return self._handle.stats.remote()


class RayBackend:
    """The Ray cluster as the controller sees it. Replica handles are opaque to callers.

    ``metrics_port``: where each node's ingress serves that node's metrics (None: nowhere).
    """

    def __init__(self, metrics_port: int | None = METRICS_PORT):
        self.metrics_port = metrics_port

    # ---------- replica actors ----------
    def create_replica(self, deployment: str, replica_id: str, desired: DesiredState, bind_host: str,
                       node_id: str | None = None) -> Any:
        """Start a named detached ``Replica`` actor (on ``node_id`` if given); its constructor runs in the
        background (await ``info``). ``ReplicaCallError`` if Ray refuses it (e.g. an invalid ``runtime_env``,
        or the name is taken)."""
        try:
            return Replica.options(**replica_actor_options(deployment, replica_id, desired, node_id)).remote(
                deployment, replica_id, desired, bind_host)
        except Exception as exc:  # noqa: BLE001
            raise ReplicaCallError(str(exc), type(exc).__name__) from exc

    async def info(self, actor: Any, timeout_s: float | None = None) -> dict[str, Any]:
        """The replica's ``info()``; with no timeout it waits as long as the actor takes to start."""
        return await _call(lambda: actor.info.remote(), timeout_s)

    async def health(self, actor: Any, check_timeout_s: float, timeout_s: float) -> dict[str, Any]:
        """The replica's ``health(check_timeout_s)``: ``{"healthy", "message", **info}``."""
        return await _call(lambda: actor.health.remote(check_timeout_s), timeout_s)

    async def drain(self, actor: Any, grace_s: float, timeout_s: float) -> dict[str, Any]:
        """The replica's ``drain(grace_s)``: its ``info`` once nothing is in flight (or the grace is over)."""
        return await _call(lambda: actor.drain.remote(grace_s), timeout_s)

    async def watch(self, actor: Any) -> None:
        """Returns every few minutes while the replica lives; ``ReplicaDied`` the moment its process dies
        (Ray fails the pending call then)."""
        await _call(lambda: actor.watch.remote(), None)

    async def placed(self, actor: Any) -> bool:
        """Whether Ray gave the actor a worker process yet (False: it waits for a node with the resources
        it asks for). From the GCS's actor table, so it needs no dashboard."""
        def ask() -> bool:
            info = ray_state.actors(actor._actor_id.hex()) or {}
            return info.get("State") == "ALIVE" or bool(info.get("Pid"))
        return await asyncio.to_thread(ask)

    async def free_resources(self) -> tuple[dict[str, float], dict[str, float]]:
        """(available, total) logical resources of the whole cluster."""
        return await asyncio.to_thread(lambda: (ray.available_resources(), ray.cluster_resources()))

    def kill(self, actor: Any) -> None:
        """Kill the actor for good (no restart); one that is already gone is fine."""
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    # ---------- recovery: replicas by their actor names ----------
    def replica_names(self) -> list[tuple[str, str]]:
        """(deployment, replica id) of every named replica actor in the cluster."""
        names = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry.get("namespace") != RAY_NAMESPACE:
                continue
            parsed = parse_replica_actor_name(entry["name"])
            if parsed is not None:
                names.append(parsed)
        return names

    def get_replica(self, deployment: str, replica_id: str) -> Any | None:
        """The handle of a named replica actor; None if it is gone."""
        try:
            return ray.get_actor(replica_actor_name(deployment, replica_id), namespace=RAY_NAMESPACE)
        except ValueError:
            return None

    # ---------- checkpoints in the GCS KV ----------
    def checkpoint_names(self) -> list[str]:
        """Names of the deployments with a checkpoint."""
        keys = internal_kv._internal_kv_list(KV_PREFIX, namespace=KV_NAMESPACE) or []
        return [(key.decode() if isinstance(key, bytes) else key)[len(KV_PREFIX):] for key in keys]

    def read_checkpoint(self, name: str) -> bytes | None:
        return internal_kv._internal_kv_get(KV_PREFIX + name, namespace=KV_NAMESPACE)

    def write_checkpoint(self, name: str, data: bytes) -> None:
        internal_kv._internal_kv_put(KV_PREFIX + name, data, overwrite=True, namespace=KV_NAMESPACE)

    def delete_checkpoint(self, name: str) -> None:
        internal_kv._internal_kv_del(KV_PREFIX + name, namespace=KV_NAMESPACE)

    # ---------- nodes and their ingress ----------
    async def nodes(self) -> list[NodeView]:
        """The alive nodes, with their total resources."""
        return await asyncio.to_thread(alive_nodes)

    async def node_ids(self, head_only: bool = False) -> list[str]:
        """IDs of the alive nodes, or only the head node's."""
        return await asyncio.to_thread(alive_node_ids, head_only)

    async def ensure_ingress(self, node_id: str, port: int, bind_host: str) -> IngressActor:
        """Get or create the ingress actor of ``node_id``."""
        return IngressActor(await asyncio.to_thread(ensure_ingress, node_id, port, bind_host, self.metrics_port))
