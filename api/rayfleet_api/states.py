"""Replica states and deployment statuses, as the controller reports them in its observed state."""
from __future__ import annotations

from enum import Enum


class _Name(str, Enum):
    """A str, so it compares and serializes (JSON, logs) as its plain value."""

    def __str__(self) -> str:
        return self.value


class ReplicaState(_Name):
    STARTING = "STARTING"  # actor created; handler loading
    READY = "READY"  # serving and routed
    UNHEALTHY = "UNHEALTHY"  # failed its latest health check(s): unrouted, replaced after failureThreshold
    DRAINING = "DRAINING"  # unrouted; finishing in-flight requests before it stops
    STOPPED = "STOPPED"  # killed, or being killed
    FAILED = "FAILED"  # actor died, or the handler failed to load


class DeploymentStatus(_Name):
    RUNNING = "Running"  # every replica READY at the desired version
    UPDATING = "Updating"  # converging: starting, rolling or scaling
    DELETING = "Deleting"  # draining every replica before it is forgotten
    FAILED = "Failed"  # the desired version can't start (handler error), too few ready
