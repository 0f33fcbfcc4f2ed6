"""The controller's desired state for one deployment: typed, defaulted here and nowhere else.

``DesiredState`` is what the operator and ``rayfleet run`` send (``PUT /v1/deployments/{name}``, as
``to_json()``), what the controller validates (``from_json``), checkpoints and acts on. Its field
defaults are the product's defaults; the CRD's schema defaults must match them (a unit test holds them
together). ``FIELDS``, below the dataclasses, is the field table: each field's camelCase name, its
attribute, its checks and whether it is versioned, once (see ``fields.py``). ``version`` is the hash of
the versioned fields: the ones that need new replica processes.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from rayfleet_api.errors import SpecError
from rayfleet_api.fields import Field, Nested, Number, decode, encode, walk
from rayfleet_api.quantity import parse_quantity

# A DNS label, optionally qualified by one more (the operator uses "<namespace>.<name>").
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)?")
# A route prefix: "/" or "/seg[/seg...]", no empty segment and no trailing "/", each segment of RFC 3986
# path characters minus "'" (haproxy.cfg can't hold it even quoted). The CRD's `pattern` is this text
# (a unit test holds them together), so the API server, the controller and the HAProxy renderer accept
# exactly the same prefixes. Always used with fullmatch: Python's `$` would let a trailing newline by.
ROUTE_PREFIX_PATTERN = r"^/([A-Za-z0-9._~!$&()*+,;=:@%-]+(/[A-Za-z0-9._~!$&()*+,;=:@%-]+)*)?$"
ROUTE_PREFIX = re.compile(ROUTE_PREFIX_PATTERN)
ROUTE_PREFIX_MAX_LENGTH = 256


@dataclass(frozen=True)
class ActorOptions:
    """Ray resources of each replica actor."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory: int | None = None  # bytes


@dataclass(frozen=True)
class HealthCheck:
    period_seconds: float = 10
    timeout_seconds: float = 5
    failure_threshold: int = 3  # consecutive failures before the replica is replaced


@dataclass(frozen=True)
class Autoscaling:
    """spec.autoscaling: the replica count follows load within min..max (the CRD says why these defaults).

    With it set, ``DesiredState.replicas`` is only the count to start from, clamped to min..max.
    """

    max_replicas: int
    min_replicas: int = 1  # 0 lets an idle deployment stop all its replicas
    target_in_flight: float = 2  # requests (running + queued) per replica aimed at
    upscale_delay_seconds: float = 3  # a higher recommendation must hold this long
    downscale_delay_seconds: float = 60  # a lower one this long; to zero, no load this long

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)


@dataclass(frozen=True)
class Canary:
    """spec.rollout.canary: a new revision gets a share of the requests before it gets them all.

    ``weight`` (manual) is the share it gets now, advanced by editing it (``kubectl patch``); 100 promotes it.
    ``steps`` (automatic) are shares held ``step_seconds`` each in turn, then 100. Either way, a new revision whose
    5xx share of its responses passes ``max_error_rate`` is rolled back.
    """

    weight: int | None = None  # percent of the requests, 0..100
    steps: tuple[int, ...] | None = None  # percents, each 1..99
    step_seconds: float = 60
    max_error_rate: float = 0.05


@dataclass(frozen=True)
class Rollout:
    """spec.rollout: how a new version replaces the running one (a Deployment's progressDeadlineSeconds, and
    rollback to the last good revision unless ``auto_rollback`` is off)."""

    progress_deadline_seconds: float = 600
    auto_rollback: bool = True
    canary: Canary | None = None  # None: the new version's replicas replace the old (surge, then in place)


@dataclass(frozen=True)
class DesiredState:
    handler: str  # "module:attr"
    version: str = ""  # "" until hashed: from_json fills it in
    handler_args: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    max_concurrency: int = 100  # requests in flight per replica; HAProxy queues the rest
    sync_threads: int = 1  # threads for plain `def` handlers
    # Bodies past this get 413 before they are read: a replica holds at most maxConcurrency of them.
    max_request_body_bytes: int = 16 * 2**20
    route_prefix: str = "/"
    request_timeout_seconds: float = 60
    graceful_shutdown_seconds: float = 30
    access_log: bool = False  # one log line per request, in the replica
    ray_actor_options: ActorOptions = field(default_factory=ActorOptions)
    runtime_env: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    health_check: HealthCheck = field(default_factory=HealthCheck)
    autoscaling: Autoscaling | None = None  # None: `replicas` is the count
    rollout: Rollout = field(default_factory=Rollout)

    def to_json(self) -> dict[str, Any]:
        return encode(self, FIELDS)

    @classmethod
    def from_json(cls, body: Any) -> "DesiredState":
        """A validated, defaulted DesiredState, or SpecError naming the first bad field."""
        state = decode(cls, FIELDS, body)
        if not state.version:  # a client that sends none (e.g. a test or a script) gets a hash of what it sent
            wire = state.to_json()
            state = replace(state, version=version_hash({key: wire.get(key) for key in VERSIONED_WIRE_FIELDS}))
        return state


def _handler(value: Any, path: str) -> str:
    if not isinstance(value, str) or ":" not in value or not all(value.partition(":")[::2]):
        raise SpecError(path, f"must be 'module:attr', got {value!r}")
    return value


def _route_prefix(value: Any, path: str) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > ROUTE_PREFIX_MAX_LENGTH
                              or not ROUTE_PREFIX.fullmatch(value)):
        raise SpecError(path, f"must be '/' or a path such as /echo or /v1/echo (no trailing '/', "
                              f"at most {ROUTE_PREFIX_MAX_LENGTH} characters), got {value!r}")
    return value


def _flag(value: Any, path: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise SpecError(path, f"must be true or false, got {value!r}")
    return value


def _object(value: Any, path: str) -> dict[str, Any]:
    value = value or {}
    if not isinstance(value, dict):
        raise SpecError(path, "must be an object")
    return value


def _object_or_null(value: Any, path: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise SpecError(path, "must be an object or null")
    return value


def _env(value: Any, path: str) -> dict[str, str]:
    value = value or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SpecError(path, "must map names to string values")
    return value


def _version(value: Any, path: str) -> str:
    value = value or ""
    if not isinstance(value, str):
        raise SpecError(path, "must be a string")
    return value


def _bounded(scaling: Autoscaling, path: str) -> None:
    if scaling.min_replicas > scaling.max_replicas:
        raise SpecError(f"{path}.minReplicas", f"must not exceed {path}.maxReplicas ({scaling.max_replicas}), "
                                               f"got {scaling.min_replicas}")


def _steps(value: Any, path: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) > 10
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 100 for v in value)):
        raise SpecError(path, f"must be up to 10 percents, each 1..99, got {value!r}")
    return tuple(value)


def _one_way(canary: Canary, path: str) -> None:
    if (canary.weight is None) == (canary.steps is None):
        raise SpecError(path, "must set either weight (advanced by hand) or steps (advanced by time), not both")


def _env_from_spec(items: list[dict[str, str]], path: str) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in items}  # the spec's is a Pod's: [{name, value}]


def _bytes_from_spec(quantity: int | str, path: str) -> int:
    return int(parse_quantity(quantity, path))  # the spec's is a Kubernetes quantity, "512Mi"


# The table: every field of the desired state, once. The upper bounds are the CRD's `maximum`s (a unit
# test holds them together), so the controller's API takes no more than Kubernetes would. Unbounded,
# maxConcurrency=10**30 or requestTimeoutSeconds=1e9 reached haproxy.cfg, which then failed `haproxy -c`:
# no route of any deployment could change any more.
ACTOR_OPTIONS_FIELDS = (
    Field("numCpus", "num_cpus", Number(minimum=0), versioned=True),
    Field("numGpus", "num_gpus", Number(minimum=0), versioned=True),
    Field("memory", "memory", Number(minimum=0, integer=True), versioned=True, spec_form=_bytes_from_spec),
)
HEALTH_CHECK_FIELDS = (
    Field("periodSeconds", "period_seconds", Number(minimum=0, exclusive=True, maximum=3600)),
    Field("timeoutSeconds", "timeout_seconds", Number(minimum=0, exclusive=True, maximum=3600)),
    Field("failureThreshold", "failure_threshold", Number(minimum=1, integer=True, maximum=100)),
)
AUTOSCALING_FIELDS = (
    Field("minReplicas", "min_replicas", Number(minimum=0, integer=True, maximum=1000)),
    Field("maxReplicas", "max_replicas", Number(minimum=1, integer=True, maximum=1000)),
    Field("targetInFlight", "target_in_flight", Number(minimum=0, exclusive=True, maximum=100_000)),
    Field("upscaleDelaySeconds", "upscale_delay_seconds", Number(minimum=0, maximum=3600)),
    Field("downscaleDelaySeconds", "downscale_delay_seconds", Number(minimum=0, maximum=3600)),
)
CANARY_FIELDS = (
    Field("weight", "weight", Number(minimum=0, integer=True, maximum=100)),
    Field("steps", "steps", _steps, spec_form=_steps),
    Field("stepSeconds", "step_seconds", Number(minimum=1, maximum=86400)),
    Field("maxErrorRate", "max_error_rate", Number(minimum=0, maximum=1)),
)
ROLLOUT_FIELDS = (
    Field("progressDeadlineSeconds", "progress_deadline_seconds", Number(minimum=1, maximum=86400)),
    Field("autoRollback", "auto_rollback", _flag),
    Field("canary", "canary", Nested(Canary, CANARY_FIELDS, check=_one_way), sent_if_none=False),
)
# `versioned`: baked into a replica process (like a Deployment's pod-template hash); fields such as
# `replicas`, `routePrefix` or `autoscaling` are applied to running replicas and stay out of the version.
FIELDS = (
    Field("handler", "handler", _handler, versioned=True),
    Field("handlerArgs", "handler_args", _object, versioned=True),
    Field("replicas", "replicas", Number(minimum=0, integer=True, maximum=1000)),
    Field("maxConcurrency", "max_concurrency", Number(minimum=1, integer=True, maximum=100_000), versioned=True),
    Field("syncThreads", "sync_threads", Number(minimum=1, integer=True, maximum=256), versioned=True),
    Field("maxRequestBodyBytes", "max_request_body_bytes", Number(minimum=0, integer=True, maximum=2**30),
          versioned=True),
    Field("routePrefix", "route_prefix", _route_prefix),
    Field("requestTimeoutSeconds", "request_timeout_seconds", Number(minimum=0, exclusive=True, maximum=3600)),
    Field("gracefulShutdownSeconds", "graceful_shutdown_seconds", Number(minimum=0, maximum=3600)),
    Field("accessLog", "access_log", _flag, versioned=True),
    Field("version", "version", _version, in_spec=False),
    Field("rayActorOptions", "ray_actor_options", Nested(ActorOptions, ACTOR_OPTIONS_FIELDS), versioned=True),
    Field("runtimeEnv", "runtime_env", _object_or_null, versioned=True),
    Field("env", "env", _env, versioned=True, spec_form=_env_from_spec),
    Field("healthCheck", "health_check", Nested(HealthCheck, HEALTH_CHECK_FIELDS)),
    Field("autoscaling", "autoscaling", Nested(Autoscaling, AUTOSCALING_FIELDS, check=_bounded), sent_if_none=False),
    Field("rollout", "rollout", Nested(Rollout, ROLLOUT_FIELDS)),
)
# Wire fields baked into a replica process: the hash for clients that send no version.
VERSIONED_WIRE_FIELDS = tuple(f.name for f in FIELDS if f.versioned)
# Upper bounds by path ("healthCheck.periodSeconds"): what the controller's errors and the CRD name.
MAXIMUM = {path: f.read.maximum for path, _, f in walk(DesiredState, FIELDS)
           if isinstance(f.read, Number) and f.read.maximum is not None}


def version_hash(fields: dict[str, Any]) -> str:
    """Stable short hash of the fields that require new replica processes."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def parse_json(data: str | bytes) -> Any:
    """The wire's JSON (RFC 8259), or ValueError. Python's own parser also takes ``NaN`` and ``Infinity``
    (and reads ``1e400`` as inf), which no strict reader takes back when we echo them, and it raises
    RecursionError, not ValueError, on a deeply nested body."""
    try:
        return json.loads(data, parse_constant=_not_json, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def validate_name(name: Any) -> None:
    """A deployment's name in the controller: a DNS label, or ``namespace.name``."""
    if not isinstance(name, str) or len(name) > 127 or not _NAME.fullmatch(name):
        raise SpecError("name", f"{name!r} must be a DNS label or 'namespace.name': lowercase letters, "
                                "digits and '-', at most 127 characters")
