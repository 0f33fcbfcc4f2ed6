"""Status from what was observed: pure, so every reason and transition is unit-tested.

Reasons are typed (CamelCase constants) so users and tools can match on them; messages say why.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from rayfleet_api.desired import DesiredState
from rayfleet_api.states import ReplicaState

from .conditions import DEGRADED, PROGRESSING, READY, Condition, find, merge_conditions
from .serve_spec import ServeSpec


class Reason:
    ALL_READY = "AllReplicasReady"
    COMPLETE = "Complete"  # the controller's RolloutComplete: the newest revision serves at full strength
    CANARY_STEP = "CanaryStep"  # the controller's own reasons, as it names them
    CANARY_WAITING = "CanaryWaiting"
    AS_EXPECTED = "AsExpected"
    INVALID_SPEC = "InvalidSpec"
    CLUSTER_CONFLICT = "RayClusterConflict"
    CLUSTER_NOT_READY = "RayClusterNotReady"
    CONTROLLER_UNREACHABLE = "ControllerUnreachable"
    INGRESS_NOT_READY = "IngressNotReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    REPLICAS_UNHEALTHY = "ReplicasUnhealthy"
    ROLLING_UPDATE = "RollingUpdate"  # the controller's NewRevisionProgressing
    SCALING = "Scaling"
    INSUFFICIENT_RESOURCES = "InsufficientResources"
    OVERLOADED = "Overloaded"
    DELETING = "Deleting"
    REPLICA_RESTARTED = "ReplicaRestarted"  # an Event's reason: a replica's restart count went up


UNHEALTHY_STATES = {ReplicaState.UNHEALTHY, ReplicaState.FAILED, ReplicaState.STOPPED}
# The controller's rollout reasons that mean what an existing reason already says: users match on that one.
ROLLOUT_REASONS = {"NewRevisionProgressing": Reason.ROLLING_UPDATE, "RolloutComplete": Reason.COMPLETE}
REVISION_FIELDS = ("revision", "updateRevision", "canaryWeight", "previousRevision")
# Progressing=True while a revision replaces another: Complete after one of these is a rollout that completed.
ROLLING_REASONS = {Reason.ROLLING_UPDATE, Reason.CANARY_STEP, Reason.CANARY_WAITING}


@dataclass
class Observation:
    """Everything one reconcile saw; the fields after `spec` describe the world, not the wish."""
    generation: int
    spec: ServeSpec
    cluster_name: str
    selector: str
    endpoint: str
    problems: list[str] = field(default_factory=list)
    cluster_conflict: str | None = None
    cluster_ready: bool = False
    cluster_state: str = "missing"
    controller: dict[str, Any] | None = None  # observed state from the rayfleet controller
    controller_error: str | None = None
    head_fault_tolerant: bool = False  # the RayCluster keeps its GCS state in Redis (gcsFaultToleranceOptions)
    # Ray pods in the Service's endpoints (Ready: their HAProxy routes); None: the cluster has no Pod
    # objects to count (`rayfleet dev`'s provider runs Ray as local processes)
    serving_pods: int | None = None


def timestamp(seconds: float) -> str:
    """Epoch seconds as Kubernetes writes times (RFC 3339, UTC, whole seconds)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def desired_replicas(desired: DesiredState, controller: dict[str, Any] | None,
                     old_status: dict[str, Any] | None) -> int:
    """The replica count the controller runs towards: spec.replicas, or with autoscaling the autoscaler's
    count. The spec doesn't hold that one: while the controller can't be asked, the last one reported,
    else spec.replicas within autoscaling's range (where the autoscaler starts)."""
    if desired.autoscaling is None:
        return desired.replicas
    if controller is not None and "desiredReplicas" in controller:
        return controller["desiredReplicas"]
    if (old_status or {}).get("autoscaling") and "desiredReplicas" in old_status:
        return old_status["desiredReplicas"]
    return desired.autoscaling.clamp(desired.replicas)


def _autoscaling_status(obs: Observation, old_status: dict[str, Any] | None) -> dict[str, Any] | None:
    """status.autoscaling: the load the autoscaler saw last, and its last change of the count with the reason."""
    if obs.spec.desired.autoscaling is None:
        return None
    scaling = (obs.controller or {}).get("autoscaling")
    if scaling is None:  # not asked (or not yet autoscaled there): what was last reported stands
        return (old_status or {}).get("autoscaling")
    load, when, reason = scaling.get("load"), scaling.get("lastScaleTime"), scaling.get("lastScaleReason")
    return {**({} if load is None else {"load": round(load, 2)}),
            **({} if when is None else {"lastScaleTime": timestamp(when)}),
            **({} if reason is None else {"lastScaleReason": reason[:1024]})}


def _revision_status(obs: Observation, old_status: dict[str, Any] | None) -> dict[str, Any]:
    """status.revision (at full strength), status.updateRevision (the one rolled out last or now),
    status.canaryWeight (its share of requests, during a canary only) and status.previousRevision (the
    newest good one before the serving one)."""
    if obs.controller is None:  # not asked: what was last reported stands
        return {key: (old_status or {}).get(key) for key in REVISION_FIELDS}
    revisions = obs.controller.get("revisions") or []
    serving = next((r.get("revision") for r in revisions if r.get("state") == "Serving"), None)
    previous = max((r["revision"] for r in revisions if r.get("good") and r.get("state") == "Previous"
                    and serving is not None and r["revision"] < serving), default=None)
    rollout = obs.controller.get("rollout") or {}
    return {"revision": serving, "updateRevision": rollout.get("revision", serving),
            "canaryWeight": rollout.get("canaryWeight") if rollout.get("state") == "Progressing" else None,
            "previousRevision": previous}


def _replica_entry(r: dict[str, Any]) -> dict[str, Any]:
    entry = {"id": r.get("id", ""), "state": r.get("state", ""), "version": r.get("version", ""),
             "node": r.get("nodeIp") or "", "pid": r.get("pid") or 0, "inFlight": r.get("inFlight") or 0,
             "restarts": r.get("restarts") or 0}
    if r.get("lastError"):
        entry["lastError"] = str(r["lastError"])[:1024]
    return entry


def _rollout_progress(rollout: dict[str, Any], updated: int, desired: int) -> Condition | None:
    """Progressing from the controller's rollout record; None once it completed (then scaling may still show)."""
    state, reason, message = rollout.get("state"), rollout.get("reason") or "", rollout.get("message") or ""
    revision = f"revision {rollout.get('revision')} ({rollout.get('version')})"
    if state == "Failed":  # message says what failed, and whether the last good revision is back
        return Condition(PROGRESSING, False, reason or "RolloutFailed", message or f"{revision} failed")
    if state != "Progressing":
        return None
    if rollout.get("canaryWeight") is not None:  # the controller's message names the weight (and how to promote)
        return Condition(PROGRESSING, True, reason or Reason.CANARY_STEP,
                         message or f"{revision} gets {rollout['canaryWeight']}% of requests")
    return Condition(PROGRESSING, True, ROLLOUT_REASONS.get(reason, reason or Reason.ROLLING_UPDATE),
                     f"{revision}: {updated}/{desired} replicas updated")


def _progressing(ctl: dict[str, Any], desired: int, ready_msg: str) -> Condition:
    """Progressing as a Deployment's: True while a revision rolls out or the count moves (and once done,
    with Complete), False when it can't go on: a replica Ray can't place, or a failed rollout."""
    replicas, updated = ctl.get("replicas") or [], ctl.get("updatedReplicas", 0)
    rollout = ctl.get("rollout")
    waiting = [r for r in replicas if r.get("unschedulable")]
    if waiting:  # progress needs resources Ray doesn't have: say so now, not after a deadline
        return Condition(PROGRESSING, False, Reason.INSUFFICIENT_RESOURCES,
                         f"{len(waiting)} replica(s) can't be placed: {waiting[0]['unschedulable']}")
    if rollout:
        progress = _rollout_progress(rollout, updated, desired)
        if progress is not None:
            return progress
    elif any(r.get("version") != ctl.get("version") for r in replicas):  # no rollout record: the versions tell
        return Condition(PROGRESSING, True, Reason.ROLLING_UPDATE, f"{updated}/{desired} replicas at version {ctl.get('version')}")
    if len(replicas) != desired or ctl.get("readyReplicas", 0) != desired:
        return Condition(PROGRESSING, True, Reason.SCALING, f"{len(replicas)} replicas, {ready_msg}")
    done = f"revision {rollout['revision']} rolled out; {ready_msg}" if rollout else ready_msg
    return Condition(PROGRESSING, True, Reason.COMPLETE, done)


def conditions_for(obs: Observation) -> list[Condition]:
    def blocked(reason: str, message: str, degraded: bool = False) -> list[Condition]:
        return [Condition(READY, False, reason, message), Condition(PROGRESSING, not degraded, reason, message),
                Condition(DEGRADED, degraded, reason if degraded else Reason.AS_EXPECTED, message if degraded else "")]

    if obs.problems:
        return blocked(Reason.INVALID_SPEC, "; ".join(obs.problems), degraded=True)
    if obs.cluster_conflict:
        return blocked(Reason.CLUSTER_CONFLICT, obs.cluster_conflict, degraded=True)
    if not obs.cluster_ready:
        return blocked(Reason.CLUSTER_NOT_READY, f"RayCluster {obs.cluster_name} is {obs.cluster_state}")
    if obs.controller is None:
        return blocked(Reason.CONTROLLER_UNREACHABLE, obs.controller_error or "the rayfleet controller did not answer")
    ctl = obs.controller
    if ctl.get("error"):
        err = ctl["error"]
        return blocked(err.get("reason") or "ReplicaError", err.get("message", ""), degraded=True)

    desired = desired_replicas(obs.spec.desired, ctl, None)
    replicas = ctl.get("replicas") or []
    ready = ctl.get("readyReplicas", 0)
    ready_msg = f"{ready}/{desired} replicas ready"
    if ready >= desired and obs.serving_pods == 0:  # replicas up, but the Service reaches none of them yet
        conds = [Condition(READY, False, Reason.INGRESS_NOT_READY,
                           f"{ready_msg}; no pod of RayCluster {obs.cluster_name} is in the Service's endpoints yet "
                           "(a pod joins once its HAProxy routes)")]
    else:
        conds = [Condition(READY, ready >= desired, Reason.ALL_READY if ready >= desired else Reason.REPLICAS_NOT_READY,
                           ready_msg)]

    conds.append(_progressing(ctl, desired, ready_msg))

    unhealthy = [r for r in replicas if r.get("state") in UNHEALTHY_STATES
                 or (r.get("state") != ReplicaState.READY and (r.get("restarts") or 0) > 0)]
    capacity = ready * obs.spec.desired.max_concurrency
    if unhealthy:
        names = ", ".join(f"{r.get('id')} ({r.get('state')}, {r.get('restarts') or 0} restarts)" for r in unhealthy)
        conds.append(Condition(DEGRADED, True, Reason.REPLICAS_UNHEALTHY, f"replicas not serving: {names}"))
    elif capacity and ctl.get("inFlight", 0) >= capacity:
        conds.append(Condition(DEGRADED, True, Reason.OVERLOADED, f"{ctl.get('inFlight')} requests in flight fill {capacity} slots"))
    else:
        conds.append(Condition(DEGRADED, False, Reason.AS_EXPECTED, ""))
    return conds


def compute_status(obs: Observation, old_status: dict[str, Any] | None, now: str) -> dict[str, Any]:
    ctl = obs.controller or {}
    replicas = ctl.get("replicas") or []
    return {
        "observedGeneration": obs.generation,
        "desiredReplicas": desired_replicas(obs.spec.desired, obs.controller, old_status),
        "replicas": len(replicas),
        "readyReplicas": ctl.get("readyReplicas", 0),
        "updatedReplicas": ctl.get("updatedReplicas", 0),
        "inFlight": ctl.get("inFlight", 0),
        "selector": obs.selector,
        "endpoint": obs.endpoint,
        "rayCluster": obs.cluster_name,
        "headFaultTolerant": obs.head_fault_tolerant,
        "replicaStatuses": [_replica_entry(r) for r in replicas],
        "autoscaling": _autoscaling_status(obs, old_status),
        **_revision_status(obs, old_status),
        "conditions": merge_conditions((old_status or {}).get("conditions"), conditions_for(obs), obs.generation, now),
    }


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Only the top-level status fields that changed (empty: write nothing)."""
    old = old or {}
    return {key: value for key, value in new.items() if old.get(key) != value}


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Events (type, reason, message) for what changed: the autoscaler changing the count (with its
    reason), Ready changing reason (Warning when not ready), a rollout failing or completing or
    progress stopping (a replica Ray can't place), which Ready alone doesn't show, and a replica restarted,
    which no condition may show: the controller can replace one between two reconciles."""
    events = _restart_events(old, new)
    scaled = (new.get("autoscaling") or {}).get("lastScaleTime")
    if (scaled and scaled != (old.get("autoscaling") or {}).get("lastScaleTime")
            and old.get("desiredReplicas", new["desiredReplicas"]) != new["desiredReplicas"]):
        events.append(("Normal", "Scaled", f"replicas {old['desiredReplicas']} -> {new['desiredReplicas']}: "
                                           f"{new['autoscaling'].get('lastScaleReason', '')}"))
    before, after = find(old.get("conditions"), READY), find(new["conditions"], READY)
    if after is not None and not _same(before, after):
        events.append(("Normal" if after["status"] == "True" else "Warning", after["reason"],
                       after["message"] or after["reason"]))
    progress = _progress_event(old, new)
    if progress is not None and not any(e[1] == progress[1] for e in events):
        events.append(progress)  # a blocked state Ready names too is in Ready's event already
    return events


def _restart_events(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str, str]]:
    before = {r.get("id"): r.get("restarts", 0) for r in old.get("replicaStatuses") or []}
    events = []
    for r in new.get("replicaStatuses") or []:
        if r["id"] in before and r["restarts"] > before[r["id"]]:
            why = f": {r['lastError']}" if r.get("lastError") else ""
            events.append(("Warning", Reason.REPLICA_RESTARTED, f"replica {r['id']} restarted ({r['restarts']} in all){why}"))
    return events


def _same(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    return before is not None and (before["reason"], before["status"]) == (after["reason"], after["status"])


def _progress_event(old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str, str] | None:
    """Warning once when progress stops for a new reason or on a new revision (a failed rollout, rolled
    back or not; a replica Ray can't place), Normal when a rollout completes. Progress itself is no Event."""
    before, after = find(old.get("conditions"), PROGRESSING), find(new["conditions"], PROGRESSING)
    if after is None:
        return None
    new_revision = old.get("updateRevision") != new.get("updateRevision")
    if after["status"] == "False" and (new_revision or not _same(before, after)):
        return "Warning", after["reason"], after["message"] or after["reason"]
    rolled = before is not None and before["reason"] in ROLLING_REASONS
    if (after["reason"] == Reason.COMPLETE and new.get("updateRevision") is not None
            and (rolled or new_revision)):  # with a new revision too: its rollout may have run between reconciles
        return "Normal", Reason.COMPLETE, after["message"]
    return None
