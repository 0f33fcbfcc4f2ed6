"""The controller's desired state for one deployment: typed, defaulted here and nowhere else.

``DesiredState`` is what the operator and ``rayfleet run`` send (``PUT /v1/deployments/{name}``, as
``to_json()``), what the controller validates (``from_json``), checkpoints and acts on. Its field
defaults are the product's defaults; the CRD's schema defaults must match them (a unit test holds them
together). ``version`` is the hash of the fields that need new replica processes (see ``spec.py``).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from rayfleet_api.errors import SpecError

# A DNS label, optionally qualified by one more (the operator uses "<namespace>.<name>").
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)?")
# A route prefix: "/" or "/seg[/seg...]", no empty segment and no trailing "/", each segment of RFC 3986
# path characters minus "'" (haproxy.cfg can't hold it even quoted). The CRD's `pattern` is this text
# (a unit test holds them together), so the API server, the controller and the HAProxy renderer accept
# exactly the same prefixes. Always used with fullmatch: Python's `$` would let a trailing newline by.
ROUTE_PREFIX_PATTERN = r"^/([A-Za-z0-9._~!$&()*+,;=:@%-]+(/[A-Za-z0-9._~!$&()*+,;=:@%-]+)*)?$"
ROUTE_PREFIX = re.compile(ROUTE_PREFIX_PATTERN)
ROUTE_PREFIX_MAX_LENGTH = 256
# Upper bounds: the CRD's `maximum`s (a unit test holds them together), so the controller's API takes no
# more than Kubernetes would. Unbounded, maxConcurrency=10**30 or requestTimeoutSeconds=1e9 reached
# haproxy.cfg, which then failed `haproxy -c`: no route of any deployment could change any more.
MAXIMUM = {"replicas": 1000, "maxConcurrency": 100_000, "syncThreads": 256, "requestTimeoutSeconds": 3600,
           "maxRequestBodyBytes": 2**30,
           "gracefulShutdownSeconds": 3600, "healthCheck.periodSeconds": 3600, "healthCheck.timeoutSeconds": 3600,
           "healthCheck.failureThreshold": 100,
           "autoscaling.minReplicas": 1000, "autoscaling.maxReplicas": 1000, "autoscaling.targetInFlight": 100_000,
           "autoscaling.upscaleDelaySeconds": 3600, "autoscaling.downscaleDelaySeconds": 3600}


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

    def to_json(self) -> dict[str, Any]:
        options = self.ray_actor_options
        actor = {"numCpus": options.num_cpus, "numGpus": options.num_gpus, "memory": options.memory}
        hc = self.health_check
        # Sent only when set: an older controller, which refuses unknown fields, still takes deployments without it.
        scaling = {} if self.autoscaling is None else {"autoscaling": _autoscaling_to_json(self.autoscaling)}
        return {
            "handler": self.handler, "handlerArgs": self.handler_args, "replicas": self.replicas,
            "maxConcurrency": self.max_concurrency, "syncThreads": self.sync_threads,
            "maxRequestBodyBytes": self.max_request_body_bytes,
            "routePrefix": self.route_prefix, "requestTimeoutSeconds": self.request_timeout_seconds,
            "gracefulShutdownSeconds": self.graceful_shutdown_seconds, "accessLog": self.access_log,
            "version": self.version,
            "rayActorOptions": actor, "runtimeEnv": self.runtime_env, "env": self.env,
            "healthCheck": {"periodSeconds": hc.period_seconds, "timeoutSeconds": hc.timeout_seconds,
                            "failureThreshold": hc.failure_threshold},
            **scaling,
        }

    @classmethod
    def from_json(cls, body: Any) -> "DesiredState":
        """A validated, defaulted DesiredState, or SpecError naming the first bad field."""
        obj = _Object(body, "")
        handler = obj.pop("handler", None)
        if not isinstance(handler, str) or ":" not in handler or not all(handler.partition(":")[::2]):
            raise SpecError("handler", f"must be 'module:attr', got {handler!r}")
        route_prefix = obj.pop("routePrefix", cls.route_prefix)
        if not isinstance(route_prefix, str) or len(route_prefix) > ROUTE_PREFIX_MAX_LENGTH or not ROUTE_PREFIX.fullmatch(route_prefix):
            raise SpecError("routePrefix", f"must be '/' or a path such as /echo or /v1/echo (no trailing '/', "
                                           f"at most {ROUTE_PREFIX_MAX_LENGTH} characters), got {route_prefix!r}")
        runtime_env = obj.pop("runtimeEnv", None)
        if runtime_env is not None and not isinstance(runtime_env, dict):
            raise SpecError("runtimeEnv", "must be an object or null")
        env = obj.pop("env", None) or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise SpecError("env", "must map names to string values")
        version = obj.pop("version", "") or ""
        if not isinstance(version, str):
            raise SpecError("version", "must be a string")
        opts = _Object(obj.pop("rayActorOptions", None), "rayActorOptions.")
        actor = ActorOptions(num_cpus=opts.number("numCpus", ActorOptions.num_cpus, minimum=0),
                             num_gpus=opts.number("numGpus", ActorOptions.num_gpus, minimum=0),
                             memory=opts.number("memory", ActorOptions.memory, minimum=0, integer=True))
        opts.done()
        hc = _Object(obj.pop("healthCheck", None), "healthCheck.")
        health = HealthCheck(
            period_seconds=hc.number("periodSeconds", HealthCheck.period_seconds, minimum=0, exclusive=True),
            timeout_seconds=hc.number("timeoutSeconds", HealthCheck.timeout_seconds, minimum=0, exclusive=True),
            failure_threshold=hc.number("failureThreshold", HealthCheck.failure_threshold, minimum=1, integer=True))
        hc.done()
        access_log = obj.pop("accessLog", cls.access_log)
        if not isinstance(access_log, bool):
            raise SpecError("accessLog", f"must be true or false, got {access_log!r}")
        handler_args = obj.pop("handlerArgs", None) or {}
        if not isinstance(handler_args, dict):
            raise SpecError("handlerArgs", "must be an object")
        state = cls(
            handler=handler, version=version, handler_args=handler_args,
            replicas=obj.number("replicas", cls.replicas, minimum=0, integer=True),
            max_concurrency=obj.number("maxConcurrency", cls.max_concurrency, minimum=1, integer=True),
            sync_threads=obj.number("syncThreads", cls.sync_threads, minimum=1, integer=True),
            max_request_body_bytes=obj.number("maxRequestBodyBytes", cls.max_request_body_bytes, minimum=0,
                                              integer=True),
            route_prefix=route_prefix,
            request_timeout_seconds=obj.number("requestTimeoutSeconds", cls.request_timeout_seconds, minimum=0,
                                               exclusive=True),
            graceful_shutdown_seconds=obj.number("gracefulShutdownSeconds", cls.graceful_shutdown_seconds, minimum=0),
            access_log=access_log, ray_actor_options=actor, runtime_env=runtime_env, env=env, health_check=health,
            autoscaling=_autoscaling_from_json(obj.pop("autoscaling", None)))
        obj.done()
        if not version:  # a client that sends none (e.g. a test or a script) gets a hash of what it sent
            wire = state.to_json()
            state = replace(state, version=version_hash({key: wire.get(key) for key in VERSIONED_WIRE_FIELDS}))
        return state


def _autoscaling_to_json(a: Autoscaling) -> dict[str, Any]:
    return {"minReplicas": a.min_replicas, "maxReplicas": a.max_replicas, "targetInFlight": a.target_in_flight,
            "upscaleDelaySeconds": a.upscale_delay_seconds, "downscaleDelaySeconds": a.downscale_delay_seconds}


def _autoscaling_from_json(body: Any) -> Autoscaling | None:
    if body is None:
        return None
    obj = _Object(body, "autoscaling.")
    max_replicas = obj.number("maxReplicas", None, minimum=1, integer=True)
    if max_replicas is None:
        raise SpecError("autoscaling.maxReplicas", "is required")
    scaling = Autoscaling(
        max_replicas=max_replicas,
        min_replicas=obj.number("minReplicas", Autoscaling.min_replicas, minimum=0, integer=True),
        target_in_flight=obj.number("targetInFlight", Autoscaling.target_in_flight, minimum=0, exclusive=True),
        upscale_delay_seconds=obj.number("upscaleDelaySeconds", Autoscaling.upscale_delay_seconds, minimum=0),
        downscale_delay_seconds=obj.number("downscaleDelaySeconds", Autoscaling.downscale_delay_seconds, minimum=0))
    obj.done()
    if scaling.min_replicas > scaling.max_replicas:
        raise SpecError("autoscaling.minReplicas",
                        f"must not exceed autoscaling.maxReplicas ({max_replicas}), got {scaling.min_replicas}")
    return scaling


# Wire fields baked into a replica process: the hash for clients that send no version.
VERSIONED_WIRE_FIELDS = ("handler", "handlerArgs", "maxConcurrency", "syncThreads", "maxRequestBodyBytes",
                         "accessLog", "rayActorOptions", "runtimeEnv", "env")


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


class _Object:
    """One JSON object being decoded: typed reads with the field path in every error, unknown keys refused."""

    def __init__(self, value: Any, prefix: str):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise SpecError(prefix.rstrip(".") or "<body>", "must be an object")
        self._left = dict(value)
        self._prefix = prefix

    def pop(self, key: str, default: Any) -> Any:
        value = self._left.pop(key, None)
        return default if value is None else value

    def number(self, key: str, default: float | None, *, minimum: float, integer: bool = False,
               exclusive: bool = False) -> Any:
        """The field's number, checked; ``default`` (which may be None: optional) when absent or null."""
        field_path = self._prefix + key
        value = self.pop(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise SpecError(field_path, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
        # Python's JSON parser accepts NaN/Infinity; NaN passes every comparison below, and either would
        # stall timers (a NaN health period never comes due) and make the observed state invalid JSON.
        if not math.isfinite(value):
            raise SpecError(field_path, f"must be a finite number, got {value!r}")
        if value < minimum or (exclusive and value == minimum):
            raise SpecError(field_path, f"must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
        maximum = MAXIMUM.get(field_path)
        if maximum is not None and value > maximum:
            raise SpecError(field_path, f"must be <= {maximum}, got {value!r}")
        return value

    def done(self) -> None:
        """Refuse what is left: a field this controller does not know would otherwise be silently ignored."""
        if self._left:
            key = sorted(self._left)[0]
            raise SpecError(self._prefix + key, "unknown field (is the replica image older than the operator?)")
