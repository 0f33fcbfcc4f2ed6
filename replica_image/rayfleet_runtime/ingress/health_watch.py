"""What this node's HAProxy finds of its own replicas, for every other ingress (``RoutingTable.shared_health``).

With shared health each replica is health-checked by one HAProxy, its own node's, instead of every node's
(nodes x replicas checks a second at the check interval becomes replicas). The ingress reads its HAProxy's
server states every ``WATCH_INTERVAL_S`` and tells the controller the set of its own replicas that are down
when it changes (and every ``RESEND_S`` anyway, for a controller that restarted); the controller's next
table marks them (``Server.up``) and every other ingress takes them out of rotation through the runtime API.
"""
from __future__ import annotations

from rayfleet_runtime.routing import RoutingTable

WATCH_INTERVAL_S = 0.25
RESEND_S = 5.0
# `show stat` of servers only (proxy -1: all, type 4: servers, server id -1: all): what the watch reads
SERVERS_STAT = "show stat -1 4 -1"


def checked_here(table: RoutingTable, node_id: str | None) -> dict[tuple[str, str], str]:
    """(backend, server) -> replica id of the replicas of ``node_id`` that this ingress checks."""
    return {(revision.name, s.name): s.replica_id for be in table.backends for revision in be.revisions()
            for s in revision.servers if s.node_id == node_id and table.checks(s, node_id)}


def down_here(stat: str, mine: dict[tuple[str, str], str]) -> frozenset[str]:
    """The replicas of ``mine`` (``checked_here``) that HAProxy found down, from ``SERVERS_STAT``'s CSV.
    Read by hand, not as rows: the CSV has every server of the table and a hundred columns, read 4 times
    a second, and only the status of this node's few is wanted."""
    lines = stat.lstrip().removeprefix("# ").splitlines()
    if not lines:
        return frozenset()
    status = lines[0].split(",").index("status")  # pxname and svname are the first two
    down = set()
    for line in lines[1:]:
        fields = line.split(",", status + 1)  # up to the status, the rest left whole
        if len(fields) > status and (key := (fields[0], fields[1])) in mine and fields[status].startswith("DOWN"):
            down.add(mine[key])
    return frozenset(down)


class Findings:
    """When to tell the controller: on a change, or ``RESEND_S`` after the last time."""

    def __init__(self) -> None:
        self._sent: frozenset[str] | None = None
        self._sent_at = float("-inf")

    def to_send(self, down: frozenset[str], now: float) -> bool:
        return down != self._sent or now - self._sent_at >= RESEND_S

    def sent(self, down: frozenset[str], now: float) -> None:
        self._sent, self._sent_at = down, now
