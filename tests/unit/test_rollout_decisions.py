"""Revisions and rollouts, decided without Ray (rayfleet_runtime.controller.rollouts)."""
import dataclasses

from rayfleet_api.desired import Canary, DesiredState, Rollout
from rayfleet_runtime.controller.rollouts import (COMPLETE, FAILED, MIN_CANARY_RESPONSES, PROGRESSING, Progress,
                                                  Revisions, overlay)


def desired(version, **fields):
    return DesiredState(handler=f"m:{version}", version=version, **fields)


def progress(ready=0, needed=2, settled=False, error=None, failures=0, counters=None):
    return Progress(ready, needed, settled, error, failures, counters or {})


def serving(first):
    """Revisions whose first revision served at full strength."""
    revs = Revisions(first)
    revs.look(first, progress(settled=True), 0)
    return revs


def test_a_new_version_is_a_new_revision_and_the_goal_once_put():
    revs = serving(desired("v1"))
    assert revs.put(desired("v1", replicas=3), 0) is None  # not versioned: no revision
    assert revs.put(desired("v2"), 0) == "started"
    spec = desired("v2")
    assert revs.goal(spec).version == "v2" and revs.canary(spec, 2) is None
    assert revs.look(spec, progress(ready=1), 1) is None
    change = revs.look(spec, progress(ready=2, settled=True), 2)
    assert change.event == "finished" and revs.serving == 2 and revs.rollout.state == COMPLETE
    assert [(r["state"], r["good"]) for r in revs.observed(spec)["revisions"]] == [("Serving", True), ("Previous", True)]


def test_a_handler_that_does_not_import_rolls_back_at_once():
    revs = serving(desired("v1"))
    revs.put(desired("v2"), 0)
    spec = desired("v2")
    error = {"reason": "HandlerImportError", "message": "No module named 'x'", "version": "v2"}
    change = revs.look(spec, progress(error=error, failures=1), 1)
    assert change.event == "stopped" and revs.rollout.reason == "HandlerImportError"
    assert revs.rollout.rolled_back_to == 1 and revs.goal(spec).version == "v1"
    assert "rolled back to revision 1" in revs.rollout.message
    seen = revs.observed(spec)
    assert seen["servingVersion"] == "v1" and seen["rollout"]["state"] == FAILED
    assert [r["state"] for r in seen["revisions"]] == ["Failed", "Serving"]
    assert revs.put(spec, 5) is None  # the same spec again: the failed version is not tried again


def test_other_start_failures_stop_the_rollout_only_when_they_repeat():
    revs = serving(desired("v1"))
    revs.put(desired("v2"), 0)
    error = {"reason": "ReplicaStartError", "message": "actor died", "version": "v2"}
    assert revs.look(desired("v2"), progress(error=error, failures=2), 1) is None
    assert revs.look(desired("v2"), progress(error=error, failures=3), 2).event == "stopped"


def test_no_progress_within_the_deadline_stops_the_rollout():
    spec = desired("v2", rollout=Rollout(progress_deadline_seconds=10))
    revs = serving(desired("v1"))
    revs.put(spec, 0)
    assert revs.look(spec, progress(ready=1), 8) is None  # a new replica ready: progress at 8
    assert revs.look(spec, progress(ready=1), 17) is None
    change = revs.look(spec, progress(ready=1), 19)
    assert change.event == "stopped" and revs.rollout.reason == "ProgressDeadlineExceeded"


def test_without_auto_rollback_a_stopped_rollout_keeps_trying_and_says_so():
    spec = desired("v2", rollout=Rollout(progress_deadline_seconds=10, auto_rollback=False))
    revs = serving(desired("v1"))
    revs.put(spec, 0)
    assert revs.look(spec, progress(), 11).event == "stopped"
    assert revs.rollout.rolled_back_to is None and revs.goal(spec).version == "v2"
    assert "still trying" in revs.rollout.message


def test_going_back_to_the_serving_version_drops_the_rollout():
    revs = serving(desired("v1"))
    revs.put(desired("v2"), 0)
    assert revs.put(desired("v1"), 1) == "reverted"
    assert revs.rollout is None and revs.goal(desired("v1")).version == "v1"


def test_a_canary_by_hand_holds_its_weight_until_promoted():
    canary = Rollout(canary=Canary(weight=10))
    spec = desired("v2", rollout=canary)
    revs = serving(desired("v1"))
    revs.put(spec, 0)
    assert revs.goal(spec).version == "v1"  # the serving revision keeps its full count
    code, count, weight = revs.canary(spec, 2)
    assert (code.version, count, weight) == ("v2", 1, 10)
    assert revs.look(spec, progress(ready=1, needed=1), 1000) is None  # waiting for the user is no stall
    assert revs.rollout.reason == "CanaryWaiting" and revs.rollout.state == PROGRESSING
    assert revs.observed(spec)["rollout"]["canaryWeight"] == 10
    promoted = dataclasses.replace(spec, rollout=Rollout(canary=Canary(weight=100)))
    assert revs.look(promoted, progress(ready=1, needed=1), 1001).event == "promoted"
    assert revs.goal(promoted).version == "v2" and revs.canary(promoted, 2) is None
    assert revs.look(promoted, progress(ready=2, settled=True), 1002).event == "finished"


def test_canary_steps_advance_by_time_and_reset_the_error_count():
    spec = desired("v2", rollout=Rollout(canary=Canary(steps=(10, 50), step_seconds=30)))
    revs = serving(desired("v1"))
    revs.put(spec, 0)
    assert revs.canary(spec, 4)[1:] == (1, 10)
    assert revs.look(spec, progress(ready=1, needed=1, counters={"a": (1, 40)}), 29) is None
    assert revs.look(spec, progress(ready=1, needed=1, counters={"a": (1, 40)}), 31).event == "canary_step"
    assert revs.canary(spec, 4)[1:] == (2, 50)
    assert revs.rollout.baseline == {"a": (1, 40)}
    assert revs.look(spec, progress(ready=2, needed=2, counters={"a": (1, 60)}), 62).event == "promoted"


def test_a_canary_that_answers_too_many_5xx_is_rolled_back():
    spec = desired("v2", rollout=Rollout(canary=Canary(weight=10, max_error_rate=0.1)))
    revs = serving(desired("v1"))
    revs.put(spec, 0)
    few = {"a": (5, MIN_CANARY_RESPONSES - 1)}  # too few responses to judge
    assert revs.look(spec, progress(ready=1, needed=1, counters=few), 1) is None
    assert revs.look(spec, progress(ready=1, needed=1, counters={"a": (2, 40)}), 2) is None  # 5 %
    change = revs.look(spec, progress(ready=1, needed=1, counters={"a": (6, 40), "b": (1, 10)}), 3)
    assert change.event == "stopped" and revs.rollout.reason == "CanaryErrorRate"
    assert revs.canary(spec, 2) is None and revs.goal(spec).version == "v1"


def test_a_rolled_back_deployment_keeps_what_the_spec_asks_for_now():
    v1 = desired("v1", max_concurrency=5)
    spec = desired("v2", max_concurrency=7, replicas=4, route_prefix="/x")
    running = overlay(spec, v1)
    assert (running.version, running.handler, running.max_concurrency) == ("v1", "m:v1", 5)  # v1's code
    assert (running.replicas, running.route_prefix) == (4, "/x")  # the spec's count and route


def test_history_is_bounded_and_survives_a_restart():
    revs = Revisions(desired("v0"))
    for n in range(1, 15):
        revs.put(desired(f"v{n}"), n)
    assert len(revs.items) == 10 and revs.items[0].number == 1  # the serving one is kept
    again = Revisions.resumed(revs.checkpoint())
    assert again.observed(desired("v14")) == revs.observed(desired("v14"))


def test_with_no_revision_that_ever_served_a_stopped_rollout_keeps_trying():
    revs = Revisions(desired("v1"))  # v1 never came up
    revs.put(desired("v2"), 0)
    error = {"reason": "HandlerImportError", "message": "no", "version": "v2"}
    assert revs.look(desired("v2"), progress(error=error, failures=1), 1).event == "stopped"
    assert revs.rollout.rolled_back_to is None and revs.goal(desired("v2")).version == "v2"
    assert "no revision served before it" in revs.rollout.message
