"""The server end of the controller's versioned HTTP JSON API (``/v1``); the client end is
``rayfleet_api.controller_client``. The operator (which never imports Ray) and ``rayfleet run`` talk to
the controller only through it:

* ``PUT /v1/deployments/{name}``: body = desired state -> 200 with the stored (defaulted) desired state;
  an invalid body (or a ``routePrefix`` another deployment already uses) -> 400
  ``{"error": "<field>: <problem>", "field": "<field>"}``.
* ``GET /v1/deployments/{name}`` -> observed state, 404 if unknown.
* ``GET /v1/deployments`` -> ``{"deployments": [observed, ...]}``.
* ``DELETE /v1/deployments/{name}`` -> 202; the replicas drain and stop, GET shows ``"status": "Deleting"``
  until they are gone, then 404.
* ``GET /healthz`` -> 200.

Every path but ``/healthz`` needs ``Authorization: Bearer <token>``, else 401: whoever can drive the
controller runs code in the cluster (a handler is any importable callable), so only the holder of the
cluster's token may (on Kubernetes, the operator; locally, `rayfleet run`).

Every 4xx, aiohttp's own included (unknown path 404, 405, 413 for a body over 1 MiB), has a JSON
``{"error": ...}`` body; no input a client can send gets a 5xx.
"""
from __future__ import annotations

import hmac
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web

from rayfleet_api.desired import DesiredState, parse_json, validate_name
from rayfleet_api.errors import SpecError


class ControllerAPI(Protocol):
    def put_deployment(self, name: str, desired: DesiredState) -> None: ...
    def get_deployment(self, name: str) -> dict[str, Any] | None: ...
    def list_deployments(self) -> list[dict[str, Any]]: ...
    def delete_deployment(self, name: str) -> bool: ...


def _error(status: int, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status)


def _require_token(token: str) -> Callable:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        # aiohttp decodes header bytes that are not UTF-8 to surrogates: encode them back, don't raise.
        sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if request.path != "/healthz" and not hmac.compare_digest(sent, expected):
            response = _error(401, "a valid 'Authorization: Bearer <token>' header is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="rayfleet-controller"'
            return response
        try:
            return await handler(request)
        except web.HTTPClientError as exc:  # aiohttp's own 404/405/413...: JSON like ours, not text/plain
            response = _error(exc.status, f"{exc.status} {exc.reason}")
            if "Allow" in exc.headers:
                response.headers["Allow"] = exc.headers["Allow"]
            return response

    return check


async def _json_body(request: web.Request) -> Any:
    """The body as strict JSON, or SpecError: any charset, nesting or number a client sends is a 400."""
    raw = await request.read()
    try:
        return parse_json(raw.decode(request.charset or "utf-8"))
    except LookupError:
        raise SpecError("<body>", f"unknown charset {request.charset!r}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, 1e400, 5000 digits, too deep
        raise SpecError("<body>", f"invalid JSON: {exc}") from None


def make_app(core: ControllerAPI, token: str) -> web.Application:
    if not token:
        raise ValueError("the controller needs a token: its API deploys code")
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
            body = await _json_body(request)
            desired = DesiredState.from_json(body)
            core.put_deployment(name, desired)
            return web.json_response(desired.to_json())
        except SpecError as exc:  # includes conflicts with other deployments, e.g. routePrefix
            return _error(400, str(exc), exc.field)

    @routes.delete("/v1/deployments/{name}")
    async def delete(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not core.delete_deployment(name):
            return _error(404, f"deployment {name!r} not found")
        return web.json_response({"name": name, "status": "Deleting"}, status=202)

    app = web.Application(middlewares=[_require_token(token)])
    app.add_routes(routes)
    return app
