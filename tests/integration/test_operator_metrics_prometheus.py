"""A real Prometheus scrapes the operator (a real process against the real kube-apiserver) while it reconciles.

No KubeRay runs here: the RayCluster the operator makes stays unready, so its reconciles end `ok` without
asking a controller. Then the test writes the RayCluster a ready status (as KubeRay would) whose head has no
controller listening: the operator's calls fail, and the controller-unreachable families move. Each family
of the operator is checked with its labels through Prometheus' query API, and so are the dashboard's
operator panels (the rest of the dashboard: tests/runtime/test_metrics_prometheus.py).
"""
from __future__ import annotations

import json

import pytest
import yaml

from bench.prometheus import Prometheus
from rayfleet.dev.operator import OperatorProcess
from rayfleet.ports import free_port
from rayfleet.waiting import eventually
from rayfleet_api.constants import CONTROL_PORT_NAME
from tests.dashboard import empty_panel_queries, operator_panels
from tests.prometheus import require_prometheus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

JOB = "operator"
NAME = "echo"
OPERATOR_PANELS = {"Operator reconciles by outcome", "Controller unreachable"}  # as tests/runtime lists them
OUTCOMES = {"ok", "temporary_error", "permanent_error"}


def get(cp, ns, kind, name):
    proc = cp.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def set_cluster_status(cp, ns, status: dict) -> None:
    """Write the RayCluster's status as KubeRay would (a merge patch of the status subresource)."""
    cp.kubectl("patch", "raycluster", NAME, "-n", ns, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))


@pytest.fixture
def watched(control_plane, namespace, tmp_path):
    """The operator for `namespace` (its own free metrics port, resync every second) and a Prometheus scraping it."""
    require_prometheus()
    operator = OperatorProcess(control_plane.kubeconfig, tmp_path / "operator.log", namespaces=[namespace],
                               env={"RAYFLEET_RESYNC_SECONDS": "1"})
    assert operator.metrics_port and operator.env["RAYFLEET_METRICS_PORT"] == str(operator.metrics_port)
    with operator, Prometheus(tmp_path / "prometheus", {JOB: [f"127.0.0.1:{operator.metrics_port}"]}) as prom:
        prom.wait_up(JOB)
        yield operator, prom
        assert "Traceback" not in operator.log_tail(400), operator.log_tail(400)


def test_prometheus_sees_the_operators_families_and_dashboard_panels(control_plane, namespace, watched):
    operator, prom = watched
    assert operator_panels() == OPERATOR_PANELS
    mine = f'namespace="{namespace}", deployment="{NAME}"'
    sd = {"apiVersion": "rayfleet.io/v1alpha1", "kind": "ServeDeployment", "metadata": {"name": NAME},
          "spec": {"handler": "examples.echo:Echo", "replicas": 1}}
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(sd))
    eventually(lambda: get(control_plane, namespace, "raycluster", NAME), what="RayCluster",
               diagnostics=operator.log_tail)

    # Reconciles, by outcome: every outcome exported (0 until it happens), this one ok, and each one timed.
    def reconciled_ok():
        return prom.values(f"rayfleet_operator_reconciles_total{{{mine}}}", by="outcome").get("ok", 0) >= 1
    eventually(reconciled_ok, 30, 0.3, what="an ok reconcile in Prometheus", diagnostics=operator.log_tail)
    series = prom.query(f"rayfleet_operator_reconciles_total{{{mine}}}")
    assert {s["metric"]["outcome"] for s in series} == OUTCOMES, series
    for s in series:
        assert set(s["metric"]) == {"__name__", "namespace", "deployment", "outcome", "job", "instance"}, s
    assert prom.value(f'rayfleet_operator_reconciles_total{{{mine}, outcome="permanent_error"}}') == 0

    def timed_every_reconcile():  # one scrape holds both; the counter and histogram move together
        count = prom.value(f"sum(rayfleet_operator_reconcile_duration_seconds_count{{{mine}}})")
        return count is not None and count >= 1 and count == prom.value(f"sum(rayfleet_operator_reconciles_total{{{mine}}})")
    eventually(timed_every_reconcile, 20, 0.3, what="reconcile_duration count == reconciles")
    assert prom.value(f'sum(rayfleet_operator_reconcile_duration_seconds_bucket{{{mine}, le="+Inf"}})') >= 1
    # The controller was never asked (its RayCluster is not ready): no unreachable time, no controller errors.
    assert prom.query(f"rayfleet_operator_controller_unreachable_seconds{{{mine}}}") == []
    assert prom.query(f'rayfleet_operator_api_errors_total{{{mine}, api="controller"}}') == []

    # KubeRay says the head is up; nothing listens where its controller should: calls fail, reconciles are
    # retried (temporary_error), the error is counted, and the unreachable time grows from the first failure.
    closed = free_port()
    set_cluster_status(control_plane, namespace, {"state": "ready", "head": {"podIP": "127.0.0.1"},
                                                  "endpoints": {CONTROL_PORT_NAME: str(closed)}})

    def unreachable_counted():
        errors = prom.query(f'rayfleet_operator_api_errors_total{{{mine}, api="controller"}}')
        outcomes = prom.values(f"rayfleet_operator_reconciles_total{{{mine}}}", by="outcome")
        seconds = prom.value(f"rayfleet_operator_controller_unreachable_seconds{{{mine}}}")
        return (errors and float(errors[0]["value"][1]) >= 1 and outcomes.get("temporary_error", 0) >= 1
                and seconds is not None and seconds > 0) and errors
    errors = eventually(unreachable_counted, 60, 0.5, what="the unreachable controller in Prometheus",
                        diagnostics=lambda: f"{prom.query(f'{{{mine}}}')}\n{operator.log_tail()}")
    assert [(e["metric"]["reason"], set(e["metric"])) for e in errors] == [
        ("ControllerUnreachable", {"__name__", "namespace", "deployment", "api", "reason", "job", "instance"})], errors
    first = prom.value(f"rayfleet_operator_controller_unreachable_seconds{{{mine}}}")
    eventually(lambda: prom.value(f"rayfleet_operator_controller_unreachable_seconds{{{mine}}}") > first + 1, 20, 0.5,
               what="the unreachable time to grow")  # computed when scraped, not frozen at the last reconcile

    # The dashboard's operator panels now have data.
    eventually(lambda: not empty_panel_queries(prom.query, only=OPERATOR_PANELS), 20, 0.5,
               what="the operator panels to return series",
               diagnostics=lambda: "\n".join(empty_panel_queries(prom.query, only=OPERATOR_PANELS)))

    # Deleted, its series go (forget): the head is unready again, so the finalizer needs no controller.
    set_cluster_status(control_plane, namespace, {"state": "suspended", "head": None, "endpoints": None})
    control_plane.kubectl("delete", "sd", NAME, "-n", namespace, "--wait=true", "--timeout=60s")
    left = f'{{__name__=~"rayfleet_operator_.*", {mine}}}'
    eventually(lambda: prom.query(left) == [], 20, 0.5, what="the deleted deployment's series to go",
               diagnostics=lambda: str(prom.query(left)))
