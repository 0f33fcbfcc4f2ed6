"""The golden signals of a `rayfleet run` under stepped load, as Prometheus saw them: bench/golden_signals.png.

Starts `rayfleet run` on ``bench.handlers:sleep50`` (2 replicas, maxConcurrency 64 each: HAProxy lets 128
requests run and queues 128 more, and answers 503 past that), a Prometheus scraping its metrics URL every
second (Debian's ``prometheus``, as the tests use it: bench/prometheus.py), and drives wrk in steps: 8, 64 and
256 connections, then a burst of 512, past what it admits, so that 503s appear. Then it asks Prometheus'
``query_range`` API for the golden signals and plots them, each panel titled with its PromQL:

* traffic: request rate by status, as the replicas count it and as HAProxy answers it;
* errors: the 5xx ratio (HAProxy's: its own 503s included), next to the replicas' view of it;
* latency: p50/p99 of the handler-time histogram, and HAProxy's average total time (queueing included);
* saturation: requests in flight and queued (replicas and HAProxy), and ready replicas.

    .venv/bin/python -m bench.golden_signals            # ~2.5 min; needs wrk, prometheus, matplotlib
    .venv/bin/python -m bench.golden_signals --step 5   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.prometheus import Prometheus, prometheus_path
from bench.wrk import run_wrk, wrk_path
from rayfleet.ports import free_port
from rayfleet.procs import cmdline, descendants
from rayfleet.waiting import eventually

REPO = Path(__file__).resolve().parents[1]
RAYFLEET = Path(sys.executable).with_name("rayfleet")
NAME = "golden"
REPLICAS = 2
MAX_CONCURRENCY = 64  # per replica: 128 in flight, 128 queued in HAProxy, the rest 503
STEPS = (8, 64, 256)
BURST = 512
RATE = "[5s]"  # rate() window: a few 1 s scrapes, so a step shows within seconds

MANIFEST = f"""\
apiVersion: rayfleet.io/v1alpha1
kind: ServeDeployment
metadata:
  name: {NAME}
spec:
  handler: bench.handlers:sleep50
  replicas: {REPLICAS}
  maxConcurrency: {MAX_CONCURRENCY}
  routePrefix: /{NAME}
  rayActorOptions: {{numCpus: 0.5}}
"""

SEL = f'deployment="{NAME}"'
# (panel, label, PromQL) -- what the four panels plot
QUERIES: list[tuple[str, str, str]] = [
    ("traffic", "replicas, code {code}", f"sum by (code) (rate(rayfleet_replica_requests_total{{{SEL}}}{RATE}))"),
    ("traffic", "HAProxy, {code}",
     f'sum by (code) (rate(haproxy_backend_http_responses_total{{{SEL}, code=~"2xx|5xx"}}{RATE}))'),
    ("errors", "HAProxy 5xx / all",
     f'sum(rate(haproxy_backend_http_responses_total{{{SEL}, code="5xx"}}{RATE})) / '
     f"sum(rate(haproxy_backend_http_responses_total{{{SEL}}}{RATE}))"),
    ("errors", "replicas 5xx / all",
     f'(sum(rate(rayfleet_replica_requests_total{{{SEL}, code=~"5.."}}{RATE})) or '
     f"sum(rate(rayfleet_replica_requests_total{{{SEL}}}{RATE})) * 0) / "
     f"sum(rate(rayfleet_replica_requests_total{{{SEL}}}{RATE}))"),
    ("latency", "handler p50", f"histogram_quantile(0.5, sum by (le) (rate(rayfleet_replica_request_duration_seconds_bucket{{{SEL}}}{RATE})))"),
    ("latency", "handler p99", f"histogram_quantile(0.99, sum by (le) (rate(rayfleet_replica_request_duration_seconds_bucket{{{SEL}}}{RATE})))"),
    ("latency", "HAProxy avg total (queue incl.)", f"haproxy_backend_total_time_average_seconds{{{SEL}}}"),
    ("saturation", "replicas in flight", f"sum(rayfleet_replica_in_flight{{{SEL}}})"),
    ("saturation", "replicas queued", f"sum(rayfleet_replica_queued{{{SEL}}})"),
    ("saturation", "HAProxy queue", f"sum(haproxy_backend_current_queue{{{SEL}}})"),
    ("saturation", "ready replicas (right axis)", f'sum(rayfleet_controller_replicas{{{SEL}, state="READY"}})'),
]
TITLES = {"traffic": "Traffic: request rate by status (req/s)", "errors": "Errors: 5xx ratio",
          "latency": "Latency (s)", "saturation": "Saturation: requests in flight and queued"}


class Run:
    """`rayfleet run` of MANIFEST in its own session and RAY_TMPDIR; ``stop()`` leaves nothing of it running."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port, self.metrics_port = free_port(), free_port()
        self.ray_tmpdir = tempfile.mkdtemp(prefix="rf-golden-", dir="/tmp")  # short: Ray's unix sockets
        self.log = workdir / "rayfleet-run.log"
        self.seen: dict[int, str] = {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        manifest = self.workdir / "golden.yaml"
        manifest.write_text(MANIFEST)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
        env.update(RAY_TMPDIR=self.ray_tmpdir, PYTHONUNBUFFERED="1")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(RAYFLEET), "run", str(manifest), "--port", str(self.port), "--metrics-port", str(self.metrics_port)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rayfleet run exited with {self.proc.returncode}:\n{self.tail()}")
            self.note()
            return f"{NAME}: {REPLICAS}/{REPLICAS} ready" in self.log.read_text(errors="replace")
        eventually(ready, 120, 0.5, what=f"{NAME} ready", diagnostics=self.tail)
        url = re.search(r"^rayfleet: metrics at (http://\S+)$", self.log.read_text(errors="replace"), re.M)
        assert url, self.tail()

        def routed() -> bool:  # HAProxy has the replicas (a few requests of warm-up)
            try:
                with urllib.request.urlopen(f"{self.url}/{NAME}", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False
        eventually(routed, 60, 0.3, what="HAProxy to route", diagnostics=self.tail)
        return url.group(1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def note(self) -> None:
        if self.proc is not None:
            for pid in descendants(self.proc.pid):
                self.seen.setdefault(pid, cmdline(pid))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.note()
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid, command in self.seen.items():  # whatever outlived the orderly stop (HAProxy, Ray's workers)
            if command and cmdline(pid) == command:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_tmpdir, ignore_errors=True)


def drive(url: str, steps: list[int], seconds: float, log) -> list[dict[str, Any]]:
    """wrk at each connection count in turn; returns [{conns, start, end, wrk result}]."""
    phases = []
    for conns in steps:
        start = time.time()
        result = run_wrk(url, conns, seconds, threads=2, timeout_s=5.0)
        end = time.time()
        log(f"  {conns:4d} conns: {result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.1f} ms  "
            f"p99 {result['p99_ms']:7.1f} ms  non-2xx {result['non2xx']}  socket errors {result['socket_errors']}")
        phases.append({"conns": conns, "start": start, "end": end, "wrk": result})
        time.sleep(2)  # a gap between steps: each shows as its own plateau
    return phases


def plot(series: dict[str, list[tuple[str, list[tuple[float, float]]]]], phases: list[dict[str, Any]], t0: float,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(TITLES)
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 15), sharex=True)
    for ax, panel in zip(axes, panels):
        exprs = []
        right = None
        for (p, label, expr), results in zip(QUERIES, series.values()):
            if p != panel:
                continue
            exprs.append(expr)
            for label_text, points in results:
                if not points:
                    continue
                xs, ys = [t - t0 for t, _ in points], [v for _, v in points]
                if "right axis" in label:
                    right = right or ax.twinx()
                    right.plot(xs, ys, color="grey", linestyle=":", label=label_text)
                    right.set_ylim(0, REPLICAS + 1)
                    right.set_ylabel("replicas")
                else:  # dashed: the replicas' own count, under HAProxy's where they agree
                    ax.plot(xs, ys, label=label_text, linewidth=2.2 if label_text.startswith("replicas") else 1.4,
                            linestyle="--" if label_text.startswith("replicas") and panel != "saturation" else "-")
        for ph in phases:
            ax.axvspan(ph["start"] - t0, ph["end"] - t0, color="tab:blue", alpha=0.06)
        if panel == "latency":
            ax.set_yscale("log")
        if panel == "traffic":  # the refused burst is fast: 10x the rest; a linear axis would flatten the steps
            ax.set_yscale("symlog", linthresh=100)
        if panel == "errors":
            ax.set_ylim(-0.02, 1.02)
        lines, labels = ax.get_legend_handles_labels()
        if right is not None:
            more = right.get_legend_handles_labels()
            lines, labels = lines + more[0], labels + more[1]
        ax.legend(lines, labels, loc="upper left", bbox_to_anchor=(1.07 if right is not None else 1.01, 1.0), fontsize=8)
        title = TITLES[panel] + "\n" + "\n".join(textwrap.fill(e, 130, subsequent_indent="    ") for e in exprs)
        ax.set_title(title, fontsize=8, loc="left", family="monospace")
        ax.grid(alpha=0.3)
    top = axes[0]
    for ph in phases:
        top.annotate(f"{ph['conns']} conns", ((ph["start"] + ph["end"]) / 2 - t0, 1.0),
                     xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=8, color="tab:blue")
    axes[-1].set_xlabel("seconds since the first load step")
    fig.suptitle(f"rayfleet golden signals: `rayfleet run` of bench.handlers:sleep50, {REPLICAS} replicas x "
                 f"maxConcurrency {MAX_CONCURRENCY}, wrk steps; Prometheus, 1 s scrapes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def label_of(template: str, metric: dict[str, str]) -> str:
    return template.format(code=metric.get("code", "")) if "{code}" in template else template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.golden_signals", description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=float, default=20, help="seconds per load step (default 20)")
    parser.add_argument("--burst", type=float, default=15, help=f"seconds of the {BURST}-connection burst (default 15)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "golden_signals.png")
    parser.add_argument("--data", type=Path, default=REPO / "bench" / "results" / "golden_signals.json",
                        help="where the queried series and wrk's numbers go (default bench/results/, gitignored)")
    parser.add_argument("--replot", action="store_true", help="plot --data again, without a run")
    args = parser.parse_args(argv)
    if args.replot:
        data = json.loads(args.data.read_text())
        plot(data["series"], data["phases"], data["t0"], args.out)
        print(f"wrote {args.out}")
        return 0
    missing = [tool for tool, found in (("wrk", wrk_path()), ("prometheus", prometheus_path())) if not found]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install -y {' '.join(missing)})", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, flush=True)

    work = Path(tempfile.mkdtemp(prefix="rf-golden-work-"))
    run = Run(work)
    prom = None
    try:
        log("starting rayfleet run ...")
        metrics_url = run.start()
        target = re.match(r"http://([^/]+)/", metrics_url).group(1)
        prom = Prometheus(work / "prometheus", {"rayfleet": [target]}).start()
        prom.wait_up("rayfleet")
        log(f"rayfleet at {run.url}, metrics {metrics_url}, Prometheus {prom.url}; load:")
        t0 = time.time() - 3
        phases = drive(f"{run.url}/{NAME}", list(STEPS), args.step, log)
        phases += drive(f"{run.url}/{NAME}", [BURST], args.burst, log)
        prom.wait_scraped_after("rayfleet", time.time())
        end = time.time() + 1
        series = {expr: [(label_of(label, r["metric"]), [(float(t), float(v)) for t, v in r["values"]])
                         for r in prom.query_range(expr, t0, end, 1)] for _, label, expr in QUERIES}
        scrapes = prom.query_range('up{job="rayfleet"}', t0, end, 1)
        down = sum(1 for r in scrapes for _, v in r["values"] if float(v) != 1)
        durations = prom.value('max_over_time(scrape_duration_seconds{job="rayfleet"}[10m])')
        log(f"scrapes: {down} failed of the {sum(len(r['values']) for r in scrapes)} 1 s steps; "
            f"longest scrape {durations:.2f} s")
        totals = prom.values(f"sum by (code) (haproxy_backend_http_responses_total{{{SEL}}})", by="code")
        replica = prom.values(f"sum by (code) (rayfleet_replica_requests_total{{{SEL}}})", by="code")
        wrk_total = sum(ph["wrk"]["requests"] for ph in phases)
        wrk_non2xx = sum(ph["wrk"]["non2xx"] for ph in phases)
        log(f"wrk: {wrk_total} answers, {wrk_non2xx} non-2xx; HAProxy backend responses by class: "
            f"{ {k: int(v) for k, v in totals.items() if v} }; replicas by code: { {k: int(v) for k, v in replica.items()} }")
        args.data.parent.mkdir(parents=True, exist_ok=True)
        args.data.write_text(json.dumps({"t0": t0, "phases": phases, "series": series}))
        plot(series, phases, t0, args.out)
        log(f"wrote {args.out} (data: {args.data})")
    finally:
        if prom is not None:
            prom.stop()
        run.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
