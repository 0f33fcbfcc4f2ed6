"""A deployment's revisions and its rollout: which version serves, which one is being rolled out, how far,
and when a rollout stops (a Deployment's ReplicaSets, ``progressDeadlineSeconds`` and ``rollout undo``).

Each distinct version the spec asks for is a ``Revision``, numbered, the last ``REVISION_HISTORY`` kept.
One revision *serves* (the last good one); a spec with a new version starts a ``Rollout`` of a new
revision. Without a canary the rollout's revision is the goal at once (new replicas beside the old, as
``planning`` rolls them); with one, the serving revision keeps its full count while the new one gets
``weight`` % of the requests on ``canary_replicas`` of its own, until it is promoted (weight 100, or past
the last step) and becomes the goal.

A rollout *stops* when its new replicas fail to start (a handler that can't be imported or constructed:
at once; any other start failure: ``START_FAILURES_TO_STOP`` in a row), when its canary answers more 5xx
than ``maxErrorRate`` of at least ``MIN_CANARY_RESPONSES``, or when it makes no progress (no new replica
ready, no step) for ``progressDeadlineSeconds``. With ``autoRollback`` (the default) the serving revision
stays the goal, so the new one's replicas go and the old one is back at full strength; without it, the
rollout goes on trying, as a Deployment past its deadline does, and only the status says it stopped.
The spec keeps what the user asked for: its version is tried again only once the spec changes.

Pure: the controller feeds in what it observed (``Progress``) and executes what comes back.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from rayfleet_api.desired import FIELDS, DesiredState

REVISION_HISTORY = 10
MIN_CANARY_RESPONSES = 20
START_FAILURES_TO_STOP = 3
HANDLER_FAILURES = ("HandlerImportError", "HandlerInitError")  # the same code fails the same way every time

PROGRESSING, COMPLETE, FAILED = "Progressing", "Complete", "Failed"
_VERSIONED = tuple(f.attr for f in FIELDS if f.versioned)


def overlay(spec: DesiredState, code: DesiredState) -> DesiredState:
    """The spec's desired state running ``code``'s revision: its versioned fields, the spec's others
    (a rolled-back deployment keeps the count, route and limits the spec asks for now)."""
    return dataclasses.replace(spec, version=code.version, **{attr: getattr(code, attr) for attr in _VERSIONED})


@dataclass
class Revision:
    number: int
    desired: DesiredState  # as it was put; only its versioned fields are its own
    failed: str | None = None  # why its rollout stopped
    good: bool = False  # it served at full strength once: a rollout that stops can come back to it

    @property
    def version(self) -> str:
        return self.desired.version


@dataclass
class Rollout:
    revision: int
    started_at: float
    progress_at: float  # the last progress: a new replica ready, a step taken
    state: str = PROGRESSING
    reason: str = "NewRevisionProgressing"
    message: str = ""
    promoted: bool = False  # canary over: the new revision is the goal
    step: int = 0  # the canary step it is at
    step_at: float = 0.0
    ready: int = 0  # new replicas ready at the last look (more is progress)
    baseline: dict[str, tuple[int, int]] = field(default_factory=dict)  # replica -> (5xx, responses) at step start
    rolled_back_to: int | None = None


@dataclass(frozen=True)
class Progress:
    """What the controller saw of the rollout's revision this tick."""

    ready: int  # its READY replicas
    needed: int  # how many it should have now (the canary count, or the target once it is the goal)
    settled: bool  # the deployment runs only it, at the target, all READY
    start_error: dict[str, str] | None  # its last start failure, if the last start failed
    start_failures: int
    counters: dict[str, tuple[int, int]]  # its replicas' (5xx, responses) so far
    serving_ready: int = 0  # READY replicas of the serving revision: something to roll back to


@dataclass(frozen=True)
class Change:
    """What a look at the rollout decided, for the controller to log, count and checkpoint."""

    event: str  # canary_step | promoted | finished | stopped
    message: str


class Revisions:
    """The revisions of one deployment (oldest first), the serving one, and the latest rollout."""

    def __init__(self, desired: DesiredState):
        self.items = [Revision(1, desired)]
        self.serving = 1
        self.rollout: Rollout | None = None

    def get(self, number: int) -> Revision:
        return next(r for r in self.items if r.number == number)

    def by_version(self, version: str) -> Revision | None:
        return next((r for r in reversed(self.items) if r.version == version), None)

    @property
    def serving_revision(self) -> Revision:
        return self.get(self.serving)

    @property
    def active(self) -> Rollout | None:
        """The rollout still being carried out: progressing, or stopped without a rollback (it goes on trying)."""
        r = self.rollout
        return r if r is not None and (r.state == PROGRESSING or (r.state == FAILED and r.rolled_back_to is None)) else None

    def put(self, desired: DesiredState, now: float) -> str | None:
        """The spec says ``desired``: 'started' a rollout of a new revision, 'reverted' to the serving one
        (the rollout in progress is dropped), or None (no new version)."""
        latest = self.items[-1]
        if desired.version == latest.version:
            latest.desired = desired
            return None
        if desired.version == self.serving_revision.version:
            self.serving_revision.desired = desired
            self.rollout = None
            return "reverted"
        self.items.append(Revision(latest.number + 1, desired))
        keep = {self.serving, self.items[-1].number}
        while len(self.items) > REVISION_HISTORY:
            oldest = next(r for r in self.items if r.number not in keep)
            self.items.remove(oldest)
        self.rollout = Rollout(self.items[-1].number, now, now, step_at=now)
        return "started"

    def goal(self, spec: DesiredState) -> DesiredState:
        """The desired state the deployment's main set of replicas converges to."""
        active = self.active
        if active is not None and (active.promoted or spec.rollout.canary is None):
            return overlay(spec, self.get(active.revision).desired)
        return overlay(spec, self.serving_revision.desired)

    def canary(self, spec: DesiredState, target: int) -> tuple[DesiredState, int, int] | None:
        """(the canary's desired state, its replica count, its weight) while a canary runs, else None."""
        active, canary = self.active, spec.rollout.canary
        if active is None or active.promoted or canary is None:
            return None
        weight = self._weight(spec)
        count = 0 if weight == 0 or target == 0 else max(1, math.ceil(target * weight / 100))
        return overlay(spec, self.get(active.revision).desired), count, weight

    def _weight(self, spec: DesiredState) -> int:
        canary, active = spec.rollout.canary, self.active
        if canary.weight is not None:
            return canary.weight
        return canary.steps[min(active.step, len(canary.steps) - 1)]

    def look(self, spec: DesiredState, progress: Progress, now: float) -> Change | None:
        """Judge the rollout in progress from what was seen (``progress`` of its revision; with none, of the
        serving one); its state changes here, and only here."""
        r = self.rollout
        if r is None or r.state != PROGRESSING:
            if progress.settled and self.active is None:
                self.serving_revision.good = True
            return None
        revision = self.get(r.revision)
        if progress.ready > r.ready:
            r.progress_at = now
        r.ready = progress.ready
        stop = self._stop_reason(spec, r, progress, now)
        if stop is not None:
            return self._stop(spec, r, revision, progress.serving_ready, *stop)
        canary = spec.rollout.canary
        if r.promoted or canary is None:
            if progress.settled:
                self.serving, r.state, r.reason = r.revision, COMPLETE, "RolloutComplete"
                revision.good = True
                r.message = f"revision {r.revision} ({revision.version}) serves every replica"
                return Change("finished", r.message)
            r.reason, r.message = "NewRevisionProgressing", f"revision {r.revision} ({revision.version}) is rolling out"
            return None
        return self._canary(spec, r, revision, progress, now)

    def _canary(self, spec: DesiredState, r: Rollout, revision: Revision, progress: Progress,
                now: float) -> Change | None:
        canary, weight = spec.rollout.canary, self._weight(spec)
        ready = progress.ready >= progress.needed
        if ready and (weight >= 100 or (canary.steps is not None and now - r.step_at >= canary.step_seconds
                                        and r.step + 1 >= len(canary.steps))):
            r.promoted, r.progress_at = True, now
            r.reason, r.message = "NewRevisionProgressing", f"revision {r.revision} promoted: rolling out to every replica"
            return Change("promoted", r.message)
        if ready and canary.steps is not None and now - r.step_at >= canary.step_seconds:
            r.step, r.step_at, r.progress_at, r.baseline = r.step + 1, now, now, dict(progress.counters)
            r.reason, r.message = "CanaryStep", f"revision {r.revision} gets {self._weight(spec)} % of the requests"
            return Change("canary_step", r.message)
        if ready and canary.weight is not None:
            r.progress_at = now  # waiting for the user is not a stalled rollout
            r.reason = "CanaryWaiting"
            r.message = f"revision {r.revision} gets {weight} % of the requests; set canary.weight to 100 to promote it"
        else:
            r.reason, r.message = "CanaryStep", f"revision {r.revision} gets {weight} % of the requests"
        return None

    @staticmethod
    def _stop_reason(spec: DesiredState, r: Rollout, progress: Progress, now: float) -> tuple[str, str] | None:
        error = progress.start_error
        if error is not None and (error.get("reason") in HANDLER_FAILURES
                                  or progress.start_failures >= START_FAILURES_TO_STOP):
            return error.get("reason") or "ReplicaStartError", f"{error.get('reason')}: {error.get('message')}"
        canary = spec.rollout.canary
        if canary is not None and not r.promoted:
            errors = sum(max(0, e - r.baseline.get(rid, (0, 0))[0]) for rid, (e, _) in progress.counters.items())
            total = sum(max(0, t - r.baseline.get(rid, (0, 0))[1]) for rid, (_, t) in progress.counters.items())
            if total >= MIN_CANARY_RESPONSES and errors > canary.max_error_rate * total:
                return "CanaryErrorRate", (f"{errors} of {total} responses were 5xx, more than maxErrorRate "
                                           f"{canary.max_error_rate:g}")
        deadline = spec.rollout.progress_deadline_seconds
        if now - r.progress_at > deadline:
            return "ProgressDeadlineExceeded", f"no progress for {deadline:g} s"
        return None

    def _stop(self, spec: DesiredState, r: Rollout, revision: Revision, serving_ready: int, reason: str,
              why: str) -> Change:
        r.state, r.reason = FAILED, reason
        revision.failed = reason
        if spec.rollout.auto_rollback and (self.serving_revision.good or serving_ready):
            r.rolled_back_to = self.serving
            r.message = f"revision {r.revision} ({revision.version}): {why}; rolled back to revision {self.serving}"
        else:
            still = "autoRollback is off" if spec.rollout.auto_rollback is False else "no revision served before it"
            r.message = f"revision {r.revision} ({revision.version}): {why}; still trying ({still})"
        return Change("stopped", r.message)

    # ---------- what the status and the checkpoint say ----------
    def observed(self, spec: DesiredState) -> dict[str, Any]:
        r, active = self.rollout, self.active
        canary = active is not None and not active.promoted and spec.rollout.canary is not None

        def state(rev: Revision) -> str:
            if rev.number == self.serving:
                return "Serving"
            if active is not None and rev.number == active.revision:
                return "Canary" if canary else "Updating"
            return "Failed" if rev.failed else "Previous"

        return {
            "servingVersion": self.serving_revision.version,
            "revisions": [{"revision": rev.number, "version": rev.version, "state": state(rev), "good": rev.good}
                          for rev in reversed(self.items)],
            "rollout": None if r is None else {
                "revision": r.revision, "version": self.get(r.revision).version, "state": r.state,
                "reason": r.reason, "message": r.message, "canaryWeight": self._weight(spec) if canary else None,
                "rolledBackTo": r.rolled_back_to},
        }

    def checkpoint(self) -> dict[str, Any]:
        return {"items": [{"number": rev.number, "desired": rev.desired.to_json(), "failed": rev.failed,
                           "good": rev.good} for rev in self.items],
                "serving": self.serving,
                "rollout": None if self.rollout is None else dataclasses.asdict(self.rollout)}

    @classmethod
    def resumed(cls, saved: dict[str, Any]) -> "Revisions":
        items = [Revision(i["number"], DesiredState.from_json(i["desired"]), i.get("failed"), i.get("good", False))
                 for i in saved["items"]]
        out = cls(items[0].desired)
        out.items, out.serving = items, saved["serving"]
        rollout = saved.get("rollout")
        if rollout is not None:
            rollout["baseline"] = {k: tuple(v) for k, v in rollout.get("baseline", {}).items()}
            out.rollout = Rollout(**rollout)
        return out
