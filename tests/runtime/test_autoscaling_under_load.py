"""Autoscaling on a real local Ray cluster: concurrent load through the real HAProxy ingress raises the
replica count, with no failed request, and it comes back down once the load stops."""
from __future__ import annotations

import threading

import httpx
import pytest

from rayfleet.waiting import eventually

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

CLIENTS = 6  # concurrent requests: 6 in flight at targetInFlight 1 asks for 6 replicas, capped at 3


class Load:
    """``CLIENTS`` threads sending requests that each sleep ``seconds`` in the handler, one after the other,
    until stopped; every response is kept (an exception as its own entry)."""

    def __init__(self, url: str, seconds: float):
        self.url, self.seconds = url, seconds
        self.stopping = threading.Event()
        self.outcomes: list[httpx.Response | Exception] = []
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stopping.is_set():
                try:
                    self.outcomes.append(client.get(self.url, params={"seconds": self.seconds}))
                except httpx.HTTPError as exc:
                    self.outcomes.append(exc)

    def pids(self) -> set[int]:
        return {r.json()["pid"] for r in list(self.outcomes) if isinstance(r, httpx.Response) and r.status_code == 200}

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(60)


def test_load_adds_replicas_without_a_failed_request_and_they_go_once_it_stops(api):
    api.put("scaled", handler="examples.async_io:handler", replicas=1, rayActorOptions={"numCpus": 0.1},
            autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetInFlight": 1, "upscaleDelaySeconds": 0,
                         "downscaleDelaySeconds": 2})
    api.wait_ready("scaled", 1)
    url = f"{api.ingress}/scaled"
    eventually(lambda: httpx.get(url, params={"seconds": 0}).status_code == 200, 30, 0.2,
               what="the ingress to route /scaled", ignoring=(httpx.HTTPError,))
    obs = api.wait("scaled", lambda o: o["autoscaling"]["load"] == 0, 30, "an idle sample")
    assert (obs["desiredReplicas"], obs["autoscaling"]["lastScaleReason"]) == (1, None)  # where it starts

    with Load(url, seconds=0.3) as load:
        obs = api.wait("scaled", lambda o: o["desiredReplicas"] == 3 and o["readyReplicas"] == 3, 60,
                       "3 ready replicas under load")
        eventually(lambda: len(load.pids()) == 3, 30, 0.2, what="requests answered by all 3 replicas",
                   diagnostics=lambda: f"pids {load.pids()}")
    failed = [o for o in load.outcomes if not isinstance(o, httpx.Response) or o.status_code != 200]
    assert not failed and load.outcomes, failed[:5]
    assert "-> 3 replicas" in obs["autoscaling"]["lastScaleReason"]

    obs = api.wait("scaled", lambda o: o["desiredReplicas"] == 1 and len(o["replicas"]) == 1
                   and o["status"] == "Running", 60, "back to 1 replica once idle")
    assert obs["autoscaling"]["load"] == 0
    # The peak of the last 2 s decides: 0, or what the last requests left in flight as the clients stopped.
    assert obs["autoscaling"]["lastScaleReason"].endswith("for 2s -> 1 replica"), obs["autoscaling"]
    api.delete("scaled")
