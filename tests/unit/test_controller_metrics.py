"""The controller's Prometheus families (``controller_metrics``): names, labels, and what crosses Ray."""
from __future__ import annotations

import pickle

from prometheus_client import CollectorRegistry, generate_latest

from rayfleet_api.states import ReplicaState
from rayfleet_runtime.controller.metrics import ControllerMetrics


def test_replicas_by_state_are_read_when_collected_with_every_state_present():
    replicas = {"team.api": [ReplicaState.READY, ReplicaState.READY, ReplicaState.STARTING], "solo": []}
    metrics = ControllerMetrics(lambda: replicas)
    value = metrics.registry.get_sample_value
    assert value("rayfleet_controller_replicas", {"namespace": "team", "deployment": "api", "state": "READY"}) == 2
    assert value("rayfleet_controller_replicas", {"namespace": "team", "deployment": "api", "state": "FAILED"}) == 0
    assert value("rayfleet_controller_replicas", {"namespace": "default", "deployment": "solo", "state": "READY"}) == 0
    del replicas["team.api"]  # deleted: its series are gone at the next scrape
    assert value("rayfleet_controller_replicas", {"namespace": "team", "deployment": "api", "state": "READY"}) is None


def test_what_controller_metrics_returns_pickles_and_renders_as_the_contract_names_it():
    metrics = ControllerMetrics(lambda: {"team.api": [ReplicaState.READY]})
    metrics.restarted("team.api", "died")
    metrics.rollout_started("team.api")
    metrics.health_check_failed("team.api")
    metrics.waiting_for_resources("team.api")
    metrics.route_pushed("ok", 0.02)

    collected = pickle.loads(pickle.dumps(metrics.collect()))  # as a Ray call returns it to the ingress
    assert collected == metrics.collect()

    class Relay:  # the ingress serves them through its own registry
        def collect(self):
            return collected

    registry = CollectorRegistry()
    registry.register(Relay())
    text = generate_latest(registry).decode()
    for line in ['rayfleet_controller_replicas{deployment="api",namespace="team",state="READY"} 1.0',
                 'rayfleet_controller_replica_restarts_total{deployment="api",namespace="team",reason="died"} 1.0',
                 'rayfleet_controller_rollouts_total{deployment="api",namespace="team"} 1.0',
                 'rayfleet_controller_health_check_failures_total{deployment="api",namespace="team"} 1.0',
                 'rayfleet_controller_scheduling_waits_total{deployment="api",namespace="team"} 1.0',
                 'rayfleet_controller_route_pushes_total{outcome="ok"} 1.0',
                 'rayfleet_controller_route_push_duration_seconds_count 1.0']:
        assert line in text.splitlines(), line


def test_forget_drops_a_deployments_counters_only():
    metrics = ControllerMetrics(lambda: {})
    for name in ("team.api", "team.web"):
        metrics.restarted(name, "unhealthy")
        metrics.rollout_started(name)
    metrics.forget("team.api")
    deployments = {s.labels["deployment"] for m in metrics.collect() for s in m.samples if "deployment" in s.labels}
    assert deployments == {"web"}
