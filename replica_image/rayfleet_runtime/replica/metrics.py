"""A replica's Prometheus families: what its runner counted, read when scraped.

The counters and gauges are the ints the runner (``handler.Admission``) keeps anyway, turned into
families at collect time, so they cost the request path nothing. Only the handler-time histogram is
observed per request, into a bucket list of its own (``LatencyHistogram``: a fifth of what
``prometheus_client``'s locked histogram costs); ``RAYFLEET_METRICS=0`` in a replica's environment turns
that off (the benchmark's baseline for what metrics cost). The node's ingress collects every local replica's families through
``Replica.metrics()`` and serves them with the rest of the node's (``ingress.metrics``).
"""
from __future__ import annotations

import bisect
import os
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from rayfleet_api.metrics_labels import split_deployment
from rayfleet_runtime.replica.admission import Admission

disable_created_metrics()  # no *_created series: every scrape would carry them for nothing
METRICS_ENV = "RAYFLEET_METRICS"
# Handler time: from a millisecond to the longest request timeout anyone should set.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 30.0, 60.0, 300.0)


def per_request_metrics_on() -> bool:
    return os.environ.get(METRICS_ENV, "1") not in ("0", "false", "off")


class LatencyHistogram:
    """Seconds counted into ``LATENCY_BUCKETS`` with no lock: its only writer is the replica's data-plane
    loop, and a scrape (another thread) copies the counts in one step, so they add up to the count it
    reports; the sum may be a request apart from them."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: a bound's own value counts in it
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus' buckets: (le, observations at or below it), ending with +Inf (the count)."""
        total, buckets = 0, []
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), list(self.counts)):
            total += n
            buckets.append((floatToGoString(bound), total))
        return buckets


class ReplicaMetrics:
    """One replica's registry: the latency histogram, plus a collector over ``runner()``'s counters."""

    def __init__(self, deployment: str, replica_id: str, runner: Callable[[], Admission | None]):
        namespace, name = split_deployment(deployment)
        self.label_names = ["namespace", "deployment", "replica"]
        self.label_values = [namespace, name, replica_id]
        self._runner = runner
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = LatencyHistogram()
        self.registry.register(self)

    def attach(self, runner: Admission) -> None:
        """Observe ``runner``'s requests in the histogram, unless per-request metrics are off."""
        if per_request_metrics_on():
            runner.observe = self.latency.observe

    def families(self) -> list[Metric]:
        """Everything this replica exports (what ``Replica.metrics()`` returns; Metric objects pickle)."""
        return list(self.registry.collect())

    def collect(self) -> Iterator[Metric]:
        runner = self._runner()
        if runner is None:  # the handler failed to load: nothing served, nothing to count
            return
        codes = dict(runner.codes)  # one C-level copy: the data-plane thread keeps counting meanwhile
        requests = CounterMetricFamily("rayfleet_replica_requests", "Requests answered, by HTTP status "
                                       "(499: the client left first; 503: refused at maxConcurrency)",
                                       labels=[*self.label_names, "code"])
        for code, n in sorted(codes.items()):
            requests.add_metric([*self.label_values, str(code)], n)
        yield requests
        latency = HistogramMetricFamily("rayfleet_replica_request_duration_seconds",
                                        "Handler time of admitted requests (a stream: until its last chunk)",
                                        labels=self.label_names)
        latency.add_metric(self.label_values, self.latency.cumulative(), self.latency.sum)
        yield latency
        for name, doc, value in (
                ("rayfleet_replica_rejected", "Requests refused with 503 at maxConcurrency", runner.rejected),
                ("rayfleet_replica_handler_exceptions", "Requests whose handler raised", runner.exceptions),
                ("rayfleet_replica_cancelled", "Requests whose client left before the answer was complete",
                 runner.cancelled),
                ("rayfleet_replica_request_body_bytes", "Request body bytes read", runner.body_bytes)):
            family = CounterMetricFamily(name, doc, labels=self.label_names)
            family.add_metric(self.label_values, value)
            yield family
        for name, doc, value in (
                ("rayfleet_replica_in_flight", "Requests running now (a stream until its last chunk)", runner.in_flight),
                ("rayfleet_replica_queued", "Requests admitted but waiting for a slot", runner.queued)):
            family = GaugeMetricFamily(name, doc, labels=self.label_names)
            family.add_metric(self.label_values, value)
            yield family
