"""Autoscaling decisions: load samples in, a replica count and its reason out.

Pure: no Ray, no I/O, no clock (the time comes in). The controller samples a deployment about every
second, calls ``decide`` with the state the previous call returned, and runs ``Decision.replicas``.

The rules, those of Kubernetes' HPA stabilization windows plus Knative's scale from zero:

- the count a load asks for is ceil(load / targetInFlight) within minReplicas..maxReplicas, load being
  the requests running or queued in the replicas plus those the ingress holds for the deployment;
- up once a higher count has been asked for over the whole upscaleDelaySeconds, to the lowest asked for
  in that time (a burst shorter than the delay adds nothing);
- down once a lower count has been asked for over the whole downscaleDelaySeconds, to the highest asked
  for in that time (load that comes and goes keeps its peak's replicas: no flapping); with
  minReplicas 0 that stops the last replica only after no load for that long;
- from zero replicas, any load scales up at once: the ingress holds a request nothing can serve;
- while replicas start, no further scale-up, and the upscale delay counts from when they all serve:
  they are capacity coming, and the load they will take queues meanwhile on the others and in the
  ingress, where it would be read as more demand;
- a count outside minReplicas..maxReplicas (the range was just changed) is brought inside at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rayfleet_api.desired import Autoscaling

# load / target is a float division: 1.1 / 0.1 is 11.000000000000002, which must ask for 11, not 12.
_ROUNDING_SLACK = 1e-9


@dataclass(frozen=True)
class ReplicaLoad:
    in_flight: float  # requests its handler runs (an average over the sampling interval will do)
    queued: float  # admitted by the replica, waiting for a handler slot
    ready: bool = True  # False while it starts: capacity coming, no load yet


@dataclass(frozen=True)
class LoadSample:
    """One look at a deployment: its serving and starting replicas (not the draining ones: their
    requests are leaving) and the requests its ingresses hold for it (no replica slot free, or none)."""

    replicas: tuple[ReplicaLoad, ...] = ()
    ingress_queued: float = 0

    @property
    def total(self) -> float:
        return self.ingress_queued + sum(r.in_flight + r.queued for r in self.replicas)

    @property
    def starting(self) -> int:
        return sum(not r.ready for r in self.replicas)


@dataclass(frozen=True)
class AutoscalerState:
    """What the decisions remember: (time, total load) of the samples that still count, oldest first (a
    sample holds until the next one, so the oldest kept is the one in effect when the longer delay
    began), and when replicas were last seen starting."""

    loads: tuple[tuple[float, float], ...] = ()
    last_starting: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int  # the count to run now
    load: float  # this sample's total load
    reason: str  # for status and Events, e.g. "load 41 over 3 replicas (target 8 each); ... -> 6 replicas"


def decide(config: Autoscaling, state: AutoscalerState, current: int, sample: LoadSample,
           now: float) -> tuple[Decision, AutoscalerState]:
    """The count to run after ``sample``, taken at ``now`` (monotonic seconds, increasing from call to call).

    ``current`` is the count the controller runs towards: ready and starting replicas, the previous
    decision's ``replicas`` (at first, ``config.clamp(spec.replicas)``). Pass the returned state next time.
    """
    longest = max(config.upscale_delay_seconds, config.downscale_delay_seconds)
    state = AutoscalerState(loads=_in_effect_since(state.loads + ((now, sample.total),), now - longest),
                            last_starting=now if sample.starting else state.last_starting)
    replicas, reason = _choose(config, state, current, sample, now)
    return Decision(replicas, sample.total, reason), state


def _choose(config: Autoscaling, state: AutoscalerState, current: int, sample: LoadSample,
            now: float) -> tuple[int, str]:
    load, wanted, context = sample.total, _asks_for(sample.total, config), _describe(sample, config)
    if config.clamp(current) != current:
        return config.clamp(current), (f"{_count(current)} outside minReplicas..maxReplicas "
                                       f"({config.min_replicas}..{config.max_replicas}) -> {config.clamp(current)}")
    if current == 0 and load > 0:
        held = f"{load:g} {'request' if load == 1 else 'requests'} held"
        return wanted, f"{held} at 0 replicas -> {_count(wanted)} at once"
    if wanted > current:
        delay = config.upscale_delay_seconds
        if sample.starting:
            return current, f"{context} asks for {wanted}; waiting for the starting ones first"
        held = _held(state, now - delay, after=state.last_starting)
        if held and _asks_for(min(held), config) > current:
            replicas = _asks_for(min(held), config)
            capped = " (maxReplicas)" if _needed(min(held), config) > replicas else ""
            since = f"; at least {min(held):g} for {delay:g}s" if delay else ""
            return replicas, f"{context}{since} -> {_count(replicas)}{capped}"
        return current, f"{context} asks for {wanted}; adding replicas once that holds {delay:g}s"
    if wanted < current:
        delay = config.downscale_delay_seconds
        held = _held(state, now - delay)
        if held and _asks_for(max(held), config) < current:
            replicas = _asks_for(max(held), config)
            if replicas == 0:
                return 0, f"no load for {delay:g}s -> 0 replicas"
            return replicas, f"{context}; at most {max(held):g} for {delay:g}s -> {_count(replicas)}"
        return current, f"{context} asks for {wanted}; removing replicas once that holds {delay:g}s"
    return current, f"{context}: {_count(current)}"


def _needed(load: float, config: Autoscaling) -> int:
    """ceil(load / target); any load at all needs a replica."""
    needed = math.ceil(load / config.target_in_flight - _ROUNDING_SLACK)
    return max(needed, 1) if load > 0 else 0


def _asks_for(load: float, config: Autoscaling) -> int:
    return config.clamp(_needed(load, config))


def _in_effect_since(loads: tuple[tuple[float, float], ...], start: float) -> tuple[tuple[float, float], ...]:
    """The samples in effect from ``start`` on: the last one taken at or before it, and all later."""
    first = max((i for i, (t, _) in enumerate(loads) if t <= start), default=0)
    return loads[first:]


def _held(state: AutoscalerState, start: float, after: float | None = None) -> list[float]:
    """The loads in effect from ``start`` to now; none while the samples do not reach back that far (a
    fresh controller, a gap in sampling) or, with ``after``, reach back to a sample taken at or before it."""
    window = _in_effect_since(state.loads, start)
    if window[0][0] > start or (after is not None and window[0][0] <= after):
        return []
    return [load for _, load in window]


def _describe(sample: LoadSample, config: Autoscaling) -> str:
    starting = f", {sample.starting} starting" if sample.starting else ""
    return (f"load {sample.total:g} over {_count(len(sample.replicas))}{starting} "
            f"(target {config.target_in_flight:g} each)")


def _count(replicas: int) -> str:
    return f"{replicas} replica" if replicas == 1 else f"{replicas} replicas"
