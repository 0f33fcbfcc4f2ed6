"""One system under test, in its own process and its own fresh local Ray: ``python -m bench.worker``.

``bench.run`` starts one of these per system (so RAY_SERVE_* env vars apply from the start and nothing
leaks between systems), collects the JSON it writes, and builds the table. Not meant to be run by hand,
but it can be: ``python -m bench.worker --system rayfleet --scenarios trivial --duration 5 --out r.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.load_scenarios import BARE_SCENARIOS, SCENARIOS, TRIVIAL_CONNS, run_system
from bench.systems import BARE, SYSTEMS, BareUvicorn, Rayfleet, Serve, repo_on_pythonpath, start_local_ray
from rayfleet.procs import Leftovers


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

    pythonpath = repo_on_pythonpath()
    import ray

    if args.system == BARE:
        scenarios = [s for s in scenarios if s in BARE_SCENARIOS]
    out: dict[str, Any] = {"system": args.system, "scenarios": scenarios, "duration_s": args.duration,
                           "loadavg_before": os.getloadavg()}
    system = {"rayfleet": Rayfleet, BARE: BareUvicorn}.get(args.system, lambda: Serve(args.system))()
    t0 = time.monotonic()
    if args.system != BARE:  # the bare server runs without Ray
        start_local_ray(args.system, pythonpath)
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
