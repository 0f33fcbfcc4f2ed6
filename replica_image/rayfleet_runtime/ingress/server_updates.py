"""A change of replicas alone, applied through HAProxy's runtime API instead of a reload.

A reload starts a new HAProxy worker, and the old one lingers with the client connections it holds (routing
them by the old table) until they close or ``hard-stop-after``; at many replicas and nodes, every replica
started or stopped would do that on every node. When a new table differs from the running one only in its
servers (``RoutingTable.without_servers`` renders the same), the ingress instead:

- adds each new replica (``add server`` with its ``haproxy_config.ServerLine``, then ``enable health`` and,
  unless its own node's ingress found it down, ``enable server``: it is up at once, as a server of a freshly
  loaded config is, for the controller lists only READY replicas), before it removes any, so a rollout's
  surge never routes to fewer;
- puts a replica checked by another node's ingress in or out of maintenance as that one found it;
- puts each replica that left in maintenance (no new request goes there, the queued ones move to another,
  those in flight finish) and deletes it once HAProxy holds no connection to it (``sweep`` tries again);
  one back before that, with the same arguments, is made ready again;
- sets each canary weight that changed in the weights map (``set map``: the canary slots are there always).

``plan`` is pure; ``RuntimeServers`` holds the runtime API socket and the servers still leaving. Any
reply that isn't success is returned as an error, and the ingress reloads instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from rayfleet_runtime.ingress.haproxy_config import ServerLine

Key = tuple[str, str]  # (backend, server), as HAProxy names them

ADDED = "New server registered."
DELETED = "Server deleted."
NO_SUCH_SERVER = "No such server."
NO_SUCH_BACKEND = "No such backend."
STILL_USED = "Server still has connections attached to it, cannot remove it."


@dataclass(frozen=True)
class ServerUpdate:
    add: tuple[tuple[Key, ServerLine], ...] = ()
    remove: tuple[tuple[Key, ServerLine], ...] = ()  # (key, the line it ran with)
    enable: tuple[Key, ...] = ()  # back in rotation / out of it, as their own node's ingress found them
    disable: tuple[Key, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove or self.enable or self.disable)


def plan(running: Mapping[Key, ServerLine], wanted: Mapping[Key, ServerLine]) -> ServerUpdate:
    """From the servers HAProxy runs to those ``wanted``. A server whose arguments changed (its address, its
    maxconn, where it is checked) is removed and added again."""
    kept = running.keys() & wanted.keys()
    changed = {key for key in kept if running[key].args != wanted[key].args}
    toggled = sorted(key for key in kept - changed if running[key].enabled != wanted[key].enabled)
    return ServerUpdate(add=tuple(sorted((key, wanted[key]) for key in wanted.keys() - running.keys() | changed)),
                        remove=tuple(sorted((key, running[key]) for key in running.keys() - wanted.keys() | changed)),
                        enable=tuple(key for key in toggled if wanted[key].enabled),
                        disable=tuple(key for key in toggled if not wanted[key].enabled))


def _name(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


class RuntimeServers:
    """Applies ``ServerUpdate``s through ``send`` (one runtime API command -> its reply)."""

    def __init__(self, send: Callable[[str], str]):
        self._send = send
        # In maintenance (key -> the line it ran with), deleted once HAProxy holds no connection to them
        self.leaving: dict[Key, ServerLine] = {}

    def apply(self, update: ServerUpdate) -> str | None:
        """None once HAProxy runs ``update``; else what it answered (the caller reloads instead)."""
        for key, line in update.add:
            if key in self.leaving and not self._delete(key):
                if self.leaving.pop(key).args != line.args:
                    return f"{_name(key)} is back, changed, while HAProxy still holds connections to it"
                err = self._run(f"set server {_name(key)} state ready" if line.enabled else "")
            else:
                err = self._add(key, line)
            if err:
                return err
        for key, state in [*((key, "ready") for key in update.enable), *((key, "maint") for key in update.disable)]:
            if err := self._run(f"set server {_name(key)} state {state}"):
                return err
        for key, line in update.remove:
            reply = self._command(f"set server {_name(key)} state maint")
            if reply in (NO_SUCH_SERVER, NO_SUCH_BACKEND):
                continue
            if reply:
                return f"set server {_name(key)} state maint: {reply}"
            self.leaving[key] = line
        self.sweep()
        return None

    def _add(self, key: Key, line: ServerLine) -> str | None:
        reply = self._command(f"add server {_name(key)} {line.args}")
        if reply != ADDED:
            return f"add server {_name(key)}: {reply}"
        # A new server is in maintenance, its checks off, until told otherwise
        return self._run(f"enable health {_name(key)}") or self._run(f"enable server {_name(key)}" if line.enabled else "")

    def _run(self, command: str) -> str | None:
        """None once HAProxy did ``command`` (nothing to do for ""); else what it answered."""
        reply = self._command(command) if command else ""
        return f"{command}: {reply}" if reply else None

    def set_weights(self, weights_map: str, running: Mapping[str, int], wanted: Mapping[str, int]) -> str | None:
        """The canary weights that changed, set in HAProxy's weights map; None once done, else its answer."""
        for name in sorted(wanted):
            if running.get(name) != wanted[name] and (err := self._run(f"set map {weights_map} {name} {wanted[name]}")):
                return err
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
