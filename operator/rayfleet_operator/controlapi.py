"""HTTP client for the rayfleet controller running in the Ray cluster (the operator never imports Ray)."""
from __future__ import annotations

from typing import Any

import aiohttp


class ControllerUnreachable(Exception):
    """The controller could not be reached or answered with a server error."""


class ControllerRejected(Exception):
    """The controller refused the desired state (4xx): a spec problem, not a transient one."""


class ControlClient:
    def __init__(self, timeout_s: float = 5.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def _request(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.request(method, url, json=body) as response:
                if response.status == 404:
                    return None
                text = await response.text()
                if 400 <= response.status < 500:
                    raise ControllerRejected(f"{method} {url}: HTTP {response.status}: {text[:500]}")
                if response.status >= 500:
                    raise ControllerUnreachable(f"{method} {url}: HTTP {response.status}: {text[:500]}")
                return await response.json(content_type=None) if text else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ControllerUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}") from None

    async def put_deployment(self, base: str, name: str, desired: dict[str, Any]) -> dict[str, Any] | None:
        return await self._request("PUT", f"{base}/v1/deployments/{name}", desired)

    async def get_deployment(self, base: str, name: str) -> dict[str, Any] | None:
        return await self._request("GET", f"{base}/v1/deployments/{name}")

    async def delete_deployment(self, base: str, name: str) -> dict[str, Any] | None:
        return await self._request("DELETE", f"{base}/v1/deployments/{name}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
