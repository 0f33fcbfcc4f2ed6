"""The fault scenarios ``bench.faults`` runs on each system: each deploys ``bench.handlers:Faulty`` under its
name, puts wrk on it, injects its fault ``--fault-at`` seconds into the load, measures recovery by polling,
and deletes the deployment again."""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import http.client
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import ray

from bench.fault_systems import Snapshot, Spec, converged
from bench.hostile_clients import (SLOW_POSTS, SLOWLORIS, PostClients, get_after_idle, get_answer, oversized_uploads,
                                   slowloris_and_slow_posts, split_url, trickle_summary, upload_summary)
from bench.processes import kill9, mem_kib, proxy_pid
from bench.systems import CLUSTER_CPUS, REPLICAS, wait_serving
from bench.wrk import run_wrk
from rayfleet.procs import descendants

SCENARIOS = ("kill-replica", "kill-proxy", "rollout-spare", "rollout-full", "scale-down", "scale-up",
             "idle-keepalive-rollout", "idle-keepalive-scaledown", "kill-controller", "slow-clients",
             "oversized-body", "blocking-handler")
RECOVERY_DEADLINE_S = 60.0  # past this a scenario's recovery counts as "never"
POLL_S = 0.1
IDLE_CLIENTS = 20  # keep-alive connections left idle across a rollout / scale-down
IDLE_STEP_S = 0.4  # client i sends again (i + 1) x this after the change: before, during and after the reload


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


def launch(system: Any, name: str, spec: Spec) -> str:
    """Deploy, wait until every replica is ready and the route answers; returns the URL."""
    wait_for_cpus(spec.replicas * spec.num_cpus)
    system.apply(name, spec)
    if poll_until(lambda: converged(system, name, spec.replicas), time.monotonic(), 180) is None:
        raise TimeoutError(f"{name}: not ready after 180 s: {system.snapshot(name).message}")
    url = system.url(name)
    wait_serving(url)
    return url


def wait_for_cpus(needed: float, timeout_s: float = 90) -> None:
    """Serve replicas of an earlier scenario take ~30 s to exit after their app is deleted and hold their
    CPUs until then: a scenario that needs the whole cluster waits for them rather than failing to place."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < needed and time.monotonic() < deadline:
        time.sleep(0.5)


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
    return outcome(rec, ctx, {"POSTs sent": post["sent"], "POSTs failed": counts_of(post["failed_kinds"]),
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
        first = collections.Counter(get_answer(c, path) for c in conns)
        new = change(ctx.spec)
        # a rollout is done once no old process serves; a scale-down keeps some old ones
        before = ctx.snapshot().ready if new.version != ctx.spec.version else frozenset()
        t = time.monotonic()
        ctx.system.apply(ctx.name, new)

        def staggered() -> list[str]:  # each connection idle a little longer: the whole change is covered
            out = []
            for i, conn in enumerate(conns):
                time.sleep(max(0.0, t + (i + 1) * IDLE_STEP_S - time.monotonic()))
                out.append(get_after_idle(conn, path))
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
                                  "second request": counts_of(collections.Counter(second))},
                       first_request=dict(first), second_by_client=second)

    return scenario


def counts_of(counts: dict[str, int]) -> str:
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
    loris, posts = asyncio.run(slowloris_and_slow_posts(host, port, path, ctx.end_at))
    return {"recovery_s": "n/a", "extra": {"slowloris (200)": trickle_summary(loris), "slow 1 MiB POSTs (20)": trickle_summary(posts)}}


def oversized_body(ctx: Ctx) -> dict[str, Any]:
    host, port, path = split_url(ctx.url)
    ctx.wait_fault()
    rss_before = _replica_rss_mib(ctx)
    plain, chunked = oversized_uploads(host, port, path + "/upload")
    rss_after = _replica_rss_mib(ctx)
    return {"recovery_s": "n/a", "extra": {
        "100 MiB Content-Length (20)": upload_summary(plain), "64 MiB+1 chunked (5)": upload_summary(chunked),
        "replica RSS MiB before/after": f"{rss_before} / {rss_after}"}, "uploads": plain + chunked}


def _replica_rss_mib(ctx: Ctx) -> str:
    mems = [mem_kib(p) for p in sorted(ctx.snapshot().ready)]
    return ", ".join(f"{m['Rss'] / 1024:.0f}" if m else "?" for m in mems)


def blocking_handler(ctx: Ctx) -> dict[str, Any]:
    ctx.wait_fault()
    t = time.monotonic()
    host, port, path = split_url(ctx.url)
    status = get_answer(http.client.HTTPConnection(host, port, timeout=30), path + "/block")
    return {"recovery_s": "n/a", "extra": {"/block answer": f"{status} in {time.monotonic() - t:.1f} s"}}


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
