"""Smoke run of the benchmark command (not a benchmark): rayfleet, one Ray Serve mode and the bare server,
one scenario, ~1-2 s each.

It only checks that ``python -m bench.run`` runs end to end and prints a table with a row per system
and the CPU each kind of process spent; numbers are not asserted. The real run is ``make bench`` (see bench/README.md).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.timeout(200)]


def test_bench_smoke(tmp_path):
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install -y wrk); the benchmark needs a real HTTP load generator")
    pytest.importorskip("ray.serve", reason="Ray Serve peers need the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("starlette", reason="Ray Serve peers need the bench extra: pip install -e '.[bench]'")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--systems", "rayfleet,serve-tuned,uvicorn-bare", "--scenarios", "trivial",
         "--trivial-conns", "8", "--duration", "1", "--warmup", "0", "--no-plot", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=190)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    systems = ("rayfleet", "serve-tuned", "uvicorn-bare")
    for system in systems:
        rows = [ln for ln in table.splitlines() if ln.startswith(f"| trivial | {system} |")]
        assert len(rows) == 1, table
        assert all(int(ln.split("|")[4].strip()) > 0 for ln in rows), table  # some req/s
    data = json.loads((tmp_path / "latest.json").read_text())
    assert set(data["runs"]) == set(systems)
    cpu = {s: data["runs"][s]["results"]["trivial"][0]["cpu_us_per_request"] for s in systems}
    assert all(c["replica"] > 0 and c["load generator"] > 0 for c in cpu.values()), cpu  # the servers and wrk were seen
    assert cpu["rayfleet"]["haproxy"] > 0 and cpu["serve-tuned"]["proxy"] > 0 and cpu["uvicorn-bare"]["haproxy"] == 0, cpu
    assert not any(r.get("error") for r in data["runs"].values())
    assert (tmp_path / "latest.md").read_text().startswith("# rayfleet vs Ray Serve")
