"""The data plane on a real local Ray cluster, driven through the controller's HTTP API.

Traffic goes through the HAProxy ingress, and some checks straight to the replicas' advertised
host:port (no Python process sits in between either way).
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from rayfleet.waiting import eventually

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def wait_ingress(api, obs, pids: int = 1, timeout: float = 30.0) -> str:
    """The ingress URL of a deployment once it routes to ``pids`` distinct replica processes."""
    url = api.ingress + obs["routePrefix"]
    seen, last = set(), []

    def routed():
        last[:] = [httpx.get(url + "/probe", timeout=5)]
        if last[0].status_code == 200:
            seen.add(last[0].json()["pid"])
        return len(seen) >= pids

    eventually(routed, timeout, 0.1, what=f"the ingress to route {url} to {pids} replicas",
               diagnostics=lambda: f"saw {seen}, last {last}", ignoring=(httpx.HTTPError,))
    return url


def ingress_counts(api) -> tuple[float, float]:
    """(tables applied by a reload, tables applied through the runtime API) by the node's ingress."""
    text = httpx.get(api.metrics, timeout=10).text
    return tuple(sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
                 for name in ("rayfleet_ingress_config_reloads_total", "rayfleet_ingress_runtime_updates_total"))


def alone(api, name: str) -> None:
    """Once ``name`` is the only deployment (what earlier tests deleted is gone): no other's change, which
    reloads the ingress, comes while a test counts reloads."""
    eventually(lambda: [d["name"] for d in api.http.get("/v1/deployments").json()["deployments"]] == [name], 60, 0.2,
               what=f"{name} to be the only deployment")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def replica_urls(obs) -> list[str]:
    return [f"http://{r['host']}:{r['port']}" for r in obs["replicas"] if r["state"] == "READY"]


async def burst(urls: list[str], n: int, path: str) -> tuple[float, list[httpx.Response]]:
    async with httpx.AsyncClient(timeout=30) as client:
        t = time.monotonic()
        responses = await asyncio.gather(*(client.get(urls[i % len(urls)] + path) for i in range(n)))
        return time.monotonic() - t, responses


def test_two_replicas_answer_from_distinct_pids(api):
    api.put("pids", replicas=2)
    obs = api.wait_ready("pids", 2)
    pids = {httpx.get(u + "/x").json()["pid"] for u in replica_urls(obs)}
    assert len(pids) == 2
    assert pids == {r["pid"] for r in obs["replicas"]}
    assert all(r["port"] and r["host"] == "127.0.0.1" for r in obs["replicas"])
    ready = httpx.get(replica_urls(obs)[0] + "/-/ready")
    assert ready.status_code == 200
    url = wait_ingress(api, obs, pids=2)
    seen = {httpx.get(url + f"/{i}").json()["pid"] for i in range(10)}
    assert seen == pids
    api.delete("pids", wait=False)


def test_the_ingress_reaches_a_replica_on_its_node_by_its_local_socket(api):
    """Over the replica's abstract Unix socket there is no peer address; over its TCP port, the peer's."""
    api.put("peer", handler="rf_test_handlers:peer")
    obs = api.wait_ready("peer", 1)
    through_ingress = httpx.get(wait_ingress(api, obs) + "/x", timeout=10).json()
    assert through_ingress["remote"] is None and through_ingress["xff"] == "127.0.0.1", through_ingress
    assert httpx.get(replica_urls(obs)[0] + "/x", timeout=10).json()["remote"] == "127.0.0.1"
    api.delete("peer", wait=False)


def test_async_handlers_overlap_sync_handlers_queue(api):
    api.put("aio", handler="rf_test_handlers:async_sleep")
    api.put("blocking", handler="rf_test_handlers:sync_sleep")
    aio, blocking = api.wait_ready("aio", 1), api.wait_ready("blocking", 1)
    elapsed, responses = asyncio.run(burst(replica_urls(aio), 5, "/?s=1"))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["pid"] for r in responses}) == 1
    assert elapsed < 2.5, f"5 x asyncio.sleep(1) on one replica took {elapsed:.2f}s"
    elapsed, responses = asyncio.run(burst(replica_urls(blocking), 5, "/?s=1"))
    assert all(r.status_code == 200 for r in responses)
    assert elapsed > 4.0, f"5 x time.sleep(1) on one replica took only {elapsed:.2f}s"
    api.delete("aio", wait=False)
    api.delete("blocking", wait=False)


def test_raising_handler_gives_500_and_replica_keeps_serving(api):
    api.put("flaky", handler="rf_test_handlers:Flaky")
    url = replica_urls(api.wait_ready("flaky", 1))[0]
    bad = httpx.get(url + "/boom")
    assert bad.status_code == 500 and "ValueError" in bad.text and "kaboom" not in bad.text
    assert httpx.get(url + "/ok").status_code == 200
    obs = api.wait("flaky", lambda o: o["replicas"][0]["lastError"], 10, "lastError")
    assert obs["replicas"][0]["lastError"] == "ValueError: kaboom"
    assert obs["restarts"] == 0
    api.delete("flaky", wait=False)


def test_import_error_is_reported_not_hot_looped(api):
    api.put("broken", handler="rf_test_broken:handler")
    obs = api.wait("broken", lambda o: o["error"] is not None, 60, "error")
    failed_at = time.monotonic()
    assert obs["error"]["reason"] == "HandlerImportError"
    assert "rf_test_broken" in obs["error"]["message"] and "rayfleet_no_such_dependency" in obs["error"]["message"]
    assert obs["status"] == "Failed" and obs["readyReplicas"] == 0
    # The controller keeps retrying, with exponential back-off (1 s, 2 s, 4 s... before each new start):
    # wait for its second retry, then check that it took the back-off's time and came alone, not in a burst.
    first_seen: dict[int, float] = {}

    def retried_twice():
        restarts = api.get("broken")["restarts"]
        first_seen.setdefault(restarts, time.monotonic())
        return restarts >= 2

    eventually(retried_twice, 60, 0.1, what="the controller's second retry of the broken handler",
               diagnostics=lambda: f"restart counts first seen: {first_seen}; {api.get('broken')}")
    second_retry_after = min(t for n, t in first_seen.items() if n >= 2) - failed_at
    assert second_retry_after > 2.0, f"2 retries {second_retry_after:.1f}s after the failure: no back-off"
    assert api.get("broken")["restarts"] <= 3  # exponential back-off: 1 s, 2 s, 4 s...
    # Fixing the handler (new version) recovers at once.
    api.put("broken", handler="examples.echo:Echo", version="v2")
    obs = api.wait_ready("broken", 1, 60)
    assert obs["error"] is None
    api.delete("broken", wait=False)


def test_overload_answers_503_quickly(api, ray_cluster):
    from rayfleet_api.constants import RAY_NAMESPACE
    from rayfleet_runtime.actor_names import replica_actor_name

    api.put("tight", handler="rf_test_handlers:async_sleep", maxConcurrency=1)
    obs = api.wait_ready("tight", 1)
    url = replica_urls(obs)[0]
    replica = ray_cluster.get_actor(replica_actor_name("tight", obs["replicas"][0]["id"]), namespace=RAY_NAMESPACE)

    def one_runs_one_waits():
        info = ray_cluster.get(replica.info.remote(), timeout=10)
        return info["inFlight"] == 1 and info["queued"] == 1

    async def main():
        async with httpx.AsyncClient(timeout=30) as client:
            slow = [asyncio.ensure_future(client.get(url + "/?s=2")) for _ in range(2)]  # 1 runs, 1 waits
            # The replica's own counters say so (within the 2 s the first one runs).
            await asyncio.to_thread(eventually, one_runs_one_waits, 1.5, 0.02, "1 request running and 1 queued on the replica")
            rejected = await client.get(url + "/?s=2")
            unfinished = not any(r.done() for r in slow)  # refused at once, not once a slot freed
            return rejected, unfinished, await asyncio.gather(*slow)

    rejected, unfinished, slow = asyncio.run(main())
    assert rejected.status_code == 503 and rejected.headers["Retry-After"] == "1"
    assert unfinished
    assert [r.status_code for r in slow] == [200, 200]
    api.delete("tight", wait=False)


class Traffic(threading.Thread):
    """Steady sequential requests through the ingress."""

    def __init__(self, api, name: str, ingress: str):
        super().__init__(daemon=True)
        self.api, self.name, self.ingress = api, name, ingress
        self.ok = 0
        self.pids: set[int] = set()  # the replica processes that answered
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self):
        with httpx.Client(timeout=10) as client:
            i = 0
            while not self.stop.is_set():
                try:
                    r = client.get(self.ingress + f"/n/{i}")
                    if r.status_code == 200:
                        self.pids.add(r.json()["pid"])
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                i += 1


def test_scale_up_and_down_loses_no_request(api):
    api.put("scale", replicas=1, gracefulShutdownSeconds=10)
    obs = api.wait_ready("scale", 1)
    traffic = Traffic(api, "scale", wait_ingress(api, obs))
    alone(api, "scale")
    reloads, runtime_updates = ingress_counts(api)
    traffic.start()
    try:
        api.put("scale", replicas=3, gracefulShutdownSeconds=10)
        obs = api.wait_ready("scale", 3)
        three = {r["pid"] for r in obs["replicas"]}
        assert len(three) == 3
        # The scale-down happens under traffic that every replica is serving.
        eventually(lambda: three <= traffic.pids, 30, 0.05, what="traffic served by all 3 replicas",
                   diagnostics=lambda: f"served by {traffic.pids}; failures {traffic.failures[:5]}")
        api.put("scale", replicas=1, gracefulShutdownSeconds=10)
        down = api.wait("scale", lambda o: len(o["replicas"]) == 1 and o["readyReplicas"] == 1, 60, "scaled down to 1")
        # Traffic goes on until the removed replicas' processes are gone, and for some requests after that.
        removed = three - {r["pid"] for r in down["replicas"]}
        eventually(lambda: not any(pid_alive(p) for p in removed), 30, 0.1, what="the removed replicas' processes to exit",
                   diagnostics=lambda: f"alive: {[p for p in removed if pid_alive(p)]}")
        served = traffic.ok
        eventually(lambda: traffic.ok >= served + 20, 30, 0.05, what="20 requests served after the scale-down",
                   diagnostics=lambda: f"failures {traffic.failures[:5]}")
    finally:
        traffic.stop.set()
        traffic.join(10)
    assert traffic.ok > 20
    assert traffic.failures == [], traffic.failures[:5]
    # Scaling changed replicas only: HAProxy's runtime API took each change, and no reload came.
    after = ingress_counts(api)
    assert after[0] == reloads and after[1] > runtime_updates, (reloads, runtime_updates, after)
    api.delete("scale", wait=False)


def test_sigkill_replica_is_replaced_and_restart_counted(api):
    api.put("victim", replicas=2)
    obs = api.wait_ready("victim", 2)
    victim = obs["replicas"][0]
    survivor = next(r for r in obs["replicas"] if r["id"] != victim["id"])
    traffic = Traffic(api, "victim", wait_ingress(api, obs, pids=2))
    traffic.start()
    # The kill comes under traffic that both replicas are serving.
    eventually(lambda: {victim["pid"], survivor["pid"]} <= traffic.pids, 30, 0.05, what="traffic served by both replicas",
               diagnostics=lambda: f"served by {traffic.pids}; failures {traffic.failures[:5]}")
    os.kill(victim["pid"], signal.SIGKILL)
    # The survivor keeps serving while the victim is replaced.
    assert httpx.get(f"http://{survivor['host']}:{survivor['port']}/x").status_code == 200
    obs = api.wait("victim", lambda o: o["restarts"] >= 1 and o["readyReplicas"] == 2
                   and victim["id"] not in {r["id"] for r in o["replicas"]}, 60, "replacement")
    new = next(r for r in obs["replicas"] if r["id"] != survivor["id"])
    assert new["pid"] != victim["pid"] and new["restarts"] == 1
    assert {httpx.get(u + "/x").status_code for u in replica_urls(obs)} == {200}
    # Traffic goes on until the ingress routes to the replacement: its table has moved past the kill.
    eventually(lambda: new["pid"] in traffic.pids, 30, 0.05, what="traffic served by the replacement",
               diagnostics=lambda: f"served by {traffic.pids}; failures {traffic.failures[:5]}")
    traffic.stop.set()
    traffic.join(10)
    # Not one GET failed: one in flight on the killed process, or sent to it before HAProxy's health
    # checks took it out, is re-sent to the survivor (retry-on empty-response / conn-failure).
    assert traffic.ok > 10 and traffic.failures == [], traffic.failures[:5]
    url = api.ingress + obs["routePrefix"]
    assert {httpx.get(url + f"/{i}").status_code for i in range(20)} == {200}
    api.delete("victim", wait=False)


def test_rolling_update_under_traffic_replaces_every_replica_loses_nothing_and_reloads_nothing(api):
    api.put("roll", replicas=2, handlerArgs={"greeting": "old"}, version="a")
    old = api.wait_ready("roll", 2)
    traffic = Traffic(api, "roll", wait_ingress(api, old, pids=2))
    alone(api, "roll")
    reloads, _ = ingress_counts(api)
    traffic.start()
    api.put("roll", replicas=2, handlerArgs={"greeting": "new"}, version="b")
    obs = api.wait("roll", lambda o: o["status"] == "Running" and o["version"] == "b" and o["readyReplicas"] == 2
                   and len(o["replicas"]) == 2 and all(r["version"] == "b" for r in o["replicas"]), 60, "rollout")
    served = traffic.ok
    eventually(lambda: traffic.ok >= served + 20, 30, 0.05, what="20 requests served after the rollout",
               diagnostics=lambda: f"failures {traffic.failures[:5]}")
    traffic.stop.set()
    traffic.join(10)
    assert traffic.failures == [], traffic.failures[:5]
    assert ingress_counts(api)[0] == reloads  # a new version's replicas are a change of replicas alone
    assert not {r["pid"] for r in obs["replicas"]} & {r["pid"] for r in old["replicas"]}
    assert {httpx.get(u + "/x").json()["greeting"] for u in replica_urls(obs)} == {"new"}
    assert obs["restarts"] == 0
    api.delete("roll")
    assert api.get("roll") is None


def test_an_idle_keepalive_client_across_a_rollout_gets_no_error(api):
    """A client holding an idle keep-alive connection while its only replica is replaced: its next
    request must be answered (an old HAProxy worker keeps routing that connection by the old table)."""
    api.put("idle", replicas=1, handlerArgs={"greeting": "old"}, version="a")
    obs = api.wait_ready("idle", 1)
    url = wait_ingress(api, obs)
    with httpx.Client(timeout=30) as client:  # one pooled keep-alive connection, left idle
        assert client.get(url + "/before").json()["greeting"] == "old"
        api.put("idle", replicas=1, handlerArgs={"greeting": "new"}, version="b")
        api.wait("idle", lambda o: o["version"] == "b" and o["readyReplicas"] == 1 and len(o["replicas"]) == 1
                 and o["status"] == "Running", 120, "the rollout to finish, the old replica gone")
        answer = client.get(url + "/after")
        assert answer.status_code == 200, answer.text
    api.delete("idle")


def test_rollout_without_spare_capacity_replaces_in_place_and_says_why(api):
    """4 CPUs; two replicas of 1.5 leave no room for a surge replica: the rollout must not deadlock."""
    spare = {"replicas": 2, "rayActorOptions": {"numCpus": 1.5}}
    api.put("nospare", handlerArgs={"greeting": "old"}, version="a", **spare)
    api.wait_ready("nospare", 2)
    api.put("nospare", handlerArgs={"greeting": "new"}, version="b", **spare)
    notes: list[str] = []

    def rolled(o) -> bool:
        notes.extend(r["unschedulable"] for r in o["replicas"] if r.get("unschedulable"))
        return (o["status"] == "Running" and o["version"] == "b" and o["readyReplicas"] == 2
                and len(o["replicas"]) == 2)

    obs = api.wait("nospare", rolled, 120, "the rollout without spare capacity to finish")
    assert notes and notes[0].startswith("waiting for resources: needs CPU 1.5 ("), notes[:1]
    assert {httpx.get(u + "/x").json()["greeting"] for u in replica_urls(obs)} == {"new"}
    api.delete("nospare")


def test_api_validation_and_listing(api):
    r = api.http.put("/v1/deployments/bad", json={"handler": "examples.echo:Echo", "replicas": -1})
    assert r.status_code == 400 and r.json()["field"] == "replicas"
    r = api.http.put("/v1/deployments/bad", json={"handler": "nocolon"})
    assert r.status_code == 400 and "handler" in r.json()["error"]
    r = api.http.put("/v1/deployments/Bad_Name", json={"handler": "a:b"})
    assert r.status_code == 400 and r.json()["field"] == "name"
    r = api.http.put("/v1/deployments/bad", json={"handler": "a:b", "healthCheck": {"failureThreshold": 0}})
    assert r.status_code == 400 and r.json()["field"] == "healthCheck.failureThreshold"
    api.put("pfx-a", replicas=0, routePrefix="/shared")
    r = api.http.put("/v1/deployments/pfx-b", json={"handler": "a:b", "routePrefix": "/shared"})
    assert r.status_code == 400 and r.json()["field"] == "routePrefix" and "pfx-a" in r.json()["error"]
    api.delete("pfx-a")
    assert api.http.get("/v1/deployments/nope").status_code == 404
    assert api.http.delete("/v1/deployments/nope").status_code == 404
    assert api.http.get("/healthz").status_code == 200
    assert "deployments" in api.http.get("/v1/deployments").json()


def test_api_refuses_requests_without_the_token(api):
    api.put("guarded", replicas=0)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": api.token}, {"Authorization": "Basic x"}):
        with httpx.Client(base_url=api.base, timeout=10, headers=headers) as anonymous:
            for method, path, body in (("GET", "/v1/deployments", None), ("GET", "/v1/deployments/guarded", None),
                                       ("PUT", "/v1/deployments/evil", {"handler": "subprocess:Popen"}),
                                       ("DELETE", "/v1/deployments/guarded", None)):
                r = anonymous.request(method, path, json=body)
                assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), (headers, path)
            assert anonymous.get("/healthz").status_code == 200  # probes need no credential
    assert api.get("evil") is None and api.get("guarded")["status"] != "Deleting"
    api.delete("guarded")


def test_controller_restart_rediscovers_replicas(api, ray_cluster):
    from rayfleet_api.constants import CONTROLLER_NAME, RAY_NAMESPACE as NAMESPACE

    api.put("survive", replicas=2)
    before = api.wait_ready("survive", 2)
    controller = ray_cluster.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    old_pid = ray_cluster.get(controller.ready.remote(), timeout=30)["pid"]
    ray_cluster.kill(controller, no_restart=False)  # Ray restarts it; it must find its state again
    # What follows must be the new incarnation's view, not the old one's: wait until another process answers.
    eventually(lambda: ray_cluster.get(controller.ready.remote(), timeout=10)["pid"] != old_pid, 60, 0.2,
               what="Ray to restart the controller actor", ignoring=(ray_cluster.exceptions.RayError,))
    after = api.wait("survive", lambda o: o is not None and o["readyReplicas"] == 2, 60, "re-discovery")
    assert {r["pid"] for r in after["replicas"]} == {r["pid"] for r in before["replicas"]}
    assert after["restarts"] == 0 and after["version"] == before["version"]
    api.put("survive", replicas=3)  # and it goes on reconciling
    api.wait_ready("survive", 3)
    api.delete("survive")


def test_a_fastapi_app_streams_through_the_ingress_chunk_by_chunk(api):
    api.put("fastapi", handler="examples.fastapi_app:app", routePrefix="/api")
    api.wait_ready("fastapi", 1)
    url = api.ingress
    eventually(lambda: httpx.get(f"{url}/api/items/1", timeout=5).status_code == 200, 30, 0.1,
               what="the ingress to route /api", ignoring=(httpx.HTTPError,))
    assert httpx.get(f"{url}/api/items/5").json()["model"] == "loaded"
    assert httpx.post(f"{url}/api/orders", json={"item": "tea", "quantity": 2}).json()["total"] == 6
    t0, arrivals = time.monotonic(), []
    with httpx.stream("GET", f"{url}/api/stream", params={"n": 3, "interval": 0.5}, timeout=10) as r:
        for chunk in r.iter_text():
            arrivals.append((time.monotonic() - t0, chunk))
    assert "".join(c for _, c in arrivals) == "chunk 0\nchunk 1\nchunk 2\n"
    assert arrivals[0][0] < 0.5 < arrivals[-1][0], arrivals  # HAProxy forwards each chunk as it comes
    from websockets.sync.client import connect

    with connect(url.replace("http://", "ws://") + "/api/echo", open_timeout=10) as ws:  # upgraded through HAProxy
        ws.send("hi")
        assert ws.recv(timeout=10) == "echo: hi"
    api.delete("fastapi")
