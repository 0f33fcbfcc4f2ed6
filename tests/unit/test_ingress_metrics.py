"""A node's scrape endpoint (no Ray): families merged across replicas, HAProxy's rows labelled, a failing
source costing only its own families, and the whole served as Prometheus text."""
from __future__ import annotations

import urllib.request

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from rayfleet.ports import free_port
from rayfleet_runtime.ingress import metrics as ingress_metrics
from rayfleet_runtime.routing import RoutingTable

HAPROXY_TEXT = """\
# HELP haproxy_backend_current_queue Number of queued requests.
# TYPE haproxy_backend_current_queue gauge
haproxy_backend_current_queue{proxy="be_team.web"} 3
haproxy_backend_current_queue{proxy="rayfleet_no_route"} 0
# HELP haproxy_server_current_sessions Number of current sessions on the frontend, backend or server
# TYPE haproxy_server_current_sessions gauge
haproxy_server_current_sessions{proxy="be_team.web",server="web-0"} 2
# HELP haproxy_frontend_http_requests_total Total number of HTTP requests received
# TYPE haproxy_frontend_http_requests_total counter
haproxy_frontend_http_requests_total{proxy="rayfleet"} 12
"""


def replica_families(replica: str, ok: int) -> list:
    requests = CounterMetricFamily("rayfleet_replica_requests", "answered", labels=["replica", "code"])
    requests.add_metric([replica, "200"], ok)
    in_flight = GaugeMetricFamily("rayfleet_replica_in_flight", "running", labels=["replica"])
    in_flight.add_metric([replica], 1)
    return [requests, in_flight]


def test_the_same_family_from_several_replicas_is_served_once_with_every_sample():
    merged = {f.name: f for f in ingress_metrics.merge(replica_families("a", 3) + replica_families("b", 4))}
    assert set(merged) == {"rayfleet_replica_requests", "rayfleet_replica_in_flight"}
    assert sorted((s.labels["replica"], s.value) for s in merged["rayfleet_replica_requests"].samples) == [("a", 3), ("b", 4)]


def test_haproxy_rows_of_a_deployment_carry_its_namespace_deployment_and_replica():
    names = RoutingTable.from_wire({"deployments": {"team.web": {"routePrefix": "/web", "replicas": [
        {"id": "web-0", "host": "10.0.0.1", "port": 8000}]}}}).names()
    backend = next(iter(names))
    text = HAPROXY_TEXT.replace("be_team.web", backend).replace('server="web-0"', f'server="{next(iter(names[backend]["servers"]))}"')
    samples = {(s.name, s.labels.get("proxy")): s.labels for f in ingress_metrics.label_haproxy(text, names) for s in f.samples}
    assert samples[("haproxy_backend_current_queue", backend)] == {"proxy": backend, "namespace": "team", "deployment": "web"}
    server = samples[("haproxy_server_current_sessions", backend)]
    assert (server["namespace"], server["deployment"], server["replica"]) == ("team", "web", "web-0")
    assert samples[("haproxy_backend_current_queue", "rayfleet_no_route")] == {"proxy": "rayfleet_no_route"}
    assert samples[("haproxy_frontend_http_requests_total", "rayfleet")] == {"proxy": "rayfleet"}


def test_a_failing_source_costs_only_its_own_families_and_is_counted():
    def broken():
        raise OSError("HAProxy is restarting")

    node = ingress_metrics.NodeMetrics({"replicas": lambda: replica_families("a", 1), "haproxy": broken})
    for _ in range(2):
        families = {f.name: f for f in node.collect()}
    assert "rayfleet_replica_requests" in families
    errors = {s.labels["source"]: s.value for s in families["rayfleet_ingress_scrape_errors"].samples}
    assert errors == {"replicas": 0, "haproxy": 2}


def test_the_endpoint_serves_prometheus_text():
    port = free_port("127.0.0.1")
    server = ingress_metrics.serve(ingress_metrics.NodeMetrics({"replicas": lambda: replica_families("a", 5)}),
                                   "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:  # noqa: S310
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    parsed = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert parsed["rayfleet_replica_requests_total"] == 5 and "rayfleet_replica_requests_created" not in parsed


def test_a_canarys_rows_carry_its_deployment_and_revision_canary():
    names = RoutingTable.from_wire({"deployments": {"team.web": {"routePrefix": "/web", "replicas": [
        {"id": "web-0", "host": "10.0.0.1", "port": 8000}], "canary": {"weight": 5, "replicas": [
            {"id": "web-c0", "host": "10.0.0.2", "port": 8000}]}}}}).names()
    text = HAPROXY_TEXT + """\
haproxy_backend_current_queue{proxy="be_team.web:canary"} 1
haproxy_server_current_sessions{proxy="be_team.web:canary",server="web-c0"} 1
"""
    samples = {(s.name, s.labels.get("proxy"), s.labels.get("server")): s.labels
               for f in ingress_metrics.label_haproxy(text, names) for s in f.samples}
    assert samples[("haproxy_backend_current_queue", "be_team.web:canary", None)] == {
        "proxy": "be_team.web:canary", "namespace": "team", "deployment": "web", "revision": "canary"}
    server = samples[("haproxy_server_current_sessions", "be_team.web:canary", "web-c0")]
    assert (server["deployment"], server["replica"], server["revision"]) == ("web", "web-c0", "canary")
    assert "revision" not in samples[("haproxy_backend_current_queue", "be_team.web", None)]


def test_the_canary_backend_of_a_deployment_with_no_canary_has_no_series():
    names = RoutingTable.from_wire({"deployments": {"team.web": {"routePrefix": "/web", "replicas": [
        {"id": "web-0", "host": "10.0.0.1", "port": 8000}]}}}).names()
    text = HAPROXY_TEXT + 'haproxy_backend_current_queue{proxy="be_team.web:canary"} 0\n'
    proxies = {s.labels.get("proxy") for f in ingress_metrics.label_haproxy(text, names) for s in f.samples}
    assert "be_team.web:canary" not in proxies and "be_team.web" in proxies
