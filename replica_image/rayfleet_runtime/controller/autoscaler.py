"""One deployment's autoscaler as the controller runs it: the replica count planning uses, and what the
status shows of it. The decisions themselves are ``autoscaling.decide``'s (pure).

The controller (``deployment_state``) samples every autoscaled deployment about every
``SAMPLE_INTERVAL_S``: the in-flight and queued requests of its serving and starting replicas (their
``info()``) and the requests its ingresses wait with. ``Autoscaler.observe`` turns each sample into the
count to run. The count is checkpointed with the deployment, so a restarted controller resumes from it;
the decisions' memory (the recent loads) is not: after a restart the delays count from the first sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from rayfleet_api.desired import Autoscaling

from rayfleet_runtime.controller.autoscaling import AutoscalerState, Decision, LoadSample, ReplicaLoad, decide

SAMPLE_INTERVAL_S = 1.0
# How long one round waits for the replicas' and ingresses' answers. One that answers later keeps its
# previous value for this round, so a slow replica delays no decision.
SAMPLE_WAIT_S = 0.5


@dataclass
class Autoscaler:
    config: Autoscaling
    replicas: int  # the count the controller runs towards
    load: float | None = None  # the latest sample's total; None until sampled
    last_scale_time: float | None = None  # wall clock of the latest change of the count
    last_scale_reason: str | None = None
    _state: AutoscalerState = field(default_factory=AutoscalerState)

    @property
    def target(self) -> int:
        # Within a range just changed even before the next sample brings the count there (and says so).
        return self.config.clamp(self.replicas)

    def observe(self, sample: LoadSample, now: float, wall: float) -> Decision:
        """Decide on ``sample`` taken at ``now`` (monotonic); a change of the count is remembered with ``wall``."""
        decision, self._state = decide(self.config, self._state, self.replicas, sample, now)
        self.load = decision.load
        if decision.replicas != self.replicas:
            self.replicas, self.last_scale_time, self.last_scale_reason = decision.replicas, wall, decision.reason
        return decision

    def observed(self) -> dict[str, Any]:
        return {"load": self.load, "lastScaleTime": self.last_scale_time, "lastScaleReason": self.last_scale_reason}

    def checkpoint(self) -> dict[str, Any]:
        return {"replicas": self.replicas, "lastScaleTime": self.last_scale_time,
                "lastScaleReason": self.last_scale_reason}

    @classmethod
    def resumed(cls, config: Autoscaling, saved: Mapping[str, Any]) -> "Autoscaler":
        return cls(config, saved["replicas"], last_scale_time=saved.get("lastScaleTime"),
                   last_scale_reason=saved.get("lastScaleReason"))


def follow_spec(current: Autoscaler | None, config: Autoscaling | None, spec_replicas: int) -> Autoscaler | None:
    """The autoscaler after a new desired state: none without autoscaling; the spec's count within the range
    when autoscaling is turned on (as a HorizontalPodAutoscaler starts from the Deployment's); else the same
    count under the new settings (``kubectl scale`` does not move it)."""
    if config is None:
        return None
    if current is None:
        return Autoscaler(config, config.clamp(spec_replicas))
    current.config = config
    return current


def replica_load(info: Mapping[str, Any], ready: bool) -> ReplicaLoad:
    """A replica's load from its latest ``info()``."""
    return ReplicaLoad(in_flight=info.get("inFlight", 0), queued=info.get("queued", 0), ready=ready)
