"""The per-node HTTP ingress: a Ray actor that runs and reconfigures HAProxy.

One ``IngressManager`` actor per Ray node (see :func:`ensure_ingress`) owns one HAProxy master
(``haproxy_process``) serving ``bind_host:port``. Requests flow client -> HAProxy -> replica; no Python
process is on the request path.

Updates (``update(table)``, a ``routing.RoutingTable`` the controller built) re-render the config. When
only the replicas changed, they are applied through HAProxy's runtime API (``server_updates``: no new
worker) and the config written for a later start. Else (a deployment added, removed, or its settings
changed) the config is validated with ``haproxy -c`` (an invalid one is logged and the running config kept)
and applied with a seamless reload: the old worker answers the next request on each idle keep-alive
connection with ``Connection: close`` (``option idle-close-on-response``) before it exits.

A ``scaleFromZero`` deployment with no replica is served by the actor's activator (``activator.py``, on
``activator.sock`` in the workdir): it holds those requests until a table gives the deployment a replica,
and ``stats()["held"]`` reports them, the load that scales the deployment up from zero.

The node's metrics endpoint (``metrics``) and the pod's preStop drain (``node_drain``) are served from
threads of their own; what they ask Ray is in ``ray_sources``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import subprocess
import time
import warnings
from typing import Any, Callable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rayfleet_api.constants import INGRESS_PORT, METRICS_PATH, RAY_NAMESPACE
from rayfleet_api.metrics_labels import split_deployment
from rayfleet_runtime.ingress import metrics as ingress_metrics, node_drain
from rayfleet_runtime.ingress.activator import Activator
from rayfleet_runtime.ingress.haproxy_bin import HAProxyBinary, check_config, find_haproxy, haproxy_version
from rayfleet_runtime.ingress.haproxy_config import canary_weights, canary_weights_text, render_config, runtime_servers
from rayfleet_runtime.ingress.haproxy_process import HAProxyProcess, cli, listen
from rayfleet_runtime.ingress import health_watch
from rayfleet_runtime.ingress.ray_sources import NodeRaySources
from rayfleet_runtime.ingress.server_updates import RuntimeServers, plan
from rayfleet_runtime.ingress.show_stat import parse_show_stat, stats_by_deployment
from rayfleet_runtime.log_setup import configure_logging
from rayfleet_runtime.routing import RoutingTable

logger = logging.getLogger("rayfleet.ingress")

MIN_RELOAD_INTERVAL_S = 0.2
SWEEP_INTERVAL_S = 1.0  # how often a server that left is deleted again, while HAProxy still holds it


def actor_name(node_id: str) -> str:
    return f"rayfleet-ingress-{node_id}"


OWN_FDS = 256  # HAProxy's listeners, runtime and metrics sockets, logs, a reload's passed sockets
SERVER_FDS = 4096  # the servers (one check socket each) a table may hold before maxconn gives way


def default_maxconn(requested: int = 20000, servers: int = 0) -> int:
    """A global maxconn HAProxy can honour under RLIMIT_NOFILE: it wants 2 fds a connection, one a checked
    server and a few of its own, and refuses to start without them. Room for ``SERVER_FDS`` servers is kept
    whatever the table, so a change of replicas alone changes no maxconn (a reload); past them, less."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return requested
    return max(256, min(requested, (hard - OWN_FDS - max(SERVER_FDS, servers)) // 2))


class Ingress:
    """Implementation of the ingress actor (plain class; :data:`IngressManager` is its Ray actor)."""

    def __init__(
        self,
        port: int = INGRESS_PORT,
        bind_host: str = "0.0.0.0",
        *,
        workdir: str | None = None,
        nbthread: int | None = None,
        maxconn: int | None = None,
        metrics_port: int | None = None,
        node_id: str | None = None,
        report_down: Callable[[list[str]], None] | None = None,
    ) -> None:
        """``node_id``: the node this ingress serves (default: its Ray actor's; None outside Ray).
        ``report_down``: tells the controller which of this node's replicas HAProxy finds down (default: the
        controller actor's ``replicas_down``; None outside Ray: nobody is told)."""
        configure_logging()
        self.port = int(port)
        self.bind_host = bind_host
        self.binary: HAProxyBinary = find_haproxy()
        self.version = haproxy_version(self.binary)
        self.nbthread = nbthread or max(1, min(2, os.cpu_count() or 1))
        self.requested_maxconn = maxconn or 20000
        self.workdir = workdir or node_drain.ingress_workdir(self.port)
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        self.cfg_path = os.path.join(self.workdir, "haproxy.cfg")
        self._haproxy = HAProxyProcess(self.binary, self.workdir, self.cfg_path)  # kills a stale one first
        self.runtime_socket = self._haproxy.runtime_socket
        self.metrics_socket = os.path.join(self.workdir, "metrics.sock")  # HAProxy's own exporter
        self.activator_socket = os.path.join(self.workdir, "activator.sock")
        self.weights_map = os.path.join(self.workdir, "canary_weights.map")
        self._listener = listen(self.bind_host, self.port)
        self._ray = NodeRaySources.for_this_actor()
        self.node_id = node_id or (self._ray.node_id if self._ray is not None else None)
        self._report_down = report_down or (self._ray.report_down if self._ray is not None else None)

        self._table = RoutingTable()
        self._config = self._render(self._table)
        self._reloads = 0
        self._runtime_updates = 0
        self._reload_failures = 0
        self._last_reload = 0.0
        self._last_error: str | None = None
        self._seq = 0
        self._applied_seq = 0
        self._desired = self._table
        self._last_result: dict[str, Any] = {"applied": True, "changed": False, "error": None}
        self._lock: asyncio.Lock | None = None  # created on the actor's event loop
        self._sweeper: asyncio.Task | None = None
        self._health_watch: asyncio.Task | None = None

        restored = self._restore_table()
        if restored is not None:
            self._table = self._desired = restored
            self._config = self._render(restored)
        self._write_weights(self._table)
        ok, out = self._check(self._config)
        if not ok:
            raise RuntimeError(f"initial HAProxy config is invalid: {out}")
        self._write_config(self._config)
        self._shape = self._render(self._table.without_servers())
        self._servers = RuntimeServers(lambda command: cli(self.runtime_socket, command))
        self._haproxy.on_start = self._servers.forget  # a restarted HAProxy runs the config on disk
        self._activator = Activator(self.activator_socket)
        self._activator.start(self._table)  # before HAProxy, which may route to it from its first request
        self._haproxy.start(self._listener)
        self._metrics_server = self._serve_metrics(metrics_port) if metrics_port is not None else None
        # The pod's preStop hook (node_drain) asks here for this node's replicas to move before it stops.
        self._drain_server = (node_drain.serve(os.path.join(self.workdir, node_drain.SOCKET_NAME), self._ray.drain)
                              if self._ray is not None else None)

    # ----------------------------------------------------------------- config

    def _render(self, table: RoutingTable) -> str:
        return render_config(
            table,
            port=self.port,
            bind_host=self.bind_host,
            runtime_socket=self.runtime_socket,
            nbthread=self.nbthread,
            maxconn=default_maxconn(self.requested_maxconn, table.server_count()),
            listen_fd=self._listener.fileno(),
            metrics_socket=self.metrics_socket,
            activator_socket=self.activator_socket,
            node_id=self.node_id,
            weights_map=self.weights_map,
        )

    @property
    def _table_path(self) -> str:
        return os.path.join(self.workdir, "table.json")

    def _restore_table(self) -> RoutingTable | None:
        """After Ray restarts this actor, serve the last applied table until the controller pushes."""
        try:
            import ray

            if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not ray.get_runtime_context().was_current_actor_reconstructed:
                    return None
            with open(self._table_path) as f:
                table = RoutingTable.from_wire(json.load(f))
        except Exception:  # noqa: BLE001 - not in an actor, no saved table, bad JSON
            return None
        logger.warning("ingress actor restarted: serving the last applied routing table until the next update")
        return table

    def _save_table(self, table: RoutingTable) -> None:
        try:
            tmp = self._table_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(table.to_wire(), f)
            os.replace(tmp, self._table_path)
        except (OSError, TypeError, ValueError) as e:
            logger.warning("could not save the routing table: %s", e)

    def _check(self, config: str) -> tuple[bool, str]:
        candidate = os.path.join(self.workdir, "haproxy.cfg.new")
        with open(candidate, "w") as f:
            f.write(config)
        try:
            return check_config(self.binary, candidate, pass_fds=(self._listener.fileno(),))
        except (OSError, subprocess.SubprocessError) as e:
            return False, f"haproxy -c failed to run: {e}"

    def _write_config(self, config: str) -> None:
        _write_file(self.cfg_path, config)

    def _write_weights(self, table: RoutingTable) -> None:
        """The canary weights HAProxy loads with the config (at a reload or a restart)."""
        _write_file(self.weights_map, canary_weights_text(table))

    # ----------------------------------------------------------------- metrics

    def _serve_metrics(self, port: int) -> Any:
        """This node's scrape endpoint (``metrics``); None if the port can't be had: the node
        still routes, and the error says why nothing answers there."""
        sources = {"ingress": self._own_metrics, "haproxy": self._haproxy_metrics}
        ray_sources = self._ray
        if ray_sources is not None:
            sources.update(replicas=lambda: ray_sources.replicas(self._table), controller=ray_sources.controller)
        try:
            server = ingress_metrics.serve(ingress_metrics.NodeMetrics(sources), self.bind_host, port)
        except OSError as exc:
            logger.error("no metrics on %s:%d: %s", self.bind_host, port, exc)
            return None
        logger.info("metrics at http://%s:%d%s", self.bind_host, port, METRICS_PATH)
        return server

    def _own_metrics(self) -> list[Any]:
        out = []
        for name, doc, value in (
                ("rayfleet_ingress_config_reloads", "Routing tables applied by a HAProxy reload", self._reloads),
                ("rayfleet_ingress_runtime_updates", "Routing tables that changed only replicas, applied through "
                 "HAProxy's runtime API (no reload)", self._runtime_updates),
                ("rayfleet_ingress_config_reload_failures", "Routing tables rejected (invalid config or a failed "
                 "reload; the previous config kept serving)", self._reload_failures),
                ("rayfleet_ingress_haproxy_restarts", "HAProxy masters restarted after they died", self._haproxy.restarts)):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            out.append(family)
        held = GaugeMetricFamily("rayfleet_ingress_activator_held", "Requests the activator holds for a deployment "
                                 "scaled to zero, until a replica is ready", labels=["namespace", "deployment"])
        for deployment, count in self._activator.held().items():
            held.add_metric(split_deployment(deployment), count)
        requests = CounterMetricFamily("rayfleet_ingress_activator_requests", "Requests the activator held, by how "
                                       "they ended (forwarded, timeout, overflow, client_left, unavailable, upgrade)",
                                       labels=["namespace", "deployment", "outcome"])
        for (deployment, outcome), count in self._activator.outcomes().items():
            requests.add_metric([*split_deployment(deployment), outcome], count)
        return [*out, held, requests]

    def _haproxy_metrics(self) -> list[Any]:
        text = ingress_metrics.get_unix(self.metrics_socket, "/metrics")
        return ingress_metrics.label_haproxy(text, self._table.names())

    # ----------------------------------------------------------------- actor API

    async def ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Return once HAProxy runs and answers its runtime API (it serves our listening socket by then;
        a connect alone would prove nothing: the socket is ours and queues connections from the start)."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self._haproxy.running:
                try:
                    await asyncio.to_thread(cli, self.runtime_socket, "show info", 2.0)
                    return self._info()
                except OSError as e:
                    last = e
            await asyncio.sleep(0.05)
        raise TimeoutError(f"HAProxy not ready on {self.bind_host}:{self.port} after {timeout_s}s: {last!r}")

    def _info(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "bind_host": self.bind_host,
            "pid": self._haproxy.pid,
            "actor_pid": os.getpid(),
            "haproxy": self.binary.path,
            "version": self.version,
            "config_path": self.cfg_path,
            "reloads": self._reloads,
            "runtime_updates": self._runtime_updates,
            "restarts": self._haproxy.restarts,
            "last_error": self._last_error,
        }

    async def update(self, table: RoutingTable) -> dict[str, Any]:
        """Apply the routing table the controller built. Idempotent; a burst of updates is coalesced to the latest.

        Returns ``{"applied": bool, "changed": bool, "error": str | None, ...}``; ``"via"`` says how a change
        was applied: ``"runtime"`` (HAProxy's runtime API) or ``"reload"``.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._health_watch is None and self._report_down is not None:
            self._health_watch = asyncio.get_running_loop().create_task(self._watch_health())
        self._seq += 1
        my_seq = self._seq
        self._desired = table
        async with self._lock:
            if self._applied_seq >= my_seq:
                # A later table was handled in this call's place: report how that went (it may have been
                # rejected, and a caller must not believe its table is live when it is not).
                return {**self._last_result, "changed": False, "coalesced": True}
            self._last_result = result = await self._apply_latest()
            return result

    async def _apply_latest(self) -> dict[str, Any]:
        """Apply the newest table given to ``update()`` (under ``self._lock``)."""
        seq, desired = self._seq, self._desired
        config = self._render(desired)
        if config == self._config and canary_weights(desired) == canary_weights(self._table):
            await self._activator.apply(desired)
            self._applied_seq = seq
            self._table = desired
            return {"applied": True, "changed": False, "error": None}
        shape = self._render(desired.without_servers())
        if shape == self._shape and await self._update_in_place(desired):
            self._write_config(config)
            self._write_weights(desired)
            self._applied(seq, desired, config, shape)
            self._runtime_updates += 1
            return {"applied": True, "changed": True, "error": None, "via": "runtime"}
        self._write_weights(desired)  # the candidate config loads them (the running one read its own at start)
        ok, out = await asyncio.to_thread(self._check, config)
        if not ok:
            self._write_weights(self._table)
            self._last_error = f"invalid config, keeping the previous one: {out}"
            self._reload_failures += 1
            logger.error("rejected routing table: %s", self._last_error)
            self._applied_seq = seq
            return {"applied": False, "changed": False, "error": self._last_error}
        wait = self._last_reload + MIN_RELOAD_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # Before the reload: the new HAProxy may send the activator a request of this table at once. Its
        # replicas are ready (the controller lists no other), so held requests may go to them already.
        await self._activator.apply(desired)
        self._write_config(config)
        err = await asyncio.to_thread(self._haproxy.reload)
        self._last_reload = time.monotonic()
        if err:
            await self._activator.apply(self._table)  # what HAProxy still serves
            self._last_error = err
            self._reload_failures += 1
            logger.error("HAProxy reload failed: %s", err)
            # The master keeps the old workers when a reload fails; keep the
            # old config on disk too so a restart brings back what runs.
            self._write_config(self._config)
            self._write_weights(self._table)
            self._applied_seq = seq
            return {"applied": False, "changed": False, "error": err}
        self._servers.forget()
        self._applied(seq, desired, config, shape)
        self._reloads += 1
        return {"applied": True, "changed": True, "error": None, "via": "reload"}

    async def _update_in_place(self, desired: RoutingTable) -> bool:
        """Apply ``desired``'s replicas and canary weights through the runtime API; False (reload instead) if
        HAProxy refused a command. The activator first: HAProxy may send it a request for a replica of this
        table at once. Replicas before weights: a canary's share goes up once its replicas are in."""
        if not self._haproxy.running:
            return False
        await self._activator.apply(desired)
        update = plan(runtime_servers(self._table, self.node_id), runtime_servers(desired, self.node_id))

        def apply() -> str | None:
            return self._servers.apply(update) or self._servers.set_weights(
                self.weights_map, canary_weights(self._table), canary_weights(desired))
        try:
            err = await asyncio.to_thread(apply)
        except OSError as e:  # the runtime socket went away: HAProxy is restarting
            err = repr(e)
        if err is None:
            if self._servers.leaving and (self._sweeper is None or self._sweeper.done()):
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep_leaving())
            return True
        logger.warning("HAProxy's runtime API refused a replica change, reloading instead: %s", err[:300])
        return False

    async def _watch_health(self) -> None:
        """Tell the controller which of this node's replicas HAProxy finds down (``health_watch``)."""
        findings = health_watch.Findings()
        table, mine = None, {}
        while True:
            await asyncio.sleep(health_watch.WATCH_INTERVAL_S)
            if self._table is not table:
                table, mine = self._table, health_watch.checked_here(self._table, self.node_id)
            if not table.shared_health:
                continue
            try:
                stat = await asyncio.to_thread(cli, self.runtime_socket, health_watch.SERVERS_STAT)
                down = health_watch.down_here(stat, mine)
                if findings.to_send(down, time.monotonic()):
                    await asyncio.to_thread(self._report_down, sorted(down))
                    findings.sent(down, time.monotonic())
            except Exception as exc:  # noqa: BLE001 - HAProxy restarting, the controller not up yet: next round
                logger.debug("health of this node's replicas not reported: %s", exc)

    async def _sweep_leaving(self) -> None:
        """Delete the servers that left as soon as HAProxy lets go of them (their requests finish)."""
        while self._servers.leaving:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            async with self._lock:
                await asyncio.to_thread(self._servers.sweep)

    def _applied(self, seq: int, desired: RoutingTable, config: str, shape: str) -> None:
        """``desired`` runs now, and ``config`` (on disk: a restarted HAProxy starts from it) says so."""
        self._config, self._shape, self._table = config, shape, desired
        self._save_table(desired)
        self._applied_seq = seq
        self._last_error = None

    async def stats(self) -> dict[str, Any]:
        """Per-deployment/replica state from HAProxy's ``show stat`` (current worker only; see
        ``stats_by_deployment``), and the requests the activator holds per deployment (``held``; HAProxy counts
        them in the deployment's ``sessions``, never in its ``queue`` nor in any replica's row: the activator is
        not listed in ``servers``)."""
        text = await asyncio.to_thread(cli, self.runtime_socket, "show stat")
        deployments, frontends, raw = stats_by_deployment(parse_show_stat(text), self._table.names())
        return {"frontend": frontends, "deployments": deployments, "raw_backends": raw, "held": self._activator.held()}

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop HAProxy: soft stop (finish in-flight requests) for up to ``grace_s``, then hard."""
        for server in (self._metrics_server, self._drain_server):
            if server is not None:
                server.shutdown()
                server.server_close()
        await asyncio.to_thread(self._haproxy.terminate, grace_s)
        await asyncio.to_thread(self._activator.stop)  # after HAProxy, which waited for the requests held there
        self._listener.close()  # after: the supervisor restarts no HAProxy once stopping, so none needs it


def _make_actor_class():
    import ray

    # Async methods -> async actor; HAProxy is on the request path, not us, so
    # no CPU is reserved.
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(Ingress)


try:
    IngressManager = _make_actor_class()
except ImportError:  # pragma: no cover - Ray-less environments (unit tests of the renderer)
    IngressManager = None  # type: ignore[assignment]


def ensure_ingress(node_id: str, port: int = INGRESS_PORT, bind_host: str = "0.0.0.0", metrics_port: int | None = None):
    """Get-or-create the ingress actor for ``node_id`` (idempotent, race-free); it serves the node's
    metrics on ``metrics_port`` (None: not at all)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return IngressManager.options(
        name=actor_name(node_id),
        namespace=RAY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        num_cpus=0,
    ).remote(port=port, bind_host=bind_host, metrics_port=metrics_port)


def _write_file(path: str, text: str) -> None:
    """Whole or not at all: HAProxy may start from it at any moment (a restart)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
