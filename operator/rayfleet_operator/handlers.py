"""kopf handlers: thin adapters from kopf's causes to `reconcile`, and its results to status and Events."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from rayfleet_api.constants import GROUP, PLURAL, VERSION
from rayfleet_api.controller_client import ControllerRejected, ControllerUnreachable

from .config import OperatorConfig
from .kube import Kube, KubeError, load_client_config
from .metrics import METRICS
from .reconcile import finalize, reconcile

log = logging.getLogger("rayfleet.operator")
RESOURCE = dict(group=GROUP, version=VERSION, plural=PLURAL)
CONFIG = OperatorConfig.from_env()


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base live in annotations: our status schema is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="rayfleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="rayfleet.io", key="last-handled-configuration")
    settings.persistence.finalizer = "rayfleet.io/drain-replicas"
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    load_client_config()
    memo.kube = Kube()
    METRICS.serve(CONFIG.metrics_port)


async def _reconcile(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int) -> None:
    # One reconcile at a time per object: the timer and change handlers would otherwise race.
    lock = memo.setdefault("lock", asyncio.Lock())
    async with lock:
        with METRICS.reconciling(body["metadata"]["namespace"], body["metadata"]["name"]):
            try:
                outcome = await reconcile(dict(body), CONFIG, memo.kube)
            except KubeError as exc:
                kopf.event(body, type="Warning", reason="ApplyFailed", message=str(exc))
                if exc.retriable:
                    raise kopf.TemporaryError(str(exc), delay=5) from exc
                raise kopf.PermanentError(str(exc)) from exc
            for key, value in outcome.status.items():
                patch.status[key] = value
            for type_, reason, message in outcome.events:
                kopf.event(body, type=type_, reason=reason, message=message)
            if outcome.retry:
                # The status patch above is still applied; kopf retries with exponential backoff.
                raise kopf.TemporaryError(outcome.retry, delay=min(2 ** retry, 30))


@kopf.on.resume(**RESOURCE)
@kopf.on.create(**RESOURCE)
@kopf.on.update(**RESOURCE, field="spec")
async def apply(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
    await _reconcile(body, patch, memo, retry)


def autoscaled(spec: kopf.Spec, **_: Any) -> bool:
    # kopf's filter, asked before any reconcile has read the spec.
    return spec.get("autoscaling") is not None


def fixed_count(spec: kopf.Spec, **_: Any) -> bool:
    return not autoscaled(spec)


@kopf.timer(**RESOURCE, interval=CONFIG.resync_seconds, initial_delay=CONFIG.resync_seconds, when=fixed_count)
async def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
    await _reconcile(body, patch, memo, retry)


# The autoscaler changes the count between reconciles: the workers and the status follow it sooner.
AUTOSCALED_RESYNC_SECONDS = min(CONFIG.resync_seconds, CONFIG.autoscaled_resync_seconds)


@kopf.timer(**RESOURCE, interval=AUTOSCALED_RESYNC_SECONDS, initial_delay=AUTOSCALED_RESYNC_SECONDS, when=autoscaled)
async def resync_autoscaled(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
    await _reconcile(body, patch, memo, retry)


@kopf.on.delete(**RESOURCE, retries=30)
async def drain(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        with METRICS.handling(namespace, name):
            done = await finalize(dict(body), CONFIG, memo.kube)
    except (ControllerUnreachable, ControllerRejected, KubeError) as exc:
        raise kopf.TemporaryError(f"draining replicas: {exc}", delay=min(2 ** retry, 10)) from exc
    if not done:
        raise kopf.TemporaryError("waiting for the controller to drain the replicas", delay=2)
    METRICS.forget(namespace, name)
