"""One system under test, in its own process and its own fresh local Ray: ``python -m bench.worker``.

``bench.run`` starts one of these per system (so RAY_SERVE_* env vars apply from the start and nothing
leaks between systems), collects the JSON it writes, and builds the table. Not meant to be run by hand,
but it can be: ``python -m bench.worker --system rayfleet --scenarios trivial --duration 5 --out r.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import secrets
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.wrk import run_wrk
from rayfleet.ports import free_port
from rayfleet.procs import Leftovers, cmdline, descendants
from rayfleet_api.constants import RAY_NAMESPACE
from rayfleet_api.controller_client import ControllerClient
from rayfleet_api.desired import ActorOptions, DesiredState
from rayfleet_api.http_probe import wait_http
from rayfleet_api.states import DeploymentStatus

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("rayfleet", "serve-default", "serve-tuned", "serve-haproxy")
SCENARIOS = ("trivial", "overhead", "memory", "sleep", "cpu", "seed", "asgi")
ASGI_CONNS = 32
TRIVIAL_CONNS = (8, 32, 128)
SLEEP_CONNS = (100, 400)
CPU_CONNS = 4
SEED_N = 5
REPLICAS = 2
RAYFLEET_MAX_CONCURRENCY = 1000  # same per-replica cap as the tuned Serve peers (max_ongoing_requests=1000)
TUNED_MAX_ONGOING = 1000


def get_status(url: str, timeout: float = 60.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_serving(url: str) -> None:
    """Until ``url`` answers 200 five times in a row (routes pushed to every proxy)."""
    wait_http(url, 120, streak=5)


# ---------------------------------------------------------------- /proc helpers

def mem_kib(pid: int) -> dict[str, int] | None:
    """RSS and PSS (KiB) from /proc/PID/smaps_rollup."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "USS", "Private_Clean", "Private_Dirty"):
                    out[key] = int(rest.split()[0])
    except OSError:
        return None
    out["Uss"] = out.pop("Private_Clean", 0) + out.pop("Private_Dirty", 0)
    return out


def haproxy_procs(my_pids: set[int]) -> list[dict[str, Any]]:
    found = []
    for pid in sorted(my_pids):
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe).startswith("haproxy"):
            found.append({"pid": pid, "exe": exe, "cmdline": cmdline(pid)[:300]})
    return found


# ---------------------------------------------------------------- systems

class Rayfleet:
    name = "rayfleet"

    def start(self) -> None:
        from rayfleet_runtime.controller import ensure_controller

        self.control_port, self.ingress_port = free_port(), free_port()
        token = secrets.token_urlsafe(32)
        ensure_controller(token, control_port=self.control_port, ingress_port=self.ingress_port, ingress_nodes="head",
                          bind_host="127.0.0.1")
        self.api = ControllerClient(f"http://127.0.0.1:{self.control_port}", token, timeout_s=10)
        self.api.wait_healthy(60)
        self.config = {"maxConcurrency": RAYFLEET_MAX_CONCURRENCY, "syncThreads": 1, "numCpus": 1}

    def deploy(self, name: str, handler: str, replicas: int) -> str:
        target = "bench.asgi_app:app" if handler == "asgi" else f"bench.handlers:{handler}"
        self.api.put_deployment(name, DesiredState(
            handler=target, replicas=replicas, version="v1", route_prefix=f"/{name}",
            max_concurrency=RAYFLEET_MAX_CONCURRENCY, ray_actor_options=ActorOptions(num_cpus=1),
            graceful_shutdown_seconds=2))
        deadline = time.monotonic() + 120
        while True:
            obs = self.api.get_deployment(name) or {}
            if obs.get("readyReplicas") == replicas and obs.get("status") == DeploymentStatus.RUNNING:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {obs}")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{self.ingress_port}/{name}"
        wait_serving(url)
        return url

    def replica_pids(self, name: str) -> list[int]:
        return [r["pid"] for r in (self.api.get_deployment(name) or {}).get("replicas", []) if r.get("pid")]

    def undeploy(self, name: str) -> None:
        self.api.delete_deployment(name)
        deadline = time.monotonic() + 60
        while self.api.get_deployment(name) is not None and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        pass


class Serve:
    def __init__(self, mode: str):
        self.name = mode
        self.max_ongoing = None if mode == "serve-default" else TUNED_MAX_ONGOING
        self.config = {"max_ongoing_requests": self.max_ongoing or 5, "num_cpus": 1,
                       "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0"),
                       "RAY_SERVE_ENABLE_HA_PROXY": os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0")}

    def start(self) -> None:
        from ray import serve

        self.serve = serve
        self.port = free_port()
        host = "0.0.0.0" if self.name == "serve-haproxy" else "127.0.0.1"  # HAProxy mode forces all interfaces
        serve.start(http_options={"host": host, "port": self.port})

    def deploy(self, name: str, handler: str, replicas: int) -> str:
        from bench.serve_app import app

        self.serve.run(app(handler, replicas, self.max_ongoing), name=name, route_prefix=f"/{name}")
        url = f"http://127.0.0.1:{self.port}/{name}"
        wait_serving(url)
        return url

    def replica_pids(self, name: str) -> list[int]:
        me = descendants(os.getpid())
        return sorted(p for p in me if cmdline(p).startswith(f"ray::ServeReplica:{name}:"))

    def undeploy(self, name: str) -> None:
        # Serve replicas take ~30 s to exit after a delete on this Ray (even with graceful_shutdown_timeout_s=1),
        # so don't wait that long: they are idle (no traffic is routed to them any more) while the next
        # scenario runs under another app name, and the cluster is thrown away at the end.
        pids = self.replica_pids(name)
        self.serve.delete(name, _blocking=False)
        deadline = time.monotonic() + 3
        while any(os.path.exists(f"/proc/{p}") and cmdline(p).startswith("ray::ServeReplica") for p in pids) \
                and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        pass  # no serve.shutdown(): it waits ~30 s for a graceful controller stop; ray.shutdown() ends this throwaway cluster


# ---------------------------------------------------------------- scenarios

def measure(url: str, conns: int, duration: float, warmup: float) -> dict[str, Any]:
    if warmup > 0:
        run_wrk(url, conns, warmup)
    return run_wrk(url, conns, duration)


def in_process_us(n: int = 200_000) -> dict[str, float]:
    """µs per call of the trivial handler in-process, bare and through rayfleet's HandlerRunner."""
    from bench.handlers import trivial
    from rayfleet_runtime.handler import HandlerRunner, Request

    req = Request("GET", "/trivial")

    async def bare() -> float:
        t = time.perf_counter()
        for _ in range(n):
            await trivial(req)
        return (time.perf_counter() - t) / n * 1e6

    async def runner() -> float:
        r = HandlerRunner(trivial, max_concurrency=RAYFLEET_MAX_CONCURRENCY)
        t = time.perf_counter()
        for _ in range(n):
            await r.handle(req)
        return (time.perf_counter() - t) / n * 1e6

    return {"handler_us": round(asyncio.run(bare()), 3), "handler_runner_us": round(asyncio.run(runner()), 3)}


def burst(url: str, n: int) -> dict[str, Any]:
    def one(_: int) -> int:
        return get_status(url)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        t = time.perf_counter()
        codes = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t
    return {"requests": n, "wall_s": round(wall, 3), "codes": codes}


def run_system(system, scenarios: list[str], duration: float, warmup: float, log,
               trivial_conns: tuple[int, ...] = TRIVIAL_CONNS) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if {"trivial", "overhead", "memory"} & set(scenarios):
        url = system.deploy("trivial", "trivial", REPLICAS)
        if "trivial" in scenarios:
            res["trivial"] = []
            for c in trivial_conns:
                r = measure(url, c, duration, warmup)
                log(f"trivial c={c}: {r['rps']:.0f} req/s p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
                    f"non2xx {r['non2xx']} sockerr {r['socket_errors']}")
                res["trivial"].append(r)
        if "overhead" in scenarios:
            r = measure(url, 1, duration, warmup)
            r.update(in_process_us())
            r["overhead_us"] = round(r["mean_ms"] * 1000 - r["handler_us"], 1)
            log(f"overhead c=1: mean {r['mean_ms'] * 1000:.0f} us, in-process {r['handler_us']:.2f} us")
            res["overhead"] = r
        if "memory" in scenarios:
            pids = system.replica_pids("trivial")
            mine = descendants(os.getpid())
            per = {str(p): mem_kib(p) for p in pids}
            total = [m for m in (mem_kib(p) for p in mine) if m]
            res["memory"] = {"replica_pids": pids, "per_replica_kib": per,
                             "avg_rss_mib": round(sum(m["Rss"] for m in per.values() if m) / max(1, len(pids)) / 1024, 1),
                             "avg_pss_mib": round(sum(m["Pss"] for m in per.values() if m) / max(1, len(pids)) / 1024, 1),
                             "avg_uss_mib": round(sum(m["Uss"] for m in per.values() if m) / max(1, len(pids)) / 1024, 1),
                             "all_processes": len(total),
                             "all_pss_mib": round(sum(m["Pss"] for m in total) / 1024, 1)}
            log(f"memory: {res['memory']['avg_rss_mib']} MiB RSS / {res['memory']['avg_pss_mib']} MiB PSS per replica")
        res["haproxy"] = haproxy_procs(descendants(os.getpid()))
        system.undeploy("trivial")
    if "sleep" in scenarios:
        url = system.deploy("sleep50", "sleep50", REPLICAS)
        res["sleep"] = []
        for c in SLEEP_CONNS:
            r = measure(url, c, duration, warmup)
            r["ideal_rps"] = c / 0.05
            r["efficiency"] = round(r["rps"] / r["ideal_rps"], 3)
            log(f"sleep50 c={c}: {r['rps']:.0f} req/s = {r['efficiency']:.0%} of ideal, p99 {r['p99_ms']:.1f} ms")
            res["sleep"].append(r)
        system.undeploy("sleep50")
    if "cpu" in scenarios:
        res["cpu"] = {}
        for n in (1, 2):
            name = f"cpu{n}"
            url = system.deploy(name, "cpu", n)
            r = measure(url, CPU_CONNS, duration, warmup)
            log(f"cpu replicas={n}: {r['rps']:.1f} req/s p99 {r['p99_ms']:.1f} ms")
            res["cpu"][str(n)] = r
            system.undeploy(name)
        one, two = res["cpu"]["1"]["rps"], res["cpu"]["2"]["rps"]
        res["cpu"]["speedup"] = round(two / one, 3) if one else None
    if "asgi" in scenarios:  # the trivial handler as a FastAPI app: rayfleet as is, Serve via @serve.ingress
        url = system.deploy("asgi", "asgi", REPLICAS)
        r = measure(url, ASGI_CONNS, duration, warmup)
        log(f"asgi (FastAPI) c={ASGI_CONNS}: {r['rps']:.0f} req/s p99 {r['p99_ms']:.2f} ms non2xx {r['non2xx']}")
        res["asgi"] = [r]
        system.undeploy("asgi")
    if "seed" in scenarios:
        res["seed"] = {}
        for kind in ("seed_async", "seed_sync"):
            name = kind.replace("_", "-")
            url = system.deploy(name, kind, 1)
            res["seed"][kind] = burst(url, SEED_N)
            log(f"seed {kind}: {SEED_N} concurrent 1 s requests on 1 replica took {res['seed'][kind]['wall_s']} s")
            system.undeploy(name)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker")
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--trivial-conns", default=",".join(map(str, TRIVIAL_CONNS)))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]

    def log(msg: str) -> None:
        print(f"[{args.system}] {msg}", file=sys.stderr, flush=True)

    pythonpath = os.pathsep.join(dict.fromkeys([str(REPO)] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x]))
    os.environ["PYTHONPATH"] = pythonpath
    import ray

    out: dict[str, Any] = {"system": args.system, "scenarios": scenarios, "duration_s": args.duration,
                           "loadavg_before": os.getloadavg()}
    system = Rayfleet() if args.system == "rayfleet" else Serve(args.system)
    t0 = time.monotonic()
    # address="local": always a fresh cluster of our own, never a Ray someone else started on this machine
    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace=RAY_NAMESPACE if args.system == "rayfleet" else "bench-serve", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    code = 0
    try:
        system.start()
        out["config"] = system.config
        out["results"] = run_system(system, scenarios, args.duration, args.warmup, log,
                                    tuple(int(c) for c in args.trivial_conns.split(",") if c))
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        log(out["traceback"])
        code = 1
    finally:
        out["loadavg_after"] = os.getloadavg()
        out["wall_s"] = round(time.monotonic() - t0, 1)
        leftovers = Leftovers()
        leftovers.note()
        system.stop()
        ray.shutdown()
        leftovers.kill()  # e.g. an HAProxy that outlived its actor
        Path(args.out).write_text(json.dumps(out, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
