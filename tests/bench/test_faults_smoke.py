"""Smoke run of the fault benchmark (not a benchmark): rayfleet only, one scenario, ``--quick``.

It only checks that ``python -m bench.faults`` runs end to end, kills a replica under load and measures a
recovery; no number is asserted beyond "recovery is a number". The real run is described in
bench/README.md ("Fault benchmark").
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.ray, pytest.mark.timeout(150)]


def test_faults_smoke(tmp_path):
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install -y wrk); the benchmark needs a real HTTP load generator")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--systems", "rayfleet", "--scenarios", "kill-replica", "--quick",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("| system |"))
    row = next((ln for ln in lines if ln.startswith("| rayfleet |")), None)
    assert row is not None, proc.stdout
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    float(cells["recovery s"])  # a number, not "never" or an error
    result = json.loads((tmp_path / "faults.json").read_text())["runs"]["rayfleet"]["results"]["kill-replica"]
    assert isinstance(result["recovery_s"], float), result
    assert (tmp_path / "faults.md").read_text().startswith("# Faults under load")
