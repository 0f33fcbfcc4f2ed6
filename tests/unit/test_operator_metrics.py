"""The operator's metrics: reconciles counted by how the handler ended, API errors where the calls fail,
controller reachability in seconds, and the endpoint. Fakes stand in for kopf's runtime, the Kubernetes
client and the controller; each test gets a registry of its own."""
from __future__ import annotations

import asyncio
import socket
import urllib.request

import kopf
import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import MaxRetryError

from rayfleet_api.controller_client import ControllerRejected, ControllerUnreachable
from rayfleet_operator import kube, reconcile
from rayfleet_operator.config import OperatorConfig
from rayfleet_operator.metrics import OperatorMetrics
from rayfleet_operator.serve_spec import ServeSpec

NS, NAME = "team", "echo"
WHO = {"namespace": NS, "deployment": NAME}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def metrics(monkeypatch, clock):
    """A fresh OperatorMetrics in place of the process's, wherever the operator counts."""
    fresh = OperatorMetrics(clock)
    for module in (kube, reconcile):
        monkeypatch.setattr(module, "METRICS", fresh)
    return fresh


def value(metrics: OperatorMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, {**WHO, **labels})


@pytest.fixture
def handlers(monkeypatch, metrics):
    monkeypatch.setenv("RAYFLEET_CONTROL_KEY", "k" * 32)  # read once, when handlers is imported
    from rayfleet_operator import handlers
    monkeypatch.setattr(handlers, "METRICS", metrics)
    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)  # no kopf runtime to post them
    return handlers


def run_handler(handlers, monkeypatch, result) -> BaseException | None:
    """One pass of the apply/resync handler whose reconcile returns `result` (or raises it)."""
    async def fake_reconcile(body, config, kube):
        if isinstance(result, BaseException):
            raise result
        return result

    monkeypatch.setattr(handlers, "reconcile", fake_reconcile)
    body = kopf.Body({"metadata": {"namespace": NS, "name": NAME}, "spec": {}})
    try:
        asyncio.run(handlers._reconcile(body, kopf.Patch(), kopf.Memo(kube=None), retry=0))
    except Exception as exc:
        return exc
    return None


def test_reconciles_are_counted_by_how_the_handler_ended(handlers, metrics, monkeypatch, clock):
    assert run_handler(handlers, monkeypatch, reconcile.Outcome({"replicas": 1})) is None
    assert value(metrics, "rayfleet_operator_reconciles_total", outcome="ok") == 1
    assert value(metrics, "rayfleet_operator_reconciles_total", outcome="permanent_error") == 0  # exported before it happens
    # A status written but the controller unreachable, a retriable API error, a surprise: kopf retries each.
    assert isinstance(run_handler(handlers, monkeypatch, reconcile.Outcome({}, retry="unreachable")), kopf.TemporaryError)
    assert isinstance(run_handler(handlers, monkeypatch, kube.KubeError(409, "conflict")), kopf.TemporaryError)
    assert isinstance(run_handler(handlers, monkeypatch, RuntimeError("bug")), RuntimeError)
    assert value(metrics, "rayfleet_operator_reconciles_total", outcome="temporary_error") == 3
    assert isinstance(run_handler(handlers, monkeypatch, kube.KubeError(422, "invalid")), kopf.PermanentError)
    assert value(metrics, "rayfleet_operator_reconciles_total", outcome="permanent_error") == 1
    assert value(metrics, "rayfleet_operator_reconcile_duration_seconds_count") == 5


def test_reconcile_duration_and_a_cancelled_reconcile(metrics, clock):
    with metrics.reconciling(NS, NAME):
        clock.now += 0.3
    assert value(metrics, "rayfleet_operator_reconcile_duration_seconds_sum") == pytest.approx(0.3)
    assert value(metrics, "rayfleet_operator_reconcile_duration_seconds_bucket", le="0.5") == 1
    assert value(metrics, "rayfleet_operator_reconcile_duration_seconds_bucket", le="0.25") == 0
    with pytest.raises(asyncio.CancelledError), metrics.reconciling(NS, NAME):  # the operator stopping
        raise asyncio.CancelledError
    assert value(metrics, "rayfleet_operator_reconcile_duration_seconds_count") == 1


class FakeResponse:
    data = b'{"metadata": {"name": "x"}}'


def api_call(outcome):
    def call(*args, **kwargs):
        if isinstance(outcome, BaseException):
            raise outcome
        return FakeResponse()
    return call


def api_exception(status: int) -> ApiException:
    exc = ApiException(status=status, reason="nope")
    exc.body = '{"message": "nope"}'
    return exc


def test_kubernetes_api_errors_by_status_or_exception_for_the_deployment_handled(metrics):
    async def calls():
        with metrics.handling(NS, NAME):
            assert await kube._call(api_call(api_exception(404))) is None  # an answer: no such object
            with pytest.raises(kube.KubeError, match="HTTP 503"):
                await kube._call(api_call(api_exception(503)))
            with pytest.raises(MaxRetryError):
                await kube._call(api_call(MaxRetryError(None, "/api", "refused")))
            # The auth Secret exists already (409): what create_secret_unless_present asks, not an error.
            client = kube.Kube.__new__(kube.Kube)
            client.core = type("Core", (), {"create_namespaced_secret": staticmethod(api_call(api_exception(409)))})()
            assert await client.create_secret_unless_present({"metadata": {"namespace": NS}}) is False
            client.core.create_namespaced_secret = api_call(None)
            assert await client.create_secret_unless_present({"metadata": {"namespace": NS}}) is True

    asyncio.run(calls())
    errors = {sample.labels["reason"]: sample.value for family in metrics.registry.collect()
              if family.name == "rayfleet_operator_api_errors" for sample in family.samples
              if sample.name.endswith("_total") and sample.labels["api"] == "kubernetes"
              and (sample.labels["namespace"], sample.labels["deployment"]) == (NS, NAME)}
    assert errors == {"503": 1, "MaxRetryError": 1}


class FakeController:
    """The controller's client: each call answers from `answers` (an exception is raised)."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def _next(self, *args):
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    put_deployment = get_deployment = delete_deployment = _next


SD = {"metadata": {"namespace": NS, "name": NAME, "uid": "uid-1"}, "spec": {"handler": "examples.echo:Echo"}}
CLUSTER = {"status": {"head": {"podIP": "10.0.0.1"}}}


def observe(monkeypatch, *answers) -> reconcile.Observation:
    monkeypatch.setattr(reconcile, "_client", lambda namespace, cluster, url, config: FakeController(*answers))
    obs = reconcile.Observation(generation=1, spec=ServeSpec.from_spec(SD["spec"]), cluster_name=NAME, selector="", endpoint="")
    with reconcile.METRICS.handling(NS, NAME):
        asyncio.run(reconcile._observe_controller(SD, CLUSTER, OperatorConfig(), obs))
    return obs


def test_controller_unreachable_seconds_count_from_the_first_failure_in_a_row(metrics, monkeypatch, clock):
    unreachable = "rayfleet_operator_controller_unreachable_seconds"
    assert observe(monkeypatch, {}, {"replicas": []}).controller == {"replicas": []}
    assert value(metrics, unreachable) == 0
    assert observe(monkeypatch, ControllerUnreachable("refused")).controller_error
    clock.now += 7
    assert value(metrics, unreachable) == 7  # read when scraped, not when last reconciled
    observe(monkeypatch, ControllerUnreachable("refused"))
    clock.now += 5
    assert value(metrics, unreachable) == 12
    assert observe(monkeypatch, ControllerRejected("bad spec")).problems  # it answered: reachable
    assert value(metrics, unreachable) == 0
    assert value(metrics, "rayfleet_operator_api_errors_total", api="controller", reason="ControllerUnreachable") == 2
    assert value(metrics, "rayfleet_operator_api_errors_total", api="controller", reason="ControllerRejected") == 1
    # The ServeDeployment deleted (its drain done): its series go.
    metrics.forget(NS, NAME)
    assert value(metrics, unreachable) is None
    assert value(metrics, "rayfleet_operator_api_errors_total", api="controller", reason="ControllerRejected") is None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_served_on_the_configured_port_and_a_busy_port_is_not_fatal(metrics, caplog):
    with metrics.reconciling(NS, NAME):
        pass
    assert metrics.serve(0) is None
    server = metrics.serve(free_port())
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert f'rayfleet_operator_reconciles_total{{deployment="{NAME}",namespace="{NS}",outcome="ok"}} 1.0' in text
        assert metrics.serve(port) is None and "metrics not served" in caplog.text
    finally:
        server.shutdown()
        server.server_close()
