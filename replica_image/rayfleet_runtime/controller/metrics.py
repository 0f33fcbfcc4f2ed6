"""The controller's Prometheus metrics, in its own registry (``Controller.metrics()`` hands them to the
head node's ingress, which serves them with the node's other metrics).

Replicas by state, the desired count and the autoscaler's load are read from the controller's state
when scraped (no count kept aside to drift; a forgotten deployment's series go with it). The counters are bumped where their events happen
(``deployment_state``, ``route_publisher``); a forgotten deployment's counters go too (``forget``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric

from rayfleet_api.metrics_labels import split_deployment
from rayfleet_api.states import ReplicaState

disable_created_metrics()  # no *_created series: every scrape would carry them for nothing
_DEPLOYMENT_LABELS = ("namespace", "deployment")

# deployment name -> the states of its replicas, as the controller knows them now
ReplicaStates = Callable[[], Mapping[str, Iterable[ReplicaState]]]
# deployment name -> (the replica count it runs towards, the autoscaler's latest load or None)
Scaling = Callable[[], Mapping[str, tuple[int, float | None]]]


class _ReplicasByState:
    """rayfleet_controller_replicas{state}: every state of every deployment, 0 included (a PromQL sum by
    state then never misses one)."""

    def __init__(self, replica_states: ReplicaStates):
        self._replica_states = replica_states

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family = self._family()
        for name, states in self._replica_states().items():
            counts = dict.fromkeys(ReplicaState, 0)
            for state in states:
                counts[state] += 1
            for state, count in counts.items():
                family.add_metric([*split_deployment(name), state.value], count)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("rayfleet_controller_replicas", "Replicas of the deployment by state.",
                                 labels=[*_DEPLOYMENT_LABELS, "state"])


class _Scaling:
    """rayfleet_controller_desired_replicas of every deployment, and rayfleet_controller_observed_load of
    those an autoscaler has sampled."""

    def __init__(self, scaling: Scaling):
        self._scaling = scaling

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        desired, load = self._families()
        for name, (replicas, observed) in self._scaling().items():
            desired.add_metric(split_deployment(name), replicas)
            if observed is not None:
                load.add_metric(split_deployment(name), observed)
        return [desired, load]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("rayfleet_controller_desired_replicas",
                                  "Replicas the controller runs towards: the autoscaler's count, else spec.replicas.",
                                  labels=_DEPLOYMENT_LABELS),
                GaugeMetricFamily("rayfleet_controller_observed_load",
                                  "Requests running or queued in the replicas plus those waiting in the ingresses, "
                                  "as the autoscaler last sampled them.", labels=_DEPLOYMENT_LABELS))


class ControllerMetrics:
    """Every controller family; one instance per ``ControllerCore``."""

    def __init__(self, replica_states: ReplicaStates, scaling: Scaling = lambda: {}):
        self.registry = CollectorRegistry()
        self.registry.register(_ReplicasByState(replica_states))
        self.registry.register(_Scaling(scaling))
        self._restarts = Counter(
            "rayfleet_controller_replica_restarts_total",
            "Replicas replaced because they died, failed to start or stayed unhealthy.",
            [*_DEPLOYMENT_LABELS, "reason"], registry=self.registry)
        self._moves = Counter(
            "rayfleet_controller_replica_moves_total",
            "Replicas replaced on another node while they still served: their pod was terminating (node-drain) "
            "or their node held too many of the deployment's replicas (rebalance).",
            [*_DEPLOYMENT_LABELS, "reason"], registry=self.registry)
        self._rollouts = Counter("rayfleet_controller_rollouts_total", "Rollouts of a new version started.",
                                 _DEPLOYMENT_LABELS, registry=self.registry)
        self._rollouts_stopped = Counter(
            "rayfleet_controller_rollouts_stopped_total",
            "Rollouts stopped before they completed (new replicas failed to start, the canary answered too many "
            "5xx, or no progress within progressDeadlineSeconds), by reason.",
            [*_DEPLOYMENT_LABELS, "reason"], registry=self.registry)
        self._health_check_failures = Counter("rayfleet_controller_health_check_failures_total",
                                              "Failed or unanswered replica health checks.",
                                              _DEPLOYMENT_LABELS, registry=self.registry)
        self._scheduling_waits = Counter("rayfleet_controller_scheduling_waits_total",
                                         "Replicas found waiting for a Ray node with the resources they ask for.",
                                         _DEPLOYMENT_LABELS, registry=self.registry)
        self._route_pushes = Counter("rayfleet_controller_route_pushes_total",
                                     "Routing-table pushes to the ingress proxies, by outcome (ok | error).",
                                     ["outcome"], registry=self.registry)
        self._route_push_seconds = Histogram("rayfleet_controller_route_push_duration_seconds",
                                             "Time from sending a routing table until every proxy answered.",
                                             registry=self.registry)
        self._scaling_decisions = Counter("rayfleet_controller_autoscaler_decisions_total",
                                          "Changes of the replica count the autoscaler made, by direction (up | down).",
                                          [*_DEPLOYMENT_LABELS, "direction"], registry=self.registry)
        self._per_deployment = (self._restarts, self._moves, self._rollouts, self._rollouts_stopped,
                                self._health_check_failures, self._scheduling_waits, self._scaling_decisions)

    def collect(self) -> list[Metric]:
        """What ``Controller.metrics()`` returns: plain ``Metric`` objects, which pickle."""
        return list(self.registry.collect())

    def restarted(self, deployment: str, reason: str) -> None:
        self._restarts.labels(*split_deployment(deployment), reason).inc()

    def moved(self, deployment: str, reason: str) -> None:
        self._moves.labels(*split_deployment(deployment), reason).inc()

    def rollout_started(self, deployment: str) -> None:
        self._rollouts.labels(*split_deployment(deployment)).inc()

    def rollout_failed(self, deployment: str, reason: str) -> None:
        self._rollouts_stopped.labels(*split_deployment(deployment), reason).inc()

    def health_check_failed(self, deployment: str) -> None:
        self._health_check_failures.labels(*split_deployment(deployment)).inc()

    def waiting_for_resources(self, deployment: str) -> None:
        self._scheduling_waits.labels(*split_deployment(deployment)).inc()

    def scaled(self, deployment: str, replicas_from: int, replicas_to: int) -> None:
        direction = "up" if replicas_to > replicas_from else "down"
        self._scaling_decisions.labels(*split_deployment(deployment), direction).inc()

    def route_pushed(self, outcome: str, seconds: float) -> None:
        self._route_pushes.labels(outcome).inc()
        self._route_push_seconds.observe(seconds)

    def forget(self, deployment: str) -> None:
        """Drop a deleted deployment's series (a deployment created again under its name counts from 0)."""
        namespace, name = split_deployment(deployment)
        for counter in self._per_deployment:
            counter.remove_by_labels({"namespace": namespace, "deployment": name})
