"""Where a new replica goes, and which replica to move: pure decisions over a view of the Ray nodes.

Ray's ``SPREAD`` strategy is best effort, per actor and blind to deployments: two replicas of one
deployment could share a pod that then takes both with it. So the controller picks the node itself
(``choose_node``), as Ray Serve's deployment scheduler does: the alive node, not draining and with room,
that holds the fewest replicas of this deployment. After a pod was lost and another took its replicas,
``to_rebalance`` names one replica to move (surge first: a new one starts on the emptier node and the
old one drains once it serves) until no node holds two more of a deployment's replicas than another
node with room for one.

Room is counted from the controller's own books (the replicas it placed, by the node each runs on or was
sent to) against each node's total resources: the cluster is the operator's, rayfleet's replicas are
what reserves resources on it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass(frozen=True)
class NodeView:
    id: str
    resources: Mapping[str, float]  # Ray's totals: CPU, GPU, memory (bytes)
    draining: bool = False  # its pod is terminating: nothing new goes there
    suspect: bool = False  # a replica there stopped answering: the node may be gone


@dataclass(frozen=True)
class Placed:
    """A replica that holds resources on a node (running, starting, or draining)."""

    node: str
    deployment: str
    needs: Mapping[str, float] = field(default_factory=dict)


def free(nodes: Iterable[NodeView], placed: Iterable[Placed]) -> dict[str, dict[str, float]]:
    out = {n.id: dict(n.resources) for n in nodes}
    for p in placed:
        if p.node in out:
            for resource, amount in p.needs.items():
                out[p.node][resource] = out[p.node].get(resource, 0.0) - amount
    return out


def _fits(room: Mapping[str, float], needs: Mapping[str, float]) -> bool:
    return all(room.get(resource, 0.0) >= amount - 1e-9 for resource, amount in needs.items() if amount)


def eligible(nodes: Iterable[NodeView], room: Mapping[str, Mapping[str, float]],
             needs: Mapping[str, float]) -> list[NodeView]:
    """Nodes a new replica with ``needs`` may go to now (``room``: ``free()``'s answer)."""
    return [n for n in nodes if not n.draining and not n.suspect and _fits(room[n.id], needs)]


def choose_node(nodes: list[NodeView], placed: list[Placed], deployment: str, needs: Mapping[str, float]) -> str | None:
    """The node for a new replica of ``deployment``: fewest of its replicas, then most free CPU.
    None: no node has room (Ray then waits for one, e.g. a pod that is being created)."""
    room = free(nodes, placed)
    mine = Counter(p.node for p in placed if p.deployment == deployment)
    candidates = eligible(nodes, room, needs)
    if not candidates:
        return None
    return min(candidates, key=lambda n: (mine[n.id], -room[n.id].get("CPU", 0.0), n.id)).id


def to_rebalance(nodes: list[NodeView], placed: list[Placed], needs: Mapping[str, float],
                 replicas: list[tuple[str, str]]) -> str | None:
    """Which of a deployment's serving ``replicas`` ((id, node), oldest first) to move, or None.

    A move is worth it when the node with the most of them holds at least two more than a node that can
    take one: afterwards the loss of either costs fewer of them. The newest on the crowded node moves."""
    mine = Counter(node for _, node in replicas)
    targets = eligible(nodes, free(nodes, placed), needs)
    if not mine or not targets:
        return None
    crowded, most = max(sorted(mine.items()), key=lambda item: item[1])
    if most - min(mine.get(n.id, 0) for n in targets) < 2:
        return None
    return [rid for rid, node in replicas if node == crowded][-1]
