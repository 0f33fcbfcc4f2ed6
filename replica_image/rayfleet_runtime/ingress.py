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
import tempfile
import threading
import time
import warnings
from typing import Any

from rayfleet_api.constants import INGRESS_PORT, RAY_NAMESPACE

from .haproxy_bin import HAProxyBinary, check_config, find_haproxy, haproxy_version
from .haproxy_config import plan_table, render_config

logger = logging.getLogger("rayfleet.ingress")

MIN_RELOAD_INTERVAL_S = 0.2

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
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self.port = int(port)
        self.bind_host = bind_host
        self.binary: HAProxyBinary = find_haproxy()
        self.version = haproxy_version(self.binary)
        self.nbthread = nbthread or max(1, min(2, os.cpu_count() or 1))
        self.maxconn = default_maxconn(maxconn or 20000)
        # Unix socket paths must stay short (108 bytes): keep the dir under /tmp.
        self.workdir = workdir or os.path.join(tempfile.gettempdir(), f"rayfleet-ingress-{self.port}")
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        self.cfg_path = os.path.join(self.workdir, "haproxy.cfg")
        self.pid_path = os.path.join(self.workdir, "haproxy.pid")
        self.runtime_socket = os.path.join(self.workdir, "admin.sock")
        self.master_socket = os.path.join(self.workdir, "master.sock")
        self._kill_stale()
        self._listener = _listen(self.bind_host, self.port)

        self._table: dict[str, Any] = {"deployments": {}}
        self._config = self._render(self._table)
        self._names = plan_table(self._table).names()
        self._reloads = 0
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
        # All forks happen on this one long-lived thread: PR_SET_PDEATHSIG fires
        # when the *thread* that forked exits, so it must live as long as we do.
        self._supervisor = threading.Thread(target=self._supervise, name="haproxy-supervisor", daemon=True)
        self._supervisor.start()
        self._spawned.wait(30)
        if self._spawn_error is not None:
            raise RuntimeError(f"could not start HAProxy: {self._spawn_error}")
        atexit.register(self._terminate)

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
                if line.startswith("[ALERT]") or line.startswith("[WARNING]") or "exited with code" in line:
                    logger.warning("haproxy: %s", line)
                else:
                    logger.info("haproxy: %s", line)
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
            self._applied_seq = seq
            self._table = desired
            return {"applied": True, "changed": False, "error": None}
        ok, out = await asyncio.to_thread(self._check, config)
        if not ok:
            self._last_error = f"invalid config, keeping the previous one: {out}"
            logger.error("rejected routing table: %s", self._last_error)
            self._applied_seq = seq
            return {"applied": False, "changed": False, "error": self._last_error}
        wait = self._last_reload + MIN_RELOAD_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._write_config(config)
        err = await asyncio.to_thread(self._reload)
        self._last_reload = time.monotonic()
        if err:
            self._last_error = err
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
        try:
            reply = _cli(self.master_socket, "reload", timeout=30)
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
        """Per-deployment/replica state from HAProxy's ``show stat`` (current worker only)."""
        text = await asyncio.to_thread(_cli, self.runtime_socket, "show stat")
        rows = parse_show_stat(text)
        out: dict[str, Any] = {"frontend": {}, "deployments": {}, "raw_backends": {}}
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
            else:
                dep["servers"][info["servers"].get(sv, sv)] = entry
        return out

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop HAProxy: soft stop (finish in-flight requests) for up to ``grace_s``, then hard."""
        await asyncio.to_thread(self._terminate, grace_s)
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


def ensure_ingress(node_id: str, port: int = INGRESS_PORT, bind_host: str = "0.0.0.0"):
    """Get-or-create the ingress actor for ``node_id`` (idempotent, race-free)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return IngressManager.options(
        name=actor_name(node_id),
        namespace=RAY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        num_cpus=0,
    ).remote(port=port, bind_host=bind_host)
