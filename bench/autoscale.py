"""Autoscaling, rayfleet vs Ray Serve, one command: ``python -m bench.autoscale`` (``make bench-autoscale``).

A load step on ``bench.handlers.sleep50`` (50 ms of ``asyncio.sleep``): ``LOW`` connection(s) for
``WARM_S``, then ``HIGH`` for ``HIGH_S``, then ``LOW`` again for ``DOWN_S``. Each replica runs at most
``MAX_CONCURRENCY`` requests (rayfleet ``maxConcurrency``, Serve ``max_ongoing_requests``), so capacity
comes only from more replicas; both autoscalers aim at ``TARGET`` requests per replica
(``targetInFlight`` = ``target_ongoing_requests``) within 1..``MAX_REPLICAS``, every other setting
their defaults. Measured: throughput and ready replicas second by second, the time until throughput
reaches 90 % of the step's ideal (``HIGH`` / 50 ms), p99 latency during that ramp, failed requests
over the whole run. Then scale to zero and back: a deployment with ``minReplicas: 0`` (Serve
``min_replicas=0``) and a 5 s downscale delay in both, left idle until it has no replica, then one
request: its status and latency (the cold start).

Each system runs in its own subprocess with a fresh local Ray, one after the other (as ``bench.run``).
Output: a markdown table on stdout and ``bench/results/autoscale.{md,json,png}``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SYSTEMS = ("rayfleet", "serve")
LOW, HIGH = 1, 64
WARM_S, HIGH_S, DOWN_S = 10.0, 60.0, 30.0
TARGET, MAX_CONCURRENCY, MAX_REPLICAS = 8, 10, 8
NUM_CPUS = 0.1  # per replica: MAX_REPLICAS of them fit the worker's 8 logical CPUs, the cores are shared anyway
HANDLER_S = 0.05
ZERO_DOWNSCALE_S = 5.0
IDEAL_RPS = HIGH / HANDLER_S


# ---------------------------------------------------------------- load

class Recorder:
    """Every request's start, end (monotonic s) and status (0: no HTTP answer)."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, float, int]] = []


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)  # the chunk and its CRLF; the last (0) chunk's CRLF ends the body
        if size == 0:
            return


async def _one_connection(host: str, port: int, path: str, stop: asyncio.Event, rec: Recorder) -> None:
    """HTTP/1.1 keep-alive GETs back to back on one connection (reconnecting when the server closes it)."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    reader = writer = None
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if headers.get("transfer-encoding", "").lower() == "chunked":
                await _read_chunked(reader)
            else:
                await reader.readexactly(int(headers.get("content-length", "0")))
            rec.requests.append((t0, time.monotonic(), status))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
            rec.requests.append((t0, time.monotonic(), 0))
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.05)  # a refused connect must not spin
    if writer is not None:
        writer.close()


async def step_load(url: str, rec: Recorder) -> dict[str, float]:
    """LOW, then HIGH, then LOW connections; returns the phases' start times (monotonic)."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.partition(":")
    path = "/" + path

    def start(n: int, stop: asyncio.Event) -> list[asyncio.Task]:
        return [asyncio.create_task(_one_connection(host, int(port), path, stop, rec)) for _ in range(n)]

    base, extra = asyncio.Event(), asyncio.Event()
    phases = {"warm": time.monotonic()}
    tasks = start(LOW, base)
    await asyncio.sleep(WARM_S)
    phases["up"] = time.monotonic()
    tasks += start(HIGH - LOW, extra)
    await asyncio.sleep(HIGH_S)
    phases["down"] = time.monotonic()
    extra.set()
    await asyncio.sleep(DOWN_S)
    phases["end"] = time.monotonic()
    base.set()
    await asyncio.gather(*tasks)
    return phases


def poll_replicas(count, stop: threading.Event, out: list[tuple[float, int]]) -> None:
    while not stop.wait(0.5):
        try:
            out.append((time.monotonic(), count()))
        except Exception:  # noqa: BLE001 - a missed sample is only a gap in the plot
            pass


# ---------------------------------------------------------------- systems

class Rayfleet:
    def __init__(self) -> None:
        from bench.systems import Rayfleet as Base

        self.base = Base()

    def start(self) -> None:
        self.base.start()

    def deploy(self, name: str, min_replicas: int, downscale_s: float | None) -> str:
        from rayfleet_api.desired import ActorOptions, Autoscaling, DesiredState

        delays = {} if downscale_s is None else {"downscale_delay_seconds": downscale_s}
        scaling = Autoscaling(max_replicas=MAX_REPLICAS, min_replicas=min_replicas, target_in_flight=TARGET, **delays)
        self.base.api.put_deployment(name, DesiredState(
            handler="bench.handlers:sleep50", replicas=1, version="v1", route_prefix=f"/{name}",
            max_concurrency=MAX_CONCURRENCY, ray_actor_options=ActorOptions(num_cpus=NUM_CPUS),
            graceful_shutdown_seconds=2, autoscaling=scaling))
        url = f"http://127.0.0.1:{self.base.ingress_port}/{name}"
        _wait(lambda: self.ready(name) >= 1, 120, f"{name} ready")
        from bench.systems import wait_serving

        wait_serving(url)
        return url

    def ready(self, name: str) -> int:
        return int((self.base.api.get_deployment(name) or {}).get("readyReplicas") or 0)

    def alive(self, name: str) -> int:
        """Replicas in any state (a draining one still serves what its proxies send it)."""
        return len((self.base.api.get_deployment(name) or {}).get("replicas") or [])

    def refused(self, name: str) -> dict[str, float]:
        """Who answered 503: the replicas at maxConcurrency, or the ingress (from the node's metrics)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.base.metrics_port}/metrics", timeout=10).read().decode()
        out = {"replicas_rejected": 0.0, "ingress_5xx": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("deployment") != name:
                    continue
                if sample.name == "rayfleet_replica_rejected_total":
                    out["replicas_rejected"] += sample.value
                elif sample.name == "haproxy_backend_http_responses_total" and sample.labels.get("code") == "5xx":
                    out["ingress_5xx"] += sample.value
        return out


class Serve:
    def start(self) -> None:
        from ray import serve

        from rayfleet.ports import free_port

        self.serve = serve
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    def deploy(self, name: str, min_replicas: int, downscale_s: float | None) -> str:
        from bench.serve_app import AsyncHandler
        from bench.systems import wait_serving

        config: dict[str, Any] = {"min_replicas": min_replicas, "max_replicas": MAX_REPLICAS,
                                  "target_ongoing_requests": TARGET, "initial_replicas": 1}
        if downscale_s is not None:
            config["downscale_delay_s"] = downscale_s
        app = AsyncHandler.options(autoscaling_config=config, max_ongoing_requests=MAX_CONCURRENCY,
                                   ray_actor_options={"num_cpus": NUM_CPUS}).bind("sleep50")
        self.serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        url = f"http://127.0.0.1:{self.port}/{name}"
        _wait(lambda: self.ready(name) >= 1, 120, f"{name} ready")
        wait_serving(url)
        return url

    def ready(self, name: str) -> int:
        return self._replicas(name, ("RUNNING",))

    def alive(self, name: str) -> int:
        return self._replicas(name, None)

    def _replicas(self, name: str, states: tuple[str, ...] | None) -> int:
        app = self.serve.status().applications.get(name)
        if app is None:
            return 0
        return sum(int(n) for d in app.deployments.values() for state, n in d.replica_states.items()
                   if states is None or state in states)


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f}s")
        time.sleep(0.2)


def run_system(name: str) -> dict[str, Any]:
    import ray

    from bench.systems import repo_on_pythonpath, start_local_ray

    start_local_ray(name, repo_on_pythonpath())
    system = Rayfleet() if name == "rayfleet" else Serve()
    out: dict[str, Any] = {"system": name, "loadavg_before": os.getloadavg()}
    try:
        system.start()
        url = system.deploy("step", 1, None)
        rec, replicas, stop = Recorder(), [], threading.Event()
        poller = threading.Thread(target=poll_replicas, args=(lambda: system.ready("step"), stop, replicas), daemon=True)
        poller.start()
        phases = asyncio.run(step_load(url, rec))
        stop.set()
        poller.join()
        t0 = phases["up"]
        out.update(phases={k: v - t0 for k, v in phases.items()},
                   requests=[(a - t0, b - t0, s) for a, b, s in rec.requests],
                   replicas=[(t - t0, n) for t, n in replicas])
        if isinstance(system, Rayfleet):
            out["refused"] = system.refused("step")
        out["zero"] = scale_to_zero(system)
    finally:
        out["loadavg_after"] = os.getloadavg()
        ray.shutdown()
    return out


def scale_to_zero(system) -> dict[str, Any]:
    """Idle until no replica is left, then one request: its status and latency."""
    url = system.deploy("zero", 0, ZERO_DOWNSCALE_S)
    t = time.monotonic()
    try:
        _wait(lambda: system.alive("zero") == 0, 180, "no replica left")
    except TimeoutError as exc:
        return {"error": str(exc)}
    idle_s = time.monotonic() - t
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 - 127.0.0.1 only
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        status, error = 0, repr(exc)
        return {"idle_to_zero_s": round(idle_s, 1), "status": status, "error": error}
    return {"idle_to_zero_s": round(idle_s, 1), "status": status, "cold_start_s": round(time.monotonic() - t, 2)}


# ---------------------------------------------------------------- analysis

def summarize(run: dict[str, Any]) -> dict[str, Any]:
    reqs, phases = run["requests"], run["phases"]
    per_second: dict[int, int] = {}
    for _, end, status in reqs:
        if status == 200:
            per_second[math.floor(end)] = per_second.get(math.floor(end), 0) + 1
    reached = next((s for s in range(0, int(phases["down"])) if per_second.get(s, 0) >= 0.9 * IDEAL_RPS), None)
    ramp_end = reached + 1 if reached is not None else phases["down"]
    ramp = sorted(end - start for start, end, status in reqs if 0 <= start < ramp_end and status == 200)
    failed = [status for _, _, status in reqs if status != 200]
    after_down = [(t, n) for t, n in run["replicas"] if t >= phases["down"]]
    back = next((t - phases["down"] for t, n in after_down if n <= math.ceil(LOW / TARGET)), None)
    return {"time_to_90pct_s": None if reached is None else reached + 1,
            "ramp_p99_ms": round(ramp[int(0.99 * (len(ramp) - 1))] * 1000, 1) if ramp else None,
            "failed": len(failed), "failed_kinds": {str(s): failed.count(s) for s in sorted(set(failed))},
            "requests": len(reqs), "peak_replicas": max((n for _, n in run["replicas"]), default=0),
            "back_to_one_s": None if back is None else round(back, 1),
            "replicas_at_end": run["replicas"][-1][1] if run["replicas"] else None,
            "per_second": per_second}


def render(report: dict[str, Any]) -> str:
    lines = [f"# Autoscaling: rayfleet vs Ray Serve ({report['started']})", "",
             f"Load step on a {HANDLER_S * 1000:.0f} ms `asyncio.sleep` handler: {LOW} connection for {WARM_S:g} s, "
             f"{HIGH} for {HIGH_S:g} s (ideal {IDEAL_RPS:.0f} req/s), {LOW} for {DOWN_S:g} s. Per replica at most "
             f"{MAX_CONCURRENCY} requests; target {TARGET} per replica, 1..{MAX_REPLICAS} replicas; other autoscaling "
             f"settings at each system's defaults. Each system in a fresh local Ray.", "",
             "| system | time to 90 % of ideal | p99 during the ramp | failed requests | peak replicas | back to 1 replica after the step down | cold start from zero |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in report["systems"]:
        run = report["runs"].get(name, {})
        if run.get("error"):
            lines.append(f"| {name} | FAILED: {run['error']} | | | | | |")
            continue
        s, zero = run["summary"], run.get("zero", {})
        reach = f"{s['time_to_90pct_s']} s" if s["time_to_90pct_s"] is not None else f"not within {HIGH_S:g} s"
        back = f"{s['back_to_one_s']} s" if s["back_to_one_s"] is not None else f"not within {DOWN_S:g} s ({s['replicas_at_end']} left)"
        cold = (f"{zero['cold_start_s']} s (HTTP {zero['status']}, zero after {zero['idle_to_zero_s']} s idle)"
                if "cold_start_s" in zero else f"{zero.get('error', '-')}")
        lines.append(f"| {name} | {reach} | {s['ramp_p99_ms']} ms | {s['failed']} of {s['requests']} | {s['peak_replicas']} | "
                     f"{back} | {cold} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for name in report["systems"]:
        run = report["runs"].get(name, {})
        if "summary" not in run:
            continue
        per = run["summary"]["per_second"]
        xs = sorted(per)
        top.plot(xs, [per[k] for k in xs], label=name)
        bottom.step([t for t, _ in run["replicas"]], [n for _, n in run["replicas"]], where="post", label=name)
    top.axhline(IDEAL_RPS, color="k", ls="--", lw=1, label=f"ideal at {HIGH} conns")
    top.axhline(0.9 * IDEAL_RPS, color="grey", ls=":", lw=1, label="90 % of ideal")
    top.set_ylabel("req/s (200s, per second)")
    top.set_title(f"Load step {LOW} -> {HIGH} -> {LOW} connections at t = 0 and t = {HIGH_S:g} s; target {TARGET} per replica")
    bottom.set_ylabel("ready replicas")
    bottom.set_xlabel("seconds since the step up")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one system, write JSON here
    args = p.parse_args(argv)
    if args.worker:
        system, _, out = args.worker.partition("=")
        try:
            result = run_system(system)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            result = {"system": system, "error": f"{type(exc).__name__}: {exc}"}
        Path(out).write_text(json.dumps(result))
        return 0
    systems = [s for s in args.systems.split(",") if s]
    if bad := [s for s in systems if s not in SYSTEMS]:
        p.error(f"unknown system: {', '.join(bad)}")
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M"), "systems": systems, "runs": {}}
    for name in systems:
        print(f"== {name}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
            subprocess.run([sys.executable, "-m", "bench.autoscale", "--worker", f"{name}={out}"], cwd=REPO, env=env,
                           timeout=900, stdout=subprocess.DEVNULL,
                           stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL)
            run = json.loads(out.read_text()) if out.exists() else {"error": "the worker wrote no result"}
        if "requests" in run:
            run["summary"] = summarize(run)
            del run["requests"]  # large; the summary keeps what the table and plot need
        report["runs"][name] = run
    md = render(report)
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    (results / "autoscale.json").write_text(json.dumps(report, indent=1))
    plot(report, results / "autoscale.png")
    (results / "autoscale.md").write_text(md + "\n![throughput and replicas over time](autoscale.png)\n")
    print(md)
    return 1 if any(r.get("error") for r in report["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
