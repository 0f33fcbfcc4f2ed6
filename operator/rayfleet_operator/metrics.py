"""The operator's Prometheus metrics, in its own registry, served by prometheus_client's HTTP server thread
(so a scrape never runs on kopf's event loop, and a stalled loop still answers).

Reconciles are counted and timed by the kopf handlers, by how each ended (handlers.py); API errors where
the calls are made: kube.py (Kubernetes), reconcile.py (the rayfleet controller). Those carry the
ServeDeployment being handled without passing it down: a context variable, which asyncio.to_thread
copies into the call's thread. How long each deployment's controller has been unreachable is kept as
the time of the first failure in a row and turned into seconds when scraped.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator
from wsgiref.simple_server import WSGIServer

import kopf
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from rayfleet_api.constants import METRICS_PATH

log = logging.getLogger(__name__)
disable_created_metrics()  # no *_created series: every scrape would carry them for nothing

_DEPLOYMENT_LABELS = ("namespace", "deployment")
OK, TEMPORARY_ERROR, PERMANENT_ERROR = "ok", "temporary_error", "permanent_error"

# (namespace, name) of the ServeDeployment this task is handling; empty outside a handler.
_handling: ContextVar[tuple[str, str]] = ContextVar("rayfleet_operator_deployment", default=("", ""))


class _ControllerUnreachable:
    """rayfleet_operator_controller_unreachable_seconds: 0 for a reachable controller, else the seconds
    since the first of the failures in a row. Computed when scraped, not when last reconciled."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.since: dict[tuple[str, str], float | None] = {}  # None: reachable

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        family, now = self._family(), self.clock()
        for labels, since in list(self.since.items()):  # a copy: the event loop's thread writes it
            family.add_metric(labels, 0.0 if since is None else now - since)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("rayfleet_operator_controller_unreachable_seconds",
                                 "Seconds the deployment's rayfleet controller has been unreachable (0: it answers).",
                                 labels=list(_DEPLOYMENT_LABELS))


class OperatorMetrics:
    """Every operator family; the process has one (METRICS)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.registry = CollectorRegistry()
        self._clock = clock
        self._unreachable = _ControllerUnreachable(clock)
        self.registry.register(self._unreachable)
        self._reconciles = Counter(
            "rayfleet_operator_reconciles_total",
            "Reconciles of a ServeDeployment by how they ended: ok, temporary_error (kopf retries), permanent_error.",
            [*_DEPLOYMENT_LABELS, "outcome"], registry=self.registry)
        self._reconcile_seconds = Histogram("rayfleet_operator_reconcile_duration_seconds",
                                            "Time one reconcile of a ServeDeployment took, however it ended.",
                                            _DEPLOYMENT_LABELS, registry=self.registry)
        self._api_errors = Counter(
            "rayfleet_operator_api_errors_total",
            "Failed calls to the Kubernetes API (reason: HTTP status, or the exception) or to a rayfleet "
            "controller (reason: the exception).", [*_DEPLOYMENT_LABELS, "api", "reason"], registry=self.registry)

    @contextmanager
    def handling(self, namespace: str, name: str) -> Iterator[None]:
        """API errors within are counted against this ServeDeployment."""
        token = _handling.set((namespace, name))
        try:
            yield
        finally:
            _handling.reset(token)

    @contextmanager
    def reconciling(self, namespace: str, name: str) -> Iterator[None]:
        """Times the reconcile within and counts it by how it ended: kopf retries every error but a
        PermanentError. A cancelled one (the operator stopping) is not counted."""
        start = self._clock()
        with self.handling(namespace, name):
            try:
                yield
            except kopf.PermanentError:
                self._reconciled(namespace, name, PERMANENT_ERROR, start)
                raise
            except Exception:
                self._reconciled(namespace, name, TEMPORARY_ERROR, start)
                raise
            self._reconciled(namespace, name, OK, start)

    def _reconciled(self, namespace: str, name: str, outcome: str, start: float) -> None:
        self._reconcile_seconds.labels(namespace, name).observe(self._clock() - start)
        for each in (OK, TEMPORARY_ERROR, PERMANENT_ERROR):  # every outcome exported, 0 until it happens
            self._reconciles.labels(namespace, name, each)
        self._reconciles.labels(namespace, name, outcome).inc()

    def api_error(self, api: str, reason: str) -> None:
        """A failed call to `api` (kubernetes | controller), for the ServeDeployment being handled."""
        self._api_errors.labels(*_handling.get(), api, reason).inc()

    def controller_reachable(self, namespace: str, name: str, reachable: bool) -> None:
        since = self._unreachable.since
        if reachable:
            since[(namespace, name)] = None
        elif since.get((namespace, name)) is None:
            since[(namespace, name)] = self._clock()

    def forget(self, namespace: str, name: str) -> None:
        """Drop a deleted ServeDeployment's series (one made again under its name starts from 0)."""
        self._unreachable.since.pop((namespace, name), None)
        for family in (self._reconciles, self._reconcile_seconds, self._api_errors):
            family.remove_by_labels({"namespace": namespace, "deployment": name})

    def serve(self, port: int) -> WSGIServer | None:
        """Serve the registry on every interface at `port` (0: not at all), from a daemon thread. A port
        in use is logged, not fatal: reconciling matters more than being watched."""
        if not port:
            return None
        try:
            server, _ = start_http_server(port, registry=self.registry)
        except OSError as exc:
            log.error("metrics not served: port %d: %s", port, exc)
            return None
        log.info("metrics at http://0.0.0.0:%d%s", port, METRICS_PATH)
        return server


METRICS = OperatorMetrics()
