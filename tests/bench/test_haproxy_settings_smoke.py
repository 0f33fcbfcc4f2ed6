"""Smoke run of the HAProxy settings benchmark (not a benchmark): two variants, 1 s points.

It checks that every variant still renders a configuration HAProxy serves, and that the table carries
HAProxy's and the replicas' CPU per request; numbers are not asserted (bench/README.md has them).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.haproxy_settings import VARIANTS

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(200)]


def test_every_variant_changes_the_rendered_config_and_two_of_them_serve(tmp_path):
    from rayfleet_runtime.ingress.haproxy_config import render_config
    from rayfleet_runtime.routing import RoutingTable

    table = RoutingTable.from_wire({"deployments": {"d": {"routePrefix": "/d", "replicas": [
        {"id": "d-0", "host": "127.0.0.1", "port": 1}]}}})
    cfg = render_config(table, port=2, bind_host="127.0.0.1", runtime_socket="/tmp/x.sock", weights_map="/tmp/x.map")
    changed = {name: change(cfg) for name, change in VARIANTS.items()}
    assert [name for name, text in changed.items() if text == cfg] == ["as rendered"]  # each changes one thing
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install -y wrk)")
    proc = subprocess.run([sys.executable, "-m", "bench.haproxy_settings", "--variants", "as rendered,nbthread 1",
                           "--duration", "1", "--warmup", "0", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    points = json.loads((tmp_path / "haproxy_settings.json").read_text())["points"]
    assert {(p["variant"], p["connections"]) for p in points} == {(v, c) for v in ("as rendered", "nbthread 1")
                                                                  for c in (32, 128)}
    assert all(p["rps"] > 0 and p["non2xx"] == 0 and p["cpu_us_per_request"]["haproxy"] > 0
               and p["cpu_us_per_request"]["replica"] > 0 for p in points), points
