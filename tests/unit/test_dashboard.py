"""The chart's Grafana dashboard: valid JSON, a query on every panel, only the metrics rayfleet exports,
and the variables a test (or Grafana) substitutes. Whether each query returns series is checked against
a real Prometheus elsewhere."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.dashboard import dashboard_queries, metric_names, panels, substitute

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "rayfleet" / "dashboards" / "rayfleet.json"

# The families of the metrics contract (issue 14), as sample names: counters end in _total, histograms
# are read through _bucket/_sum/_count.
COUNTERS = {"rayfleet_replica_requests", "rayfleet_replica_rejected", "rayfleet_replica_handler_exceptions",
            "rayfleet_replica_cancelled", "rayfleet_replica_request_body_bytes", "rayfleet_ingress_config_reloads",
            "rayfleet_ingress_config_reload_failures", "rayfleet_ingress_haproxy_restarts",
            "rayfleet_controller_replica_restarts", "rayfleet_controller_rollouts",
            "rayfleet_controller_health_check_failures", "rayfleet_controller_scheduling_waits",
            "rayfleet_controller_route_pushes", "rayfleet_operator_reconciles", "rayfleet_operator_api_errors"}
HISTOGRAMS = {"rayfleet_replica_request_duration_seconds", "rayfleet_controller_route_push_duration_seconds",
              "rayfleet_operator_reconcile_duration_seconds"}
GAUGES = {"rayfleet_replica_in_flight", "rayfleet_replica_queued", "rayfleet_controller_replicas",
          "rayfleet_operator_controller_unreachable_seconds"}
CONTRACT = ({f"{name}_total" for name in COUNTERS} | GAUGES
            | {f"{name}_{suffix}" for name in HISTOGRAMS for suffix in ("bucket", "sum", "count")})
HAPROXY = re.compile(r"haproxy_(frontend|backend|server)_\w+")  # HAProxy's own exporter, rows labelled by deployment


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_panel_has_a_query_with_its_datasource_from_the_variable(dashboard):
    assert panels(dashboard)
    for panel in panels(dashboard):
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"])
    rows = [panel for panel in dashboard["panels"] if panel["type"] == "row"]
    ids = [panel["id"] for panel in [*rows, *panels(dashboard)]]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_queries_use_only_the_contracts_metric_families(dashboard):
    queries = dashboard_queries(DASHBOARD)
    used = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        assert all(name in CONTRACT or HAPROXY.fullmatch(name) for name in names), f"{title}: {names - CONTRACT}"
        used |= names
    # The golden signals, per deployment, and what the issue asks the dashboard to show.
    assert {"rayfleet_replica_requests_total", "rayfleet_replica_request_duration_seconds_bucket",
            "rayfleet_replica_in_flight", "rayfleet_replica_queued", "rayfleet_replica_rejected_total",
            "rayfleet_controller_replicas", "haproxy_backend_current_queue", "haproxy_backend_current_sessions",
            "rayfleet_operator_reconciles_total", "rayfleet_operator_controller_unreachable_seconds"} <= used
    latency = [expr for title, expr in queries if title.startswith("Latency")]
    assert [re.match(r"histogram_quantile\(([\d.]+),", expr).group(1) for expr in latency] == ["0.5", "0.9", "0.99"]


def test_every_selector_filters_by_the_variables_and_rates_use_the_rate_interval(dashboard):
    for title, expr in dashboard_queries(DASHBOARD):
        selectors = re.findall(r"[a-zA-Z_:][\w:]*\{([^}]*)\}", expr)
        assert len(selectors) == len(re.findall(r"\{", expr)) > 0, f"{title}: a metric without a selector"
        for selector in selectors:
            assert 'namespace=~"$namespace"' in selector and 'deployment=~"$deployment"' in selector, f"{title}: {selector}"
        assert set(re.findall(r"\[([^\]]*)\]", expr)) <= {"$__rate_interval"}, title
        assert "$" not in substitute(expr), f"{title}: a variable the Prometheus test would not substitute"


def test_variables(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "deployment"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["multi"] and variable["includeAll"]
        assert variable["allValue"] == ".*"  # a regex, as the =~ matchers expect
        metric, label = re.fullmatch(r"label_values\(([\w:]+)(?:\{[^}]*\})?, *(\w+)\)", variable["query"]["query"]).groups()
        assert metric in CONTRACT and label == name


def test_metric_names_reads_promql():
    expr = ('(sum by (namespace, code) (rate(a_total{code=~"5..", x="by(y)"}[1m])) or b * 0) / '
            'histogram_quantile(0.9, sum without (le) (c_bucket)) unless on (job) d offset 5m')
    assert metric_names(expr) == {"a_total", "b", "c_bucket", "d"}
