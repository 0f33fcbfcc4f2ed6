"""One HAProxy master process for the ingress: started, restarted when it dies, reloaded, stopped.

The ingress actor, not HAProxy, owns the listening socket (``listen``), and HAProxy inherits it
(``bind fd@N``): when HAProxy dies (a killed worker takes its master with it) and is restarted, clients
that connect in between wait in the socket's backlog instead of being refused. Only the connections the
dead worker held are lost.

``reload()`` is a *seamless reload* through the master CLI: the master re-execs, the new worker takes
over the listening sockets from the old one (``expose-fd listeners`` / ``-x sockpair@``), and the old
worker finishes its in-flight requests before it exits (bounded by ``hard-stop-after``).

HAProxy cannot outlive the actor: it is started with ``PR_SET_PDEATHSIG`` (SIGTERM to the master when
the supervisor thread that forked it dies; the workers exit with their master), and ``terminate()`` /
interpreter exit stop it.
"""
from __future__ import annotations

import atexit
import collections
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Callable

from rayfleet_runtime.ingress.haproxy_bin import HAProxyBinary

logger = logging.getLogger("rayfleet.ingress")

MASTER_SOCKET_WAIT_S = 10.0
SPAWN_WAIT_S = 30.0

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


def listen(host: str, port: int, wait_s: float = 10.0) -> socket.socket:
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


def cli(path: str, command: str, timeout: float = 5.0) -> str:
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


class HAProxyProcess:
    """The master (``haproxy -W -S <master socket>``) running ``cfg_path`` on an inherited listening socket.

    Made before the socket: it first kills a master a previous incarnation left, which may hold the port."""

    def __init__(self, binary: HAProxyBinary, workdir: str, cfg_path: str):
        self.binary = binary
        self.workdir = workdir
        self.cfg_path = cfg_path
        self.listener: socket.socket | None = None
        self.pid_path = os.path.join(workdir, "haproxy.pid")
        self.master_socket = os.path.join(workdir, "master.sock")
        self.runtime_socket = os.path.join(workdir, "admin.sock")  # the config's `stats socket`
        self.restarts = 0
        self.on_start: Callable[[], None] = lambda: None  # called as each master starts (a restart too)
        self._log_tail: collections.deque[str] = collections.deque(maxlen=200)
        self._proc: subprocess.Popen | None = None
        self._proc_lock = threading.Lock()
        self._stopping = threading.Event()
        self._spawned = threading.Event()
        self._spawn_error: BaseException | None = None
        self._kill_stale()

    def start(self, listener: socket.socket) -> None:
        """Start the master on ``listener``; returns once it runs (RuntimeError if it could not start)."""
        self.listener = listener
        # All forks happen on this one long-lived thread: PR_SET_PDEATHSIG fires
        # when the *thread* that forked exits, so it must live as long as we do.
        threading.Thread(target=self._supervise, name="haproxy-supervisor", daemon=True).start()
        self._spawned.wait(SPAWN_WAIT_S)
        if self._spawn_error is not None:
            raise RuntimeError(f"could not start HAProxy: {self._spawn_error}")
        atexit.register(self.terminate)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc else None

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

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
            pass_fds=(self.listener.fileno(),),
        )
        logger.info("started HAProxy (master pid %d)", proc.pid)
        return proc

    def _supervise(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            try:
                with self._proc_lock:
                    if self._stopping.is_set():
                        break
                    self._proc = proc = self._spawn()
                self.on_start()
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
            self.restarts += 1
            # At once after a crash that ended a healthy run (clients wait in the listener's backlog
            # meanwhile); backing off only if it keeps crashing.
            backoff = 0.0 if time.monotonic() - started > 30 else min(max(backoff * 2, 0.5), 10.0)
            self._stopping.wait(backoff)

    def terminate(self, grace_s: float = 0.0) -> None:
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

    def reload(self) -> str | None:
        """Reload the config on disk; None if it took, else the error."""
        # A master just (re)started may not have created its socket yet: wait for it a little, rather
        # than fail the first table pushed after a start.
        deadline = time.monotonic() + MASTER_SOCKET_WAIT_S
        while True:
            try:
                reply = cli(self.master_socket, "reload", timeout=30)
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
