"""Run wrk (a real HTTP load generator, in C) and parse its numbers from a Lua ``done`` hook."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, connections: int, duration_s: float, threads: int = 1, timeout_s: float = 5.0) -> dict:
    """One wrk run; returns req/s, latency percentiles (ms), non-2xx and socket error counts."""
    exe = wrk_path()
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    threads = max(1, min(threads, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_LUA)
        script = f.name
    try:
        cmd = [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
               "--timeout", f"{timeout_s:g}s", "-s", script, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    finally:
        os.unlink(script)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    raw = json.loads(line[len("BENCHJSON "):])
    secs = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "duration_s": round(secs, 2),
        "requests": raw["requests"],
        "rps": round(raw["requests"] / secs, 1) if secs else 0.0,
        "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
        "mean_ms": round(raw["mean_us"] / 1000, 3), "max_ms": raw["max_us"] / 1000,
        "non2xx": raw["status"],  # wrk: "Non-2xx or 3xx responses"
        "socket_errors": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        "errors_detail": {k: raw[k] for k in ("connect", "read", "write", "timeout")},
    }
