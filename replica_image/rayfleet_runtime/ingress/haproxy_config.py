"""Render the HAProxy configuration for one rayfleet node from the routing table.

Pure: no Ray, no HAProxy, no I/O. ``render_config(table, ...)`` returns the text of a complete
``haproxy.cfg`` for a ``routing.RoutingTable`` (which holds every routing rule: prefixes, limits, names);
the same table always renders the same text (so the ingress can skip reloads when nothing changed).

Only the ``server`` lines depend on which replicas a deployment has: the rest of the text (its *shape*,
``render_config(table.without_servers())``) does not, so a table that differs only in replicas is applied
through HAProxy's runtime API (``runtime_servers``: ``add server`` with the same ``server_args``) instead of
a reload. Hence the rules that read a replica count read HAProxy's own (``nbsrv``), not the table's.
The path is forwarded unchanged. With no ``/`` deployment, unmatched paths get a 404 JSON body from
HAProxy itself.

Every deployment has a second backend, for a canary revision's replicas (``Backend.canary_slot``: empty,
with the deployment's limits, while no canary runs): the frontend sends it the canary's weight % of the
deployment's requests, drawn per request (``rand(100)``), while it has a replica up (``nbsrv``); with none
up, or weight 0, every request goes to the stable backend. The weights are in a map file
(``canary_weights``), which the runtime API changes in place (``set map``), so a canary's start, steps and
end with the deployment's own limits need no reload.

A deployment with no replica up gets 503 from HAProxy, unless it has ``scaleFromZero`` and the ingress runs
an activator (``activator_socket``): then the frontend sends its requests to the deployment's activator
backend (``<backend>:activator``, whose only server is the activator) while ``nbsrv`` of its own is 0, and the
activator holds them until a replica is ready (``activator.py``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from rayfleet_api.constants import INGRESS_READY_PATH, REPLICA_READY_PATH
from rayfleet_runtime.routing import (DEFAULT_REQUEST_TIMEOUT_S, KEEPALIVE_TIMEOUT_S, QUEUE_TIMEOUT_S, Backend,
                                      RoutingTable, Server, join_addr)

# Short: a connect in the cluster takes well under a millisecond, and HAProxy waits min(this, 1 s)
# before it retries a refused connect elsewhere (a killed replica's GETs would stall a second).
CONNECT_TIMEOUT_MS = 250
HEALTH_INTER_MS = 1000
# A replica another node's ingress checks (RoutingTable.shared_health) is checked here this rarely while up:
# what marks it down here is its own node's finding (the table) or this node's traffic failing to reach it
# (`observe`, which needs checks on); once down it is checked every HEALTH_INTER_MS until it answers.
ELSEWHERE_HEALTH_INTER_MS = 3_600_000
# On every 503 HAProxy answers itself (no replica, queue full, queue timeout), as the replica does on its own.
RETRY_AFTER_S = 1
RETRY_AFTER = f" hdr Retry-After {RETRY_AFTER_S}"
FRONTEND_NAME = "rayfleet"
CANARY_DRAW_VAR = "txn.canary_draw"  # one draw (0..99) per request, against every canary weight
METRICS_FRONTEND_NAME = "metrics"
NOT_FOUND_BACKEND = "rayfleet_no_route"
ACTIVATOR_SERVER = "activator"
# Names the backend (hence the deployment) a request reached the activator through; set by HAProxy, so a
# client can't choose it. The backend name, not the deployment's, because it is always a safe haproxy.cfg word.
ACTIVATOR_BACKEND_HEADER = "X-Rayfleet-Backend"
# HAProxy waits this much longer than requestTimeoutSeconds for the activator, whose own 504 (counted,
# with the deployment named) comes at requestTimeoutSeconds.
ACTIVATOR_TIMEOUT_MARGIN_S = 1.0


def _ms(seconds: float) -> str:
    ms = max(1, int(round(seconds * 1000)))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _quote_single(text: str) -> str:
    """A single-quoted haproxy.cfg word (no escapes are processed inside)."""
    return "'" + text.replace("'", "\\u0027") + "'"


def _json_body(obj: Mapping[str, Any]) -> str:
    return _quote_single(json.dumps(obj, separators=(",", ":"), sort_keys=True))


def _comment(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", " ", str(text))  # a newline ends it, a NUL fails the whole config


def _body_limit(be: Backend) -> list[str]:
    """Refused on its headers, before a byte of the body is forwarded (chunked bodies: the replica)."""
    if be.max_body_bytes is None:
        return []
    too_large = _json_body({"error": "request body too large", "deployment": be.deployment,
                            "maxRequestBodyBytes": be.max_body_bytes})
    return ["    http-request return status 413 content-type application/json string "
            f"{too_large} hdr Connection close if {{ req.hdr_val(content-length) gt {be.max_body_bytes} }}"]


def activator_backend_name(backend: str) -> str:
    """Named after the deployment's backend: ``:`` is in no deployment's backend name (see canary_backend_name)."""
    return backend + ":activator"


def _activator_backend(be: Backend, activator_socket: str) -> list[str]:
    """Where a scale-from-zero deployment's requests go while it has no replica up: the activator, its only
    server, holds each one until a replica is ready (or answers 504/503 itself: no health check, no maxconn,
    no queue here)."""
    return [
        f"# deployment {_comment(be.deployment)}: prefix {be.prefix}, with no replica up: held by the activator",
        f"backend {activator_backend_name(be.name)}",
        f"    timeout server {_ms(be.request_timeout_s + ACTIVATOR_TIMEOUT_MARGIN_S)}",
        *_body_limit(be),
        f"    http-request set-header {ACTIVATOR_BACKEND_HEADER} {be.name}",
        "    retry-on conn-failure",  # the activator's answers are final; a failed connect reached nothing
        f"    server {ACTIVATOR_SERVER} unix@{activator_socket}",
    ]


def _routes(table: RoutingTable, activator_socket: str | None, weights_map: str) -> list[str]:
    """The frontend's routing rules: each deployment's by prefix, longest first, then the catch-all."""
    out = []
    for be in table.backends:
        if be.prefix == "/":
            continue
        matches = [f"{{ path {be.prefix} }}", f"{{ path_beg {be.prefix}/ }}"]
        out.append(f"    # deployment {_comment(be.deployment)}")
        out.extend(_activator_route(be, matches, activator_socket))
        out.extend(_canary_route(be, matches, weights_map))
        out.append(f"    use_backend {be.name} if {' || '.join(matches)}")
    catch_all = table.catch_all
    if catch_all is not None:
        # After every prefix's rules: only the paths no other deployment matched reach it.
        out.append(f"    # deployment {_comment(catch_all.deployment)}: the paths left, with no replica up or to its canary")
        out.extend(_activator_route(catch_all, [], activator_socket))
        out.extend(_canary_route(catch_all, [], weights_map))
    out.append(f"    default_backend {catch_all.name if catch_all else NOT_FOUND_BACKEND}")
    return out


def _activator_route(be: Backend, matches: list[str], activator_socket: str | None) -> list[str]:
    """The rule that sends a scale-from-zero deployment's requests to the activator while none of its
    replicas is up (``matches`` as for ``_canary_route``)."""
    if not be.uses_activator(activator_socket):
        return []
    none_up = f"{{ nbsrv({be.name}) eq 0 }}"
    condition = " || ".join(f"{match} {none_up}" for match in matches) if matches else none_up
    return [f"    use_backend {activator_backend_name(be.name)} if {condition}"]


def _canary_route(be: Backend, matches: list[str], weights_map: str) -> list[str]:
    """The rule, before the deployment's own, that sends its canary slot its weight % of its requests
    (``matches``: its paths' alternatives; none for the catch-all, whose rule comes after every other): the
    weight, from the map, less the request's draw (0..99) is positive. ``nbsrv``: with no canary replica up,
    the request stays on the stable backend instead of a 503 from the canary's."""
    slot = be.canary_slot.name
    draw = (f"{{ str({slot}),map_str_int({weights_map},0),sub({CANARY_DRAW_VAR}) gt 0 }}"
            f" {{ nbsrv({slot}) gt 0 }}")
    condition = " || ".join(f"{match} {draw}" for match in matches) if matches else draw
    return [f"    use_backend {slot} if {condition}"]


def canary_weights(table: RoutingTable) -> dict[str, int]:
    """Canary backend -> the percent of its deployment's requests it gets: the weights map's entries."""
    return {be.canary_slot.name: be.canary_weight if be.canary is not None else 0 for be in table.backends}


def canary_weights_text(table: RoutingTable) -> str:
    """The weights map file HAProxy loads with the config (``render_config``'s ``weights_map``)."""
    return "".join(f"{name} {weight}\n" for name, weight in canary_weights(table).items())


def _title(deployment: Backend, revision: Backend) -> str:
    if revision is not deployment:
        return f"# deployment {_comment(deployment.deployment)}: its canary, for a share of prefix {deployment.prefix}"
    return f"# deployment {_comment(revision.deployment)}: prefix {revision.prefix}"


@dataclass(frozen=True)
class ServerLine:
    """One replica as this node's HAProxy runs it."""

    args: str  # what follows `server <name>`: the same in haproxy.cfg and in a runtime `add server`
    own: bool  # health-checked here every HEALTH_INTER_MS; else by its own node's ingress (see ELSEWHERE_...)
    enabled: bool  # in rotation (a replica its own node's ingress found down is in maintenance elsewhere)


def server_line(table: RoutingTable, be: Backend, server: Server, node_id: str | None,
                health_inter_ms: int = HEALTH_INTER_MS) -> ServerLine:
    """A replica of ``be`` for the ingress of ``node_id``, by its local socket if it is on that node
    (``Server.address_for``): checked every interval there if ``table.checks``
    says so, else rarely (``ELSEWHERE_HEALTH_INTER_MS``); marked down after 3 failed connects in a row either
    way, then checked every interval until it answers. (A runtime ``add server`` takes no ``default-server``.)"""
    own = table.checks(server, node_id)
    inter = int(health_inter_ms)
    up_inter = inter if own else max(inter, ELSEWHERE_HEALTH_INTER_MS)
    health = (f"check inter {up_inter}ms downinter {inter}ms fastinter {max(100, inter // 2)}ms rise 1 fall 2"
              " observe layer4 error-limit 3 on-error mark-down")
    return ServerLine(f"{server.address_for(node_id)} {health} maxconn {be.max_concurrency}", own, own or server.up)


def runtime_servers(table: RoutingTable, node_id: str | None,
                    health_inter_ms: int = HEALTH_INTER_MS) -> dict[tuple[str, str], ServerLine]:
    """(backend, server) -> its ``ServerLine`` for every replica in ``table``: what the runtime API must hold."""
    return {(revision.name, s.name): server_line(table, revision, s, node_id, health_inter_ms)
            for be in table.backends for revision in be.revisions() for s in revision.servers}


def _replica_backend(table: RoutingTable, be: Backend, title: str, node_id: str | None,
                     health_inter_ms: int) -> list[str]:
    """A backend of replicas: health-checked, each up to maxConcurrency, a bounded queue, its own 503s."""
    out = [title, f"backend {be.name}"]
    w = out.append
    w("    balance random(2)")
    w("    http-reuse always")
    w("    option httpchk")
    w(f"    http-check send meth GET uri {REPLICA_READY_PATH}")
    w("    http-check expect status 200")
    w(f"    timeout server {_ms(be.request_timeout_s)}")
    # A WebSocket may be silent this long (uvicorn pings every 20 s, so a live session never is)
    w(f"    timeout tunnel {_ms(be.request_timeout_s)}")
    w(f"    timeout queue {_ms(be.queue_timeout_s)}")
    no_replicas = _json_body({"error": "no ready replicas", "deployment": be.deployment})
    w(f"    http-request return status 503 content-type application/json string {no_replicas}{RETRY_AFTER}"
      " if { nbsrv() eq 0 }")
    overloaded = _json_body({"error": "overloaded", "deployment": be.deployment})
    if be.max_queued is None:  # what the replicas up could run at once
        w(f"    http-request set-var(txn.max_queued) nbsrv,mul({be.max_concurrency})")
        full = "queue,sub(txn.max_queued) ge 0"
    else:
        full = f"queue() ge {be.max_queued}"
    w(f"    http-request return status 503 content-type application/json string {overloaded}{RETRY_AFTER}"
      f" if {{ {full} }}")
    out.extend(_body_limit(be))
    for s in be.servers:
        comment = "" if s.name == s.replica_id else f"  # replica {_comment(s.replica_id)}"
        line = server_line(table, be, s, node_id, health_inter_ms)
        # init-addr: a host name that doesn't resolve (yet) leaves its server down, not the config invalid
        w(f"    server {s.name} {line.args}{'' if line.enabled else ' disabled'} init-addr last,libc,none{comment}")
    return out


def render_config(
    table: RoutingTable,
    *,
    weights_map: str,
    port: int,
    bind_host: str,
    runtime_socket: str,
    nbthread: int = 2,
    maxconn: int = 20000,
    hard_stop_after_s: float | None = None,
    log_target: str = "stderr format raw",
    health_inter_ms: int = HEALTH_INTER_MS,
    connect_timeout_ms: int = CONNECT_TIMEOUT_MS,
    listen_fd: int | None = None,
    metrics_socket: str | None = None,
    activator_socket: str | None = None,
    node_id: str | None = None,
) -> str:
    """Render a complete haproxy.cfg for ``table`` (see the module docstring).

    ``listen_fd``: a listening socket HAProxy inherits (``bind fd@N``) instead of binding ``bind_host:port``.
    ``metrics_socket``: a Unix socket where HAProxy's own Prometheus exporter answers (for the ingress
    actor, which serves the node's metrics; no TCP port of its own).
    ``activator_socket``: the Unix socket of the ingress's activator, the server of every ``scaleFromZero``
    deployment with no replica (None: those answer 503 as any deployment with no replica).
    ``node_id``: this ingress's node, whose replicas alone it health-checks in a ``shared_health`` table.
    ``weights_map``: the file with ``canary_weights_text(table)`` (HAProxy loads it with the config).
    """
    max_req_timeout = max([b.request_timeout_s for be in table.backends for b in be.revisions()]
                          + [DEFAULT_REQUEST_TIMEOUT_S])
    if hard_stop_after_s is None:
        # Old workers left by a reload get this long to finish in-flight requests.
        hard_stop_after_s = max_req_timeout + 30
    bind_addr = f"fd@{int(listen_fd)}" if listen_fd is not None else join_addr(bind_host, port)

    out: list[str] = []
    w = out.append
    w("# Generated by rayfleet_runtime.ingress.haproxy_config -- do not edit.")
    for reason in table.skipped:
        w(f"# SKIPPED {_comment(reason)}")
    w("")
    w("global")
    w(f"    nbthread {max(1, int(nbthread))}")
    w(f"    maxconn {int(maxconn)}")
    w(f"    stats socket {runtime_socket} mode 600 level admin expose-fd listeners")
    w("    stats timeout 30s")
    w(f"    hard-stop-after {_ms(hard_stop_after_s)}")
    w("    mworker-max-reloads 50")
    # notice: drops per-request logs (info) but keeps errors (log-separate-errors
    # raises them to err) and server up/down transitions.
    w(f"    log {log_target} local0 notice")
    w("")
    w("defaults")
    w("    mode http")
    w("    log global")
    w("    option httplog")
    w("    option dontlog-normal")
    w("    option log-separate-errors")
    w("    option http-keep-alive")
    # On reload, the old worker keeps idle client keep-alive connections until
    # their next request and answers it with "Connection: close" instead of
    # closing them under the client's feet (no reset race).
    w("    option idle-close-on-response")
    w("    option forwardfor")
    # A request goes to a replica once its body is in (up to a buffer, 16 KiB): a client that trickles a
    # small body ties up HAProxy's buffer, not one of the replica's maxConcurrency slots.
    w("    option http-buffer-request")
    # A client that goes away takes its request with it: queued, it is dropped; sent, the replica's
    # connection is closed, which cancels the handler (the replica's server does on a disconnect).
    w("    option abortonclose")
    # Each chunk of a streamed response goes out as it arrives: without this HAProxy sends with MSG_MORE
    # while it expects more, and the kernel holds a small first chunk up to 200 ms (measured: first byte
    # of a stream at ~225 ms instead of ~2 ms). A whole response leaves in one write either way.
    w("    option http-no-delay")
    w("    option redispatch 1")
    w("    retries 2")
    # Every method: a failed connect (nothing ran). GET/HEAD/OPTIONS only (the frontend's
    # disable-l7-retry stops the rest, so a POST never runs twice): the replica's 503 (overloaded, or
    # the handler's own), and a connection that died without an answer (a replica killed mid-request):
    # those are re-sent to another replica. Never on a response timeout: the handler may still run.
    w("    retry-on conn-failure 503 empty-response junk-response")
    w(f"    timeout connect {int(connect_timeout_ms)}ms")
    w(f"    timeout client {_ms(max_req_timeout)}")
    w(f"    timeout server {_ms(DEFAULT_REQUEST_TIMEOUT_S)}")
    w("    timeout http-request 10s")
    w(f"    timeout http-keep-alive {KEEPALIVE_TIMEOUT_S}s")
    w(f"    timeout queue {_ms(QUEUE_TIMEOUT_S)}")
    w("    timeout check 2s")
    w(
        "    http-error status 503 content-type application/json string "
        + _json_body({"error": "service unavailable"}) + RETRY_AFTER
    )
    w(
        "    http-error status 504 content-type application/json string "
        + _json_body({"error": "upstream request timed out"})
    )
    w("")
    w(f"frontend {FRONTEND_NAME}")
    w(f"    bind {bind_addr}")
    w(f"    maxconn {int(maxconn)}")
    # The client's address is ours to tell (option forwardfor): a client-sent one is dropped, not extended.
    w("    http-request del-header X-Forwarded-For")
    w("    http-request disable-l7-retry unless METH_GET || METH_OPTIONS")  # METH_GET is GET and HEAD
    if table.backends:  # the pod's readiness: this ingress routes (else the path falls through to 404)
        w(f"    http-request return status 200 content-type text/plain string ready if {{ path {INGRESS_READY_PATH} }}")
        w(f"    http-request set-var({CANARY_DRAW_VAR}) rand(100)")
    out.extend(_routes(table, activator_socket, weights_map))
    if metrics_socket is not None:
        w("")
        w(f"frontend {METRICS_FRONTEND_NAME}")
        w(f"    bind unix@{metrics_socket} mode 600")
        w("    http-request use-service prometheus-exporter")

    for be in table.backends:
        for revision in (be, be.canary_slot):
            w("")
            out.extend(_replica_backend(table, revision, _title(be, revision), node_id, health_inter_ms))
        if be.uses_activator(activator_socket):  # never a canary's: it has no scale-from-zero
            w("")
            out.extend(_activator_backend(be, activator_socket))

    if table.catch_all is None:
        w("")
        w(f"backend {NOT_FOUND_BACKEND}")
        w(
            "    http-request return status 404 content-type application/json string "
            + _json_body({"error": "no deployment serves this path"})
        )
    w("")
    return "\n".join(out)
