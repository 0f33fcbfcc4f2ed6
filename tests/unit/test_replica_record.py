"""What a replica reports about itself in the controller's observed state (no Ray cluster)."""
from rayfleet_api.states import ReplicaState
from rayfleet_runtime.controller.records import SLOW_START_S, ReplicaRecord


def test_a_slow_start_explains_itself_and_a_real_error_wins():
    rec = ReplicaRecord(id="echo-0", version="v1", actor=None, created_at=1000.0)
    assert rec.observed(now=1000.0 + SLOW_START_S - 1)["lastError"] is None
    late = rec.observed(now=1000.0 + SLOW_START_S + 30)["lastError"]
    assert "still starting after 90 s" in late and "rayActorOptions" in late
    rec.last_error = "HandlerInitError: boom"
    assert rec.observed(now=1000.0 + SLOW_START_S + 30)["lastError"] == "HandlerInitError: boom"


def test_a_ready_replica_is_not_slow():
    rec = ReplicaRecord(id="echo-0", version="v1", actor=None, state=ReplicaState.READY, created_at=0.0)
    assert rec.state != ReplicaState.STARTING and rec.observed(now=10_000.0)["lastError"] is None
