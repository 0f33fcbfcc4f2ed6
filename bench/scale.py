"""The scale benchmark (issue 27): ``python -m bench.scale`` (``--quick``: the smallest shapes, seconds each).

Deployments x replicas x ingress nodes on one host. Nodes beyond this machine are simulated: each ingress
is a real ``Ingress`` (``rayfleet_runtime.ingress.actor``, the actor's class run without Ray, its own HAProxy,
``nbthread 1``) in a process of its own (``python -m bench.scale _ingress``), serving the node id it is given;
the replicas are stand-ins, one process (``python -m bench.scale _stand_ins``) listening on one port per
replica, answering every request with ``ok`` and counting the health checks (``GET /-/ready``) per port.

Parts (``--parts``, default all):

* ``push``: the same table change sent to K ingresses at once, time until the last has applied it, for a
  change of replicas alone (HAProxy's runtime API) and one that needs a reload (a deployment added or removed);
  the CPU each ingress spent per push; HAProxy processes left after a burst of changes with idle keep-alive
  clients opened between them (a reload leaves the old worker as long as it holds one).
* ``health``: checks per second the stand-ins receive from K ingresses, with ``sharedHealth`` (each ingress
  checks its own node's replicas) and without (every ingress checks every replica), and HAProxy's CPU for them.
* ``latency``: wrk on one deployment through one ingress, quiet, then while other deployments' replicas change
  (runtime), then while changes force reloads.
* ``ready`` (needs Ray): N one-replica deployments on a fresh local Ray, rayfleet (controller + ingress) and
  Ray Serve (N applications): time from the request until every one answers 200, and the replicas' memory;
  and ``rayfleet run`` of the same N: time from the command's start, its Ray's start included.

Prints a markdown table; writes ``bench/results/scale.json`` and ``scale.md``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bench.processes import haproxy_procs, mem_kib
from bench.wrk import run_wrk, wrk_path
from rayfleet.procs import cmdline, descendants, stat_fields

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PARTS = ("push", "health", "latency", "ready")
HOST = "127.0.0.1"
VIRTUAL_NODES = 100  # the push part's replicas are spread over this many nodes (the model's cluster)
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")

FULL = {
    "push": {"deployments": 100, "replicas": 10, "ingresses": (1, 4, 8), "reps": 10, "burst": 5},
    "health": {"replicas": 250, "ingresses": 4, "window_s": 8.0},
    "latency": {"deployments": 20, "replicas": 5, "duration_s": 8.0, "connections": 8},
    "ready": {"counts": (5, 30), "systems": ("rayfleet-run", "rayfleet", "serve")},
}
QUICK = {
    "push": {"deployments": 4, "replicas": 3, "ingresses": (1, 2), "reps": 2, "burst": 3},
    "health": {"replicas": 6, "ingresses": 2, "window_s": 2.0},
    "latency": {"deployments": 3, "replicas": 2, "duration_s": 2.0, "connections": 4},
    "ready": {"counts": (2,), "systems": ("rayfleet", "serve")},
}


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its children it waited for (``haproxy -c``, old workers)."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else sum(int(fields[i]) for i in (11, 12, 13, 14)) * _TICK_S


def tree_cpu(roots: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for root in roots:
        for pid in descendants(root) | {root}:
            out[pid] = cpu_seconds(pid)
    return out


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two ``tree_cpu`` snapshots (a process new since counts from zero)."""
    return sum(s - before.get(pid, 0.0) for pid, s in after.items())


def haproxy_children(master: int) -> list[int]:
    """The HAProxy workers of a master (the current one and those a reload left)."""
    return [p["pid"] for p in haproxy_procs(descendants(master))]


def rss_kib(pid: int) -> int:
    return (mem_kib(pid) or {}).get("Rss", 0)


# ---------------------------------------------------------------------------------------------- stand-ins

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def stand_ins_main(count: int) -> None:
    """``count`` ports, one process, one event loop: every request gets 200 ``ok``; health checks counted.

    Its stdout: one JSON line with the ports, then one JSON line per command read from stdin
    (``checks``, ``hits``, ``cpu``); it exits when stdin closes."""
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    checks = [0] * count
    hits = [0] * count

    class Replica(asyncio.Protocol):
        def __init__(self, index: int):
            self.index, self.buf, self.transport = index, b"", None

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                head, _, self.buf = self.buf.partition(b"\r\n\r\n")
                if head.startswith(b"GET /-/ready"):
                    checks[self.index] += 1
                else:
                    hits[self.index] += 1
                self.transport.write(_RESPONSE)

    servers = []
    for i in range(count):
        servers.append(loop.run_until_complete(
            loop.create_server(lambda i=i: Replica(i), HOST, 0, backlog=128, reuse_address=True)))
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    out = os.fdopen(os.dup(1), "w")
    out.write(json.dumps({"ports": ports}) + "\n")
    out.flush()

    def commands() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "checks":
                reply: Any = list(checks)
            elif cmd == "hits":
                reply = list(hits)
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=commands, daemon=True).start()
    loop.run_forever()


class StandIns:
    """The stand-in replicas' process, from the driver."""

    def __init__(self, count: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "_stand_ins", str(count)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise RuntimeError("the stand-in replicas did not start")
        self.ports: list[int] = json.loads(line)["ports"]
        self._lock = threading.Lock()

    def ask(self, command: str) -> Any:
        with self._lock:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# ---------------------------------------------------------------------------------------------- ingress worker


def ingress_main(workdir: str, port: int, node_id: str) -> None:
    """One simulated node's ingress: commands (JSON lines) on stdin, answers on stdout; stops at EOF."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else prints goes to stderr; stdout carries answers only
    from rayfleet_runtime.ingress.actor import Ingress
    from rayfleet_runtime.routing import RoutingTable

    reports: list[list[str]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def read() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        ing = Ingress(port=port, bind_host=HOST, workdir=workdir, nbthread=1, node_id=node_id,
                      report_down=reports.append)  # as the controller is told, from the health watch
        try:
            info = await ing.ready()
            out.write(json.dumps({"ready": info}) + "\n")
            out.flush()
            threading.Thread(target=read, daemon=True).start()
            while (line := await queue.get()) is not None:
                msg = json.loads(line)
                if msg["op"] == "update":
                    t0 = time.monotonic()
                    result = await ing.update(RoutingTable.from_wire(msg["table"]))
                    reply = {"result": result, "apply_s": time.monotonic() - t0}
                elif msg["op"] == "info":
                    reply = {**ing._info(), "reports": len(reports)}
                else:
                    reply = {"error": f"unknown op {msg['op']!r}"}
                out.write(json.dumps(reply) + "\n")
                out.flush()
        finally:
            await ing.stop(1)

    asyncio.run(main())


class IngressProc:
    """One simulated node's ingress process, from the driver (asyncio)."""

    def __init__(self, node_id: str, root: str):
        from rayfleet.ports import free_port

        self.node_id = node_id
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix=f"rfs-{node_id}-", dir=root)  # short: Unix socket paths
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.scale", "_ingress", self.workdir, str(self.port), self.node_id,
            cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True, limit=1 << 24)
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            raise RuntimeError(f"ingress {self.node_id} did not start")
        self.info = json.loads(line)["ready"]

    @property
    def master(self) -> int:
        return int(self.info["pid"])

    async def call(self, msg: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        async with self._lock:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"ingress {self.node_id} exited")
        return json.loads(line)

    async def update(self, table: dict[str, Any]) -> dict[str, Any]:
        reply = await self.call({"op": "update", "table": table})
        result = reply["result"]
        if not result.get("applied") or result.get("error"):
            raise RuntimeError(f"ingress {self.node_id} did not apply the table: {result}")
        return reply

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 15)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@contextlib.asynccontextmanager
async def ingresses(node_ids: list[str]):
    """Started ingress processes, stopped on the way out (and whatever they left, killed)."""
    root = tempfile.mkdtemp(prefix="rfs-")
    procs = [IngressProc(node, root) for node in node_ids]
    seen: dict[int, str] = {}
    try:
        await asyncio.gather(*(p.start() for p in procs))
        for p in procs:
            for pid in descendants(p.proc.pid) | {p.proc.pid}:
                seen.setdefault(pid, cmdline(pid))
        yield procs
    finally:
        for p in procs:
            if p.proc is not None:
                for pid in descendants(p.proc.pid):
                    seen.setdefault(pid, cmdline(pid))
        await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
        for pid, command in seen.items():  # an HAProxy that outlived its ingress
            if command and cmdline(pid) == command:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- tables


class Fleet:
    """Deployments x replicas as the controller would list them; ``wire()`` is the table it pushes."""

    def __init__(self, deployments: int, replicas: int, ports: list[int], nodes: list[str], shared: bool = True):
        self.ports = list(ports)
        self.free = self.ports[deployments * replicas:]  # ports for replicas that come later
        self.shared = shared
        self.nodes = nodes
        self.deps: dict[str, list[dict[str, Any]]] = {}
        self._next = 0
        for d in range(deployments):
            self.deps[f"d{d}"] = [self._replica(f"d{d}", self.ports[d * replicas + r]) for r in range(replicas)]

    def _replica(self, dep: str, port: int) -> dict[str, Any]:
        self._next += 1
        node = self.nodes[(self._next - 1) % len(self.nodes)]
        return {"id": f"{dep}-{self._next}", "host": HOST, "port": port, "nodeId": node}

    def servers(self) -> int:
        return sum(len(r) for r in self.deps.values())

    def wire(self) -> dict[str, Any]:
        return {"sharedHealth": self.shared, "deployments": {
            name: {"routePrefix": f"/{name}", "maxConcurrency": 100, "replicas": list(reps)}
            for name, reps in self.deps.items()}}

    def replace_replicas(self, names: list[str]) -> None:
        """A rolling step in each of ``names``: its first replica goes, a new one (another port) comes."""
        for name in names:
            old = self.deps[name].pop(0)
            new = self._replica(name, self.free.pop(0))
            self.free.append(old["port"])
            self.deps[name].append(new)

    def add(self, name: str) -> None:
        self.deps[name] = [self._replica(name, self.free.pop(0))]

    def remove(self, name: str) -> None:
        for rep in self.deps.pop(name):
            self.free.append(rep["port"])


async def push(procs: list[IngressProc], table: dict[str, Any]) -> dict[str, Any]:
    """The same table to every ingress at once: when each had applied it, how, and its own apply time."""
    t0 = time.monotonic()
    done: list[float] = []

    async def one(p: IngressProc) -> dict[str, Any]:
        reply = await p.update(table)
        done.append(time.monotonic() - t0)
        return reply

    replies = await asyncio.gather(*(one(p) for p in procs))
    return {"last_s": max(done), "first_s": min(done), "via": sorted({r["result"].get("via", "none") for r in replies}),
            "apply_s": [r["apply_s"] for r in replies]}


async def idle_clients(procs: list[IngressProc], path: str, n: int) -> list[asyncio.StreamWriter]:
    """``n`` keep-alive connections to each ingress, one request answered on each, then left idle."""
    writers = []
    for p in procs:
        for _ in range(n):
            reader, writer = await asyncio.open_connection(HOST, p.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: scale\r\n\r\n".encode())
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = next((int(h.split(b":", 1)[1]) for h in head.split(b"\r\n")
                           if h.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writers.append(writer)
    return writers


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


# ---------------------------------------------------------------------------------------------- push


async def part_push(shape: dict[str, Any]) -> dict[str, Any]:
    deployments, replicas, reps, burst = shape["deployments"], shape["replicas"], shape["reps"], shape["burst"]
    nodes = [f"n{i}" for i in range(VIRTUAL_NODES)]
    stand_ins = StandIns(deployments * replicas + deployments + burst + 16)
    points = []
    try:
        for k in shape["ingresses"]:
            fleet = Fleet(deployments, replicas, stand_ins.ports, nodes)
            async with ingresses(nodes[:k]) as procs:
                masters = [p.master for p in procs]
                first = await push(procs, fleet.wire())  # the first table: a reload from the empty one
                point: dict[str, Any] = {"ingresses": k, "deployments": deployments, "replicas": replicas,
                                         "servers": fleet.servers(), "first_table": first}
                roots = [p.proc.pid for p in procs]

                async def measure(kind: str, change) -> dict[str, Any]:
                    runs = []
                    before = tree_cpu(roots)
                    for rep in range(reps):
                        change(rep)
                        runs.append(await push(procs, fleet.wire()))
                        await asyncio.sleep(0.3)  # past MIN_RELOAD_INTERVAL_S: a reload is never held back
                    after = tree_cpu(roots)
                    cpu = cpu_spent(before, after)
                    # the ingress's Python (render, runtime API commands; haproxy -c is its child): the rest is HAProxy
                    py = sum(after.get(r, 0.0) - before.get(r, 0.0) for r in roots)
                    return {"kind": kind, "via": sorted({v for r in runs for v in r["via"]}),
                            "last_ms": round(_median([r["last_s"] for r in runs]) * 1000, 2),
                            "last_max_ms": round(max(r["last_s"] for r in runs) * 1000, 2),
                            "apply_ms": round(_median([a for r in runs for a in r["apply_s"]]) * 1000, 2),
                            "cpu_ms_per_ingress": round(cpu * 1000 / (reps * k), 2),
                            "python_cpu_ms_per_ingress": round(py * 1000 / (reps * k), 2)}

                names = list(fleet.deps)
                changes = [
                    await measure("runtime: 1 replica replaced", lambda rep: fleet.replace_replicas([names[rep % len(names)]])),
                    await measure(f"runtime: {len(names)} replicas replaced (1 per deployment)",
                                  lambda rep: fleet.replace_replicas(names)),
                    await measure("reload: a deployment added or removed",
                                  lambda rep: fleet.add("extra") if "extra" not in fleet.deps else fleet.remove("extra")),
                ]
                if "extra" in fleet.deps:
                    fleet.remove("extra")
                    await push(procs, fleet.wire())
                # Background CPU over the same time as one measure: the health checks and health watch
                idle_before = tree_cpu(roots)
                await asyncio.sleep(0.3 * reps)
                idle = cpu_spent(idle_before, tree_cpu(roots))
                # cores each ingress uses with no change: its own replicas' checks and the health watch
                point["idle_cores_per_ingress"] = round(idle / (0.3 * reps * k), 4)
                for c in changes:
                    c["cpu_ms_per_ingress_net"] = round(max(0.0, c["cpu_ms_per_ingress"] - idle * 1000 / (reps * k)), 2)
                point["changes"] = changes
                point["haproxy_rss_kib"] = _median([sum(rss_kib(w) for w in [m, *haproxy_children(m)]) for m in masters])
                point["bursts"] = [await burst_workers(procs, fleet, masters, burst, "runtime"),
                                   await burst_workers(procs, fleet, masters, burst, "reload")]
                infos = [await p.call({"op": "info"}) for p in procs]
                point["updates_per_ingress"] = [i["reloads"] + i["runtime_updates"] for i in infos]
            log(f"push K={k}: " + "; ".join(f"{c['kind']}: last {c['last_ms']} ms via {c['via']}" for c in changes))
            points.append(point)
    finally:
        stand_ins.close()
    return {"shape": {**shape, "ingresses": list(shape["ingresses"]), "virtual_nodes": VIRTUAL_NODES}, "points": points}


async def burst_workers(procs: list[IngressProc], fleet: Fleet, masters: list[int], n: int, kind: str) -> dict[str, Any]:
    """``n`` changes back to back, 2 idle keep-alive clients opened to each ingress after each: HAProxy
    workers per master right after (an old worker stays while it holds a connection)."""
    writers: list[asyncio.StreamWriter] = []
    name = next(iter(fleet.deps))
    before = [len(haproxy_children(m)) for m in masters]
    try:
        writers += await idle_clients(procs, f"/{name}/x", 2)
        vias = set()
        for i in range(n):
            if kind == "runtime":
                fleet.replace_replicas([name])
            elif "extra" in fleet.deps:
                fleet.remove("extra")
            else:
                fleet.add("extra")
            vias.update((await push(procs, fleet.wire()))["via"])
            writers += await idle_clients(procs, f"/{name}/x", 2)
        after = [len(haproxy_children(m)) for m in masters]
    finally:
        close_all(writers)
    if "extra" in fleet.deps:
        fleet.remove("extra")
        await push(procs, fleet.wire())
    return {"kind": kind, "changes": n, "via": sorted(vias), "workers_before": max(before),
            "workers_after_max": max(after), "workers_after_median": _median(after)}


# ---------------------------------------------------------------------------------------------- health


async def part_health(shape: dict[str, Any]) -> dict[str, Any]:
    replicas, k, window = shape["replicas"], shape["ingresses"], shape["window_s"]
    nodes = [f"n{i}" for i in range(k)]
    stand_ins = StandIns(replicas)
    runs = []
    try:
        for shared in (False, True):
            fleet = Fleet(1, replicas, stand_ins.ports, nodes, shared=shared)
            async with ingresses(nodes) as procs:
                await push(procs, fleet.wire())
                await asyncio.sleep(2.5)  # HAProxy spreads the first checks over one interval
                masters, pythons = [p.master for p in procs], [p.proc.pid for p in procs]
                c0, t0, cpu0 = stand_ins.ask("checks"), time.monotonic(), tree_cpu(masters)
                py0, sc0 = sum(cpu_seconds(p) for p in pythons), cpu_seconds(stand_ins.proc.pid)
                await asyncio.sleep(window)
                c1, t1, cpu1 = stand_ins.ask("checks"), time.monotonic(), tree_cpu(masters)
                py1, sc1 = sum(cpu_seconds(p) for p in pythons), cpu_seconds(stand_ins.proc.pid)
            per_replica = [(b - a) / (t1 - t0) for a, b in zip(c0, c1)]
            total = sum(per_replica)
            haproxy_cpu = cpu_spent(cpu0, cpu1) / (t1 - t0)
            python_cpu = (py1 - py0) / (t1 - t0)  # the ingress processes: the health watch (shared health only)
            stand_in_cpu = (sc1 - sc0) / (t1 - t0)
            runs.append({"shared": shared, "ingresses": k, "replicas": replicas, "checks_per_s": round(total, 1),
                         "per_replica_per_s": round(total / replicas, 3),
                         "per_replica_min_max": [round(min(per_replica), 2), round(max(per_replica), 2)],
                         "per_ingress_per_s": round(total / k, 1),
                         "haproxy_cpu_share": round(haproxy_cpu, 4),  # cores, all K HAProxies together
                         "haproxy_us_per_check": round(haproxy_cpu * 1e6 / total, 1) if total else None,
                         "ingress_python_cores": round(python_cpu, 4),  # all K together
                         "stand_ins_us_per_check": round(stand_in_cpu * 1e6 / total, 1) if total else None})
            log(f"health shared={shared}: {total:.0f} checks/s from {k} ingresses to {replicas} replicas")
    finally:
        stand_ins.close()
    return {"shape": shape, "runs": runs}


# ---------------------------------------------------------------------------------------------- latency


async def part_latency(shape: dict[str, Any]) -> dict[str, Any]:
    if wrk_path() is None:
        return {"skipped": "wrk is not installed"}
    deployments, replicas, duration, conns = (shape["deployments"], shape["replicas"], shape["duration_s"],
                                              shape["connections"])
    stand_ins = StandIns(deployments * replicas + deployments + 16)
    phases = []
    try:
        fleet = Fleet(deployments, replicas, stand_ins.ports, ["n0"])
        async with ingresses(["n0"]) as procs:
            (ing,) = procs
            await push(procs, fleet.wire())
            url = f"http://{HOST}:{ing.port}/d0/x"
            await asyncio.to_thread(run_wrk, url, conns, 1)  # warm-up
            others = [n for n in fleet.deps if n != "d0"]
            for phase in ("quiet", "runtime", "reload"):
                stop = asyncio.Event()
                vias: list[str] = []
                change_ms: list[float] = []

                async def changer() -> None:
                    i = 0
                    while not stop.is_set():
                        if phase == "runtime":
                            fleet.replace_replicas([others[i % len(others)]])
                        elif "extra" in fleet.deps:
                            fleet.remove("extra")
                        else:
                            fleet.add("extra")
                        r = await push(procs, fleet.wire())
                        vias.extend(r["via"])
                        change_ms.append(r["last_s"] * 1000)
                        i += 1
                        await asyncio.sleep(0.1 if phase == "runtime" else 0.25)

                task = asyncio.create_task(changer()) if phase != "quiet" else None
                before = await ing.call({"op": "info"})
                try:
                    w = await asyncio.to_thread(run_wrk, url, conns, duration)
                finally:
                    stop.set()
                    if task is not None:
                        await task
                after = await ing.call({"op": "info"})
                phases.append({"phase": phase, "changes": len(change_ms), "via": sorted(set(vias)),
                               "reloads": after["reloads"] - before["reloads"],
                               "runtime_updates": after["runtime_updates"] - before["runtime_updates"],
                               "change_ms_median": round(_median(change_ms), 2),
                               **{k: w[k] for k in ("rps", "p50_ms", "p99_ms", "max_ms", "requests", "non2xx",
                                                    "socket_errors")}})
                log(f"latency {phase}: {w['rps']:.0f} req/s p50 {w['p50_ms']} p99 {w['p99_ms']} ms, "
                    f"{w['non2xx'] + w['socket_errors']} failed, {len(change_ms)} changes")
    finally:
        stand_ins.close()
    return {"shape": shape, "phases": phases}


# ---------------------------------------------------------------------------------------------- ready (Ray)


def wait_answering(base: str, names: list[str], t0: float) -> dict[str, float]:
    """Seconds from ``t0`` until each route first answered 200 (polled every 0.1 s, for up to 300 s)."""
    import httpx

    ready_at: dict[str, float] = {}
    with httpx.Client(timeout=2) as client:
        while len(ready_at) < len(names) and time.monotonic() < t0 + 300:
            for name in names:
                if name in ready_at:
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{base}/{name}/x").status_code == 200:
                        ready_at[name] = time.monotonic() - t0
            time.sleep(0.1)
    if len(ready_at) < len(names):
        raise TimeoutError(f"{len(names) - len(ready_at)} of {len(names)} deployments not answering after 300 s")
    return ready_at


def ready_rayfleet_run(n: int) -> dict[str, Any]:
    """``rayfleet run FILE.yaml`` of ``n`` one-replica deployments: seconds from the command's start (its
    local Ray's start included) until every route answers. Its output goes to a file: a pipe nobody reads
    would stop it."""
    from rayfleet.ports import free_port

    names = [f"s{i}" for i in range(n)]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "scale.yaml"
        manifest.write_text("---\n".join(
            f"apiVersion: rayfleet.io/v1alpha1\nkind: ServeDeployment\nmetadata: {{name: {name}}}\nspec:\n"
            f"  handler: bench.handlers:trivial\n  replicas: 1\n  routePrefix: /{name}\n"
            f"  rayActorOptions: {{numCpus: 0.05}}\n" for name in names))
        with open(Path(tmp) / "out.log", "w") as log_file:
            t0 = time.monotonic()
            proc = subprocess.Popen([str(Path(sys.executable).with_name("rayfleet")), "run", str(manifest),
                                     "--port", str(port)], cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                ready_at = wait_answering(f"http://{HOST}:{port}", names, t0)
            finally:
                proc.terminate()  # an orderly stop: Ray and everything it started
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return {"first_ready_s": round(min(ready_at.values()), 2), "all_ready_s": round(max(ready_at.values()), 2)}


def ready_worker(system: str, n: int, out: str) -> int:
    """One system, ``n`` one-replica deployments, on a fresh local Ray of this process (``_ready``)."""
    if system == "rayfleet-run":
        result: dict[str, Any] = {"system": system, "deployments": n}
        try:
            result.update(ready_rayfleet_run(n))
        except Exception as exc:  # noqa: BLE001
            result["error"] = f"{type(exc).__name__}: {exc}"
        Path(out).write_text(json.dumps(result, indent=1))
        return 0 if "error" not in result else 1
    from bench.systems import repo_on_pythonpath, start_local_ray
    from rayfleet.procs import Leftovers
    import ray

    pythonpath = repo_on_pythonpath()
    result = {"system": system, "deployments": n}
    leftovers = Leftovers()
    t_start = time.monotonic()
    try:
        start_local_ray("rayfleet" if system == "rayfleet" else "serve", pythonpath)
        names = [f"s{i}" for i in range(n)]
        if system == "rayfleet":
            from bench.systems import Rayfleet
            from rayfleet_api.desired import ActorOptions, DesiredState

            sysobj = Rayfleet()
            sysobj.start()
            base = f"http://{HOST}:{sysobj.ingress_port}"
            t0 = time.monotonic()
            for name in names:
                sysobj.api.put_deployment(name, DesiredState(
                    handler="bench.handlers:trivial", replicas=1, version="v1", route_prefix=f"/{name}",
                    ray_actor_options=ActorOptions(num_cpus=0.05), graceful_shutdown_seconds=2))
        else:
            from ray import serve
            from bench.serve_app import AsyncHandler
            from bench.systems import Serve
            from rayfleet.ports import free_port

            sysobj = Serve("serve-default")
            sysobj.serve, sysobj.port = serve, free_port()
            serve.start(http_options={"host": HOST, "port": sysobj.port})
            base = f"http://{HOST}:{sysobj.port}"
            try:
                from ray.serve.api import _run as serve_run  # returns before the app runs
                kwargs: dict[str, Any] = {"_blocking": False}
            except ImportError:  # pragma: no cover
                serve_run, kwargs = serve.run, {}
            t0 = time.monotonic()
            for name in names:
                app = AsyncHandler.options(num_replicas=1, ray_actor_options={"num_cpus": 0.05},
                                           graceful_shutdown_timeout_s=1).bind("trivial")
                serve_run(app, name=name, route_prefix=f"/{name}", **kwargs)
        requested_s = time.monotonic() - t0
        ready_at = wait_answering(base, names, t0)
        leftovers.note()
        pids = [p for name in names for p in sysobj.replica_pids(name)]
        mems = [m for m in (mem_kib(p) for p in pids) if m]
        everything = [m for m in (mem_kib(p) for p in descendants(os.getpid())) if m]
        result.update({
            "requested_s": round(requested_s, 2),
            "first_ready_s": round(min(ready_at.values()), 2), "all_ready_s": round(max(ready_at.values()), 2),
            "replica_processes": len(mems),
            "replica_rss_mib": round(_median([m["Rss"] for m in mems]) / 1024, 1),
            "replica_uss_mib": round(_median([m["Uss"] for m in mems]) / 1024, 1),
            "replica_pss_mib": round(_median([m["Pss"] for m in mems]) / 1024, 1),
            "all_processes_pss_mib": round(sum(m["Pss"] for m in everything) / 1024, 1),
            "all_processes": len(everything),
        })
    except Exception as exc:  # noqa: BLE001
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
    finally:
        result["wall_s"] = round(time.monotonic() - t_start, 1)
        leftovers.note()
        with contextlib.suppress(Exception):
            ray.shutdown()
        leftovers.kill()
        Path(out).write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


def part_ready(shape: dict[str, Any]) -> dict[str, Any]:
    if importlib.util.find_spec("ray") is None:
        return {"skipped": "ray is not installed"}
    runs = []
    for n in shape["counts"]:
        for system in shape["systems"]:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = f.name
            proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "_ready", system, str(n), out], cwd=REPO,
                                    start_new_session=True,
                                    stdout=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL,
                                    stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL)
            try:
                proc.wait(600)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            try:
                r = json.loads(Path(out).read_text() or "{}")
            except (OSError, ValueError):
                r = {}
            r = r or {"system": system, "deployments": n, "error": f"worker exited {proc.returncode} with no result"}
            with contextlib.suppress(OSError):
                os.unlink(out)
            runs.append(r)
            log(f"ready {system} N={n}: " + (r.get("error") or f"all answering after {r['all_ready_s']} s"))
    return {"shape": {**shape, "counts": list(shape["counts"]), "systems": list(shape["systems"])}, "runs": runs}


# ---------------------------------------------------------------------------------------------- report


def render(report: dict[str, Any]) -> str:
    lines = [f"# Scale benchmark ({report['started']}, {report['machine']})", ""]
    push_ = report["parts"].get("push")
    if push_:
        lines += ["### Route push: the same change to K ingresses at once", "",
                  "| K ingresses | servers | change | via | to the last: median ms | max ms | one ingress's apply: "
                  "median ms | CPU ms per ingress per push | less idle | of which the ingress's Python (+ haproxy -c) |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for p in push_["points"]:
            lines.append(f"| {p['ingresses']} | {p['servers']} | first table | {', '.join(p['first_table']['via'])} | "
                         f"{p['first_table']['last_s'] * 1000:.0f} | | | | | |")
            for c in p["changes"]:
                lines.append(f"| {p['ingresses']} | {p['servers']} | {c['kind']} | {', '.join(c['via'])} | "
                             f"{c['last_ms']} | {c['last_max_ms']} | {c['apply_ms']} | {c['cpu_ms_per_ingress']} | "
                             f"{c['cpu_ms_per_ingress_net']} | {c['python_cpu_ms_per_ingress']} |")
        lines += ["", "| K ingresses | servers | burst | HAProxy processes per master before | right after: max | "
                  "median | HAProxy RSS per ingress MiB | idle CPU per ingress (cores) |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|"]
        for p in push_["points"]:
            for b in p["bursts"]:
                lines.append(f"| {p['ingresses']} | {p['servers']} | {b['changes']} x {b['kind']} | "
                             f"{b['workers_before']} | {b['workers_after_max']} | {b['workers_after_median']} | "
                             f"{p['haproxy_rss_kib'] / 1024:.1f} | {p['idle_cores_per_ingress']} |")
        lines.append("")
    health = report["parts"].get("health")
    if health:
        lines += ["### Health-check load", "", "| sharedHealth | K ingresses | replicas | checks/s (all) | per replica/s "
                  "| per ingress/s | HAProxy CPU (cores, all K) | HAProxy us per check | ingress Python CPU (cores, all K) | "
                  "stand-ins us per check |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in health["runs"]:
            lines.append(f"| {'yes' if r['shared'] else 'no'} | {r['ingresses']} | {r['replicas']} | {r['checks_per_s']} | "
                         f"{r['per_replica_per_s']} | {r['per_ingress_per_s']} | {r['haproxy_cpu_share']} | "
                         f"{r['haproxy_us_per_check']} | {r['ingress_python_cores']} | {r['stand_ins_us_per_check']} |")
        lines.append("")
    lat = report["parts"].get("latency")
    if lat and "phases" in lat:
        s = lat["shape"]
        lines += [f"### One deployment's latency while others change ({s['deployments']} x {s['replicas']}, wrk "
                  f"-c{s['connections']}, {s['duration_s']:g} s)", "",
                  "| while | changes | reloads | runtime updates | change ms (median) | req/s | p50 ms | p99 ms | max ms "
                  "| non-2xx | socket errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for ph in lat["phases"]:
            lines.append(f"| {ph['phase']} | {ph['changes']} | {ph['reloads']} | {ph['runtime_updates']} | "
                         f"{ph['change_ms_median']} | {ph['rps']:.0f} | {ph['p50_ms']} | {ph['p99_ms']} | {ph['max_ms']} | "
                         f"{ph['non2xx']} | {ph['socket_errors']} |")
        lines.append("")
    elif lat:
        lines += [f"### Latency: skipped ({lat.get('skipped')})", ""]
    ready = report["parts"].get("ready")
    if ready and "runs" in ready:
        lines += ["### Time to ready and memory per replica (local Ray, one-replica deployments, numCpus 0.05)", "",
                  "| system | deployments | requests sent s | first answers s | all answer s | replica RSS MiB | "
                  "USS MiB | PSS MiB | all processes PSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ready["runs"]:
            if "error" in r:
                lines.append(f"| {r['system']} | {r['deployments']} | failed: {r['error'][:120]} | | | | | | |")
                continue
            cells = [r.get(k, "") for k in ("requested_s", "first_ready_s", "all_ready_s", "replica_rss_mib",
                                            "replica_uss_mib", "replica_pss_mib", "all_processes_pss_mib")]
            lines.append(f"| {r['system']} | {r['deployments']} | " + " | ".join(map(str, cells)) + " |")
        lines.append("")
    elif ready:
        lines += [f"### Ready: skipped ({ready.get('skipped')})", ""]
    for part, err in report.get("errors", {}).items():
        lines += [f"**{part} failed**: `{err}`", ""]
    return "\n".join(lines)


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    return f"{os.cpu_count()} CPUs {model}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_stand_ins"]:
        stand_ins_main(int(argv[1]))
        return 0
    if argv[:1] == ["_ingress"]:
        ingress_main(argv[1], int(argv[2]), argv[3])
        return 0
    if argv[:1] == ["_ready"]:
        return ready_worker(argv[1], int(argv[2]), argv[3])
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="the smallest shapes (a few seconds a part)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part: {', '.join(unknown)}")
    shapes = QUICK if args.quick else FULL
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                              "quick": args.quick, "loadavg_before": os.getloadavg(), "parts": {}, "errors": {}}
    t0 = time.monotonic()
    for part in parts:
        log(f"{part}: {shapes[part]}")
        try:
            if part == "ready":
                report["parts"][part] = part_ready(shapes[part])
            else:
                report["parts"][part] = asyncio.run({"push": part_push, "health": part_health,
                                                     "latency": part_latency}[part](shapes[part]))
        except Exception as exc:  # noqa: BLE001
            report["errors"][part] = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc())
    report["wall_s"] = round(time.monotonic() - t0, 1)
    report["loadavg_after"] = os.getloadavg()
    md = render(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(report, indent=1))
    (out / "scale.md").write_text(md)
    print(md)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
