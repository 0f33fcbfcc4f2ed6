"""HAProxy's settings measured one by one: ``python -m bench.haproxy_settings``.

The ingress's own configuration (``render_config``, one deployment of two replicas) in front of two
replica servers (``ReplicaServer`` with ``bench.handlers:trivial``, each its own process, no Ray), and
variants that each change one thing in it. For every variant and connection count: wrk's req/s and
p99, and the CPU per request of HAProxy and of the replicas (``bench.cpu``), so a setting is kept only
where it pays. The configuration as rendered is measured again right before each variant and the
variant judged against that run: on a VM whose speed drifts by half within minutes, a baseline from
the start of the run says nothing about a variant measured later. Prints a markdown table; writes ``bench/results/haproxy_settings.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from bench.cpu import Accounting
from bench.wrk import run_wrk
from rayfleet.ports import free_port
from rayfleet_api.desired import DesiredState
from rayfleet_api.http_probe import wait_http
from rayfleet_runtime.ingress.haproxy_bin import find_haproxy
from rayfleet_runtime.ingress.actor import default_maxconn
from rayfleet_runtime.ingress.haproxy_config import canary_weights_text, render_config
from rayfleet_runtime.routing import ReplicaRow, Route, build_table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
REPLICAS = 2
CONNS = (32, 128)
_REPLICA = """
import asyncio, sys, uvloop
from rayfleet_api.desired import DesiredState
from rayfleet_runtime.replica.actor import ReplicaServer
async def main():
    server = ReplicaServer(DesiredState(handler="bench.handlers:trivial", version="v", max_concurrency=1000))
    await server.start("127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()
uvloop.run(main())
"""


def _sub(pattern: str, repl: str) -> Callable[[str], str]:
    def change(cfg: str) -> str:
        out, n = re.subn(pattern, repl, cfg, flags=re.M)
        assert n, f"{pattern!r} is not in the rendered config"
        return out
    return change


# Each variant: one change to the rendered configuration.
VARIANTS: dict[str, Callable[[str], str]] = {
    "as rendered": lambda cfg: cfg,
    "nbthread 1": _sub(r"^    nbthread \d+$", "    nbthread 1"),
    "no health checks": _sub(r" check inter \S+ downinter \S+ fastinter \S+ rise 1 fall 2 observe layer4 error-limit 3 on-error mark-down", ""),
    "http-reuse safe": _sub(r"^    http-reuse always$", "    http-reuse safe"),
    "no keep-alive to replicas": _sub(r"^    http-reuse always$", "    option http-server-close"),
    "balance roundrobin": _sub(r"^    balance random\(2\)$", "    balance roundrobin"),
    "no http-buffer-request": _sub(r"^    option http-buffer-request\n", ""),
    "no abortonclose": _sub(r"^    option abortonclose\n", ""),
    "no http-no-delay": _sub(r"^    option http-no-delay\n", ""),
    "no logging": _sub(r"^    log global\n    option httplog\n", ""),
    "no forwardfor": _sub(r"^    option forwardfor\n", ""),
}


def _start_replicas(ports: list[int]) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", _REPLICA, str(p)], cwd=REPO) for p in ports]
    for p in ports:
        wait_http(f"http://127.0.0.1:{p}/", 60)
    return procs


def measure_variant(name: str, cfg: str, port: int, duration: float, warmup: float) -> list[dict]:
    binary = find_haproxy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "haproxy.cfg"
        path.write_text(cfg)
        proc = subprocess.Popen([binary.path, "-db", "-f", str(path)], env=binary.environ(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}/bench/x"
            try:
                wait_http(url, 30, streak=5)
            except TimeoutError:
                proc.terminate()
                raise RuntimeError(f"HAProxy ({name}) did not serve: {proc.communicate(timeout=30)[1][-2000:]}") from None
            points = []
            for conns in CONNS:
                run_wrk(url, conns, warmup)
                with Accounting() as cpu:
                    r = run_wrk(url, conns, duration)
                r["cpu_us_per_request"], r["steal"] = cpu.per_request(r["requests"]), cpu.steal
                r["variant"] = name
                points.append(r)
                print(f"[haproxy] {name} c={conns}: {r['rps']:.0f} req/s p99 {r['p99_ms']:.2f} ms, haproxy "
                      f"{r['cpu_us_per_request']['haproxy']} us, replicas {r['cpu_us_per_request']['replica']} us "
                      f"per request", file=sys.stderr, flush=True)
            return points
        finally:
            proc.terminate()
            proc.wait(30)


def render(report: dict) -> str:
    lines = [f"# HAProxy settings one by one ({report['started']})", "",
             f"{REPLICAS} replica servers (no Ray), the trivial handler, wrk -t1, {report['duration']:g} s per point; "
             "CPU in us per request from /proc.", "",
             "| variant | conns | req/s | vs as rendered just before | p99 ms | HAProxy us/req | replicas us/req | wrk us/req | "
             "non-2xx | steal |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base: dict[int, dict] = {}
    for p in report["points"]:
        if p["variant"] == "as rendered":
            base[p["connections"]] = p
        b = base.get(p["connections"])
        cpu = p["cpu_us_per_request"]
        ratio = f"{p['rps'] / b['rps']:.2f}x" if b else "-"
        lines.append(f"| {p['variant']} | {p['connections']} | {p['rps']:.0f} | {ratio} | {p['p99_ms']:.2f} | {cpu['haproxy']:.1f} | "
                     f"{cpu['replica']:.1f} | {cpu['load generator']:.1f} | {p['non2xx'] + p['socket_errors']} | "
                     f"{p.get('steal', 0):.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.haproxy_settings", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant: {', '.join(unknown)}")
    ports = [free_port() for _ in range(REPLICAS)]
    port = free_port()
    desired = DesiredState(handler="bench.handlers:trivial", route_prefix="/bench", max_concurrency=1000)
    table = build_table([Route("bench", desired, tuple(ReplicaRow(f"bench-{i}", "127.0.0.1", rp, None)
                                                       for i, rp in enumerate(ports)))])  # as the controller does
    with tempfile.TemporaryDirectory() as tmp:
        weights_map = f"{tmp}/canary_weights.map"
        with open(weights_map, "w") as f:
            f.write(canary_weights_text(table))
        cfg = render_config(table, port=port, bind_host="127.0.0.1", runtime_socket=f"{tmp}/admin.sock",
                            maxconn=default_maxconn(), weights_map=weights_map)  # as the ingress renders it
        report = {"started": time.strftime("%Y-%m-%d %H:%M"), "duration": args.duration, "points": []}
        replicas = _start_replicas(ports)
        try:
            for name in variants:
                if name != "as rendered":
                    report["points"] += measure_variant("as rendered", cfg, port, args.duration, args.warmup)
                report["points"] += measure_variant(name, VARIANTS[name](cfg), port, args.duration, args.warmup)
        finally:
            for proc in replicas:
                proc.terminate()
                proc.wait(30)
    md = render(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "haproxy_settings.json").write_text(json.dumps(report, indent=1))
    (out / "haproxy_settings.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
