"""A replica's latency histogram (its own bucket list, no lock) exposed as a Prometheus histogram: a
bound's own value counts in its bucket, the buckets are cumulative and end with the count."""
from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rayfleet_runtime.replica.handler import HandlerRunner
from rayfleet_runtime.replica.metrics import LATENCY_BUCKETS, ReplicaMetrics


async def ok(request) -> str:
    return "ok"


def test_handler_times_land_in_cumulative_buckets_that_prometheus_reads():
    runner = HandlerRunner(ok)
    metrics = ReplicaMetrics("team.web", "web-0", lambda: runner)
    metrics.attach(runner)
    for seconds in (0.0004, 0.001, 0.0011, 0.3, 1000.0):  # 0.001 is a bound: le="0.001" holds it
        runner.observe(seconds)

    (family,) = [f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
                 if f.name == "rayfleet_replica_request_duration_seconds"]
    assert family.type == "histogram"
    values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert values[("rayfleet_replica_request_duration_seconds_bucket", "0.001")] == 2
    assert values[("rayfleet_replica_request_duration_seconds_bucket", "0.0025")] == 3
    assert values[("rayfleet_replica_request_duration_seconds_bucket", "0.25")] == 3
    assert values[("rayfleet_replica_request_duration_seconds_bucket", "0.5")] == 4
    assert values[("rayfleet_replica_request_duration_seconds_bucket", "300.0")] == 4
    assert values[("rayfleet_replica_request_duration_seconds_bucket", "+Inf")] == 5
    assert values[("rayfleet_replica_request_duration_seconds_count", None)] == 5
    assert abs(values[("rayfleet_replica_request_duration_seconds_sum", None)] - 1000.3025) < 1e-9
    assert len([s for s in family.samples if s.name.endswith("_bucket")]) == len(LATENCY_BUCKETS) + 1
    assert {s.labels["replica"] for s in family.samples} == {"web-0"}
