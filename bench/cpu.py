"""CPU per request by kind of process, from /proc, around one measured point.

Every process under the benchmark's worker (its Ray: raylet, GCS and the rest, the actors, HAProxy,
or the bare server's workers) is sampled before and after the point; wrk's own CPU comes from the
rusage of waited children. A process started during the point counts from zero; one that ended
during it is lost (none should).
"""
from __future__ import annotations

import os
import resource
from typing import Any

from rayfleet.procs import cmdline, descendants, stat_fields

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
# What the benchmark tables show, in this order.
KINDS = ("haproxy", "proxy", "replica", "other actors", "ray daemons", "load generator", "driver")
_REPLICA_ACTORS = ("ray::Replica", "ray::ServeReplica")


def process_kind(pid: int, cmd: str) -> str:
    """haproxy; a Python proxy (Serve's ProxyActor); a replica (either system's, a replica server
    without Ray, or a bare server's worker); another Ray actor (controllers, rayfleet's ingress); Ray's daemons; the driver (this
    worker process)."""
    if pid == os.getpid():
        return "driver"
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    if exe.startswith("haproxy") or cmd.split(" ", 1)[0].endswith("haproxy"):
        return "haproxy"
    if cmd.startswith(_REPLICA_ACTORS) or any(word in cmd for word in ("ReplicaServer", "uvicorn", "multiprocessing.spawn")):
        return "replica"
    if cmd.startswith("ray::ProxyActor"):
        return "proxy"
    if cmd.startswith("ray::"):
        return "other actors"
    return "ray daemons"  # raylet, gcs_server, the dashboard's agents, log monitor...


def _cpu_seconds(pid: int) -> float | None:
    fields = stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) * _TICK_S  # utime + stime


def _snapshot(root: int) -> dict[int, tuple[str, float]]:
    out = {}
    for pid in descendants(root) | {root}:
        seconds = _cpu_seconds(pid)
        if seconds is not None:
            out[pid] = (process_kind(pid, cmdline(pid)), seconds)
    return out


def _machine_ticks() -> tuple[int, int]:
    """(all, steal) jiffies of the whole machine: time the hypervisor gave to someone else shows as steal."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]), fields[7]


def _children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Accounting:
    """``with Accounting() as cpu: <one wrk run>``, then ``cpu.per_request(requests)``."""

    def __init__(self, root: int | None = None):
        self.root = root or os.getpid()

    def __enter__(self) -> "Accounting":
        self._before, self._children, self._ticks = _snapshot(self.root), _children_seconds(), _machine_ticks()
        return self

    def __exit__(self, *exc: Any) -> None:
        after = _snapshot(self.root)
        self.seconds = dict.fromkeys(KINDS, 0.0)
        for pid, (kind, seconds) in after.items():
            self.seconds[kind] += seconds - self._before.get(pid, (kind, 0.0))[1]
        self.seconds["load generator"] = _children_seconds() - self._children  # wrk, waited for meanwhile
        ticks = _machine_ticks()
        elapsed = ticks[0] - self._ticks[0]
        # The share of the machine's CPU time its hypervisor took: a point at 50 % steal ran on half a machine.
        self.steal = round((ticks[1] - self._ticks[1]) / elapsed, 3) if elapsed else 0.0

    def per_request(self, requests: int) -> dict[str, float]:
        """Microseconds of CPU per request for each kind, and their total."""
        us = {kind: round(s * 1e6 / requests, 1) if requests else 0.0 for kind, s in self.seconds.items()}
        us["total"] = round(sum(us.values()), 1)
        return us
