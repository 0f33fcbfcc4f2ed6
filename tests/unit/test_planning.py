"""Reconciliation decisions (pure, no Ray)."""
from __future__ import annotations

from dataclasses import replace

from rayfleet_api.states import DeploymentStatus, ReplicaState
from rayfleet_runtime.controller import planning as P
from rayfleet_runtime.controller.planning import ReplicaView, StartIntent, plan

STARTING, READY, UNHEALTHY = ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY
DRAINING, FAILED = ReplicaState.DRAINING, ReplicaState.FAILED


def rv(i, state=READY, version="v1", failures=0, restarts=0, t=None):
    return ReplicaView(f"r{i}", version, state, failures, restarts, float(i if t is None else t))


def ids(stops):
    return sorted(s.replica_id for s in stops)


def test_scale_up_from_nothing():
    p = plan(3, "v1", [])
    assert p.start == [StartIntent()] * 3 and p.stop == [] and p.restarts == 0


def test_steady_state_does_nothing():
    assert not plan(2, "v1", [rv(0), rv(1)])
    assert not plan(2, "v1", [rv(0), rv(1, STARTING)])  # starting counts toward the target


def test_scale_down_prefers_not_ready_then_newest_and_drains_ready_gracefully():
    p = plan(2, "v1", [rv(0), rv(1), rv(2, STARTING), rv(3)])
    assert p.start == []
    stops = {s.replica_id: s for s in p.stop}
    assert set(stops) == {"r2", "r3"}
    assert stops["r2"].graceful is False  # never served: just kill
    assert stops["r3"].graceful is True and stops["r3"].reason == "scale-down"


def test_scale_to_zero():
    p = plan(0, "v1", [rv(0), rv(1)])
    assert ids(p.stop) == ["r0", "r1"] and all(s.graceful for s in p.stop)


def test_dead_replica_is_replaced_and_restart_counted_on_its_slot():
    p = plan(2, "v1", [rv(0), rv(1, FAILED, restarts=2)])
    assert ids(p.stop) == ["r1"] and not p.stop[0].graceful and p.stop[0].reason == "failed"
    assert p.start == [StartIntent(restarts=3, replaces="r1")]
    assert p.restarts == 1


def test_unhealthy_replaced_only_after_threshold():
    assert not plan(2, "v1", [rv(0), rv(1, UNHEALTHY, failures=2)], failure_threshold=3)
    p = plan(2, "v1", [rv(0), rv(1, UNHEALTHY, failures=3)], failure_threshold=3)
    assert ids(p.stop) == ["r1"] and p.stop[0].reason == "unhealthy"
    assert p.start == [StartIntent(restarts=1, replaces="r1")]


def test_health_state_transitions():
    assert P.next_health_state(READY, 0, False) == (UNHEALTHY, 1)
    assert P.next_health_state(UNHEALTHY, 1, False) == (UNHEALTHY, 2)
    assert P.next_health_state(UNHEALTHY, 2, True) == (READY, 0)


def test_backoff_blocks_starts_and_keeps_failed_placeholder():
    replicas = [rv(0, FAILED, restarts=1)]
    assert not plan(1, "v1", replicas, can_start=False)  # no hot loop while backing off
    p = plan(1, "v1", replicas, can_start=True)
    assert p.start == [StartIntent(restarts=2, replaces="r0")]
    assert [P.backoff_seconds(n) for n in range(0, 9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]


def test_failed_replica_removed_instead_of_replaced_on_scale_down():
    p = plan(1, "v1", [rv(0), rv(1, FAILED)])
    assert ids(p.stop) == ["r1"] and p.start == []


def _simulate_rollout(target, old_count, surge=None):
    """Drive plan() through a rollout, making started replicas READY one round later; track READY counts."""
    replicas = [rv(i, version="v1") for i in range(old_count)]
    n = old_count
    min_ready = old_count
    for _ in range(50):
        p = plan(target, "v2", replicas, max_surge=surge)
        stopped = {s.replica_id for s in p.stop}  # unrouted at once (draining or killed)
        # Replicas that were STARTING become READY; then the new ones appear as STARTING.
        replicas = [replace(r, state=READY, health_failures=0) for r in replicas if r.id not in stopped]
        min_ready = min(min_ready, len(replicas))
        for _s in p.start:
            replicas.append(rv(n, STARTING, "v2"))
            n += 1
        if not p and all(r.version == "v2" and r.state == READY for r in replicas):
            break
    return replicas, min_ready


def test_rolling_update_never_drops_below_ready_count():
    for target, surge in [(1, None), (2, None), (3, 1), (4, None), (5, 2)]:
        replicas, min_ready = _simulate_rollout(target, target, surge)
        assert len(replicas) == target and all(r.version == "v2" for r in replicas)
        assert min_ready >= target, (target, surge, min_ready)


def test_rollout_starts_new_before_draining_old_and_respects_surge():
    old = [rv(0), rv(1), rv(2), rv(3)]
    p = plan(4, "v2", old)  # surge = ceil(4/4) = 1
    assert len(p.start) == 1 and p.stop == []
    p = plan(4, "v2", old + [rv(9, STARTING, "v2")])
    assert p.start == [] and p.stop == []  # new one not ready yet: keep all old
    p = plan(4, "v2", old + [rv(9, READY, "v2")])
    assert ids(p.stop) == ["r0"] and p.stop[0].graceful and p.stop[0].reason == "rollout"


def test_a_rollout_without_room_drains_one_old_replica_at_a_time():
    old = [rv(0), rv(1)]
    stuck = replace(rv(2, STARTING, version="v2"), unplaced=True)  # the surge replica: no node has room
    p = plan(2, "v2", [*old, stuck])
    assert ids(p.stop) == ["r0"] and p.stop[0].graceful and p.start == []  # the oldest makes room, drained
    # While it drains (or is being killed), no second one goes.
    assert not plan(2, "v2", [replace(rv(0), state=DRAINING), rv(1), stuck]).stop
    assert not plan(2, "v2", [replace(rv(0), state=ReplicaState.STOPPED), rv(1), stuck]).stop
    # Once gone, and if the replacement can't be placed either, nothing more is taken: only one READY lost.
    assert not plan(2, "v2", [rv(1), stuck]).stop
    # With room (nothing unplaced), old ones still wait for new READY ones.
    assert not plan(2, "v2", [*old, rv(2, STARTING, version="v2")]).stop
    # Scaling up past the cluster's room touches nothing that serves.
    assert not plan(3, "v1", [*old, replace(rv(2, STARTING), unplaced=True)]).stop


def test_old_version_not_ready_replicas_are_killed_right_away():
    p = plan(1, "v2", [rv(0, STARTING, "v1"), rv(1, READY, "v1")])
    stops = {s.replica_id: s for s in p.stop}
    assert stops == {"r0": P.StopIntent("r0", False, "rollout")}
    assert len(p.start) == 1


def test_delete_stops_everything_ready_ones_gracefully():
    p = plan(3, "v1", [rv(0), rv(1, STARTING), rv(2, DRAINING)], deleting=True)
    assert {s.replica_id: s.graceful for s in p.stop} == {"r0": True, "r1": False}
    assert p.start == []


def test_draining_replicas_are_neither_stopped_twice_nor_replaced():
    assert not plan(1, "v1", [rv(0), rv(1, DRAINING), rv(2, DRAINING)])


def test_status():
    assert P.deployment_status(2, "v1", [rv(0), rv(1)]) == DeploymentStatus.RUNNING == "Running"
    assert P.deployment_status(2, "v1", [rv(0), rv(1, STARTING)]) == DeploymentStatus.UPDATING
    assert P.deployment_status(2, "v2", [rv(0), rv(1)]) == DeploymentStatus.UPDATING
    assert P.deployment_status(1, "v1", [rv(0, FAILED)], error=True) == DeploymentStatus.FAILED
    assert P.deployment_status(1, "v1", [rv(0)], deleting=True) == DeploymentStatus.DELETING


def test_a_replica_on_a_draining_node_serves_until_its_replacement_does():
    moving = replace(rv(0), evict="node-drain")
    p = plan(2, "v1", [moving, rv(1)])
    assert p.start == [StartIntent()] and p.stop == []  # surge first: r0 keeps serving
    p = plan(2, "v1", [moving, rv(1), rv(2, STARTING)])
    assert not p  # nothing to drain until the replacement is READY
    p = plan(2, "v1", [moving, rv(1), rv(2)])
    assert [(s.replica_id, s.graceful, s.reason) for s in p.stop] == [("r0", True, "node-drain")] and not p.start


def test_every_replica_of_a_draining_node_is_replaced_at_once_whatever_the_surge():
    leaving = [replace(rv(i), evict="node-drain") for i in range(3)]
    p = plan(4, "v1", [*leaving, rv(3)], max_surge=1)
    assert len(p.start) == 3 and not p.stop


def test_a_moving_replica_that_is_not_serving_is_stopped_and_replaced_at_once():
    p = plan(2, "v1", [replace(rv(0, STARTING), evict="node-drain"), rv(1)])
    assert [(s.replica_id, s.graceful, s.reason) for s in p.stop] == [("r0", False, "node-drain")]
    assert p.start == [StartIntent()]


def test_a_move_that_cannot_be_placed_never_drains_the_replica_early():
    p = plan(2, "v1", [replace(rv(0), evict="node-drain"), rv(1), replace(rv(2, STARTING), unplaced=True)])
    assert not p.stop  # unlike a rollout without room: the replica serves until its pod goes


def test_scale_down_stops_replicas_on_the_most_crowded_node_first():
    views = [replace(rv(0), node="a"), replace(rv(1), node="a"), replace(rv(2), node="b"), replace(rv(3), node="b"),
             replace(rv(4), node="b")]
    p = plan(3, "v1", views)
    assert ids(p.stop) == ["r3", "r4"]  # b held three: its newest goes, then the newest of a tie
    p = plan(2, "v1", views)
    assert ids(p.stop) == ["r1", "r3", "r4"]
