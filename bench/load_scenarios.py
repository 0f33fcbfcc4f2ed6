"""The scenarios ``bench.run`` measures on one system, under wrk or a client of their own: the trivial handler
(throughput, per-request overhead, memory), sleeping and CPU-bound handlers, the seed's concurrency check,
ASGI apps, streaming, and the cost of per-request metrics."""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from bench.cpu import Accounting
from bench.processes import haproxy_procs, mem_kib
from bench.systems import ASGI_APPS, RAYFLEET_MAX_CONCURRENCY, REPLICAS, Rayfleet
from bench.wrk import run_wrk
from rayfleet.procs import descendants

SCENARIOS = ("trivial", "overhead", "memory", "sleep", "cpu", "seed", "asgi", "stream", "metrics")
BARE_SCENARIOS = ("trivial",)
ASGI_CONNS = 32
STREAM_CONNS = (1, 64)
METRICS_CONNS = 32
METRICS_ROUNDS = 5  # on, off, on, off...: alternated so drift on a noisy machine hits both alike
SCRAPE_INTERVAL_S = 1.0  # 15x Prometheus' default rate: the scrape's own cost counted generously
TRIVIAL_CONNS = (8, 32, 128)
SLEEP_CONNS = (100, 400)
CPU_CONNS = 4
SEED_N = 5


def get_status(url: str, timeout: float = 60.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def measure(url: str, conns: int, duration: float, warmup: float) -> dict[str, Any]:
    """One wrk point, with the CPU each kind of process spent per request during it (``bench.cpu``)."""
    if warmup > 0:
        run_wrk(url, conns, warmup)
    with Accounting() as cpu:
        r = run_wrk(url, conns, duration)
    r["cpu_us_per_request"], r["steal"] = cpu.per_request(r["requests"]), cpu.steal
    return r


def in_process_us(n: int = 200_000) -> dict[str, float]:
    """µs per call of the trivial handler in-process: bare, through rayfleet's HandlerRunner, and through it
    with the replica's per-request metrics on."""
    from bench.handlers import trivial
    from rayfleet_runtime.replica.handler import HandlerRunner, Request
    from rayfleet_runtime.replica.metrics import ReplicaMetrics

    req = Request("GET", "/trivial")

    async def bare() -> float:
        t = time.perf_counter()
        for _ in range(n):
            await trivial(req)
        return (time.perf_counter() - t) / n * 1e6

    async def runner(metrics: bool) -> float:
        r = HandlerRunner(trivial, max_concurrency=RAYFLEET_MAX_CONCURRENCY)
        if metrics:
            ReplicaMetrics("bench", "bench-0", lambda: r).attach(r)
        t = time.perf_counter()
        for _ in range(n):
            await r.handle(req)
        return (time.perf_counter() - t) / n * 1e6

    return {"handler_us": round(asyncio.run(bare()), 3), "handler_runner_us": round(asyncio.run(runner(False)), 3),
            "with_metrics_us": round(asyncio.run(runner(True)), 3)}


def asgi_in_process_us(n: int = 50_000) -> dict[str, float]:
    """µs per request of each ``bench.asgi_app`` app called in-process (no server): the framework's own cost."""
    from bench import asgi_app

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/asgi/x", "raw_path": b"/asgi/x", "root_path": "/asgi", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    async def per_call(app) -> float:
        t = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return (time.perf_counter() - t) / n * 1e6

    return {kind: round(asyncio.run(per_call(getattr(asgi_app, target.rsplit(":", 1)[1]))), 2)
            for kind, target in ASGI_APPS.items()}


def _percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def stream_load(url: str, conns: int, duration: float) -> dict[str, Any]:
    """``conns`` clients streaming ``url`` back to back for ``duration`` s: time to the first body byte and to the end."""
    import aiohttp

    from bench.handlers import STREAM_CHUNKS, STREAM_GAP_S

    ttfb: list[float] = []
    total: list[float] = []
    errors: list[str] = []
    stop = time.monotonic() + duration

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            t = time.perf_counter()
            first = None
            try:
                async with session.get(url) as resp:
                    body = b""
                    async for chunk in resp.content.iter_any():
                        if first is None:
                            first = time.perf_counter()
                        body += chunk
                    if resp.status != 200 or body.count(b"\n") != STREAM_CHUNKS:
                        errors.append(f"{resp.status}: {body[:80]!r}")
                        continue
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors.append(repr(exc))
                continue
            ttfb.append(first - t)
            total.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(client(session) for _ in range(conns)))
    return {"connections": conns, "streams": len(total), "errors": len(errors), "error_samples": errors[:5],
            "chunks": STREAM_CHUNKS, "ideal_total_ms": round((STREAM_CHUNKS - 1) * STREAM_GAP_S * 1000, 1),
            "ttfb_p50_ms": _percentile_ms(ttfb, 0.5), "ttfb_p99_ms": _percentile_ms(ttfb, 0.99),
            "total_p50_ms": _percentile_ms(total, 0.5), "total_p99_ms": _percentile_ms(total, 0.99)}


def metrics_cost(system: "Rayfleet", duration: float, warmup: float, log) -> dict[str, Any]:
    """The trivial handler with per-request metrics on (and the node scraped every SCRAPE_INTERVAL_S) and
    off (``RAYFLEET_METRICS=0``: no latency histogram, no scrapes), alternated in one run."""
    from rayfleet_runtime.replica.metrics import METRICS_ENV

    urls = {"on": system.deploy("metrics-on", "trivial", REPLICAS),
            "off": system.deploy("metrics-off", "trivial", REPLICAS, env={METRICS_ENV: "0"})}
    scrape_url = f"http://127.0.0.1:{system.metrics_port}/metrics"
    out: dict[str, Any] = {"on": [], "off": [], "scrapes": 0}
    for _ in range(METRICS_ROUNDS):
        for mode in ("on", "off"):
            stop = threading.Event()
            scraper = threading.Thread(target=_scrape_until, args=(scrape_url, stop, out), daemon=True)
            if mode == "on":
                scraper.start()
            r = measure(urls[mode], METRICS_CONNS, duration, warmup)
            stop.set()
            if mode == "on":
                scraper.join()
            out[mode].append(r)
            log(f"metrics {mode} c={METRICS_CONNS}: {r['rps']:.0f} req/s p99 {r['p99_ms']:.2f} ms")
    for mode in ("on", "off"):
        out[f"{mode}_median_rps"] = sorted(r["rps"] for r in out[mode])[METRICS_ROUNDS // 2]
    out["in_process_us"] = {mode: in_process_us()["handler_runner_us" if mode == "off" else "with_metrics_us"]
                            for mode in ("on", "off")}
    out["cost"] = round(1 - out["on_median_rps"] / out["off_median_rps"], 4)
    system.undeploy("metrics-on")
    system.undeploy("metrics-off")
    return out


def _scrape_until(url: str, stop: threading.Event, out: dict[str, Any]) -> None:
    while not stop.wait(SCRAPE_INTERVAL_S):
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - 127.0.0.1 only
            resp.read()
        out["scrapes"] += 1


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
    if "asgi" in scenarios:  # the trivial handler as ASGI apps: rayfleet as they are, Serve via @serve.ingress
        res["asgi"] = {"in_process_us": asgi_in_process_us()}
        for kind in ASGI_APPS:
            if kind == "asgi_bare" and not isinstance(system, Rayfleet):
                continue  # Serve's @serve.ingress answered a bare ASGI callable with non-2xx only: FastAPI only there
            name = kind.replace("_", "-")
            url = system.deploy(name, kind, REPLICAS)
            r = measure(url, ASGI_CONNS, duration, warmup)
            log(f"{kind} c={ASGI_CONNS}: {r['rps']:.0f} req/s p99 {r['p99_ms']:.2f} ms non2xx {r['non2xx']}")
            res["asgi"][kind] = [r]
            system.undeploy(name)
    if "stream" in scenarios:
        url = system.deploy("stream", "stream", REPLICAS)
        res["stream"] = []
        for c in STREAM_CONNS:
            r = asyncio.run(stream_load(url, c, duration))
            log(f"stream c={c}: {r['streams']} streams, first byte p50 {r['ttfb_p50_ms']} ms p99 {r['ttfb_p99_ms']} ms, "
                f"whole p50 {r['total_p50_ms']} ms, errors {r['errors']}")
            res["stream"].append(r)
        system.undeploy("stream")
    if "metrics" in scenarios and isinstance(system, Rayfleet):
        res["metrics"] = metrics_cost(system, duration, warmup, log)
    if "seed" in scenarios:
        res["seed"] = {}
        for kind in ("seed_async", "seed_sync"):
            name = kind.replace("_", "-")
            url = system.deploy(name, kind, 1)
            res["seed"][kind] = burst(url, SEED_N)
            log(f"seed {kind}: {SEED_N} concurrent 1 s requests on 1 replica took {res['seed'][kind]['wall_s']} s")
            system.undeploy(name)
    return res
