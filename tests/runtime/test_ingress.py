"""The ingress actor with real Ray and a real HAProxy, in front of stand-in replicas.

Stand-in replicas (``stand_ins.Replicas``) are tiny aiohttp servers on 127.0.0.1, run on a background
event loop in the test process. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import socket
import threading
import time

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
pytest.importorskip("aiohttp.web")

from rayfleet_runtime.routing import RoutingTable  # noqa: E402
from rayfleet_runtime.ingress.haproxy_bin import HAProxyNotFound, find_haproxy  # noqa: E402
from rayfleet_runtime.ingress.haproxy_process import cli  # noqa: E402
from rayfleet.procs import cmdline  # noqa: E402
from rayfleet.ports import free_port  # noqa: E402
from rayfleet.waiting import eventually  # noqa: E402
from rayfleet_api.constants import INGRESS_READY_PATH  # noqa: E402
from tests.runtime.stand_ins import Replicas  # noqa: E402

pytestmark = pytest.mark.ray

try:
    find_haproxy()
except HAProxyNotFound:  # pragma: no cover
    pytest.skip("no HAProxy binary", allow_module_level=True)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def replicas():
    r = Replicas()
    yield r
    r.close()


@pytest.fixture(scope="module")
def ingress(ray_cluster):
    from rayfleet_runtime.ingress.actor import actor_name, ensure_ingress

    node_id = ray.get_runtime_context().get_node_id()
    port = free_port()
    handle = ensure_ingress(node_id, port=port, bind_host="127.0.0.1")
    info = ray.get(handle.ready.remote(), timeout=120)
    # get-or-create is idempotent: same actor, HAProxy not restarted.
    again = ensure_ingress(node_id, port=port, bind_host="127.0.0.1")
    assert again._actor_id == handle._actor_id
    assert ray.get(again.ready.remote(), timeout=30)["pid"] == info["pid"]
    assert ray.get_actor(actor_name(node_id), namespace="rayfleet")._actor_id == handle._actor_id
    yield handle, port, info
    # HAProxy must die with its actor (PR_SET_PDEATHSIG), not only on stop().
    ray.kill(handle, no_restart=True)
    eventually(lambda: not pid_alive(info["pid"]), 15, 0.1, what="the HAProxy master to die with the ingress actor")

    def leftovers():
        return [p for p in os.listdir("/proc")
                if p.isdigit() and cmdline(int(p)).find(info["config_path"]) >= 0 and pid_alive(int(p))]
    # Its workers follow the master (they notice it is gone): promptly.
    eventually(lambda: not leftovers(), 5, 0.1, what="HAProxy workers to exit after their master",
               diagnostics=lambda: f"HAProxy workers left behind: {leftovers()}")




def push(handle, table) -> dict:
    result = ray.get(handle.update.remote(RoutingTable.from_wire(table)), timeout=60)
    assert result["error"] is None, result
    return result


def dep(prefix, reps, **kw):
    return {"routePrefix": prefix, "maxConcurrency": 100, "replicas": reps, **kw}


def test_balances_across_replicas(ingress, replicas):
    handle, port, _ = ingress
    a, b = replicas.start("echo-a"), replicas.start("echo-b")
    result = push(handle, {"deployments": {"echo": dep("/echo", [a, b])}})
    assert result["changed"]
    # Same table again: no reload.
    assert push(handle, {"deployments": {"echo": dep("/echo", [b, a])}})["changed"] is False

    seen = collections.Counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for i in range(200):
            r = client.get(f"/echo/x{i}")
            assert r.status_code == 200, r.text
            assert r.json()["path"] == f"/echo/x{i}"  # path forwarded unchanged
            seen[r.json()["replica"]] += 1
    assert set(seen) == {"echo-a", "echo-b"}
    assert min(seen.values()) > 40, seen

    stats = ray.get(handle.stats.remote(), timeout=30)
    servers = stats["deployments"]["echo"]["servers"]
    assert set(servers) == {"echo-a", "echo-b"}
    assert all(s["status"] in ("UP", "no check") or s["status"].startswith("UP") for s in servers.values()), servers
    assert sum(s["total"] for s in servers.values()) >= 200


def haproxy_worker(info) -> str:
    """The pid of the HAProxy worker that serves now (a reload starts a new one)."""
    reply = cli(os.path.join(os.path.dirname(info["config_path"]), "admin.sock"), "show info")
    return re.search(r"^Pid: (\d+)$", reply, re.M).group(1)


def test_replica_changes_under_keepalive_load_drop_nothing_and_reload_nothing(ingress, replicas):
    handle, port, info = ingress
    a = {"id": "echo-a", "host": "127.0.0.1", "port": replicas.ports["echo-a"]}
    b = {"id": "echo-b", "host": "127.0.0.1", "port": replicas.ports["echo-b"]}
    c = replicas.start("echo-c")
    push(handle, {"deployments": {"echo": dep("/echo", [a, b])}})
    reloads_before = ray.get(handle.ready.remote(), timeout=30)["reloads"]

    statuses: collections.Counter = collections.Counter()
    failures: list[str] = []
    by_replica: collections.Counter = collections.Counter()
    by_worker: collections.Counter = collections.Counter()  # answers each of the 8 connections got
    stop = threading.Event()

    async def worker(i: int):
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=15) as client:
            n = 0
            while not stop.is_set() and n < 5000:
                n += 1
                # Some requests are slow so they are in flight across reloads.
                path = "/echo/slow?sleep=0.3" if (i == 0 and n % 3 == 0) else f"/echo/{i}-{n}"
                try:
                    r = await client.get(path)
                    statuses[r.status_code] += 1
                    by_worker[i] += 1
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text[:100]}")
                    else:
                        by_replica[r.json()["replica"]] += 1
                except httpx.HTTPError as e:
                    failures.append(repr(e))

    async def load():
        await asyncio.gather(*(worker(i) for i in range(8)))

    def served(since, reps, n):
        """Since the snapshot `since` (of hits, answers): each replica in `reps` answered `n` more requests,
        and each connection 2 more: the first may still be the old HAProxy worker's, the second is the new one's."""
        hits, answers = since
        return (all(replicas.hits[r["id"]] - hits.get(r["id"], 0) >= n for r in reps)
                and all(by_worker[i] - answers.get(i, 0) >= 2 for i in range(8)))

    def snapshot():
        return dict(replicas.hits), dict(by_worker)

    def load_state():
        return f"hits {dict(replicas.hits)}; answers per connection {dict(by_worker)}; failures {failures[:5]}"

    t = threading.Thread(target=lambda: asyncio.run(load()))
    start = snapshot()
    t.start()
    try:
        # Every connection is open and in keep-alive use, and the first table serves, before any update.
        eventually(lambda: served(start, [a, b], 30), 30, 0.05,
                   what="load on all 8 connections through the first table", diagnostics=load_state)
        tables = [
            [a],  # remove b
            [a, c],  # add c
            [c],  # remove a
            [a, b, c],
            [b],
        ]
        serving = haproxy_worker(info)
        applied = []
        for reps in tables:
            since = snapshot()
            applied.append(push(handle, {"deployments": {"echo": dep("/echo", reps)}}).get("via"))
            # Traffic flows through the new table (for a while) before the next one.
            eventually(lambda: served(since, reps, 30), 30, 0.05,
                       what=f"traffic through the table {[r['id'] for r in reps]}", diagnostics=load_state)
        # Replicas alone changed: each table went through the runtime API, and the same HAProxy worker
        # served throughout (a reload would have started a new one).
        assert applied == ["runtime"] * len(tables)
        assert haproxy_worker(info) == serving
        assert ray.get(handle.ready.remote(), timeout=30)["reloads"] == reloads_before
        last = snapshot()
        before = last[0]
        # Only then: b takes plenty of new requests, and a and c (asserted below) none but stragglers.
        eventually(lambda: served(last, [b], 100), 30, 0.05,
                   what="100 more requests through the last table", diagnostics=load_state)
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive()
    total = sum(statuses.values())
    assert total > 200, statuses
    assert not failures, (len(failures), failures[:10], statuses)
    assert set(by_replica) >= {"echo-a", "echo-b", "echo-c"}
    # After the last update ([b]), only b gets new traffic (old workers may finish in-flight work).
    after = dict(replicas.hits)
    assert after["echo-a"] - before["echo-a"] <= 2 and after["echo-c"] - before["echo-c"] <= 2, (before, after)
    assert after["echo-b"] > before["echo-b"]


def test_unknown_prefix_404(ingress, replicas):
    handle, port, _ = ingress
    a = {"id": "echo-a", "host": "127.0.0.1", "port": replicas.ports["echo-a"]}
    push(handle, {"deployments": {"echo": dep("/echo", [a])}})
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for path in ("/nope", "/echoes", "/"):
            r = client.get(path)
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"]
        assert client.get("/echo").status_code == 200
    # With a "/" deployment, everything unmatched goes there.
    push(handle, {"deployments": {"echo": dep("/echo", [a]), "root": dep("/", [a])}})
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert client.get("/nope").status_code == 200


def test_ready_path_only_once_it_routes(ingress, replicas):
    """The pods' readiness probe: 404 while the ingress routes nothing, 200 once it routes a deployment,
    whatever the deployments' own prefixes (a "/" deployment doesn't shadow it). A new connection each
    time, as the kubelet's probe makes."""
    handle, port, _ = ingress
    a = replicas.start("ready-a")
    url = f"http://127.0.0.1:{port}{INGRESS_READY_PATH}"
    push(handle, {"deployments": {}})
    assert httpx.get(url, timeout=10).status_code == 404
    push(handle, {"deployments": {"root": dep("/", [a])}})
    r = httpx.get(url, timeout=10)
    assert (r.status_code, r.text) == (200, "ready")


def test_empty_backend_503_quickly(ingress, replicas):
    handle, port, _ = ingress
    push(handle, {"deployments": {"empty": dep("/empty", [])}})
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        r = client.get("/empty/x")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    # the backend's own rule for no ready replica, not HAProxy's generic 503 (say, a queue timeout after 2 s)
    assert r.json() == {"deployment": "empty", "error": "no ready replicas"}


def test_a_client_that_goes_away_takes_its_request_off_the_replica(ingress, replicas):
    """HAProxy closes the replica's side of a request whose client disconnected: the handler is cancelled."""
    handle, port, _ = ingress
    a = replicas.start("gone-0")
    push(handle, {"deployments": {"gone": dep("/gone", [a])}})
    eventually(lambda: httpx.get(f"http://127.0.0.1:{port}/gone/up", timeout=5).status_code == 200, 30, 0.1,
               what="the ingress to route /gone")
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET /gone/x?sleep=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    eventually(lambda: replicas.hits["gone-0"] >= 2, 10, 0.05, what="the request to reach the replica")
    sock.close()
    eventually(lambda: replicas.cancelled["gone-0"] == 1, 10, 0.05, what="the replica's handler to be cancelled")


def test_a_body_over_the_limit_is_refused_on_its_headers(ingress, replicas):
    handle, port, _ = ingress
    a = replicas.start("body-0")
    push(handle, {"deployments": {"body": dep("/body", [a], maxRequestBodyBytes=1000)}})
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        eventually(lambda: client.get("/body/up").status_code == 200, 30, 0.1, what="the ingress to route /body")
        before = replicas.hits["body-0"]
        assert client.post("/body/x", content=b"x" * 1000).status_code == 200
        r = client.post("/body/x", content=b"x" * 1001)
        assert r.status_code == 413 and r.json()["maxRequestBodyBytes"] == 1000, r.text
        assert replicas.hits["body-0"] - before == 1  # the refused one never reached the replica


def test_handler_503_is_retried_only_when_idempotent_and_client_xff_is_replaced(ingress, replicas):
    handle, port, _ = ingress
    a, b = replicas.start("retry-a"), replicas.start("retry-b")
    push(handle, {"deployments": {"retry": dep("/retry", [a, b])}})
    hits = lambda: replicas.hits["retry-a"] + replicas.hits["retry-b"]  # noqa: E731
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        eventually(lambda: client.get("/retry/up").status_code == 200, 30, 0.1, what="the ingress to route /retry")
        before = hits()
        assert client.post("/retry/order?status=503", content=b"{}").status_code == 503
        assert hits() - before == 1  # a handler's own 503: a POST is never run a second time
        before = hits()
        assert client.get("/retry/page?status=503").status_code == 503
        assert hits() - before == 3  # a GET is retried (retries 2) on the other replica
        seen = client.get("/retry/who", headers={"X-Forwarded-For": "6.6.6.6"}).json()["xff"]
        assert seen == ["127.0.0.1"], seen  # the ingress says who the client is
        # A replica that dies mid-request: a GET is re-sent to the other one, a POST is not.
        dropped = replicas.hits["retry-a"]
        assert {client.get(f"/retry/g{i}?drop=retry-a").status_code for i in range(12)} == {200}
        assert replicas.hits["retry-a"] > dropped  # some did land on the dying one first
        before = hits()
        try:
            status = client.post("/retry/p?drop=all", content=b"{}").status_code
        except httpx.RemoteProtocolError:  # HAProxy may close the client's connection rather than say 502
            status = None
        assert status in (502, None) and hits() - before == 1  # the POST reached one replica, once


def test_saturated_replica_sheds_load_quickly(ingress, replicas):
    handle, port, _ = ingress
    s = replicas.start("slow-0")
    push(
        handle,
        {"deployments": {"slow": {"routePrefix": "/slow", "maxConcurrency": 1, "queueTimeoutSeconds": 0.5, "replicas": [s]}}},
    )

    retry_after = []

    async def one(client):
        t0 = time.monotonic()
        r = await client.get("/slow/x?sleep=2")
        if r.status_code == 503:
            retry_after.append(r.headers.get("Retry-After"))
        return r.status_code, time.monotonic() - t0

    async def flood():
        limits = httpx.Limits(max_connections=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=15) as client:
            return await asyncio.gather(*(one(client) for _ in range(20)))

    results = asyncio.run(flood())
    ok = [d for code, d in results if code == 200]
    shed = [d for code, d in results if code == 503]
    assert len(ok) >= 1 and len(ok) + len(shed) == len(results), results
    assert len(shed) >= 17, results
    assert all(r == "1" for r in retry_after), retry_after
    # Shed requests fail fast (queue bound, or the 0.5s queue timeout), never hang.
    assert max(shed) < 1.5, results
    assert replicas.hits["slow-0"] <= 2


def test_stop_kills_haproxy(ray_cluster, replicas):
    from rayfleet_runtime.ingress.actor import IngressManager

    port = free_port()
    h = IngressManager.options(num_cpus=0).remote(port=port, bind_host="127.0.0.1")
    info = ray.get(h.ready.remote(), timeout=60)
    assert pid_alive(info["pid"])
    ray.get(h.stop.remote(), timeout=30)
    assert not pid_alive(info["pid"])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    ray.kill(h, no_restart=True)


def test_invalid_config_keeps_running_one(replicas, tmp_path):
    """No Ray: the Ingress class directly. A config haproxy -c rejects is not applied."""
    from rayfleet_runtime.ingress.actor import Ingress

    port = free_port()
    ing = Ingress(port=port, bind_host="127.0.0.1", workdir=str(tmp_path / "ing"), nbthread=1)
    try:
        a = replicas.start("inv-a")
        asyncio.run(ing.ready())
        assert asyncio.run(ing.update(RoutingTable.from_wire({"deployments": {"x": dep("/x", [a])}})))["changed"]
        good = ing._config
        ing._render = lambda table: good + "\nbackend broken\n    this-is-not-a-keyword\n"
        result = asyncio.run(ing.update(RoutingTable.from_wire({"deployments": {"x": dep("/x", [])}})))
        assert result["applied"] is False and "this-is-not-a-keyword" in result["error"]
        assert ing._config == good
        with open(ing.cfg_path) as f:
            assert f.read() == good
        r = httpx.get(f"http://127.0.0.1:{port}/x/1", timeout=10)
        assert r.status_code == 200 and r.json()["replica"] == "inv-a"
    finally:
        pid = ing._haproxy.pid
        ing._haproxy.terminate(1)
    assert not pid_alive(pid)


def test_actor_crash_kills_haproxy_and_restart_restores_table(ray_cluster, replicas):
    import signal

    from rayfleet_runtime.ingress.actor import IngressManager

    port = free_port()
    a = replicas.start("crash-a")
    h = IngressManager.options(num_cpus=0).remote(port=port, bind_host="127.0.0.1")
    try:
        info = ray.get(h.ready.remote(), timeout=60)
        push(h, {"deployments": {"c": dep("/c", [a])}})
        os.kill(info["actor_pid"], signal.SIGKILL)  # the actor's process dies abruptly
        eventually(lambda: not pid_alive(info["pid"]), 15, 0.1, what="HAProxy to die with its actor process")
        # Ray restarts the actor (max_restarts=-1); it serves the last table until the next push.
        # Calls made while Ray restarts the actor fail; callers retry.
        info2 = eventually(lambda: ray.get(h.ready.remote(), timeout=60), 120, 0.5, what="Ray to restart the ingress actor",
                           ignoring=(ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError))
        assert info2["actor_pid"] != info["actor_pid"] and info2["pid"] != info["pid"]
        r = httpx.get(f"http://127.0.0.1:{port}/c/1", timeout=10)
        assert r.status_code == 200 and r.json()["replica"] == "crash-a"
    finally:
        try:
            ray.get(h.stop.remote(), timeout=30)
        finally:
            ray.kill(h, no_restart=True)


def test_a_killed_haproxy_worker_is_replaced_and_new_clients_wait_instead_of_being_refused(ingress, replicas):
    handle, port, _ = ingress
    a = replicas.start("phoenix-0")
    push(handle, {"deployments": {"phoenix": dep("/phoenix", [a])}})
    url = f"http://127.0.0.1:{port}/phoenix/x"
    eventually(lambda: httpx.get(url, timeout=5).status_code == 200, 30, 0.1, what="the ingress to route /phoenix")
    master = ray.get(handle.ready.remote(), timeout=30)["pid"]
    workers = [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if pid_alive(p) and ppid(p) == master]
    assert workers, "no HAProxy worker under the master"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # the master exits with it; the ingress starts a new one
    # Connecting right away, while no HAProxy runs: held in the ingress's listen backlog, then served.
    codes = [httpx.get(url, timeout=15).status_code for _ in range(5)]
    assert codes == [200] * 5, codes
    info = ray.get(handle.ready.remote(), timeout=30)
    assert info["pid"] != master and info["restarts"] >= 1, info

