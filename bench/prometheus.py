"""A real Prometheus for the golden-signals bench and the metrics tests: start one on loopback, scrape our
endpoints, query it.

Debian's ``prometheus`` package (``make setup`` installs it as root, next to wrk). Each instance gets its own
config, TSDB directory and free port, and is stopped with everything it started. Queries go through
Prometheus' HTTP API (``/api/v1/query``, ``/api/v1/query_range``), exactly as Grafana's would.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Sequence

from rayfleet.ports import free_port
from rayfleet.procs import spawn, stop_process_group
from rayfleet.waiting import eventually

SCRAPE_INTERVAL = "1s"


def prometheus_path() -> str | None:
    return shutil.which("prometheus") or next((p for p in ("/usr/bin/prometheus",) if os.access(p, os.X_OK)), None)


class PrometheusError(RuntimeError):
    pass


Sample = dict[str, Any]  # one series of an instant vector: {"metric": {labels}, "value": [t, "v"]}


class Prometheus:
    """One Prometheus process scraping ``targets`` (job name -> ["host:port", ...]) every ``scrape_interval``."""

    def __init__(self, workdir: Path, targets: Mapping[str, Sequence[str]], scrape_interval: str = SCRAPE_INTERVAL,
                 metrics_path: str = "/metrics"):
        self.workdir = Path(workdir)
        self.targets = {job: list(addrs) for job, addrs in targets.items()}
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.workdir / "prometheus.log"
        self.popen = None

    def config(self) -> dict[str, Any]:
        return {"global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                           "evaluation_interval": self.scrape_interval},
                "scrape_configs": [{"job_name": job, "metrics_path": self.metrics_path,
                                    "static_configs": [{"targets": addrs}]} for job, addrs in self.targets.items()]}

    def start(self, timeout: float = 60) -> "Prometheus":
        binary = prometheus_path()
        if binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install -y prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=1))  # JSON is YAML
        self.popen = spawn([binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
                            "--log.level=warn"], self.log, cwd=self.workdir)

        def ready() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.popen.returncode}:\n{self.log_tail()}")
            return self.answers_ready()
        eventually(ready, timeout, 0.2, what=f"prometheus ready at {self.url}", diagnostics=self.log_tail)
        return self

    def answers_ready(self) -> bool:
        """Whether Prometheus at `url` says it is ready (/-/ready)."""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            stop_process_group(self.popen, 10)

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    # ---------------------------------------------------------------- the HTTP API

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; its ``data``, or PrometheusError with Prometheus' own message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400 for a bad query, 422 for one that can't run
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """The instant vector ``expr`` evaluates to (now, or at ``at``)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range vector results: [{"metric": {labels}, "values": [[t, "v"], ...]}, ...]."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def values(self, expr: str, by: str | Sequence[str] | None = None) -> dict[Any, float]:
        """``expr``'s series as {label value (or a tuple of them, for several labels): value}."""
        names = (by,) if isinstance(by, str) else tuple(by or ())
        out = {}
        for sample in self.query(expr):
            key = tuple(sample["metric"].get(n, "") for n in names)
            out[key[0] if len(key) == 1 else key] = float(sample["value"][1])
        return out

    def value(self, expr: str) -> float | None:
        """The value of a query that yields one series (say, a ``sum(...)``); None if it yields none."""
        result = self.query(expr)
        if len(result) > 1:
            raise PrometheusError(f"{expr} yields {len(result)} series, not one: {result}")
        return float(result[0]["value"][1]) if result else None

    def targets_health(self) -> dict[str, dict[str, Any]]:
        """Active targets by scrape URL: {"health": "up"|"down"|"unknown", "lastError", "lastScrape", "job"}."""
        return {t["scrapeUrl"]: {"job": t["labels"].get("job"), "health": t["health"], "lastError": t["lastError"],
                                 "lastScrape": t["lastScrape"]}
                for t in self.api("targets", state="active")["activeTargets"]}

    def wait_up(self, job: str, timeout: float = 60) -> None:
        """Until every target of ``job`` has been scraped successfully (``up == 1``)."""
        want = len(self.targets[job])

        def up() -> bool:
            got = self.values(f'up{{job="{job}"}}', by="instance")
            return len(got) == want and all(v == 1 for v in got.values())
        eventually(up, timeout, 0.3, what=f"prometheus to scrape job {job} successfully",
                   diagnostics=lambda: f"targets: {self.targets_health()}\n{self.log_tail()}")

    def wait_value(self, expr: str, expected: float, timeout: float = 30, grows: bool = True) -> float:
        """Until ``expr`` (one series) equals ``expected``. With ``grows`` (a counter), a value past ``expected``
        fails at once: it can only grow further."""
        def check() -> bool:
            got = self.value(expr)
            if grows and got is not None and got > expected:
                raise AssertionError(f"{expr} = {got:g}, past the expected {expected:g}")
            return got is not None and math.isclose(got, expected)
        eventually(check, timeout, 0.3, what=f"{expr} == {expected:g}",
                   diagnostics=lambda: f"last: {self.query(expr)}\ntargets: {self.targets_health()}")
        return expected

    def wait_scraped_after(self, job: str, t: float, timeout: float = 30) -> None:
        """Until a scrape of every target of ``job`` started after the wall-clock time ``t`` (and succeeded): what
        that target counted up to ``t`` is then in Prometheus."""
        def fresh() -> bool:
            mine = [h for h in self.targets_health().values() if h["job"] == job]
            return len(mine) == len(self.targets[job]) and all(
                h["health"] == "up" and _rfc3339(h["lastScrape"]) > t for h in mine)
        eventually(fresh, timeout, 0.2, what=f"a scrape of {job} after t={t:.3f}",
                   diagnostics=lambda: f"targets: {self.targets_health()}")


def _rfc3339(text: str) -> float:
    """Prometheus' lastScrape ("2024-01-02T03:04:05.123456789Z", or with an offset) as a Unix time."""
    from datetime import datetime  # noqa: PLC0415

    if text.startswith("0001-"):
        return 0.0
    head, _, rest = text.partition(".")
    frac, zone = "", "Z"
    if rest:
        i = next((k for k, ch in enumerate(rest) if not ch.isdigit()), len(rest))
        frac, zone = rest[:i], rest[i:] or "Z"
    else:
        for sep in ("Z", "+", "-"):
            idx = head.find(sep, 19)
            if idx != -1:
                head, zone = head[:idx], head[idx:]
                break
    zone = "+00:00" if zone == "Z" else zone
    seconds = datetime.fromisoformat(head + zone).timestamp()
    return seconds + (float(f"0.{frac}") if frac else 0.0)
