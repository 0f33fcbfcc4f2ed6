"""A change of replicas alone, applied through HAProxy's runtime API instead of a reload.

A reload starts a new HAProxy worker, and the old one lingers with the client connections it holds (routing
them by the old table) until they close or ``hard-stop-after``; at many replicas and nodes, every replica
started or stopped would do that on every node. When a new table differs from the running one only in its
servers (``RoutingTable.without_servers`` renders the same), the ingress instead:

- adds each new replica (``add server`` with ``haproxy_config.server_args``, then ``enable server`` and
  ``enable health``: it is up at once, as a server of a freshly loaded config is, for the controller lists
  only READY replicas), before it removes any, so a rollout's surge never routes to fewer;
- puts each replica that left in maintenance (no new request goes there, the queued ones move to another,
  those in flight finish) and deletes it once HAProxy holds no connection to it (``sweep`` tries again);
  one back before that, with the same arguments, is made ready again.

``plan`` is pure; ``RuntimeServers`` holds the runtime API socket and the servers still leaving. Any
reply that isn't success is returned as an error, and the ingress reloads instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

Key = tuple[str, str]  # (backend, server), as HAProxy names them

ADDED = "New server registered."
DELETED = "Server deleted."
NO_SUCH_SERVER = "No such server."
NO_SUCH_BACKEND = "No such backend."
STILL_USED = "Server still has connections attached to it, cannot remove it."


@dataclass(frozen=True)
class ServerUpdate:
    add: tuple[tuple[Key, str], ...] = ()  # (key, server_args)
    remove: tuple[tuple[Key, str], ...] = ()  # (key, the server_args it ran with)

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def plan(running: Mapping[Key, str], wanted: Mapping[Key, str]) -> ServerUpdate:
    """From the servers HAProxy runs to those ``wanted`` (both: key -> server_args). A server whose
    arguments changed (its address, its maxconn) is removed and added again."""
    changed = {key for key in running.keys() & wanted.keys() if running[key] != wanted[key]}
    return ServerUpdate(add=tuple(sorted((key, wanted[key]) for key in wanted.keys() - running.keys() | changed)),
                        remove=tuple(sorted((key, running[key]) for key in running.keys() - wanted.keys() | changed)))


def _name(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


class RuntimeServers:
    """Applies ``ServerUpdate``s through ``send`` (one runtime API command -> its reply)."""

    def __init__(self, send: Callable[[str], str]):
        self._send = send
        # In maintenance (key -> its server_args), deleted once HAProxy holds no connection to them
        self.leaving: dict[Key, str] = {}

    def apply(self, update: ServerUpdate) -> str | None:
        """None once HAProxy runs ``update``; else what it answered (the caller reloads instead)."""
        for key, args in update.add:
            if key in self.leaving and not self._delete(key):
                if self.leaving.pop(key) != args:
                    return f"{_name(key)} is back, changed, while HAProxy still holds connections to it"
                reply = self._command(f"set server {_name(key)} state ready")
                if reply:
                    return f"set server {_name(key)} state ready: {reply}"
                continue
            reply = self._command(f"add server {_name(key)} {args}")
            if reply != ADDED:
                return f"add server {_name(key)}: {reply}"
            for command in (f"enable server {_name(key)}", f"enable health {_name(key)}"):
                reply = self._command(command)
                if reply:
                    return f"{command}: {reply}"
        for key, args in update.remove:
            reply = self._command(f"set server {_name(key)} state maint")
            if reply in (NO_SUCH_SERVER, NO_SUCH_BACKEND):
                continue
            if reply:
                return f"set server {_name(key)} state maint: {reply}"
            self.leaving[key] = args
        self.sweep()
        return None

    def sweep(self) -> None:
        """Delete the servers that left and that HAProxy no longer holds a connection to."""
        for key in sorted(self.leaving):
            self._delete(key)

    def forget(self) -> None:
        """After a reload or a restart: the new worker never had the servers that were leaving."""
        self.leaving.clear()

    def _delete(self, key: Key) -> bool:
        reply = self._command(f"del server {_name(key)}")
        if reply in (DELETED, NO_SUCH_SERVER, NO_SUCH_BACKEND):
            self.leaving.pop(key, None)
            return True
        return False  # STILL_USED, most likely: its requests are finishing

    def _command(self, command: str) -> str:
        return self._send(command).strip()
