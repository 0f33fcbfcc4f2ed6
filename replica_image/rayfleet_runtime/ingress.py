"""The per-node HTTP ingress: a Ray actor that runs and reconfigures HAProxy.

One ``IngressManager`` actor per Ray node (see :func:`ensure_ingress`) owns one
HAProxy master process (``haproxy -W -S <master socket>``) serving
``bind_host:port``. Requests flow client -> HAProxy -> replica; no Python
process is on the request path.

The actor, not HAProxy, owns the listening socket, and HAProxy inherits it
(``bind fd@N``): when HAProxy dies (a killed worker takes its master with it) and
is restarted, clients that connect in between wait in the socket's backlog
instead of being refused. Only the connections the dead worker held are lost.

Updates (``update(table)``) re-render the config and, when it changed, apply it
with a *seamless reload* through the master CLI: the master re-execs, the new
worker takes over the listening sockets from the old one (``expose-fd
listeners`` / ``-x sockpair@``), and the old worker finishes its in-flight
requests, answering the next request on each idle keep-alive connection with
``Connection: close`` (``option idle-close-on-response``) before it exits
(bounded by ``hard-stop-after``). Configs are validated with ``haproxy -c``
first; an invalid one is logged and the running config is kept.

A ``scaleFromZero`` deployment with no replica is served by the actor's activator (``activator.py``, on
``activator.sock`` in the workdir): it holds those requests until a table gives the deployment a replica,
and ``stats()["held"]`` reports them, the load that scales the deployment up from zero.

HAProxy cannot outlive the actor: it is started with ``PR_SET_PDEATHSIG``
(SIGTERM to the master when the actor's supervisor thread/process dies; the
workers exit with their master), and ``stop()`` / interpreter exit stop it.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import ctypes
import ctypes.util
import csv
import io
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import threading
import time
import warnings
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rayfleet_api.constants import CONTROLLER_NAME, INGRESS_PORT, METRICS_PATH, RAY_NAMESPACE
from rayfleet_api.metrics_labels import split_deployment

from . import ingress_metrics, node_drain
from .activator import Activator
from .log_setup import configure_logging
from .haproxy_bin import HAProxyBinary, check_config, find_haproxy, haproxy_version
from .haproxy_config import ACTIVATOR_SERVER, plan_table, render_config

logger = logging.getLogger("rayfleet.ingress")

MIN_RELOAD_INTERVAL_S = 0.2
MASTER_SOCKET_WAIT_S = 10.0

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl  # resolved before fork: preexec_fn must not import or allocate much


def _die_with_parent_of(parent_pid: int):
    def preexec() -> None:  # runs in the forked child, before exec: keep it tiny
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        # Ray runs its workers at nice 15 and HAProxy would inherit it, yet every request passes
        # through HAProxy: give it normal priority where allowed (needs CAP_SYS_NICE; else keep 15).
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            pass

    return preexec


def _listen(host: str, port: int, wait_s: float = 10.0) -> socket.socket:
    """The ingress's listening socket, for HAProxy to inherit.

    Retries while the port is still held: a previous incarnation's HAProxy may take a moment to exit.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(4096)  # the kernel caps it at net.core.somaxconn
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ingress cannot listen on {host}:{port}: {exc}") from exc
            time.sleep(0.2)


def actor_name(node_id: str) -> str:
    return f"rayfleet-ingress-{node_id}"


def _cli(path: str, command: str, timeout: float = 5.0) -> str:
    """Send one command to a HAProxy CLI (runtime or master) socket; return the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(command.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


def parse_show_stat(text: str) -> list[dict[str, str]]:
    """Parse ``show stat`` CSV output into one dict per row."""
    text = text.lstrip()
    if text.startswith("# "):
        text = text[2:]
    rows = list(csv.DictReader(io.StringIO(text)))
    return [{k: v for k, v in row.items() if k} for row in rows if row.get("pxname")]


def _int(v: str | None) -> int:
    try:
        return int(v) if v not in (None, "") else 0
    except ValueError:
        return 0


def default_maxconn(requested: int = 20000) -> int:
    """A global maxconn HAProxy can actually honour under RLIMIT_NOFILE (~2 fds/conn)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return requested
    return max(256, min(requested, (hard - 256) // 2))


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
    ) -> None:
        configure_logging()
        self.port = int(port)
        self.bind_host = bind_host
        self.binary: HAProxyBinary = find_haproxy()
        self.version = haproxy_version(self.binary)
        self.nbthread = nbthread or max(1, min(2, os.cpu_count() or 1))
        self.maxconn = default_maxconn(maxconn or 20000)
        self.workdir = workdir or node_drain.ingress_workdir(self.port)
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        self.cfg_path = os.path.join(self.workdir, "haproxy.cfg")
        self.pid_path = os.path.join(self.workdir, "haproxy.pid")
        self.runtime_socket = os.path.join(self.workdir, "admin.sock")
        self.master_socket = os.path.join(self.workdir, "master.sock")
        self.metrics_socket = os.path.join(self.workdir, "metrics.sock")  # HAProxy's own exporter
        self.activator_socket = os.path.join(self.workdir, "activator.sock")
        self._kill_stale()
        self._listener = _listen(self.bind_host, self.port)

        self._table: dict[str, Any] = {"deployments": {}}
        self._config = self._render(self._table)
        self._names = plan_table(self._table).names()
        self._reloads = 0
        self._reload_failures = 0
        self._last_reload = 0.0
        self._last_error: str | None = None
        self._seq = 0
        self._applied_seq = 0
        self._desired: dict[str, Any] = self._table
        self._last_result: dict[str, Any] = {"applied": True, "changed": False, "error": None}
        self._lock: asyncio.Lock | None = None  # created on the actor's event loop

        self._log_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._proc: subprocess.Popen | None = None
        self._proc_lock = threading.Lock()
        self._stopping = threading.Event()
        self._spawned = threading.Event()
        self._spawn_error: BaseException | None = None
        self._restarts = 0

        restored = self._restore_table()
        if restored is not None:
            self._table = self._desired = restored
            self._config = self._render(restored)
            self._names = plan_table(restored).names()
        ok, out = self._check(self._config)
        if not ok:
            raise RuntimeError(f"initial HAProxy config is invalid: {out}")
        self._write_config(self._config)
        self._activator = Activator(self.activator_socket)
        self._activator.start(self._table)  # before HAProxy, which may route to it from its first request
        # All forks happen on this one long-lived thread: PR_SET_PDEATHSIG fires
        # when the *thread* that forked exits, so it must live as long as we do.
        self._supervisor = threading.Thread(target=self._supervise, name="haproxy-supervisor", daemon=True)
        self._supervisor.start()
        self._spawned.wait(30)
        if self._spawn_error is not None:
            raise RuntimeError(f"could not start HAProxy: {self._spawn_error}")
        atexit.register(self._terminate)
        self._ray = _RaySources.for_this_actor()
        self._metrics_server = self._serve_metrics(metrics_port) if metrics_port is not None else None
        # The pod's preStop hook (node_drain) asks here for this node's replicas to move before it stops.
        self._drain_server = (node_drain.serve(os.path.join(self.workdir, node_drain.SOCKET_NAME), self._ray.drain)
                              if self._ray is not None else None)

    # ----------------------------------------------------------------- process

    def _render(self, table: dict[str, Any]) -> str:
        return render_config(
            table,
            port=self.port,
            bind_host=self.bind_host,
            runtime_socket=self.runtime_socket,
            nbthread=self.nbthread,
            maxconn=self.maxconn,
            listen_fd=self._listener.fileno(),
            metrics_socket=self.metrics_socket,
            activator_socket=self.activator_socket,
        )

    @property
    def _table_path(self) -> str:
        return os.path.join(self.workdir, "table.json")

    def _restore_table(self) -> dict[str, Any] | None:
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
                table = json.load(f)
        except Exception:  # noqa: BLE001 - not in an actor, no saved table, bad JSON
            return None
        logger.warning("ingress actor restarted: serving the last applied routing table until the next update")
        return table

    def _save_table(self, table: dict[str, Any]) -> None:
        try:
            tmp = self._table_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(table, f)
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
        tmp = self.cfg_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(config)
        os.replace(tmp, self.cfg_path)

    def _kill_stale(self) -> None:
        """Kill a HAProxy left by a previous incarnation of this actor (same workdir)."""
        try:
            pid = int(open(self.pid_path).read().split()[0])
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return
        if "haproxy" in cmdline and self.cfg_path in cmdline:
            logger.warning("killing stale HAProxy master %d from a previous ingress", pid)
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _spawn(self) -> subprocess.Popen:
        for path in (self.master_socket, self.runtime_socket):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        argv = [
            self.binary.path,
            "-W",
            "-S", f"{self.master_socket},mode,600",
            "-f", self.cfg_path,
            "-p", self.pid_path,
        ]
        proc = subprocess.Popen(
            argv,
            env=self.binary.environ(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,  # own process group: signals aimed at Ray's group don't hit it
            preexec_fn=_die_with_parent_of(os.getpid()),
            close_fds=True,
            pass_fds=(self._listener.fileno(),),
        )
        logger.info("started HAProxy %s (master pid %d) on %s:%d", self.version, proc.pid, self.bind_host, self.port)
        return proc

    def _supervise(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                with self._proc_lock:
                    if self._stopping.is_set():
                        break
                    self._proc = proc = self._spawn()
            except BaseException as e:  # noqa: BLE001
                self._spawn_error = e
                self._spawned.set()
                logger.exception("failed to start HAProxy")
                return
            self._spawned.set()
            started = time.monotonic()
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                if not line:
                    continue
                self._log_tail.append(line)
                # Its notices and warnings come with every reload ("Proxy stopped", "Former worker exited"):
                # debug; what went wrong reaches our own log as a reload failure or a restart.
                logger.log(logging.WARNING if line.startswith("[ALERT]") else logging.DEBUG, "haproxy: %s", line)
            rc = proc.wait()
            if self._stopping.is_set():
                break
            logger.error(
                "HAProxy master exited unexpectedly (rc=%s); restarting. Last output:\n%s",
                rc,
                "\n".join(list(self._log_tail)[-20:]),
            )
            self._restarts += 1
            # At once after a crash that ended a healthy run (clients wait in the listener's backlog
            # meanwhile); backing off only if it keeps crashing.
            backoff = 0.0 if time.monotonic() - started > 30 else min(max(backoff * 2, 0.5), 10.0)
            self._stopping.wait(backoff)

    def _terminate(self, grace_s: float = 0.0) -> None:
        self._stopping.set()
        with self._proc_lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        try:
            if grace_s > 0:
                # SIGUSR1 = soft stop: stop accepting, finish in-flight requests.
                proc.send_signal(signal.SIGUSR1)
                try:
                    proc.wait(grace_s)
                    return
                except subprocess.TimeoutExpired:
                    pass
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        except ProcessLookupError:
            pass

    # ----------------------------------------------------------------- metrics

    def _serve_metrics(self, port: int) -> Any:
        """This node's scrape endpoint (``ingress_metrics``); None if the port can't be had: the node
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
                ("rayfleet_ingress_config_reload_failures", "Routing tables rejected (invalid config or a failed "
                 "reload; the previous config kept serving)", self._reload_failures),
                ("rayfleet_ingress_haproxy_restarts", "HAProxy masters restarted after they died", self._restarts)):
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
        return ingress_metrics.label_haproxy(text, self._names)

    # ----------------------------------------------------------------- actor API

    async def ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Return once HAProxy runs and answers its runtime API (it serves our listening socket by then;
        a connect alone would prove nothing: the socket is ours and queues connections from the start)."""
        deadline = time.monotonic() + timeout_s
        last: BaseException | None = None
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                try:
                    await asyncio.to_thread(_cli, self.runtime_socket, "show info", 2.0)
                    return self._info()
                except OSError as e:
                    last = e
            await asyncio.sleep(0.05)
        raise TimeoutError(f"HAProxy not ready on {self.bind_host}:{self.port} after {timeout_s}s: {last!r}")

    def _info(self) -> dict[str, Any]:
        proc = self._proc
        return {
            "port": self.port,
            "bind_host": self.bind_host,
            "pid": proc.pid if proc else None,
            "actor_pid": os.getpid(),
            "haproxy": self.binary.path,
            "version": self.version,
            "config_path": self.cfg_path,
            "reloads": self._reloads,
            "restarts": self._restarts,
            "last_error": self._last_error,
        }

    async def update(self, table: dict[str, Any]) -> dict[str, Any]:
        """Apply a routing table. Idempotent; a burst of updates is coalesced to the latest.

        Returns ``{"applied": bool, "changed": bool, "error": str | None, ...}``.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
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
        if config == self._config:
            await self._activator.apply(desired)
            self._applied_seq = seq
            self._table = desired
            return {"applied": True, "changed": False, "error": None}
        ok, out = await asyncio.to_thread(self._check, config)
        if not ok:
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
        err = await asyncio.to_thread(self._reload)
        self._last_reload = time.monotonic()
        if err:
            await self._activator.apply(self._table)  # what HAProxy still serves
            self._last_error = err
            self._reload_failures += 1
            logger.error("HAProxy reload failed: %s", err)
            # The master keeps the old workers when a reload fails; keep the
            # old config on disk too so a restart brings back what runs.
            self._write_config(self._config)
            self._applied_seq = seq
            return {"applied": False, "changed": False, "error": err}
        self._config = config
        self._table = desired
        self._save_table(desired)
        self._names = plan_table(desired).names()
        self._applied_seq = seq
        self._last_error = None
        self._reloads += 1
        return {"applied": True, "changed": True, "error": None, "reloads": self._reloads}

    def _reload(self) -> str | None:
        # A master just (re)started may not have created its socket yet: wait for it a little, rather
        # than fail the first table pushed after a start.
        deadline = time.monotonic() + MASTER_SOCKET_WAIT_S
        while True:
            try:
                reply = _cli(self.master_socket, "reload", timeout=30)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > deadline:
                    return f"master CLI: {e!r}"
                time.sleep(0.05)
            except OSError as e:
                return f"master CLI: {e!r}"
        first = reply.strip().splitlines()[0] if reply.strip() else ""
        if first.startswith("Success=1"):
            return None
        if first.startswith("Success=0"):
            return reply.strip()
        # HAProxy < 2.7 answers nothing to "reload"; the config passed -c already.
        return None

    async def stats(self) -> dict[str, Any]:
        """Per-deployment/replica state from HAProxy's ``show stat`` (current worker only), and the requests
        the activator holds per deployment (``held``; HAProxy counts them in the deployment's ``sessions``,
        never in its ``queue`` nor in any replica's row: the activator is not listed in ``servers``)."""
        text = await asyncio.to_thread(_cli, self.runtime_socket, "show stat")
        rows = parse_show_stat(text)
        out: dict[str, Any] = {"frontend": {}, "deployments": {}, "raw_backends": {}, "held": self._activator.held()}
        names = self._names
        for row in rows:
            px, sv = row["pxname"], row["svname"]
            entry = {
                "status": row.get("status", ""),
                "sessions": _int(row.get("scur")),
                "max_sessions": _int(row.get("smax")),
                "limit": _int(row.get("slim")),
                "total": _int(row.get("stot")),
                "queue": _int(row.get("qcur")),
                "max_queue": _int(row.get("qmax")),
                "responses_5xx": _int(row.get("hrsp_5xx")),
                "connect_errors": _int(row.get("econ")),
                "retries": _int(row.get("wretr")),
                "redispatches": _int(row.get("wredis")),
                "check_status": row.get("check_status", ""),
            }
            if sv == "FRONTEND":
                out["frontend"][px] = entry
                continue
            info = names.get(px)
            if info is None:
                out["raw_backends"].setdefault(px, {})[sv] = entry
                continue
            dep = out["deployments"].setdefault(info["deployment"], {"backend": px, "servers": {}})
            if sv == "BACKEND":
                dep.update(entry)
            elif sv != ACTIVATOR_SERVER:  # servers are the replicas
                dep["servers"][info["servers"].get(sv, sv)] = entry
        return out

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop HAProxy: soft stop (finish in-flight requests) for up to ``grace_s``, then hard."""
        for server in (self._metrics_server, self._drain_server):
            if server is not None:
                server.shutdown()
                server.server_close()
        await asyncio.to_thread(self._terminate, grace_s)
        await asyncio.to_thread(self._activator.stop)  # after HAProxy, which waited for the requests held there
        self._listener.close()  # after: the supervisor restarts no HAProxy once stopping, so none needs it


class _RaySources:
    """The metrics of the replicas on this actor's node, and of the controller if it runs here (Ray calls,
    made from the metrics server's thread, never the actor's event loop)."""

    def __init__(self, node_id: str):
        self.node_id = node_id
        # Ray warns of any blocking get in an async actor; these run on the metrics server's thread.
        os.environ["RAY_WARN_BLOCKING_GET_INSIDE_ASYNC"] = "0"
        self._replicas: dict[tuple[str, str], Any] = {}  # (deployment, replica id) -> actor handle
        self._controller: Any = None  # its handle once known to run on this node; False: elsewhere

    @classmethod
    def for_this_actor(cls) -> "_RaySources | None":
        try:
            import ray

            if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
                return None
            return cls(ray.get_runtime_context().get_node_id())
        except ImportError:
            return None

    def replicas(self, table: dict[str, Any]) -> list[Any]:
        """The families of the replicas in ``table`` that run on this node (a replica that is gone or slow
        is left out of this scrape; the controller replaces a dead one, the next scrape has its successor)."""
        import ray

        from .replica import replica_actor_name

        here = [(dep, r["id"]) for dep, spec in (table.get("deployments") or {}).items()
                for r in spec.get("replicas") or [] if r.get("nodeId") == self.node_id]
        handles = {}
        for key in here:
            try:
                handles[key] = self._replicas.get(key) or ray.get_actor(replica_actor_name(*key), namespace=RAY_NAMESPACE)
            except ValueError:
                continue  # died since the table was pushed
        self._replicas = handles
        refs = [handle.metrics.remote() for handle in handles.values()]
        if not refs:
            return []
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=ingress_metrics.SOURCE_TIMEOUT_S)
        out: list[Any] = []
        for ref in done:
            try:
                out.extend(ray.get(ref))
            except ray.exceptions.RayError:
                pass
        return out

    def drain(self, timeout_s: float) -> int:
        """Have the controller move this node's replicas away; how many are still here."""
        import ray

        handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
        return ray.get(handle.drain_node.remote(self.node_id, timeout_s), timeout=ingress_metrics.SOURCE_TIMEOUT_S)

    def controller(self) -> list[Any]:
        import ray

        if self._controller is False:
            return []
        try:
            if self._controller is None:
                handle = ray.get_actor(CONTROLLER_NAME, namespace=RAY_NAMESPACE)
                info = ray.get(handle.ready.remote(), timeout=ingress_metrics.SOURCE_TIMEOUT_S)
                self._controller = handle if info.get("nodeId") == self.node_id else False
                if self._controller is False:
                    return []
            return ray.get(self._controller.metrics.remote(), timeout=ingress_metrics.SOURCE_TIMEOUT_S)
        except Exception:
            self._controller = None  # restarted, or not up yet: look again next time
            raise


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
