"""The controller's versioned HTTP JSON API (``/v1``) and desired-state validation.

The operator (which never imports Ray) and ``rayfleet run`` talk to the controller only through this:

* ``PUT /v1/deployments/{name}``: body = desired state -> 200 with the stored (defaulted) desired state;
  an invalid body (or a ``routePrefix`` another deployment already uses) -> 400
  ``{"error": "<field>: <problem>", "field": "<field>"}``.
* ``GET /v1/deployments/{name}`` -> observed state, 404 if unknown.
* ``GET /v1/deployments`` -> ``{"deployments": [observed, ...]}``.
* ``DELETE /v1/deployments/{name}`` -> 202; the replicas drain and stop, GET shows ``"status": "Deleting"``
  until they are gone, then 404.
* ``GET /healthz`` -> 200.
"""
from __future__ import annotations

import copy
import json
import math
import re
from typing import Any, Protocol

from aiohttp import web

from rayfleet.spec import spec_version

# A DNS label, optionally qualified by one more (the operator uses "<namespace>.<name>").
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")


DEFAULTS: dict[str, Any] = {
    "handlerArgs": {},
    "replicas": 1,
    "maxConcurrency": 100,
    "syncThreads": 1,
    "routePrefix": "/",
    "requestTimeoutSeconds": 60,
    "gracefulShutdownSeconds": 30,
    "rayActorOptions": {"numCpus": 1, "numGpus": 0, "memory": None},
    "runtimeEnv": None,
    "env": {},
    "healthCheck": {"periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
}


class DesiredStateError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _number(body: dict, key: str, field: str, *, minimum: float, integer: bool = False, exclusive: bool = False) -> None:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise DesiredStateError(field, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    # Python's JSON parser accepts NaN/Infinity; NaN passes every comparison below, and either would
    # stall timers (a NaN health period never comes due) and make the observed state invalid JSON.
    if not math.isfinite(value):
        raise DesiredStateError(field, f"must be a finite number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        raise DesiredStateError(field, f"must be {'>' if exclusive else '>='} {minimum}, got {value!r}")


def validate_name(name: str) -> None:
    if not isinstance(name, str) or len(name) > 127 or not NAME_RE.match(name):
        raise DesiredStateError("name", f"{name!r} must be a DNS label or 'namespace.name': lowercase letters, "
                                        "digits and '-', at most 127 characters")


def validate_desired(body: Any) -> dict[str, Any]:
    """Defaulted copy of a desired state, or DesiredStateError naming the first bad field."""
    if not isinstance(body, dict):
        raise DesiredStateError("<body>", "must be a JSON object")
    d = copy.deepcopy(body)
    for key, default in DEFAULTS.items():
        if d.get(key) is None and default is not None:
            d[key] = copy.deepcopy(default)
        elif key not in d:
            d[key] = default
    handler = d.get("handler")
    if not isinstance(handler, str) or ":" not in handler or not all(handler.partition(":")[::2]):
        raise DesiredStateError("handler", f"must be 'module:attr', got {handler!r}")
    if not isinstance(d["handlerArgs"], dict):
        raise DesiredStateError("handlerArgs", "must be an object")
    _number(d, "replicas", "replicas", minimum=0, integer=True)
    _number(d, "maxConcurrency", "maxConcurrency", minimum=1, integer=True)
    _number(d, "syncThreads", "syncThreads", minimum=1, integer=True)
    if not isinstance(d["routePrefix"], str) or not d["routePrefix"].startswith("/"):
        raise DesiredStateError("routePrefix", f"must be a path starting with '/', got {d['routePrefix']!r}")
    _number(d, "requestTimeoutSeconds", "requestTimeoutSeconds", minimum=0, exclusive=True)
    _number(d, "gracefulShutdownSeconds", "gracefulShutdownSeconds", minimum=0)
    opts = d["rayActorOptions"]
    if not isinstance(opts, dict):
        raise DesiredStateError("rayActorOptions", "must be an object")
    opts.setdefault("numCpus", 1)
    opts.setdefault("numGpus", 0)
    opts.setdefault("memory", None)
    _number(opts, "numCpus", "rayActorOptions.numCpus", minimum=0)
    _number(opts, "numGpus", "rayActorOptions.numGpus", minimum=0)
    if opts["memory"] is not None:
        _number(opts, "memory", "rayActorOptions.memory", minimum=0, integer=True)
    if "resources" in opts and opts["resources"] is not None and not isinstance(opts["resources"], dict):
        raise DesiredStateError("rayActorOptions.resources", "must be an object")
    if d["runtimeEnv"] is not None and not isinstance(d["runtimeEnv"], dict):
        raise DesiredStateError("runtimeEnv", "must be an object or null")
    env = d["env"]
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise DesiredStateError("env", "must map names to string values")
    hc = d["healthCheck"]
    if not isinstance(hc, dict):
        raise DesiredStateError("healthCheck", "must be an object")
    d["healthCheck"] = hc = {**DEFAULTS["healthCheck"], **hc}
    _number(hc, "periodSeconds", "healthCheck.periodSeconds", minimum=0, exclusive=True)
    _number(hc, "timeoutSeconds", "healthCheck.timeoutSeconds", minimum=0, exclusive=True)
    _number(hc, "failureThreshold", "healthCheck.failureThreshold", minimum=1, integer=True)
    if d.get("version") in (None, ""):
        d["version"] = spec_version(d)  # a client that sends none gets the operator's own hash
    elif not isinstance(d["version"], str):
        raise DesiredStateError("version", "must be a string")
    return d


class ControllerAPI(Protocol):
    def put_deployment(self, name: str, desired: dict[str, Any]) -> dict[str, Any]: ...
    def get_deployment(self, name: str) -> dict[str, Any] | None: ...
    def list_deployments(self) -> list[dict[str, Any]]: ...
    def delete_deployment(self, name: str) -> bool: ...


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status)


def make_app(core: ControllerAPI) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/healthz")
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @routes.get("/v1/deployments")
    async def list_(_: web.Request) -> web.Response:
        return web.json_response({"deployments": core.list_deployments()})

    @routes.get("/v1/deployments/{name}")
    async def get(request: web.Request) -> web.Response:
        observed = core.get_deployment(request.match_info["name"])
        if observed is None:
            return _error(404, f"deployment {request.match_info['name']!r} not found")
        return web.json_response(observed)

    @routes.put("/v1/deployments/{name}")
    async def put(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            validate_name(name)
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DesiredStateError("<body>", f"invalid JSON: {exc}") from exc
            desired = validate_desired(body)
            return web.json_response(core.put_deployment(name, desired))
        except DesiredStateError as exc:  # includes conflicts with other deployments, e.g. routePrefix
            return _error(400, str(exc), exc.field)

    @routes.delete("/v1/deployments/{name}")
    async def delete(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not core.delete_deployment(name):
            return _error(404, f"deployment {name!r} not found")
        return web.json_response({"name": name, "status": "Deleting"}, status=202)

    app = web.Application()
    app.add_routes(routes)
    return app
