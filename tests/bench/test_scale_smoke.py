"""Smoke run of the scale benchmark (not a benchmark): its quick shapes of the parts that need no Ray.

It checks behaviour, never speed: every simulated ingress applied each table, a change of replicas alone went
through HAProxy's runtime API and a new deployment through a reload, a burst of reloads with idle keep-alive
clients left old HAProxy workers and a burst of runtime changes none, shared health checks each replica from
one ingress instead of all, and the deployment under load answered while the others changed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rayfleet_runtime.ingress.haproxy_bin import HAProxyNotFound, find_haproxy

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(240)]

try:
    find_haproxy()
except HAProxyNotFound:  # pragma: no cover
    pytest.skip("no HAProxy binary", allow_module_level=True)


def test_quick_push_health_and_latency(tmp_path):
    from bench.wrk import wrk_path

    parts = "push,health" + (",latency" if wrk_path() else "")
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--quick", "--parts", parts, "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "scale.json").read_text())
    assert report["errors"] == {} and "# Scale benchmark" in (tmp_path / "scale.md").read_text()

    push = report["parts"]["push"]
    assert [p["ingresses"] for p in push["points"]] == list(push["shape"]["ingresses"])
    for point in push["points"]:
        runtime_1, runtime_all, reload = point["changes"]
        assert runtime_1["via"] == ["runtime"] and runtime_all["via"] == ["runtime"], point["changes"]
        assert reload["via"] == ["reload"], point["changes"]
        # Every ingress applied every table: the first, each measured change, the bursts' changes
        changes = 1 + 3 * push["shape"]["reps"] + 2 * push["shape"]["burst"]
        assert all(n >= changes for n in point["updates_per_ingress"]), (changes, point["updates_per_ingress"])
        runtime_burst, reload_burst = point["bursts"]
        assert runtime_burst["via"] == ["runtime"] and runtime_burst["workers_after_max"] == 1, runtime_burst
        assert reload_burst["via"] == ["reload"] and reload_burst["workers_after_max"] > 1, reload_burst

    unshared, shared = report["parts"]["health"]["runs"]
    assert (unshared["shared"], shared["shared"]) == (False, True)
    assert 0 < shared["checks_per_s"] < unshared["checks_per_s"], (shared, unshared)
    assert shared["per_replica_min_max"][0] > 0  # every replica is still checked, by its own node's ingress

    if "latency" in parts:
        phases = {p["phase"]: p for p in report["parts"]["latency"]["phases"]}
        assert set(phases) == {"quiet", "runtime", "reload"}
        assert phases["runtime"]["runtime_updates"] > 0 and phases["runtime"]["reloads"] == 0, phases["runtime"]
        assert phases["reload"]["reloads"] > 0, phases["reload"]
        assert all(p["requests"] > 0 and p["non2xx"] == 0 for p in phases.values()), phases
