"""Reconciliation decisions as pure functions: replica views in, intents out (no Ray, no I/O).

The controller observes its replicas, turns them into ``ReplicaView``s, asks ``plan()`` what to do and
executes the returned ``ReplicaPlan`` (like Ray Serve's deployment_state.py, but small). Rules:

* keep ``target`` replicas of the desired ``version``: start missing ones, stop extras on scale-down
  (not-ready ones first, then the newest ready ones);
* a FAILED replica (actor died, or its handler failed to load) is replaced, and the replacement inherits
  the slot's restart count + 1; an UNHEALTHY replica is replaced once ``failure_threshold`` consecutive
  health checks failed;
* starts are suppressed while ``can_start`` is False (back-off after handler load failures, see
  ``backoff_seconds``): FAILED replicas then stay as placeholders so nothing hot-loops;
* on a version change, new replicas are started (at most ``max_surge`` above ``target``) and an old READY
  replica is drained only once enough new ones are READY: the READY count never drops below
  ``min(target, READY count)``; but when a new replica can't be placed (no node has room for a surge),
  one old READY replica at a time is drained to make room, as a Deployment with ``maxUnavailable: 1``
  would: the READY count then dips by one, never more, and a rollout never deadlocks;
* a replica to be moved (``evict``: its pod is terminating, or its node holds too many of the deployment's
  replicas) is replaced like an old version: a new replica first, the old one drained once enough new ones
  are READY; one that isn't serving is stopped at once and replaced;
* scale-down stops replicas on the node with the most of them first, so the rest stay spread;
* stopping a READY replica is graceful (``StopIntent.graceful``): the controller marks it DRAINING, which
  takes it out of the routing table *before* it asks the replica to drain and finally kills it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from rayfleet_api.states import DeploymentStatus, ReplicaState

# Scale-down preference: cheapest to lose first.
_STOP_ORDER = {ReplicaState.FAILED: 0, ReplicaState.STARTING: 1, ReplicaState.UNHEALTHY: 2, ReplicaState.READY: 3}


@dataclass(frozen=True)
class ReplicaView:
    id: str
    version: str
    state: ReplicaState
    health_failures: int = 0  # consecutive failed health checks
    restarts: int = 0  # how often this slot was restarted
    created_at: float = 0.0
    unplaced: bool = False  # STARTING, and no Ray node has the resources it asks for
    node: str | None = None  # the Ray node it runs on (or was sent to)
    evict: str | None = None  # why it must move: node-drain | rebalance (None: it stays)


@dataclass(frozen=True)
class StartIntent:
    restarts: int = 0  # restart count the new replica's slot carries
    replaces: str | None = None  # id of the FAILED/UNHEALTHY replica it replaces (a counted restart)


@dataclass(frozen=True)
class StopIntent:
    replica_id: str
    graceful: bool  # True: unroute, drain in-flight requests (grace period), then kill
    reason: str  # scale-down | rollout | node-drain | rebalance | unhealthy | failed | delete


@dataclass
class ReplicaPlan:
    """What to start and stop in one reconcile step of one deployment."""

    start: list[StartIntent] = field(default_factory=list)
    stop: list[StopIntent] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        return sum(1 for s in self.start if s.replaces is not None)

    def __bool__(self) -> bool:
        return bool(self.start or self.stop)


def default_max_surge(target: int) -> int:
    return max(1, math.ceil(target / 4))


def backoff_seconds(consecutive_failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before the next start after ``consecutive_failures`` handler load failures (0 -> none)."""
    if consecutive_failures <= 0:
        return 0.0
    return min(cap, base * 2 ** (consecutive_failures - 1))


def _stop(r: ReplicaView, reason: str) -> StopIntent:
    return StopIntent(r.id, graceful=r.state == ReplicaState.READY, reason=reason)


def plan(target: int, version: str, replicas: list[ReplicaView], *, failure_threshold: int = 3,
         deleting: bool = False, can_start: bool = True, max_surge: int | None = None) -> ReplicaPlan:
    """What to start and stop so that ``replicas`` converge to ``target`` replicas of ``version``."""
    out = ReplicaPlan()
    active = [r for r in replicas if r.state not in (ReplicaState.DRAINING, ReplicaState.STOPPED)]
    if deleting:
        out.stop = [_stop(r, "delete") for r in active]
        return out

    threshold = max(1, failure_threshold)
    current: list[ReplicaView] = []
    old_ready: list[ReplicaView] = []
    replacements: list[StartIntent] = []
    for r in active:
        if r.version != version or r.evict:
            if r.state == ReplicaState.READY:
                old_ready.append(r)  # leaving: it serves until what replaces it does
            else:  # not serving: nothing to protect
                out.stop.append(StopIntent(r.id, graceful=False, reason=r.evict or "rollout"))
        elif r.state == ReplicaState.FAILED:
            if can_start:
                out.stop.append(StopIntent(r.id, graceful=False, reason="failed"))
                replacements.append(StartIntent(restarts=r.restarts + 1, replaces=r.id))
            else:
                current.append(r)  # placeholder until the back-off expires
        elif r.state == ReplicaState.UNHEALTHY and r.health_failures >= threshold:
            out.stop.append(StopIntent(r.id, graceful=False, reason="unhealthy"))
            replacements.append(StartIntent(restarts=r.restarts + 1, replaces=r.id))
        else:
            current.append(r)

    # Scale down the current version: not-ready first, newest first among equals.
    excess = len(current) + len(replacements) - target
    if excess > 0:
        drop_replacements = min(excess, len(replacements))
        replacements = replacements[: len(replacements) - drop_replacements]
        excess -= drop_replacements
        crowd = Counter(r.node for r in current)
        for _ in range(min(excess, len(current))):  # one at a time: each stop thins the node it came from
            r = min(current, key=lambda r: (_STOP_ORDER.get(r.state, 9), -crowd[r.node], -r.created_at))
            out.stop.append(_stop(r, "scale-down"))
            current.remove(r)
            crowd[r.node] -= 1

    # Start what is missing (replacements first: they carry the slot's restart count).
    missing = target - len(current)
    starts = replacements + [StartIntent() for _ in range(max(0, missing - len(replacements)))]
    if old_ready:
        surge = default_max_surge(target) if max_surge is None else max(0, max_surge)
        # Replicas that move are replaced all at once: their pod is going, whatever the surge allows.
        surge += sum(1 for r in old_ready if r.version == version)
        room = target + surge - len(current) - len(old_ready)
        if room < len(starts):
            starts = starts[: max(0, room)] if room > 0 else []
            if not starts and not current:
                starts = [replacements[0] if replacements else StartIntent()]  # always make progress
    out.start = starts if can_start else []

    # Drain old READY replicas only as far as new READY ones cover the target.
    ready_current = sum(1 for r in current if r.state == ReplicaState.READY)
    excess_old = max(0, ready_current + len(old_ready) - target)
    # No room for the new version: make room in place, one replica at a time, and only while nothing is
    # missing otherwise (so an unplaceable new version costs one READY replica, not all of them).
    # A replica that only moves is never stopped early: it serves until the pod it is on goes.
    freeing = any(r.version != version and r.state in (ReplicaState.DRAINING, ReplicaState.STOPPED) for r in replicas)
    if (not excess_old and any(r.version != version for r in old_ready) and not freeing
            and ready_current + len(old_ready) >= target and any(r.unplaced for r in current)):
        excess_old = 1
    leaving = sorted(old_ready, key=lambda r: (r.version == version, r.created_at))  # old versions first
    for r in leaving[:excess_old]:
        out.stop.append(StopIntent(r.id, graceful=True, reason=r.evict or "rollout"))
    return out


def next_health_state(state: ReplicaState, failures: int, healthy: bool) -> tuple[ReplicaState, int]:
    """(state, consecutive failures) after one health check of a STARTING/READY/UNHEALTHY replica."""
    if healthy:
        return ReplicaState.READY, 0
    return ReplicaState.UNHEALTHY, failures + 1


def deployment_status(target: int, version: str, replicas: list[ReplicaView], *, deleting: bool = False,
                      error: bool = False) -> DeploymentStatus:
    """Running | Updating | Deleting | Failed, for the observed state."""
    if deleting:
        return DeploymentStatus.DELETING
    live = [r for r in replicas if r.state != ReplicaState.STOPPED]
    ready_new = sum(1 for r in live if r.state == ReplicaState.READY and r.version == version)
    if error and ready_new < target:
        return DeploymentStatus.FAILED
    settled = ready_new == target and all(r.version == version and r.state == ReplicaState.READY for r in live)
    return DeploymentStatus.RUNNING if settled else DeploymentStatus.UPDATING
