"""A node's one scrape endpoint: everything rayfleet runs on the node, as Prometheus text on one port.

The node's ingress actor serves it (``Ingress(metrics_port=...)``) from a thread of its own, so a scrape
never waits on the actor's event loop, and gathers, per scrape, from its sources:

* its own counters (config reloads and their failures, HAProxy restarts);
* HAProxy's built-in Prometheus exporter, over a Unix socket (``haproxy_*``), its backend and server
  rows labelled with the deployment (``namespace``, ``deployment``) and replica they serve;
* every replica on the node (``Replica.metrics()``) and, on the head node, the controller
  (``Controller.metrics()``): Ray calls, each source bounded by ``SOURCE_TIMEOUT_S``.

A source that fails costs the scrape only its own families (and counts in
``rayfleet_ingress_scrape_errors_total{source}``); the rest are still served.
"""
from __future__ import annotations

import collections
import http.client
import logging
import socket
from typing import Any, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from rayfleet_api.metrics_labels import split_deployment

logger = logging.getLogger("rayfleet.ingress")

disable_created_metrics()  # no *_created series: every scrape would carry them for nothing
SOURCE_TIMEOUT_S = 3.0  # per source; well inside Prometheus' default 10 s scrape timeout

Source = Callable[[], Iterable[Metric]]


def merge(families: Iterable[Metric]) -> list[Metric]:
    """One family per name: the same family from several replicas becomes one, with all their samples."""
    merged: dict[str, Metric] = {}
    for family in families:
        into = merged.get(family.name)
        if into is None:
            into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
        elif into.type != family.type:
            logger.warning("metric %s is a %s and a %s: kept the first", family.name, into.type, family.type)
            continue
        into.samples.extend(family.samples)
    return list(merged.values())


def label_haproxy(text: str, names: Mapping[str, Any]) -> list[Metric]:
    """HAProxy's exporter output, with ``namespace``/``deployment`` on the rows of a deployment's backend
    and ``replica`` on its servers' (``names`` is ``routing.RoutingTable.names()``). A canary's backend is
    its deployment's too, its rows also labelled ``revision="canary"`` (the stable rows keep the labels they
    always had: a sum by deployment counts both, ``revision!="canary"`` selects the stable one). The rows of
    a canary backend with no canary (``names`` maps it to None) are left out: no series for what isn't there."""
    families = list(text_string_to_metric_families(text))
    for family in families:
        family.samples = [s for s in family.samples
                          if s.labels.get("proxy") not in names or names[s.labels["proxy"]] is not None]
        for i, sample in enumerate(family.samples):
            backend = names.get(sample.labels.get("proxy", ""))
            if backend is None:
                continue
            namespace, deployment = split_deployment(backend["deployment"])
            labels = {**sample.labels, "namespace": namespace, "deployment": deployment}
            if "revision" in backend:
                labels["revision"] = backend["revision"]
            if "server" in sample.labels:
                labels["replica"] = backend["servers"].get(sample.labels["server"], sample.labels["server"])
            family.samples[i] = sample._replace(labels=labels)
    return families


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def get_unix(path: str, url: str, timeout: float = SOURCE_TIMEOUT_S) -> str:
    """GET ``url`` from an HTTP server on the Unix socket ``path``; the body as text."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        if response.status != 200:
            raise OSError(f"GET {url} on {path}: HTTP {response.status}")
        return body
    finally:
        conn.close()


class NodeMetrics:
    """The collector behind a node's ``/metrics``: its sources' families, merged."""

    def __init__(self, sources: Mapping[str, Source]):
        self.sources = dict(sources)
        self.errors: collections.Counter[str] = collections.Counter()

    def collect(self) -> Iterator[Metric]:
        families: list[Metric] = []
        for name, source in self.sources.items():
            try:
                families.extend(source())
            except Exception as exc:  # noqa: BLE001 - one source's failure must not cost the others
                self.errors[name] += 1
                logger.warning("metrics source %s failed: %s: %s", name, type(exc).__name__, exc)
        yield from merge(families)
        errors = CounterMetricFamily("rayfleet_ingress_scrape_errors", "Scrapes that could not read a source",
                                     labels=["source"])
        for name in self.sources:
            errors.add_metric([name], self.errors[name])
        yield errors


def serve(collector: NodeMetrics, host: str, port: int) -> Any:
    """Serve ``collector`` at ``http://host:port/metrics`` (any path, as prometheus_client does) from a
    daemon thread; returns the server (``.shutdown()`` then ``.server_close()`` stop it)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
