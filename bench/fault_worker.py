"""One system's fault scenarios, in its own process and its own fresh local Ray: ``python -m bench.fault_worker``.

``bench.faults`` starts one of these per system (as ``bench.run`` starts ``bench.worker``), collects the
JSON it writes and builds the tables. Every scenario deploys ``bench.handlers:Faulty`` under the
scenario's name, puts wrk on it, injects its fault ``--fault-at`` seconds into the load, measures
recovery by polling, and deletes the deployment again. By hand:
``python -m bench.fault_worker --system rayfleet --scenarios kill-replica --duration 6 --fault-at 2 --out r.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import http.client
import json
import os
import select
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import ray

from bench.processes import haproxy_procs, mem_kib
from bench.systems import RAYFLEET_MAX_CONCURRENCY, REPLICAS, Rayfleet, Serve, wait_serving
from bench.wrk import run_wrk
from rayfleet.procs import Leftovers, cmdline, descendants
from rayfleet_api.constants import CONTROLLER_NAME, RAY_NAMESPACE
from rayfleet_api.controller_client import ControllerUnreachable
from rayfleet_api.desired import ActorOptions, DesiredState
from rayfleet_api.states import DeploymentStatus, ReplicaState

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("rayfleet", "serve-default", "serve-haproxy")
SCENARIOS = ("kill-replica", "kill-proxy", "rollout-spare", "rollout-full", "scale-down", "scale-up",
             "idle-keepalive-rollout", "idle-keepalive-scaledown", "kill-controller", "slow-clients",
             "oversized-body", "blocking-handler")
CLUSTER_CPUS = 8  # the local Ray's logical CPUs: rollout-full's two replicas ask for half each
RECOVERY_DEADLINE_S = 60.0  # past this a scenario's recovery counts as "never"
POLL_S = 0.1
HOST = "127.0.0.1"

POST_CLIENTS = 4  # concurrent POSTers in kill-replica (each POST stays in flight bench.handlers.POST_S)
IDLE_CLIENTS = 20  # keep-alive connections left idle across a rollout / scale-down
IDLE_STEP_S = 0.4  # client i sends again (i + 1) x this after the change: before, during and after the reload
SLOWLORIS = 200  # connections sending their headers one byte at a time
SLOWLORIS_BYTE_EVERY_S = 0.5
SLOW_POSTS = 20  # connections sending a 1 MiB body at ~10 KiB/s
SLOW_POST_BYTES = 1 << 20
SLOW_POST_PIECE, SLOW_POST_EVERY_S = 1024, 0.1  # 1 KiB per 0.1 s = 10 KiB/s
BIG_BODY = 100 << 20  # declared by the Content-Length uploads: over any sane limit
BIG_CHUNKED_BODY = (64 << 20) + 1  # chunked uploads: one byte over the replica's current hard cap (64 MiB)
BIG_UPLOADS, BIG_CHUNKED_UPLOADS, UPLOAD_PARALLEL = 20, 5, 5
UPLOAD_PIECE = 64 << 10


@dataclass(frozen=True)
class Spec:
    """What a scenario deploys."""

    replicas: int = REPLICAS
    num_cpus: float = 1
    version: str = "v1"  # reaches the replicas as $BENCH_VERSION: a new one is a rollout (new processes)


@dataclass(frozen=True)
class Snapshot:
    """A deployment as its system reports it."""

    ready: frozenset[int]  # pids of replicas serving the desired version
    settled: bool  # the system says it is done converging
    message: str  # its status in words, for "never recovered" notes


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it no longer holds a socket)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def kill9(pid: int) -> None:
    """SIGKILL and wait until it is gone, so polling for recovery never sees the victim still answering."""
    os.kill(pid, signal.SIGKILL)
    while not gone(pid):
        time.sleep(0.01)


def proxy_pid(candidates: set[int]) -> tuple[int, str] | None:
    """The process that holds client connections: HAProxy's worker (master-worker mode: its parent is the
    master), or the only HAProxy (Serve runs one process, ``-db``), or else Serve's Python ProxyActor."""
    haproxies = {p["pid"] for p in haproxy_procs(candidates)}
    workers = [p for p in haproxies if _ppid(p) in haproxies]
    if workers:
        worker = max(workers)
        return worker, f"haproxy worker (master pid {_ppid(worker)})"
    if haproxies:
        return max(haproxies), "haproxy (single process)"
    proxies = [p for p in candidates if cmdline(p).startswith("ray::ProxyActor")]
    return (max(proxies), "Serve ProxyActor") if proxies else None


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------- systems

class FleetFaults(Rayfleet):
    def __init__(self, record_dir: str):
        self.record_dir = record_dir

    def apply(self, name: str, spec: Spec) -> None:
        """Send the desired state and return at once (a rollout or scale is then under way)."""
        self.api.put_deployment(name, DesiredState(
            handler="bench.handlers:Faulty", handler_args={"record_dir": self.record_dir}, replicas=spec.replicas,
            route_prefix=f"/{name}", max_concurrency=RAYFLEET_MAX_CONCURRENCY,
            ray_actor_options=ActorOptions(num_cpus=spec.num_cpus), env={"BENCH_VERSION": spec.version}))

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ingress_port}/{name}"

    def snapshot(self, name: str) -> Snapshot:
        obs = self.api.get_deployment(name) or {}
        reps = obs.get("replicas", [])
        ready = frozenset(r["pid"] for r in reps
                          if r.get("state") == ReplicaState.READY and r.get("version") == obs.get("version") and r.get("pid"))
        why = sorted({r["lastError"] for r in reps if r.get("lastError")})
        if obs.get("error"):
            why.insert(0, obs["error"].get("message", ""))
        return Snapshot(ready, obs.get("status") == DeploymentStatus.RUNNING,
                        f"{obs.get('status')}, {obs.get('readyReplicas')}/{obs.get('targetReplicas')} ready"
                        + (f": {'; '.join(why)}" if why else ""))

    def controller_pid(self) -> int:
        handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
        return ray.get(handle.ready.remote(), timeout=10)["pid"]

    def controller_answers(self, name: str) -> bool:
        try:
            return self.api.get_deployment(name) is not None
        except ControllerUnreachable:
            return False


class ServeFaults(Serve):
    def __init__(self, mode: str, record_dir: str):
        super().__init__(mode)
        self.record_dir = record_dir

    def apply(self, name: str, spec: Spec) -> None:
        from bench.serve_app import faulty_app

        self.serve._run(faulty_app(spec.replicas, self.max_ongoing, spec.num_cpus, spec.version, self.record_dir),
                        _blocking=False, name=name, route_prefix=f"/{name}")

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.port}/{name}"

    def _controller(self) -> Any:
        from ray.serve.context import _get_global_client

        return _get_global_client()._controller

    def snapshot(self, name: str) -> Snapshot:
        details = ray.get(self._controller().get_serve_instance_details.remote(), timeout=10)
        app = details.get("applications", {}).get(name)
        dep = (app or {}).get("deployments", {}).get("FaultyHandler")
        if not dep:
            return Snapshot(frozenset(), False, f"app {app and app.get('status')}, no deployment yet")
        ready = frozenset(r["pid"] for r in dep["replicas"] if r["state"] == "RUNNING" and r.get("pid"))
        states = collections.Counter(_plain(r["state"]) for r in dep["replicas"])
        msg = f"app {_plain(app['status'])}, deployment {_plain(dep['status'])}, replicas {dict(states)}"
        return Snapshot(ready, app["status"] == "RUNNING" and dep["status"] == "HEALTHY",
                        msg + (f": {dep['message']}" if dep.get("message") else ""))

    def controller_pid(self) -> int:
        return next(p for p in descendants(os.getpid()) if cmdline(p).startswith("ray::ServeController"))

    def controller_answers(self, name: str) -> bool:
        try:
            ray.get(self._controller().get_serve_instance_details.remote(), timeout=2)
            return True
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return False


def _plain(value: Any) -> str:
    """Serve's status enums as their bare value ("RUNNING", not "<ReplicaState.RUNNING: 'RUNNING'>")."""
    return str(getattr(value, "value", value))


def launch(system: Any, name: str, spec: Spec) -> str:
    """Deploy, wait until every replica is ready and the route answers; returns the URL."""
    wait_for_cpus(spec.replicas * spec.num_cpus)
    system.apply(name, spec)
    if poll_until(lambda: converged(system, name, spec.replicas), time.monotonic(), 180) is None:
        raise TimeoutError(f"{name}: not ready after 180 s: {system.snapshot(name).message}")
    url = system.url(name)
    wait_serving(url)
    return url


def converged(system: Any, name: str, replicas: int, old: frozenset[int] = frozenset()) -> bool:
    """The system calls the deployment converged, with exactly ``replicas`` ready, none of them an ``old`` pid."""
    snap = system.snapshot(name)
    return snap.settled and len(snap.ready) == replicas and snap.ready.isdisjoint(old)


def wait_for_cpus(needed: float, timeout_s: float = 90) -> None:
    """Serve replicas of an earlier scenario take ~30 s to exit after their app is deleted and hold their
    CPUs until then: a scenario that needs the whole cluster waits for them rather than failing to place."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < needed and time.monotonic() < deadline:
        time.sleep(0.5)


# ---------------------------------------------------------------- measuring

def poll_until(pred: Callable[[], bool], since: float, deadline_s: float = RECOVERY_DEADLINE_S) -> float | None:
    """Seconds from ``since`` until ``pred()`` first holds (an exception counts as not yet); None past the deadline."""
    while time.monotonic() - since < deadline_s:
        try:
            if pred():
                return time.monotonic() - since
        except Exception:  # noqa: BLE001 - a controller that is down or busy just means "not yet"
            pass
        time.sleep(POLL_S)
    return None


def serving_again(url: str, since: float, streak: int = 5) -> tuple[float | None, int]:
    """(seconds from ``since`` to the first of ``streak`` successful GETs in a row, failed probes): one GET
    on a fresh connection every 50 ms, so one lucky request doesn't count as recovered."""
    first_ok, ok, failed = None, 0, 0
    while time.monotonic() - since < RECOVERY_DEADLINE_S:
        t = time.monotonic()
        if _get_ok(url):
            first_ok = t if ok == 0 else first_ok
            ok += 1
            if ok >= streak:
                return first_ok - since, failed
        else:
            ok, failed = 0, failed + 1
        time.sleep(0.05)
    return None, failed


def _get_ok(url: str) -> bool:
    host, port, path = split_url(url)
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return 200 <= resp.status < 300
    except OSError:
        return False
    finally:
        conn.close()


def split_url(url: str) -> tuple[str, int, str]:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    return host, int(port), "/" + path


class Load:
    """wrk on ``url`` in a thread, for the scenario's whole duration."""

    def __init__(self, url: str, conns: int, duration: float):
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(url, conns, duration), daemon=True)
        self._thread.start()

    def _run(self, url: str, conns: int, duration: float) -> None:
        try:
            self.result = run_wrk(url, conns, duration)
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}"

    def join(self) -> dict[str, Any]:
        self._thread.join()
        if self.result is None:
            raise RuntimeError(f"wrk: {self.error}")
        return self.result


@dataclass
class Ctx:
    """One scenario run: the system, its deployment, and when the fault is due."""

    system: Any
    name: str
    url: str
    spec: Spec
    fault_at: float  # time.monotonic() of the injection
    end_at: float  # when wrk stops
    record_dir: Path

    def wait_fault(self) -> float:
        time.sleep(max(0.0, self.fault_at - time.monotonic()))
        return time.monotonic()

    def snapshot(self) -> Snapshot:
        return self.system.snapshot(self.name)


def outcome(recovery: float | None, ctx: Ctx, extra: dict[str, Any] | None = None, **details: Any) -> dict[str, Any]:
    """A scenario's result: recovery seconds (or never, with the status at the deadline), its extra table
    columns, and details for the JSON only."""
    res: dict[str, Any] = {"recovery_s": None if recovery is None else round(recovery, 2), "extra": extra or {},
                           **details}
    if recovery is None:
        res["never"] = f"not within {RECOVERY_DEADLINE_S:.0f} s: {ctx.snapshot().message}"
    return res


# ---------------------------------------------------------------- scenarios

def kill_replica(ctx: Ctx) -> dict[str, Any]:
    before = ctx.snapshot().ready
    victim = min(before)
    with PostClients(ctx.url + "/post", ctx.name) as posts:
        t = ctx.wait_fault()
        kill9(victim)
        rec = poll_until(lambda: converged(ctx.system, ctx.name, ctx.spec.replicas, frozenset([victim])), t)
        time.sleep(1)  # POSTs sent once the new replica is up also count
    post = posts.verdict(ctx.record_dir)
    return outcome(rec, ctx, {"POSTs sent": post["sent"], "POSTs failed": _counts_of(post["failed_kinds"]),
                              "POSTs executed twice": post["twice"], "failed POSTs that ran once": post["failed_but_ran"]},
                   posts=post)


def kill_proxy(ctx: Ctx) -> dict[str, Any]:
    found = proxy_pid(descendants(os.getpid()))
    if found is None:
        raise RuntimeError("no proxy process found")
    pid, kind = found
    t = ctx.wait_fault()
    kill9(pid)
    rec, failed_probes = serving_again(ctx.url, t)
    after = proxy_pid(descendants(os.getpid()))
    return outcome(rec, ctx, {"killed": f"{kind} pid {pid}", "failed probes": failed_probes,
                              "proxy after": f"{after[1]} pid {after[0]}" if after else "none"})


def rollout(ctx: Ctx) -> dict[str, Any]:
    before = ctx.snapshot().ready
    t = ctx.wait_fault()
    ctx.system.apply(ctx.name, replace(ctx.spec, version="v2"))
    rec = poll_until(lambda: converged(ctx.system, ctx.name, ctx.spec.replicas, before), t)
    return outcome(rec, ctx)


def scale_to(replicas: int) -> Callable[[Ctx], dict[str, Any]]:
    def scale(ctx: Ctx) -> dict[str, Any]:
        t = ctx.wait_fault()
        ctx.system.apply(ctx.name, replace(ctx.spec, replicas=replicas))
        # Serving the new count comes before converging: a scale-down's extra replicas drain (Serve's for
        # at least RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S in HAProxy mode) before it is done.
        serving = poll_until(lambda: len(ctx.snapshot().ready) == replicas, t)
        rec = poll_until(lambda: converged(ctx.system, ctx.name, replicas), t)
        return outcome(rec, ctx, {f"{replicas} ready s": "never" if serving is None else f"{serving:.2f}"})

    return scale


def idle_keepalive(change: Callable[[Spec], Spec]) -> Callable[[Ctx], dict[str, Any]]:
    def scenario(ctx: Ctx) -> dict[str, Any]:
        host, port, path = split_url(ctx.url)
        ctx.wait_fault()
        conns = [http.client.HTTPConnection(host, port, timeout=10) for _ in range(IDLE_CLIENTS)]
        first = collections.Counter(_request(c, path) for c in conns)
        new = change(ctx.spec)
        # a rollout is done once no old process serves; a scale-down keeps some old ones
        before = ctx.snapshot().ready if new.version != ctx.spec.version else frozenset()
        t = time.monotonic()
        ctx.system.apply(ctx.name, new)

        def staggered() -> list[str]:  # each connection idle a little longer: the whole change is covered
            out = []
            for i, conn in enumerate(conns):
                time.sleep(max(0.0, t + (i + 1) * IDLE_STEP_S - time.monotonic()))
                out.append(_idle_then_request(conn, path))
            return out

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sending = pool.submit(staggered)
            rec = poll_until(lambda: converged(ctx.system, ctx.name, new.replicas, before), t)
            second = sending.result()
        for c in conns:
            c.close()
        failed = sum(1 for what in second if what not in ("200", "closed while idle"))
        idle_s = f"{IDLE_STEP_S:g}-{IDLE_STEP_S * len(conns):g}"
        return outcome(rec, ctx, {"idle s": idle_s, "failed after idle": failed,
                                  "second request": _counts_of(collections.Counter(second))},
                       first_request=dict(first), second_by_client=second)

    return scenario


def _request(conn: http.client.HTTPConnection, path: str) -> str:
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    if 200 <= resp.status < 300:
        return str(resp.status)
    # who answered an error tells its cause apart: the proxy's own page, or the replica's
    return f"{resp.status} {resp.getheader('Server', '')} {body[:60].decode(errors='replace').strip()!r}"


def _idle_then_request(conn: http.client.HTTPConnection, path: str) -> str:
    """The second request on an idle keep-alive connection. One the server closed while it sat idle (FIN
    already here) is told apart: every HTTP client expects that and reconnects; an error on a connection
    that looked open, or a non-2xx, is what a client can't tell from a failed request."""
    sock = conn.sock
    if sock is not None and select.select([sock], [], [], 0)[0]:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                return "closed while idle"
        except OSError:
            return "closed while idle"
    return _request(conn, path)


def _counts_of(counts: dict[str, int]) -> str:
    """``{"502": 2, "RemoteDisconnected": 1}`` -> ``"3 (502 x2, RemoteDisconnected x1)"``."""
    total = sum(counts.values())
    return f"{total} (" + ", ".join(f"{what} x{n}" for what, n in collections.Counter(counts).most_common()) + ")" \
        if total else "0"


def kill_controller(ctx: Ctx) -> dict[str, Any]:
    before = ctx.snapshot().ready
    pid = ctx.system.controller_pid()
    t = ctx.wait_fault()
    kill9(pid)
    rec = poll_until(lambda: ctx.system.controller_answers(ctx.name), t)
    kept = poll_until(lambda: ctx.snapshot().ready == before, time.monotonic(), 10) is not None
    return outcome(rec, ctx, {"new controller pid": ctx.system.controller_pid() != pid, "replicas kept": kept})


def slow_clients(ctx: Ctx) -> dict[str, Any]:
    host, port, path = split_url(ctx.url)
    ctx.wait_fault()
    loris, posts = asyncio.run(_slow_clients(host, port, path, ctx.end_at))
    return {"recovery_s": "n/a", "extra": {"slowloris (200)": _summary(loris), "slow 1 MiB POSTs (20)": _summary(posts)}}


async def _slow_clients(host: str, port: int, path: str, until: float) -> tuple[list, list]:
    head = f"GET {path} HTTP/1.1\r\nHost: bench\r\nX-Slow: ".encode()
    post_head = (f"POST {path}/upload HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Length: {SLOW_POST_BYTES}\r\n\r\n").encode()
    loris = [_trickle(host, port, head, b"a", SLOWLORIS_BYTE_EVERY_S, until) for _ in range(SLOWLORIS)]
    posts = [_trickle(host, port, post_head, b"x" * SLOW_POST_PIECE, SLOW_POST_EVERY_S, until,
                      limit=len(post_head) + SLOW_POST_BYTES) for _ in range(SLOW_POSTS)]
    res = await asyncio.gather(*loris, *posts)
    return res[:SLOWLORIS], res[SLOWLORIS:]


async def _trickle(host: str, port: int, head: bytes, piece: bytes, every: float, until: float,
                   limit: int | None = None) -> tuple[str, float]:
    """Send ``head``, then ``piece`` every ``every`` s until the server answers or closes, ``limit`` bytes
    are sent, or time is up; returns (what happened, seconds after connecting)."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return f"connect {type(exc).__name__}", 0.0
    answer = asyncio.ensure_future(reader.read(200))
    sent, data = 0, head
    what = "still open at the end"
    try:
        while time.monotonic() < until and not answer.done():
            if limit is None or sent < limit:
                writer.write(data)
                await writer.drain()
                sent += len(data)
                data = piece
            await asyncio.wait([answer], timeout=every)
    except OSError as exc:
        what = f"send {type(exc).__name__}"
    if answer.done():
        try:
            got = answer.result()
            what = got.split(b"\r\n", 1)[0].decode(errors="replace") if got else "closed without an answer"
        except OSError as exc:
            what = f"read {type(exc).__name__}"
    else:
        answer.cancel()
    writer.close()
    return what, time.monotonic() - t0


def _summary(results: list[tuple[str, float]]) -> str:
    by: dict[str, list[float]] = collections.defaultdict(list)
    for what, secs in results:
        by[what].append(secs)
    return "; ".join(f"{len(ts)} {what}" + ("" if what == "still open at the end" else f" after ~{statistics.median(ts):.1f} s")
                     for what, ts in sorted(by.items(), key=lambda kv: -len(kv[1])))


def oversized_body(ctx: Ctx) -> dict[str, Any]:
    host, port, path = split_url(ctx.url)
    ctx.wait_fault()
    rss_before = _replica_rss_mib(ctx)
    jobs = [(BIG_BODY, False)] * BIG_UPLOADS + [(BIG_CHUNKED_BODY, True)] * BIG_CHUNKED_UPLOADS
    with concurrent.futures.ThreadPoolExecutor(UPLOAD_PARALLEL) as pool:
        results = list(pool.map(lambda job: _upload(host, port, path + "/upload", *job), jobs))
    rss_after = _replica_rss_mib(ctx)
    plain, chunked = results[:BIG_UPLOADS], results[BIG_UPLOADS:]
    return {"recovery_s": "n/a", "extra": {
        "100 MiB Content-Length (20)": _upload_summary(plain), "64 MiB+1 chunked (5)": _upload_summary(chunked),
        "replica RSS MiB before/after": f"{rss_before} / {rss_after}"}, "uploads": results}


def _replica_rss_mib(ctx: Ctx) -> str:
    mems = [mem_kib(p) for p in sorted(ctx.snapshot().ready)]
    return ", ".join(f"{m['Rss'] / 1024:.0f}" if m else "?" for m in mems)


def _upload(host: str, port: int, path: str, size: int, chunked: bool) -> dict[str, Any]:
    """One big POST; stops sending as soon as the server answers (a 413 before the body is read) or stalls."""
    t0 = time.monotonic()
    sent, status = 0, ""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    piece = b"x" * UPLOAD_PIECE
    try:
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                      f"{framing}\r\n\r\n".encode())
            try:
                while sent < size:
                    readable, writable, _ = select.select([s], [s], [], 10)
                    if readable or not writable:
                        break  # answered early, or stalled for 10 s: read whatever it says
                    n = min(UPLOAD_PIECE, size - sent)
                    s.sendall(f"{n:x}\r\n".encode() + piece[:n] + b"\r\n" if chunked else piece[:n])
                    sent += n
                if chunked and sent == size:
                    s.sendall(b"0\r\n\r\n")
            except OSError as exc:  # the server answered and closed while we sent: its answer may be here
                status = f"send {type(exc).__name__}"
            line = s.makefile("rb").readline(200)
            if len(line.split()) > 1:
                status = line.split()[1].decode()
            status = status or "closed without an answer"
    except OSError as exc:
        status = f"{status + ', ' if status else ''}read {type(exc).__name__}"
    return {"status": status, "answer_s": round(time.monotonic() - t0, 2), "sent_mib": round(sent / 2**20, 1)}


def _upload_summary(results: list[dict[str, Any]]) -> str:
    by: dict[str, list[dict]] = collections.defaultdict(list)
    for r in results:
        by[str(r["status"])].append(r)
    return "; ".join(f"{what} x{len(rs)} in ~{statistics.median(r['answer_s'] for r in rs):.2f} s after "
                     f"~{statistics.median(r['sent_mib'] for r in rs):.0f} MiB sent" for what, rs in by.items())


def blocking_handler(ctx: Ctx) -> dict[str, Any]:
    ctx.wait_fault()
    t = time.monotonic()
    host, port, path = split_url(ctx.url)
    status = _request(http.client.HTTPConnection(host, port, timeout=30), path + "/block")
    return {"recovery_s": "n/a", "extra": {"/block answer": f"{status} in {time.monotonic() - t:.1f} s"}}


class PostClients:
    """``POST_CLIENTS`` threads, each POSTing one unique id after the other on a keep-alive connection
    (reconnecting after an error), to count failures and double executions around a replica kill."""

    def __init__(self, url: str, prefix: str):
        self.host, self.port, self.path = split_url(url)
        self.prefix = prefix
        self.results: dict[str, str] = {}  # id -> status or error type
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(POST_CLIENTS)]

    def __enter__(self) -> "PostClients":
        for th in self._threads:
            th.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for th in self._threads:
            th.join()

    def _run(self, worker: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        seq = 0
        while not self._stop.is_set():
            request_id = f"{self.prefix}-{worker}-{seq}"
            seq += 1
            try:
                conn.request("POST", f"{self.path}?id={request_id}", body=b"x")
                resp = conn.getresponse()
                resp.read()
                self.results[request_id] = str(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                self.results[request_id] = type(exc).__name__
                conn.close()  # http.client reconnects on the next request

    def verdict(self, record_dir: Path) -> dict[str, Any]:
        """Join what the clients saw with what the replicas recorded."""
        runs: collections.Counter = collections.Counter()
        for log in record_dir.glob("*.log"):
            runs.update(line for line in log.read_text().splitlines() if line.startswith(self.prefix + "-"))
        failed = {i: r for i, r in self.results.items() if not r.startswith("2")}
        return {"sent": len(self.results), "failed": len(failed),
                "failed_kinds": dict(collections.Counter(failed.values())),
                "twice": sum(1 for i in self.results if runs[i] > 1),
                "failed_but_ran": sum(1 for i in failed if runs[i] == 1),
                "ok_but_never_ran": sum(1 for i, r in self.results.items() if r.startswith("2") and runs[i] == 0)}


@dataclass(frozen=True)
class Scenario:
    run: Callable[[Ctx], dict[str, Any]]
    spec: Spec = Spec()
    what: str = ""


SCENARIO_DEFS: dict[str, Scenario] = {
    "kill-replica": Scenario(kill_replica, what="kill -9 one replica process; POSTs with unique ids alongside"),
    "kill-proxy": Scenario(kill_proxy, what="kill -9 the proxy process that holds the client connections"),
    "rollout-spare": Scenario(rollout, what="new version (env) with spare CPUs for surge replicas"),
    "rollout-full": Scenario(rollout, Spec(num_cpus=CLUSTER_CPUS / REPLICAS),
                             what=f"new version, each replica asks for {CLUSTER_CPUS // REPLICAS} of the "
                                  f"{CLUSTER_CPUS} CPUs: no room for a surge replica"),
    "scale-down": Scenario(scale_to(1), Spec(replicas=3), what="3 -> 1 replicas"),
    "scale-up": Scenario(scale_to(3), Spec(replicas=1), what="1 -> 3 replicas"),
    "idle-keepalive-rollout": Scenario(idle_keepalive(lambda s: replace(s, version="v2")), Spec(replicas=1),
                                       what=f"{IDLE_CLIENTS} idle keep-alive clients across a rollout (1 replica)"),
    "idle-keepalive-scaledown": Scenario(idle_keepalive(lambda s: replace(s, replicas=1)), Spec(replicas=3),
                                         what=f"{IDLE_CLIENTS} idle keep-alive clients across a 3 -> 1 scale-down"),
    "kill-controller": Scenario(kill_controller, what="kill -9 the controller actor's process"),
    "slow-clients": Scenario(slow_clients, what=f"{SLOWLORIS} slowloris + {SLOW_POSTS} slow 1 MiB POSTs alongside"),
    "oversized-body": Scenario(oversized_body, what="20 x 100 MiB (Content-Length) + 5 x 64 MiB+1 chunked POSTs"),
    "blocking-handler": Scenario(blocking_handler, what="one request blocks its replica's event loop for 3 s"),
}
assert tuple(SCENARIO_DEFS) == SCENARIOS


def run_scenario(system: Any, sid: str, conns: int, duration: float, fault_at: float,
                 record_dir: Path) -> dict[str, Any]:
    sc = SCENARIO_DEFS[sid]
    url = launch(system, sid, sc.spec)
    load = Load(url, conns, duration)
    ctx = Ctx(system, sid, url, sc.spec, load.started + fault_at, load.started + duration, record_dir)
    try:
        res = sc.run(ctx)
    finally:
        wrk = load.join()
    res["wrk"] = wrk
    system.undeploy(sid)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fault_worker")
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--fault-at", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[{args.system}] {msg}", file=sys.stderr, flush=True)

    pythonpath = os.pathsep.join(dict.fromkeys([str(REPO)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    os.environ["PYTHONPATH"] = pythonpath
    record_dir = Path(tempfile.mkdtemp(prefix="rayfleet-faults-"))
    system = FleetFaults(str(record_dir)) if args.system == "rayfleet" else ServeFaults(args.system, str(record_dir))
    out: dict[str, Any] = {"system": args.system, "results": {}}
    t0 = time.monotonic()
    ray.init(address="local", num_cpus=CLUSTER_CPUS, include_dashboard=False, _node_ip_address=HOST,
             namespace=RAY_NAMESPACE if args.system == "rayfleet" else "bench-serve", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    leftovers = Leftovers()
    try:
        system.start()
        for sid in [s for s in args.scenarios.split(",") if s]:
            log(f"{sid}: {SCENARIO_DEFS[sid].what}")
            try:
                res = run_scenario(system, sid, args.conns, args.duration, args.fault_at, record_dir)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others' results
                res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                log(res["traceback"])
            leftovers.note()  # a HAProxy restarted by a kill is reparented when its actor goes: note it now
            out["results"][sid] = res
            log(f"{sid}: {json.dumps({k: v for k, v in res.items() if k != 'traceback'}, default=str)[:600]}")
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"
        log(traceback.format_exc())
    finally:
        out["wall_s"] = round(time.monotonic() - t0, 1)
        leftovers.note()
        ray.shutdown()
        leftovers.kill()
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    return 1 if out.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
