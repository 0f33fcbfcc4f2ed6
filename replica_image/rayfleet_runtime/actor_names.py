"""The names replica actors are registered under: the controller finds its live replicas by them after a
restart, and each node's ingress finds the replicas whose metrics it serves."""
from __future__ import annotations

from rayfleet_api.constants import REPLICA_PREFIX


def replica_actor_name(deployment: str, replica_id: str) -> str:
    """Detached actor name; a restarted controller finds live replicas by it."""
    return f"{REPLICA_PREFIX}:{deployment}:{replica_id}"


def parse_replica_actor_name(name: str) -> tuple[str, str] | None:
    """(deployment, replica id) for a replica actor name, else None."""
    prefix, sep, rest = name.partition(":")
    if prefix != REPLICA_PREFIX or not sep:
        return None
    deployment, sep, replica_id = rest.rpartition(":")
    return (deployment, replica_id) if sep and deployment and replica_id else None
