"""The routing table: which deployment a path reaches, with what limits, on which replicas.

The controller builds it (``build_table``) from each deployment's ``DesiredState`` and its READY replicas,
once per change, and pushes it to every node's ingress; there the ingress, the HAProxy renderer
(``ingress.haproxy_config``) and the activator (``ingress.activator``) only read it. Every rule of the
table lives here: prefix normalisation and which deployment owns a prefix, the queue each deployment
gets, the names HAProxy knows backends and servers by, the keep-alive that bounds how long a replica
leaving the table still gets requests.

Routing: a request goes to the deployment whose prefix is the longest one equal to the path or followed
by ``/`` in it (``/echo`` matches ``/echo`` and ``/echo/x`` but not ``/echoes``); ``/`` catches the rest.
A deployment in a canary rollout (``Route.canary``) has a second backend, ``Backend.canary``, with the canary
revision's replicas and limits; ``canary_weight`` % of the deployment's requests go there (drawn per request,
in HAProxy), while it has a replica up.

The wire form (``to_wire``, the JSON an ingress keeps to serve again after its actor restarts) is::

    {"sharedHealth": true,                 # optional: each replica checked by its own node's ingress alone
     "deployments": {
        "echo": {
            "routePrefix": "/echo",            # normalised: "/echo/" -> "/echo"
            "maxConcurrency": 100,             # per replica -> per-server maxconn
            "requestTimeoutSeconds": 60,       # -> timeout server (504)
            "maxRequestBodyBytes": 16777216,   # optional; a larger Content-Length gets 413 at the ingress
            "queueTimeoutSeconds": 2,          # optional; default QUEUE_TIMEOUT_S (then 503)
            "maxQueued": 800,                  # optional; default maxConcurrency x replicas up
            "scaleFromZero": true,             # optional; with no replicas, requests wait in the activator
            "replicas": [{"id": "echo-0", "host": "127.0.0.1", "port": 43123, "nodeId": "...",
                          "local": "rayfleet/812/43123",  # optional: its node-local socket
                          "up": false}],   # optional: its own node's ingress found it down
            "canary": {                        # optional: a new revision gets `weight` % of the requests
                "weight": 10,                  # percent, 0..100 (0, or no replica: it gets none)
                "maxConcurrency": 50, ...,     # its own limits, as above (no routePrefix, no scaleFromZero)
                "replicas": [...]},
        }}}

``from_wire`` reads any such mapping without failing: what it can't use is left out, with the reason in
``RoutingTable.skipped``.
"""
from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, NamedTuple

from rayfleet_api.desired import ROUTE_PREFIX, DesiredState
from rayfleet_runtime import local_socket

QUEUE_TIMEOUT_S = 2.0  # a request waits this long for a free replica slot, then gets 503
# How long a client's keep-alive connection may sit idle at the ingress. After a reload, an old HAProxy
# worker keeps such a connection, routing it by the old table, until it times out or carries one more
# request: a replica leaving the table serves until then (the controller's drain settle). Short, as
# uvicorn's default, so that takes seconds, not half a minute.
KEEPALIVE_TIMEOUT_S = 5
DEFAULT_REQUEST_TIMEOUT_S = float(DesiredState.request_timeout_seconds)
DEFAULT_MAX_CONCURRENCY = DesiredState.max_concurrency
# Values HAProxy can hold whatever a table says: its timers overflow at 2**31 ms (~24.8 days), and
# `queue() ge N` refuses N past 2**63. The controller sends far less (rayfleet_api.desired.MAXIMUM).
MAX_TIMEOUT_S = 7 * 86400.0
MAX_SERVER_MAXCONN = 1_000_000

_NAME_OK = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # fullmatch only: "$" would admit a trailing newline
# A replica's host: a DNS name (IP addresses are checked with ipaddress). Anything else (a space, a
# newline) would break the `server` line, and with it the whole config.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME_OK = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")


@dataclass(frozen=True)
class Server:
    name: str  # HAProxy's identifier for it
    replica_id: str
    addr: str  # host:port, as haproxy.cfg writes it
    node_id: str | None = None
    # What the ingress of its own node last found (RoutingTable.shared_health): False, every other
    # ingress takes it out of rotation
    up: bool = True
    local: str | None = None  # its node-local socket (rayfleet_runtime.local_socket), for its own node's ingress

    def address_for(self, node_id: str | None) -> str:
        """How the ingress of ``node_id`` reaches it: its local socket from its own node, else TCP."""
        if self.local is not None and node_id is not None and node_id == self.node_id:
            return local_socket.haproxy_address(self.local)
        return self.addr


@dataclass(frozen=True)
class Backend:
    deployment: str
    name: str  # HAProxy's identifier; the activator learns a held request's deployment from it
    prefix: str
    max_concurrency: int
    request_timeout_s: float
    queue_timeout_s: float
    # None: what the replicas up could run at once (maxConcurrency x HAProxy's nbsrv), which a change of
    # replicas alone leaves to HAProxy
    max_queued: int | None
    max_body_bytes: int | None
    scale_from_zero: bool = False
    servers: tuple[Server, ...] = ()
    # The deployment's canary revision: a backend of its own (its replicas, its limits, never the
    # activator's) that gets canary_weight % of the deployment's requests while it has a replica up.
    canary: Backend | None = None
    canary_weight: int = 0
    canary_name: str = ""  # the canary's backend, whether a canary runs or not (canary_slot)

    @property
    def canary_slot(self) -> Backend:
        """The backend for the deployment's canary: its own while one runs, else an empty one with this
        backend's limits, so that a canary starting with those (a new version of the code alone) or ending
        changes no backend, and HAProxy needs no reload."""
        if self.canary is not None:
            return self.canary
        return replace(self, name=self.canary_name, servers=(), scale_from_zero=False, canary=None, canary_weight=0)

    def revisions(self) -> tuple[Backend, ...]:
        """The deployment's backends: this one, then its canary's if it has one."""
        return (self,) if self.canary is None else (self, self.canary)

    def uses_activator(self, activator_socket: str | None) -> bool:
        """With no replica up, requests wait in the activator for one, instead of a 503 at once."""
        return activator_socket is not None and self.scale_from_zero

    def without_servers(self) -> Backend:
        return replace(self, servers=(), canary=self.canary and self.canary.without_servers())


@dataclass(frozen=True)
class RoutingTable:
    """Backends in routing order (longest prefix first, ``/`` last), each prefix owned by one."""

    backends: tuple[Backend, ...] = ()
    skipped: tuple[str, ...] = ()  # why deployments or replicas were left out (from_wire only)
    # Each replica is health-checked by its own node's ingress alone, which tells the controller, whose
    # table tells the others (Server.up); False: every ingress checks every replica itself
    shared_health: bool = False

    def checks(self, server: Server, node_id: str | None) -> bool:
        """The ingress of ``node_id`` (None: not known) health-checks ``server`` itself."""
        return not self.shared_health or None in (server.node_id, node_id) or server.node_id == node_id

    @property
    def catch_all(self) -> Backend | None:
        return next((be for be in self.backends if be.prefix == "/"), None)

    def backend(self, deployment: str) -> Backend | None:
        return next((be for be in self.backends if be.deployment == deployment), None)

    def server_count(self) -> int:
        return sum(len(b.servers) for be in self.backends for b in be.revisions())

    def without_servers(self) -> RoutingTable:
        """The table's shape: what a change of replicas alone leaves as it is."""
        return replace(self, backends=tuple(be.without_servers() for be in self.backends))

    def names(self) -> dict[str, Any]:
        """HAProxy names -> table names, for mapping ``show stat`` back. A canary's backend maps to its
        deployment too, marked ``"revision": "canary"``: its replicas are the deployment's. The canary
        backend of a deployment with no canary maps to None: ours, with nothing to report."""
        out: dict[str, Any] = {}
        for be in self.backends:
            out[be.name] = {"deployment": be.deployment, "servers": {s.name: s.replica_id for s in be.servers}}
            out[be.canary_name] = None
            if be.canary is not None:
                out[be.canary.name] = {"deployment": be.deployment, "revision": "canary",
                                       "servers": {s.name: s.replica_id for s in be.canary.servers}}
        return out

    def to_wire(self) -> dict[str, Any]:
        return {**({"sharedHealth": True} if self.shared_health else {}), "deployments": {be.deployment: {
            "routePrefix": be.prefix, **_limits_to_wire(be),
            **({"scaleFromZero": True} if be.scale_from_zero else {}),
            **({"canary": {"weight": be.canary_weight, **_limits_to_wire(be.canary)}} if be.canary else {}),
        } for be in self.backends}}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any] | None) -> "RoutingTable":
        deployments = (wire or {}).get("deployments") or {}
        entries, skipped = [], []
        for name in sorted(deployments):
            entry = _entry_from_wire(name, deployments[name] or {}, skipped)
            if entry is not None:
                entries.append(entry)
        return _assemble(entries, skipped, (wire or {}).get("sharedHealth") is True)


class ReplicaRow(NamedTuple):
    """A READY replica as the controller routes it."""

    id: str
    host: str
    port: int
    node: str | None  # its Ray node: the ingress there reaches it by ``local``
    local: str | None = None  # its abstract Unix socket's name (local_socket), if it bound one


@dataclass(frozen=True)
class Route:
    """One deployment as the controller routes it: its desired state and its READY replicas."""

    deployment: str
    desired: DesiredState
    replicas: tuple[ReplicaRow, ...]
    canary: CanaryRoute | None = None


@dataclass(frozen=True)
class CanaryRoute:
    """A deployment's canary revision: its own desired state (its limits are versioned, so they may differ
    from the stable revision's), its READY replicas, and the percent (0..100) of the requests it gets."""

    desired: DesiredState
    replicas: tuple[ReplicaRow, ...]
    weight: int


def build_table(routes: Iterable[Route], shared_health: bool = False, down: frozenset[str] = frozenset()) -> RoutingTable:
    """The table for these deployments (the controller's, once per change); ``down``: the replicas their own
    node's ingress found down (with ``shared_health``)."""
    skipped: list[str] = []
    entries = []
    for route in sorted(routes, key=lambda r: r.deployment):
        entry = _entry(route.deployment, route.desired, route.replicas, f"deployment {route.deployment!r}", skipped,
                       down)
        if route.canary is not None:
            c = route.canary
            # The stable revision owns the prefix and scale-from-zero: the canary only takes a share.
            canary = replace(_entry(route.deployment, c.desired, c.replicas,
                                    f"deployment {route.deployment!r} canary", skipped, down),
                             prefix=entry.prefix, scale_from_zero=False)
            entry = replace(entry, canary=canary, canary_weight=min(max(int(c.weight), 0), 100))
        entries.append(entry)
    return _assemble(entries, skipped, shared_health)


def _entry(deployment: str, d: DesiredState, replicas: Iterable[Any], who: str, skipped: list[str],
           down: frozenset[str]) -> _Entry:
    scaled = d.autoscaling
    return _Entry(
        deployment, d.route_prefix, d.max_concurrency, float(d.request_timeout_seconds),
        # Autoscaled, the ingress queues what maxReplicas could run, up to the request timeout: the
        # queue is the load that brings more replicas, and they are coming (not a 503 at once).
        queue_timeout_s=float(d.request_timeout_seconds) if scaled else QUEUE_TIMEOUT_S,
        max_queued=d.max_concurrency * scaled.max_replicas if scaled else None,
        max_body_bytes=d.max_request_body_bytes,
        # With no replica the ingress holds a request (it starts one) instead of refusing it.
        scale_from_zero=bool(scaled and scaled.min_replicas == 0),
        servers=_servers(who, ((*rep, rep[0] not in down) for rep in replicas), skipped))


def normalize_prefix(prefix: Any) -> str:
    """``"/echo/"`` -> ``"/echo"``, ``""``/None -> ``"/"``; raises ValueError if unusable."""
    if prefix is None or prefix == "":
        return "/"
    stripped = (prefix.rstrip("/") or "/") if isinstance(prefix, str) else ""
    if not ROUTE_PREFIX.fullmatch(stripped):  # the spec's own rule (rayfleet_api)
        raise ValueError(f"invalid routePrefix {prefix!r}")
    return stripped


def prefix_taken(deployment: str, prefix: str, owners: Mapping[str, str]) -> str | None:
    """The other deployment that owns ``prefix`` already (``owners``: prefix -> deployment), if any. A prefix
    is its first claimant's: the controller answers a later claim with a 400, a table read from the wire
    (by deployment name) drops it."""
    owner = owners.get(prefix)
    return owner if owner is not None and owner != deployment else None


def sanitize_name(raw: str) -> str:
    """A stable HAProxy identifier for ``raw``.

    Names that are already valid are kept verbatim (so ``echo-0`` stays ``echo-0``); others have bad
    characters replaced and a hash of the original appended, so two different raw names can't collapse
    onto one identifier.
    """
    raw = str(raw)
    if _NAME_OK.fullmatch(raw):
        return raw
    cleaned = re.sub(r"[^A-Za-z0-9_.:-]", "_", raw)[:48] or "x"
    return f"{cleaned}-{_short_hash(raw)}"


def backend_name(deployment: str) -> str:
    return "be_" + sanitize_name(deployment)


def canary_backend_name(stable: str) -> str:
    """The canary's backend, named after the stable one's: ``:`` is no deployment name's (rayfleet_api's
    validate_name), so no deployment's own backend is called that."""
    return stable + ":canary"


def server_name(replica_id: str) -> str:
    return sanitize_name(replica_id)


def server_addr(host: Any, port: Any) -> str:
    """A replica's ``host:port``; ValueError (the replica is left out) if haproxy.cfg can't hold it."""
    host, port = str(host), int(port)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        if not _HOSTNAME_OK.fullmatch(host):
            raise ValueError(f"invalid host {host!r}") from None
    return join_addr(host, port)


def join_addr(host: str, port: int) -> str:
    host = str(host)
    if ":" in host and not host.startswith("["):  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{int(port)}"


def _limits_to_wire(be: Backend) -> dict[str, Any]:
    return {"maxConcurrency": be.max_concurrency, "requestTimeoutSeconds": be.request_timeout_s,
            "queueTimeoutSeconds": be.queue_timeout_s, "maxQueued": be.max_queued,
            "maxRequestBodyBytes": be.max_body_bytes,
            "replicas": [{"id": s.replica_id, **_host_port(s.addr), "nodeId": s.node_id,
                          **({} if s.local is None else {"local": s.local}), **({} if s.up else {"up": False})}
                         for s in be.servers]}


def _host_port(addr: str) -> dict[str, Any]:
    host, _, port = addr.rpartition(":")
    return {"host": host.removeprefix("[").removesuffix("]"), "port": int(port)}


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


@dataclass(frozen=True)
class _Entry:
    """A deployment's values, checked, before names and the queue default are settled."""

    deployment: str
    prefix: str
    max_concurrency: int
    request_timeout_s: float
    queue_timeout_s: float
    max_queued: int | None  # None: Backend.max_queued's default
    max_body_bytes: int | None
    scale_from_zero: bool
    servers: tuple[tuple[str, str, str | None, bool, str | None], ...]  # (replica id, addr, node id, up, local)
    canary: _Entry | None = None  # its prefix is this entry's, its scale_from_zero False
    canary_weight: int = 0


def _servers(who: str, replicas: Iterable[Any], skipped: list[str]) -> tuple[tuple[str, str, str | None, bool, str | None], ...]:
    """From (replica id, host, port, node id, local socket, up) rows; ``who`` names the replicas' revision in a
    skip reason ("deployment 'x'", "deployment 'x' canary"). A local socket haproxy.cfg can't hold is dropped
    (the replica is still reached over TCP)."""
    parsed = set()
    for rep in replicas:
        try:
            rid, host, port, node, local, up = rep
            local = local if isinstance(local, str) and local_socket.NAME_OK.fullmatch(local) else None
            parsed.add((str(rid), server_addr(host, port), None if node is None else str(node), up is not False, local))
        except (TypeError, ValueError, OverflowError) as e:
            skipped.append(f"{who}: bad replica {rep!r}: {e}")
    return tuple(sorted(parsed, key=lambda row: tuple(map(str, row))))


def _entry_from_wire(name: str, spec: Any, skipped: list[str]) -> _Entry | None:
    if not isinstance(spec, Mapping):
        skipped.append(f"deployment {name!r}: not an object")
        return None
    try:
        prefix = normalize_prefix(spec.get("routePrefix"))
    except ValueError as e:
        skipped.append(f"deployment {name!r}: {e}")
        return None
    entry = _limits_from_wire(name, prefix, spec, f"deployment {name!r}", skipped)
    entry = replace(entry, scale_from_zero=spec.get("scaleFromZero") is True)
    if spec.get("canary") is not None:
        return _with_canary_from_wire(entry, spec["canary"], skipped)
    return entry


def _with_canary_from_wire(entry: _Entry, spec: Any, skipped: list[str]) -> _Entry:
    """``entry`` with the canary ``spec`` describes; without one (the reason skipped) if it is unusable: the
    stable revision then gets every request, as before the canary."""
    who = f"deployment {entry.deployment!r} canary"
    weight = spec.get("weight") if isinstance(spec, Mapping) else None
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        skipped.append(f"{who}: left out: not an object with a weight 0..100: {spec!r}"[:300])
        return entry
    return replace(entry, canary=_limits_from_wire(entry.deployment, entry.prefix, spec, who, skipped),
                   canary_weight=weight)


def _limits_from_wire(name: str, prefix: str, spec: Mapping[str, Any], who: str, skipped: list[str]) -> _Entry:
    """A revision's limits and replicas as the wire has them (a deployment's, or its canary's)."""
    try:
        max_conc = int(spec.get("maxConcurrency") or DEFAULT_MAX_CONCURRENCY)
    except (TypeError, ValueError, OverflowError):
        max_conc = DEFAULT_MAX_CONCURRENCY
    replicas = spec.get("replicas") or []
    if not isinstance(replicas, list):
        skipped.append(f"{who}: replicas is not a list")
        replicas = []
    rows = []
    for rep in replicas:
        try:
            rows.append((rep["id"], rep["host"], rep["port"], rep.get("nodeId"), rep.get("local"), rep.get("up")))
        except (KeyError, TypeError, AttributeError) as e:
            skipped.append(f"{who}: bad replica {rep!r}: {e!r}")
    return _Entry(name, prefix, max_conc, _secs(spec.get("requestTimeoutSeconds"), DEFAULT_REQUEST_TIMEOUT_S),
                  _secs(spec.get("queueTimeoutSeconds"), QUEUE_TIMEOUT_S), _count(spec.get("maxQueued")),
                  _max_body(spec.get("maxRequestBodyBytes")), False, _servers(who, rows, skipped))


def _assemble(entries: list[_Entry], skipped: list[str], shared_health: bool) -> RoutingTable:
    """Names, prefix owners, the queue default and routing order: the same for both ways a table is made."""
    owners: dict[str, str] = {}
    backends: list[Backend] = []
    seen_backend: set[str] = set()
    for e in entries:
        taken = prefix_taken(e.deployment, e.prefix, owners)
        if taken is not None:
            skipped.append(f"deployment {e.deployment!r}: routePrefix {e.prefix} already used by {taken!r}")
            continue
        owners[e.prefix] = e.deployment
        name = backend_name(e.deployment)
        if name in seen_backend:
            name = f"be_{sanitize_name(e.deployment)[:40]}-{_short_hash('be:' + e.deployment)}"
        seen_backend.add(name)
        canary_name = canary_backend_name(name)
        if canary_name in seen_backend:  # only a table no controller sends: names are checked there
            canary_name = f"{canary_name[:48]}-{_short_hash('canary:' + e.deployment)}"
        seen_backend.add(canary_name)
        backend = replace(_backend(e, name, f"deployment {e.deployment!r}", skipped), canary_name=canary_name)
        if e.canary is not None:
            canary = _backend(e.canary, canary_name, f"deployment {e.deployment!r} canary", skipped)
            backend = replace(backend, canary=canary, canary_weight=e.canary_weight)
        backends.append(backend)
    # Longest prefix first; ties can't happen (prefixes are unique). "/" is len 1 -> last.
    backends.sort(key=lambda b: (-len(b.prefix), b.prefix))
    return RoutingTable(tuple(backends), tuple(skipped), shared_health)


def _backend(e: _Entry, name: str, who: str, skipped: list[str]) -> Backend:
    """One revision's backend: its servers named, its limits held to what haproxy.cfg can take."""
    servers: list[Server] = []
    used: set[str] = set()
    for rid, addr, node, up, local in e.servers:  # sorted: names don't depend on the order replicas are listed in
        sname = server_name(rid)
        if sname in used:
            sname = f"{sname[:48]}-{_short_hash('dup:' + rid + addr)}"
        if sname in used:
            skipped.append(f"{who}: duplicate replica id {rid!r}")
            continue
        used.add(sname)
        servers.append(Server(sname, rid, addr, node, up, local))
    servers.sort(key=lambda s: s.name)
    max_conc = min(max(1, e.max_concurrency), MAX_SERVER_MAXCONN)
    return Backend(
        e.deployment, name, e.prefix, max_conc, min(e.request_timeout_s, MAX_TIMEOUT_S),
        min(e.queue_timeout_s, MAX_TIMEOUT_S),
        None if e.max_queued is None else min(e.max_queued, MAX_SERVER_MAXCONN * 1000),
        e.max_body_bytes, e.scale_from_zero, tuple(servers))


def _secs(value: Any, default: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    if not math.isfinite(v) or v <= 0:
        return default
    return min(v, MAX_TIMEOUT_S)


def _count(value: Any) -> int | None:
    """A positive int from the table (HAProxy's queue is a counter); else None, for the default."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _max_body(value: Any) -> int | None:
    """The body limit HAProxy enforces on Content-Length; None (the replica alone checks) if unusable."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        return None
    return value
