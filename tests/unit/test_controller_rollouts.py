"""Rollouts through the controller with a fake Ray: a bad version rolls back, a canary gets its share.

The routing table is what a client of the old version depends on: every test checks that the old
revision's replicas stay in it, at full count, from the moment the new version is put to the end.
"""
import asyncio
import dataclasses

from rayfleet_api.desired import Canary, Rollout
from rayfleet_api.states import DeploymentStatus, ReplicaState
from rayfleet_runtime.controller import deployment_state
from rayfleet_runtime.controller.deployment_state import ControllerCore
from tests.unit.test_deployment_state import FakeBackend, desired, metric, run, settle, states

IMPORT_ERROR = {"reason": "HandlerImportError", "message": "No module named 'broken'", "traceback": "Traceback ..."}


def break_version(backend: FakeBackend, version: str) -> None:
    """Replicas of ``version`` fail to import their handler; those of any other start as before."""
    create = backend.create_replica

    def create_replica(deployment, replica_id, desired, bind_host, node_id=None):
        backend.handler_error = IMPORT_ERROR if desired.version == version else None
        return create(deployment, replica_id, desired, bind_host, node_id)
    backend.create_replica = create_replica


def routed(core: ControllerCore, name: str = "d") -> tuple[list[str], list[str], int]:
    """(stable replica ids, canary replica ids, canary weight) in the routing table now."""
    be = core.routing_table().backend(name)
    canary = be.canary
    return ([s.replica_id for s in be.servers], [] if canary is None else [s.replica_id for s in canary.servers],
            be.canary_weight if canary is not None else 0)


async def watch_old(core: ControllerCore, old: set[str], lowest: list[int]) -> None:
    """Record the fewest of the ``old`` replicas ever routed (the controller's loop interleaves)."""
    while True:
        lowest[0] = min(lowest[0], len(old & set(routed(core)[0])))
        await asyncio.sleep(0.005)


async def two_ready(core: ControllerCore) -> set[str]:
    core.put_deployment("d", desired(replicas=2))
    await settle(core, lambda: core.get_deployment("d")["status"] == DeploymentStatus.RUNNING, "v1 running")
    return set(states(core))


def rolled_back(core: ControllerCore, reason: str):
    def check() -> bool:
        obs = core.get_deployment("d")
        rollout = obs["rollout"] or {}
        return (rollout.get("state") == "Failed" and rollout.get("reason") == reason
                and obs["readyReplicas"] == 2 and obs["status"] == DeploymentStatus.RUNNING
                and {r["version"] for r in obs["replicas"]} == {"v1"})
    return check


def test_a_version_that_fails_to_import_is_rolled_back_and_no_old_replica_leaves_the_routes():
    async def test(core: ControllerCore, backend: FakeBackend):
        old = await two_ready(core)
        lowest = [2]
        watcher = asyncio.ensure_future(watch_old(core, old, lowest))
        break_version(backend, "v2")
        core.put_deployment("d", desired(replicas=2, version="v2"))
        await settle(core, rolled_back(core, "HandlerImportError"), "the rollout stopped and rolled back")
        watcher.cancel()
        assert lowest[0] == 2  # with room for a surge, the old replicas never stopped serving
        obs = core.get_deployment("d")
        assert obs["version"] == "v2" and obs["servingVersion"] == "v1" and obs["error"] is None
        assert obs["rollout"]["rolledBackTo"] == 1 and "HandlerImportError" in obs["rollout"]["message"]
        assert [(r["revision"], r["state"]) for r in obs["revisions"]] == [(2, "Failed"), (1, "Serving")]
        assert metric(core, "rayfleet_controller_rollouts_stopped_total", reason="HandlerImportError") == 1
        created = len(backend.created())
        for _ in range(30):  # the spec still says v2: it is not tried again until the spec changes
            core.put_deployment("d", desired(replicas=2, version="v2"))
            core.reconcile_once()
            await asyncio.sleep(0.01)
        assert len(backend.created()) == created

    run(test)


def test_without_room_for_a_surge_the_deployment_is_back_at_full_strength_after_a_bad_version(monkeypatch):
    monkeypatch.setattr(deployment_state, "PLACEMENT_GRACE_S", 0.0)
    monkeypatch.setattr(deployment_state, "PROBE_INTERVAL_S", 0.0)

    async def test(core: ControllerCore, backend: FakeBackend):
        backend.slots = 2  # in place: an old replica drains to make room for each new one
        await two_ready(core)
        break_version(backend, "v2")
        lowest = [2]

        def back() -> bool:
            lowest[0] = min(lowest[0], core.get_deployment("d")["readyReplicas"])
            return rolled_back(core, "HandlerImportError")()
        core.put_deployment("d", desired(replicas=2, version="v2"))
        await settle(core, back, "two v1 replicas again")
        assert lowest[0] == 1  # an old replica made room in place, and only one: never below replicas - 1

    run(test)


def test_a_rollout_without_progress_stops_at_its_deadline_and_rolls_back():
    async def test(core: ControllerCore, backend: FakeBackend):
        old = await two_ready(core)
        backend.auto_up = False  # v2's replicas never finish starting
        core.put_deployment("d", desired(replicas=2, version="v2", rollout=Rollout(progress_deadline_seconds=1)))
        await settle(core, lambda: core.get_deployment("d")["rollout"]["reason"] == "NewRevisionProgressing",
                     "the rollout under way")
        await settle(core, rolled_back(core, "ProgressDeadlineExceeded"), "the deadline passed", timeout=5)
        assert old == {r["id"] for r in core.get_deployment("d")["replicas"] if r["state"] == ReplicaState.READY}

    run(test)


def test_a_canary_by_hand_gets_its_weight_then_everything_once_promoted():
    async def test(core: ControllerCore, backend: FakeBackend):
        old = await two_ready(core)
        at_10 = desired(replicas=2, version="v2", rollout=Rollout(canary=Canary(weight=10)))
        core.put_deployment("d", at_10)
        await settle(core, lambda: routed(core)[1], "the canary routed")
        stable, canary, weight = routed(core)
        assert set(stable) == old and len(canary) == 1 and weight == 10  # one canary replica beside both old ones
        obs = core.get_deployment("d")
        assert obs["status"] == DeploymentStatus.UPDATING and obs["rollout"]["canaryWeight"] == 10
        await settle(core, lambda: core.get_deployment("d")["rollout"]["reason"] == "CanaryWaiting", "waiting")
        [(_, first)] = [(r["revision"], r["state"]) for r in obs["revisions"] if r["revision"] == 2]
        assert first == "Canary"
        core.put_deployment("d", dataclasses.replace(at_10, rollout=Rollout(canary=Canary(weight=100))))
        await settle(core, lambda: core.get_deployment("d")["rollout"]["state"] == "Complete", "promoted")
        obs = core.get_deployment("d")
        assert obs["servingVersion"] == "v2" and {r["version"] for r in obs["replicas"]} == {"v2"}
        assert routed(core)[1:] == ([], 0)

    run(test)


def test_a_canary_that_answers_5xx_is_rolled_back_and_its_replica_unrouted():
    async def test(core: ControllerCore, backend: FakeBackend):
        old = await two_ready(core)
        core.put_deployment("d", desired(replicas=2, version="v2",
                                         rollout=Rollout(canary=Canary(steps=(10, 50), step_seconds=60))))
        await settle(core, lambda: routed(core)[1], "the canary routed")
        [canary] = [r for r in backend.replicas.values() if r.version == "v2"]
        canary.answered, canary.answered_5xx = 40, 20
        await settle(core, rolled_back(core, "CanaryErrorRate"), "the canary judged", timeout=8)
        assert routed(core) == (sorted(old), [], 0)

    run(test)


def test_a_canary_survives_a_controller_restart():
    backend = FakeBackend()

    async def first(core: ControllerCore, backend: FakeBackend):
        await two_ready(core)
        core.put_deployment("d", desired(replicas=2, version="v2", rollout=Rollout(canary=Canary(weight=50))))
        await settle(core, lambda: routed(core)[1], "the canary routed")

    async def restarted(core: ControllerCore, backend: FakeBackend):
        await core.recover()
        await settle(core, lambda: routed(core)[1] and len(routed(core)[0]) == 2, "both routed again")
        obs = core.get_deployment("d")
        assert obs["rollout"]["canaryWeight"] == 50 and obs["servingVersion"] == "v1"

    run(first, backend)
    run(restarted, backend)
