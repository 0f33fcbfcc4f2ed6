"""Faults under load, rayfleet vs Ray Serve, one command: ``python -m bench.faults``.

Runs each system one after the other, each in its own subprocess with a fresh local Ray
(``bench.fault_worker``): per scenario, 2 replicas of ``bench.handlers:Faulty`` under wrk, one fault
injected a few seconds in, recovery measured by polling. Prints one markdown table per scenario (the
systems side by side) and writes ``bench/results/faults.{md,json}``. See bench/README.md, "Fault benchmark".
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fault_scenarios import RECOVERY_DEADLINE_S, SCENARIO_DEFS, SCENARIOS
from bench.fault_systems import SYSTEMS
from bench.run import RESULTS, SYSTEM_DESC, SYSTEM_ENV, machine_info, selection
from bench.wrk import wrk_path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SYSTEMS = ("rayfleet", "serve-haproxy")
QUICK_DURATION, QUICK_FAULT_AT = 6.0, 2.0


def run_worker(system: str, scenarios: list[str], args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    env.update(SYSTEM_ENV[system])
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # each scenario: a deploy (Serve: up to a minute), the load, up to a minute of recovery, a delete
    timeout = 120 + len(scenarios) * (args.duration + 180)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "bench.fault_worker", "--system", system, "--scenarios", ",".join(scenarios),
               "--duration", str(args.duration), "--fault-at", str(args.fault_at), "--conns", str(args.conns),
               "--out", str(out)]
        print(f"== {system}: {SYSTEM_DESC[system]}", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, stdout=subprocess.DEVNULL,
                                  stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            return {"system": system, "error": f"timed out after {timeout:.0f}s", "results": {}}
        data = json.loads(out.read_text()) if out.exists() else \
            {"system": system, "error": f"worker exited {proc.returncode} without results", "results": {}}
        if proc.stderr:  # our own progress lines only, not Ray's chatter
            for line in proc.stderr.splitlines():
                if line.startswith(f"[{system}]"):
                    print(line, file=sys.stderr, flush=True)
            if proc.returncode and data.get("error"):
                data["stderr_tail"] = proc.stderr[-3000:]
        return data


# ------------------------------------------------------------------ reporting

def _socket_errors(wrk: dict[str, Any]) -> str:
    detail = ", ".join(f"{k} {v}" for k, v in wrk["errors_detail"].items() if v)
    return f"{wrk['socket_errors']} ({detail})" if detail else "0"


def _recovery(res: dict[str, Any]) -> str:
    rec = res.get("recovery_s")
    if isinstance(rec, (int, float)):
        return f"{rec:.2f}"
    return "never" if res.get("never") else str(rec)


def scenario_table(sid: str, systems: list[str], runs: dict[str, Any]) -> list[str]:
    results = {s: runs[s]["results"][sid] for s in systems if sid in runs[s].get("results", {})}
    if not results:
        return []
    extras = list(dict.fromkeys(k for r in results.values() for k in r.get("extra", {})))
    cols = ["system", "requests", "non-2xx", "socket errors", "p99 ms", "max ms", "recovery s", *extras, "notes"]
    lines = [f"### {sid}: {SCENARIO_DEFS[sid].what}", "", "| " + " | ".join(cols) + " |",
             "|---|" + "---:|" * 6 + "---|" * (len(extras) + 1)]
    for system, res in results.items():
        wrk = res.get("wrk")
        if res.get("error") or not wrk:
            lines.append(f"| {system} |" + " - |" * (len(cols) - 2) + f" ERROR {res.get('error', 'no wrk result')} |")
            continue
        cells = [system, str(wrk["requests"]), str(wrk["non2xx"]), _socket_errors(wrk), f"{wrk['p99_ms']:.1f}",
                 f"{wrk['max_ms']:.0f}", _recovery(res), *(str(res["extra"].get(k, "")) for k in extras),
                 res.get("never", "")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    runs, m = report["runs"], report["machine"]
    systems = [s for s in report["systems"] if s in runs]
    lines = [f"# Faults under load: rayfleet vs Ray Serve ({report['started']})", "",
             f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, Linux {m['kernel']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
             f"Per scenario: a fresh deployment (2 replicas unless the scenario says otherwise), wrk -c{report['conns']} "
             f"for {report['duration']:g} s on its trivial path, the fault at t = {report['fault_at']:g} s; recovery "
             f"= seconds from the fault until recovered (see bench/README.md), \"never\" after "
             f"{report['recovery_deadline_s']:.0f} s. Every system in a fresh local Ray, one after the other.", "",
             "Systems:", "", *(f"* `{s}`: {SYSTEM_DESC[s]}" for s in systems), ""]
    for s in systems:
        if runs[s].get("error"):
            lines += [f"**{s} FAILED**: {runs[s]['error']}", ""]
    for sid in report["scenarios"]:
        lines += scenario_table(sid, systems, runs)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--duration", type=float, default=None, help="seconds of wrk per scenario (default 20; 6 with --quick)")
    p.add_argument("--fault-at", type=float, default=None, help="seconds into the load (default 5; 2 with --quick)")
    p.add_argument("--conns", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_DURATION:g} s of load, fault at {QUICK_FAULT_AT:g} s")
    p.add_argument("--out", default=str(RESULTS), help="directory for faults.{md,json} (default bench/results)")
    args = p.parse_args(argv)
    if wrk_path() is None:
        print("bench: wrk is not installed (apt-get install -y wrk)", file=sys.stderr)
        return 2
    systems, scenarios = selection(p, args, SYSTEMS, SCENARIOS)
    args.duration = args.duration or (QUICK_DURATION if args.quick else 20.0)
    args.fault_at = args.fault_at if args.fault_at is not None else (QUICK_FAULT_AT if args.quick else 5.0)
    if not 0 <= args.fault_at < args.duration:
        p.error("--fault-at must fall inside --duration")

    report: dict[str, Any] = {"started": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "systems": systems,
                              "scenarios": scenarios, "duration": args.duration, "fault_at": args.fault_at,
                              "conns": args.conns, "recovery_deadline_s": RECOVERY_DEADLINE_S,
                              "machine": machine_info(), "runs": {}}
    for s in systems:
        t = time.monotonic()
        report["runs"][s] = run_worker(s, scenarios, args)
        print(f"== {s}: done in {time.monotonic() - t:.0f}s" + (f" - ERROR {report['runs'][s]['error']}"
                                                                  if report["runs"][s].get("error") else ""),
              file=sys.stderr, flush=True)
    md = render_markdown(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "faults.md").write_text(md)
    print(md)
    print(f"results: {out / 'faults.md'} {out / 'faults.json'}", file=sys.stderr)
    failed = any(r.get("error") or any(x.get("error") for x in r.get("results", {}).values())
                 for r in report["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
