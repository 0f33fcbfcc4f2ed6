"""Kubernetes API I/O through the official client. The client is synchronous, so every call runs in a
worker thread: kopf's event loop is never blocked. Objects travel as plain dicts."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from rayfleet_api.constants import RAY_GROUP, RAY_PLURAL, RAY_VERSION

from .metrics import METRICS


class KubeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

    @property
    def retriable(self) -> bool:
        return self.status in (0, 409, 429) or self.status >= 500


def load_client_config() -> None:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()


async def _call(fn, *args, answers: tuple[int, ...] = (404,), **kwargs) -> dict[str, Any] | None:
    """Run one client call off the loop. A status in `answers` answers the question (404: no such object;
    a create's 409: it exists already) → None; other API errors → KubeError. Failures are counted."""
    def run():
        try:
            response = fn(*args, _preload_content=False, **kwargs)
            return json.loads(response.data or b"null")
        except ApiException as exc:
            if exc.status in answers:
                return None
            METRICS.api_error("kubernetes", str(exc.status or type(exc).__name__))
            try:
                message = json.loads(exc.body).get("message", exc.reason)
            except (TypeError, ValueError):
                message = exc.reason
            raise KubeError(exc.status or 0, message) from None
        except Exception as exc:  # no HTTP answer at all: refused, timed out, TLS
            METRICS.api_error("kubernetes", type(exc).__name__)
            raise
    return await asyncio.to_thread(run)


async def _replace(fn, obj: dict[str, Any], resource_version: str) -> dict[str, Any]:
    """Replace a namespaced object whole, at ``resource_version`` (409 if it moved on)."""
    obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": resource_version}}
    return await _call(fn, obj["metadata"]["name"], obj["metadata"]["namespace"], obj)


class Kube:
    """The few operations the operator needs, namespaced, returning dicts."""

    def __init__(self) -> None:
        self.custom = kubernetes.client.CustomObjectsApi()
        self.core = kubernetes.client.CoreV1Api()
        self.networking = kubernetes.client.NetworkingV1Api()
        self.policy = kubernetes.client.PolicyV1Api()

    async def get_raycluster(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _call(self.custom.get_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name)

    async def create_raycluster(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await _call(self.custom.create_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
                           obj["metadata"]["namespace"], RAY_PLURAL, obj)

    async def replace_raycluster(self, obj: dict[str, Any], resource_version: str) -> dict[str, Any]:
        """Replace the spec whole (a merge patch would keep fields we dropped); 409 if it moved on."""
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": resource_version}}
        return await _call(self.custom.replace_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
                           obj["metadata"]["namespace"], RAY_PLURAL, obj["metadata"]["name"], obj)

    async def create_secret_unless_present(self, obj: dict[str, Any]) -> bool:
        """Create the Secret; False if it exists already. Create-only, so the operator needs no right
        to read Secrets."""
        return await _call(self.core.create_namespaced_secret, obj["metadata"]["namespace"], obj,
                           answers=(409,)) is not None

    async def get_network_policy(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _call(self.networking.read_namespaced_network_policy, name, namespace)

    async def create_network_policy(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await _call(self.networking.create_namespaced_network_policy, obj["metadata"]["namespace"], obj)

    async def replace_network_policy(self, obj: dict[str, Any], resource_version: str) -> dict[str, Any]:
        return await _replace(self.networking.replace_namespaced_network_policy, obj, resource_version)

    async def get_pdb(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _call(self.policy.read_namespaced_pod_disruption_budget, name, namespace)

    async def create_pdb(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await _call(self.policy.create_namespaced_pod_disruption_budget, obj["metadata"]["namespace"], obj)

    async def replace_pdb(self, obj: dict[str, Any], resource_version: str) -> dict[str, Any]:
        return await _replace(self.policy.replace_namespaced_pod_disruption_budget, obj, resource_version)

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return (await _call(self.core.list_namespaced_pod, namespace, label_selector=selector) or {}).get("items", [])

    async def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await _call(self.core.read_namespaced_service, name, namespace)

    async def create_service(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await _call(self.core.create_namespaced_service, obj["metadata"]["namespace"], obj)

    async def patch_service(self, obj: dict[str, Any]) -> dict[str, Any]:
        patch = {"metadata": {"labels": obj["metadata"]["labels"]}, "spec": obj["spec"]}
        return await _call(self.core.patch_namespaced_service, obj["metadata"]["name"], obj["metadata"]["namespace"], patch)
