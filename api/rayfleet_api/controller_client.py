"""The client end of the controller's HTTP API (the server end is ``rayfleet_runtime.controller.api_server``).

Used by the operator (through a thread, so kopf's event loop never blocks), ``rayfleet run``, the
``rayfleet dev`` provider and the benchmarks. Blocking and stdlib-only, so the bottom layer needs no
HTTP library.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from rayfleet_api.desired import DesiredState
from rayfleet_api.http_probe import wait_http


class ControllerUnreachable(Exception):
    """The controller could not be reached or answered with a server error: worth retrying."""


class ControllerUnauthorized(ControllerUnreachable):
    """The controller refused our credential (401): the token is wrong or missing on one side."""


class ControllerRejected(Exception):
    """The controller refused the request (4xx): a spec problem, not a transient one."""


class ControllerClient:
    """``token`` is the controller's credential (``Authorization: Bearer``); only ``/healthz`` is open."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 5.0):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}

    def put_deployment(self, name: str, desired: DesiredState) -> dict[str, Any]:
        """Store the desired state; returns it as the controller defaulted it."""
        return self._request("PUT", f"/v1/deployments/{name}", desired.to_json()) or {}

    def get_deployment(self, name: str) -> dict[str, Any] | None:
        """The observed state, or None if the controller has no such deployment."""
        return self._request("GET", f"/v1/deployments/{name}")

    def list_deployments(self) -> list[dict[str, Any]]:
        return (self._request("GET", "/v1/deployments") or {}).get("deployments", [])

    def delete_deployment(self, name: str) -> bool:
        """Start draining it; False if there is no such deployment."""
        return self._request("DELETE", f"/v1/deployments/{name}") is not None

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        wait_http(f"{self.base_url}/healthz", timeout_s)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - our own API
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            if exc.code == 404:
                return None
            if exc.code == 401:
                raise ControllerUnauthorized(f"{method} {url}: the controller refused our token (401)") from None
            if 400 <= exc.code < 500:
                raise ControllerRejected(_error_text(text) or f"HTTP {exc.code}") from None
            raise ControllerUnreachable(f"{method} {url}: HTTP {exc.code}: {text[:500]}") from None
        except (OSError, ValueError) as exc:  # refused, reset, timed out, or not JSON
            raise ControllerUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}") from None


def _error_text(text: str) -> str:
    """The controller's own message from an error body ``{"error": ...}``, else the raw text."""
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text[:500]
