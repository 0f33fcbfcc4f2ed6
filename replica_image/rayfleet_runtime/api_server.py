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
"""
from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web

from rayfleet_api.desired import DesiredState, validate_name
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
        if request.path != "/healthz" and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(), expected):
            response = _error(401, "a valid 'Authorization: Bearer <token>' header is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="rayfleet-controller"'
            return response
        return await handler(request)

    return check


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
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SpecError("<body>", f"invalid JSON: {exc}") from exc
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
