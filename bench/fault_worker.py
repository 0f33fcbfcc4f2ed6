"""One system's fault scenarios, in its own process and its own fresh local Ray: ``python -m bench.fault_worker``.

``bench.faults`` starts one of these per system (as ``bench.run`` starts ``bench.worker``), collects the
JSON it writes and builds the tables. The scenarios are ``bench.fault_scenarios``'s. By hand:
``python -m bench.fault_worker --system rayfleet --scenarios kill-replica --duration 6 --fault-at 2 --out r.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from bench.fault_scenarios import SCENARIO_DEFS, SCENARIOS, run_scenario
from bench.fault_systems import SYSTEMS, FleetFaults, ServeFaults
from bench.systems import repo_on_pythonpath, start_local_ray
from rayfleet.procs import Leftovers


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

    pythonpath = repo_on_pythonpath()
    record_dir = Path(tempfile.mkdtemp(prefix="rayfleet-faults-"))
    system = FleetFaults(str(record_dir)) if args.system == "rayfleet" else ServeFaults(args.system, str(record_dir))
    out: dict[str, Any] = {"system": args.system, "results": {}}
    t0 = time.monotonic()
    start_local_ray(args.system, pythonpath)
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
