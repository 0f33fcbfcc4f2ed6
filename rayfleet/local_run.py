"""`rayfleet run FILE.yaml`: serve ServeDeployment manifests on this machine with a local Ray, no Kubernetes.

It validates the manifests exactly as the cluster would (``rayfleet.manifest``), starts a local Ray
(everything on 127.0.0.1, the working directory and ``PYTHONPATH`` passed on to Ray workers so
``handler: module:attr`` imports the same way as in this shell), ensures the rayfleet controller with one
HAProxy ingress on the head node, PUTs each deployment, then prints the endpoint and a status line per
deployment whenever readiness changes (``echo: 2/2 ready``). From then on it follows FILE.yaml as a
`kubectl apply` on each save would (``rayfleet.follow``): an edit rolls out, and each rollout's progress is
printed. Ctrl-C / SIGTERM shuts everything down: Ray and every process it started, HAProxy included.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import signal
import sys
import threading

from rayfleet.follow import Follower, WatchedFile, endpoint_line
from rayfleet.manifest import load_manifests
from rayfleet.ports import free_port
from rayfleet.procs import Leftovers
from rayfleet_api.constants import (CONTROL_TOKEN_ENV, INGRESS_PORT, LOG_LEVEL_ENV, METRICS_PATH, METRICS_PORT,
                                    RAY_NAMESPACE)
from rayfleet_api.controller_client import ControllerClient, ControllerRejected
from rayfleet_api.errors import SpecError


def local_cpus(manifests: list, asked: int | None) -> tuple[int, str | None]:
    """Logical CPUs for the local Ray: what was asked, else enough for every replica of the manifests
    (replicas then share this machine's cores, as `async def` handlers do well), else all cores."""
    cores = os.cpu_count() or 1
    if asked is not None:
        return asked, None
    states = [m.desired_state() for m in manifests]
    needed = sum(s.replicas * s.ray_actor_options.num_cpus for s in states)
    if needed <= cores:
        return cores, None
    cpus = math.ceil(needed)
    return cpus, (f"the replicas ask for {needed:g} CPUs and this machine has {cores} cores: the local Ray gets "
                  f"{cpus} logical CPUs, so every replica starts (they share the cores; --num-cpus to choose)")


def worker_env(cwd: str, pythonpath: str, verbose: bool) -> dict[str, str]:
    """The environment every Ray worker needs: this directory first on ``PYTHONPATH`` (handlers import as in
    this shell) and the log level. Set in this process's environment, which Ray's processes inherit, and not
    as the job's ``runtime_env``: any ``runtime_env``, even variables alone, sends each worker start through
    Ray's runtime-env agent and keeps replicas off the workers Ray starts ahead, so they start one by one."""
    path = os.pathsep.join(dict.fromkeys([cwd] + [p for p in pythonpath.split(os.pathsep) if p]))
    return {"PYTHONPATH": path, LOG_LEVEL_ENV: "DEBUG" if verbose else "INFO"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayfleet run", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="YAML with one or more ServeDeployment manifests, followed: each saved edit is applied")
    parser.add_argument("--host", default="127.0.0.1", help="address HAProxy listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=INGRESS_PORT, help=f"HTTP port (default {INGRESS_PORT})")
    parser.add_argument("--control-port", type=int, default=0, help="controller API port (default: a free one)")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT,
                        help=f"Prometheus metrics port, on --host (default {METRICS_PORT}; 0: no metrics)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="logical CPUs of the local Ray (default: all cores, more if the replicas ask for more)")
    parser.add_argument("--validate", default="strict", choices=["strict", "warn", "ignore", "true", "false"],
                        help="unknown fields, as kubectl apply --validate: strict (or true, the default) refuses them, "
                             "warn drops them with a warning, ignore (or false) drops them")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also Ray's own messages and every runtime debug line (HAProxy's notices included)")
    args = parser.parse_args(argv)

    warnings: list[str] = []
    field_validation = {"true": "strict", "false": "ignore"}.get(args.validate, args.validate)
    watched = WatchedFile(args.file)
    watched.changed()  # before reading it: an edit made from here on is applied once the deployments run
    try:
        manifests = load_manifests(args.file, field_validation, warnings)
    except (SpecError, OSError) as exc:
        print(f"rayfleet run: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"Warning: {warning}", file=sys.stderr)

    stop = threading.Event()

    def on_signal(signum, _frame):  # noqa: ANN001
        stop.set()

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    os.environ.update(worker_env(os.getcwd(), os.environ.get("PYTHONPATH", ""), args.verbose))
    control_port = args.control_port or free_port("127.0.0.1")

    import ray  # noqa: PLC0415 - keep `rayfleet --help` and manifest errors fast

    from rayfleet_runtime.controller.actor import ensure_controller  # noqa: PLC0415

    # The controller answers only to this token: yours from the environment (to script against the
    # API), else a random one that only this process knows.
    token = os.environ.get(CONTROL_TOKEN_ENV) or secrets.token_urlsafe(32)

    leftovers = Leftovers()
    print(f"rayfleet: starting local Ray for {', '.join(m.name for m in manifests)} ...", flush=True)
    code = 0
    try:
        num_cpus, sizing = local_cpus(manifests, args.num_cpus)
        if sizing:
            print(f"rayfleet: {sizing}", flush=True)
        # The actors' lines (lifecycle events, handler errors, access logs) reach this terminal; Ray's own
        # start-up chatter and HAProxy's notices only with --verbose, so the status lines stand out.
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, namespace=RAY_NAMESPACE,
                 num_cpus=num_cpus, log_to_driver=True, logging_level=logging.INFO if args.verbose else logging.ERROR)
        # ray.init replaces the SIGTERM handler with sys.exit(15) (and its core worker logs a crash-style
        # "SIGTERM received" trace): take it back so SIGTERM is an orderly stop, exit 0, like Ctrl-C.
        for sig in old_handlers:
            signal.signal(sig, on_signal)
        ensure_controller(token, control_port=control_port, ingress_port=args.port, ingress_nodes="head", bind_host=args.host
                          if args.host not in ("0.0.0.0", "::") else "0.0.0.0", metrics_port=args.metrics_port or None)
        api = ControllerClient(f"http://127.0.0.1:{control_port}", token)
        api.wait_healthy(60)
        for m in manifests:
            try:
                api.put_deployment(m.name, m.desired_state())
            except ControllerRejected as exc:
                print(f"rayfleet run: {m.name}: {exc}", file=sys.stderr)
                return 2
        shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        for m in manifests:
            print(endpoint_line(m, shown_host, args.port), flush=True)
        if args.metrics_port:
            print(f"rayfleet: metrics at http://{shown_host}:{args.metrics_port}{METRICS_PATH}", flush=True)
        who = f"token from ${CONTROL_TOKEN_ENV}" if os.environ.get(CONTROL_TOKEN_ENV) else "random token"
        print(f"rayfleet: controller API at {api.base_url} ({who}); Ctrl-C to stop", flush=True)
        follower = Follower(api, watched, field_validation, manifests, shown_host, args.port)
        while not stop.is_set():
            follower.turn()
            leftovers.note()
            stop.wait(1.0)
        print("rayfleet: shutting down ...", flush=True)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001
        print(f"rayfleet run: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        leftovers.note()
        try:
            ray.shutdown()
        finally:
            leftovers.kill()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
