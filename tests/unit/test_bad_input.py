"""Bad input, tried and counted: property-based tests (hypothesis) of every surface that reads what
someone else wrote.

* The controller's HTTP API (``api_server.make_app``), driven in-process over real HTTP/1.1 bytes: any
  name (any unicode, newlines, dots, slashes, very long), path, method, body (any JSON, near-valid desired
  states with one field broken, invalid UTF-8, deep nesting, NaN), Content-Type and ``Authorization``
  header gets a 2xx with a valid JSON result or a 4xx with a JSON ``{"error": ...}``: never a 5xx, never
  an exception; and only the exact token opens it.
* The HAProxy config (``haproxy_config.render_config``): any routing table the controller builds from
  what its API accepts, and garbage tables too, passes ``haproxy -c``; and adding deployments never
  changes how another one ("echo" at /echo) is routed.
* The replica's HTTP surface (``handler.HandlerRunner``): any method, path, headers and body give a
  well-formed (status, headers, bytes): 200, or 400 for a body the handler can't read (not counted as
  the handler's error); a return value that isn't JSON gives 500, and ``handle()`` never raises.

CI pays a fixed, small bill: every test is derandomized (the same examples on every run), has a bounded
``max_examples`` and no deadline, and writes no example database. What the fuzzing found is kept as
``@example(...)``s, each naming the bug it was.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from rayfleet_api.desired import ROUTE_PREFIX_PATTERN, DesiredState, parse_json, validate_name
from rayfleet_api.errors import SpecError
from rayfleet_api.states import ReplicaState
from rayfleet_runtime.ingress import haproxy_config as hc
from rayfleet_runtime.routing import CanaryRoute, ReplicaRow, Route, RoutingTable, build_table
from rayfleet_runtime.controller.api_server import make_app
from rayfleet_runtime.controller.deployment_state import ControllerCore
from rayfleet_runtime.controller.records import ReplicaRecord
from rayfleet_runtime.replica.handler import HandlerRunner, Request, Response

# The fixed budget: the same examples on every run, no example database, no per-example deadline, and no
# "too slow" health check that a loaded CI runner could trip.
FIXED = settings(derandomize=True, database=None, deadline=None, max_examples=100, print_blob=False,
                 suppress_health_check=[HealthCheck.too_slow])


def strict_json(data: bytes | str) -> Any:
    """RFC 8259 JSON, as a strict reader (JavaScript's JSON.parse, Go) takes it; ValueError otherwise."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    try:
        return json.loads(data, parse_constant=refuse)
    except RecursionError:
        raise ValueError("nested too deeply") from None


# ---------------------------------------------------------------- the values everything is built from

def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON-shaped value, NaN and ±inf floats included (json.dumps writes them as NaN/Infinity)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=max_leaves)


finite_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)

# Numbers at the edges: each one broke, or could break, a bound somewhere.
edge_numbers = st.sampled_from([0, -1, 1, 0.5, -0.0, 1e-300, 2**31, 2**63, 10**30, 1e308, 3601, 100_001, 1001,
                                float("nan"), float("inf"), float("-inf"), True, False])
weird_values = edge_numbers | json_values(max_leaves=4) | st.integers()

# A DNS label, optionally "namespace.name": what validate_name accepts (and some it doesn't: too long).
dns_shaped_names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?)?",
                                 fullmatch=True)
tricky_names = st.sampled_from(["echo\n", "echo\r\n", "Echo", "a.b.c", "..", ".", "a/b", "-x", "x-", "", " ",
                                "x" * 127, "x" * 128, "\u0435cho", "echo%0A", "e\x00cho", "a..b"])
any_names = (dns_shaped_names | tricky_names | st.text(max_size=40) | st.text(min_size=100, max_size=300)
             | dns_shaped_names.map(lambda n: n + "\n"))

prefixes_the_pattern_allows = st.from_regex(ROUTE_PREFIX_PATTERN, fullmatch=True)
any_prefixes = (prefixes_the_pattern_allows | st.text(max_size=30) | st.text(max_size=30).map("/".__add__)
                | st.sampled_from(["/", "", "/echo/", "//", "/a b", "/it's", "/x\n", "/#", "/${HOME}", "/%",
                                   '/"x', "/" + "a" * 256, "/" + "a" * 255]))


# ---------------------------------------------------------------- 1. the controller's HTTP API

TOKEN = "s3cret-token"
GOOD_AUTHORIZATION = f"Bearer {TOKEN}".encode()


class FakeCore:
    """The ``ControllerAPI`` in memory, no Ray: stores what it's given, refuses a routePrefix in use (as the
    real one does), and answers observed states."""

    def __init__(self) -> None:
        self.desired: dict[str, DesiredState] = {}

    def put_deployment(self, name: str, desired: DesiredState) -> None:
        for other, d in self.desired.items():
            if other != name and d.route_prefix == desired.route_prefix:
                raise SpecError("routePrefix", f"{d.route_prefix} is already used by deployment {other!r}")
        self.desired[name] = desired

    def get_deployment(self, name: str) -> dict[str, Any] | None:
        d = self.desired.get(name)
        return None if d is None else {"name": name, "status": "Running", "routePrefix": d.route_prefix,
                                       "version": d.version, "replicas": []}

    def list_deployments(self) -> list[dict[str, Any]]:
        return [self.get_deployment(name) for name in sorted(self.desired)]

    def delete_deployment(self, name: str) -> bool:
        return self.desired.pop(name, None) is not None


@pytest.fixture(scope="module")
def api():
    """The API on a real port, on an event loop of its own; ``api.send(raw request bytes)`` -> response."""
    loop = asyncio.new_event_loop()
    core = FakeCore()
    server = TestServer(make_app(core, TOKEN))
    loop.run_until_complete(server.start_server())

    async def exchange(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        await writer.drain()
        data = await reader.read()  # "Connection: close": the server ends the response with EOF
        writer.close()
        return data

    yield SimpleNamespace(core=core, send=lambda raw: parse_response(loop.run_until_complete(exchange(raw))))
    loop.run_until_complete(server.close())
    loop.close()


def http_request(method: str, target: str, authorization: bytes | None, content_type: bytes | None,
                 body: bytes) -> bytes:
    """An HTTP/1.1 request as bytes: the request line and header names are well-formed (what any client
    library sends), header values and the body are whatever we were given."""
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: controller", b"Connection: close",
             b"Content-Length: %d" % len(body)]
    if authorization is not None:
        lines.append(b"Authorization: " + authorization)
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse_response(data: bytes) -> SimpleNamespace:
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    length = int(headers.get("content-length", len(rest)))
    assert "chunked" not in headers.get("transfer-encoding", ""), "every answer has a length"
    return SimpleNamespace(status=int(status_line.split(" ")[1]), headers=headers, body=rest[:length])


def header_safe(value: bytes) -> bytes:
    """What a client can put in a header value: any bytes but CR, LF, NUL and other controls (tab is fine)."""
    return bytes(c for c in value if c == 9 or 32 <= c != 127)


header_value_bytes = st.binary(max_size=60).map(header_safe)

wrong_authorizations = st.one_of(
    st.none(),
    header_value_bytes,
    st.sampled_from([b"", b"Bearer", b"Bearer ", TOKEN.encode(), b"bearer " + TOKEN.encode(),
                     b"Bearer  " + TOKEN.encode(), b"Basic " + TOKEN.encode(), GOOD_AUTHORIZATION + b"x",
                     GOOD_AUTHORIZATION[:-1], b"Bearer \xff", b"Bearer " + TOKEN.encode() + b"\xff"]),
    st.text(max_size=20).map(lambda t: header_safe(f"Bearer {t}".encode("utf-8", "surrogatepass"))),
    header_value_bytes.map(lambda b: GOOD_AUTHORIZATION + b),
)


def authorized(authorization: bytes | None) -> bool:
    """Would the server see exactly ``Bearer <token>``? (HTTP strips the spaces around a header value.)"""
    return authorization is not None and authorization.strip(b" \t") == GOOD_AUTHORIZATION


content_types = st.one_of(
    st.none(),
    st.sampled_from([b"application/json", b"application/json; charset=utf-8", b"text/plain", b"",
                     b"application/json; charset=latin-1", b"application/json; charset=utf-16",
                     b"application/json; charset=bogus", b"application/json; charset=", b"multipart/form-data",
                     b"application/x-www-form-urlencoded", b'application/json; charset="utf-8"']),
    header_value_bytes,
)


# Each field of a desired state, with values the controller takes (the CRD's ranges).
VALID_FIELDS = {
    "replicas": st.integers(0, 1000),
    "maxConcurrency": st.integers(1, 100_000),
    "syncThreads": st.integers(1, 256),
    "maxRequestBodyBytes": st.integers(0, 2**30),
    "routePrefix": prefixes_the_pattern_allows,
    "requestTimeoutSeconds": st.integers(1, 3600),
    "gracefulShutdownSeconds": st.integers(0, 3600),
    "env": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    "handlerArgs": st.dictionaries(st.text(max_size=5), finite_json_values, max_size=2),
    "healthCheck": st.fixed_dictionaries({}, optional={"periodSeconds": st.integers(1, 3600),
                                                       "timeoutSeconds": st.integers(1, 3600),
                                                       "failureThreshold": st.integers(1, 100)}),
    "rayActorOptions": st.fixed_dictionaries({}, optional={"numCpus": st.floats(0, 64),
                                                           "memory": st.integers(0, 2**40)}),
}
FIELDS_TO_BREAK = ["handler", *VALID_FIELDS, "runtimeEnv", "version", "healthCheck.periodSeconds",
                   "healthCheck.failureThreshold", "rayActorOptions.numCpus", "rayActorOptions.memory",
                   "rayActorOptions.unknown", "an unknown key"]


@st.composite
def near_valid_desired_states(draw, break_one: bool = True) -> dict[str, Any]:
    """A desired state the controller would take, then (if ``break_one``, usually) one field of it broken."""
    body: dict[str, Any] = {"handler": draw(st.sampled_from(["examples.echo:Echo", "m:f", "a.b:C.d"]))}
    for key, valid in VALID_FIELDS.items():
        if draw(st.booleans()):
            body[key] = draw(valid)
    broken = draw(st.sampled_from(["nothing", *FIELDS_TO_BREAK])) if break_one else "nothing"
    if broken == "an unknown key":
        body[draw(st.text(min_size=1, max_size=10))] = draw(weird_values)
    elif broken == "routePrefix":
        body["routePrefix"] = draw(any_prefixes | weird_values)
    elif broken != "nothing":
        *parents, key = broken.split(".")
        target = body
        for parent in parents:
            target = target.setdefault(parent, {}) if isinstance(target.get(parent, {}), dict) else {}
        target[key] = draw(weird_values)
    return body


def encoded(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and ±inf go out as the non-JSON NaN/Infinity


request_bodies = st.one_of(
    near_valid_desired_states().map(encoded),
    json_values().map(encoded),
    st.binary(max_size=100),
    st.sampled_from([
        b"", b"null", b"{", b"[]", b'"x"', b'{"handler": "a:b"}', b'{"handler": "a:b", "replicas": NaN}',
        b'{"handler": "a:b", "handlerArgs": {"x": Infinity}}', b'{"handler": "a:b", "handlerArgs": {"x": 1e400}}',
        b'{"handler": "a:\xff"}', b"\xef\xbb\xbf{}", '{"handler": "a:b"}'.encode("utf-16"),
        b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b'{"handler": "a:b", "replicas": ' + b"9" * 5000 + b"}",
    ]),
)

methods = st.sampled_from(["GET", "PUT", "DELETE", "POST", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"])


def deployment_target(name: str, raw_slashes: bool) -> str:
    """/v1/deployments/<name>, percent-encoded (any unicode, lone surrogates as their UTF-8 bytes)."""
    return "/v1/deployments/" + quote(name.encode("utf-8", "surrogatepass"), safe="/" if raw_slashes else "")


@st.composite
def api_requests(draw) -> SimpleNamespace:
    kind = draw(st.sampled_from(["deployment", "deployment", "deployment", "list", "healthz", "any path"]))
    name = draw(any_names)
    target = {"deployment": deployment_target(name, draw(st.booleans())), "list": "/v1/deployments",
              "healthz": "/healthz",
              "any path": "/" + quote(draw(st.text(max_size=30)).encode("utf-8", "surrogatepass"), safe="/")}[kind]
    if draw(st.booleans()):
        target += "?" + quote(draw(st.text(max_size=10)))
    method = draw(st.sampled_from(["PUT", "GET", "DELETE"]) if kind == "deployment" else methods)
    authorization = draw(st.just(GOOD_AUTHORIZATION) | wrong_authorizations)
    return SimpleNamespace(kind=kind, name=name, target=target, method=method, authorization=authorization,
                           content_type=draw(content_types), body=draw(request_bodies))


def check_api_answer(api, req: SimpleNamespace) -> None:
    """The whole contract for one request: 2xx with a valid result, or 4xx with {"error": ...}."""
    resp = api.send(http_request(req.method, req.target, req.authorization, req.content_type, req.body))
    assert 200 <= resp.status < 500, (resp.status, resp.body[:300])
    if resp.status == 401:
        assert not authorized(req.authorization)
    path = unquote_to_bytes(req.target.partition("?")[0])
    if not authorized(req.authorization) and path != b"/healthz":
        assert resp.status == 401
    if req.method == "HEAD":
        return  # no body to judge
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    result = strict_json(resp.body)
    if resp.status >= 400:
        assert isinstance(result, dict) and isinstance(result.get("error"), str), result
        return
    if req.kind == "deployment" and req.method == "PUT" and resp.status == 200:
        validate_name(req.name)
        assert DesiredState.from_json(result).to_json() == result  # what came back is a desired state
        assert api.core.desired[req.name].to_json() == result
    elif req.kind == "deployment" and req.method == "GET":
        assert result == api.core.get_deployment(result["name"])
    elif req.kind == "deployment" and req.method == "DELETE":
        assert resp.status == 202 and result == {"name": result["name"], "status": "Deleting"}
        assert result["name"] not in api.core.desired
    elif req.kind == "list" and req.method == "GET":
        assert result == {"deployments": api.core.list_deployments()}
    else:
        assert isinstance(result, dict)
    for stored in api.core.desired:  # nothing the controller can't name got stored
        validate_name(stored)


@settings(FIXED, max_examples=300)
@given(st.lists(api_requests(), min_size=1, max_size=3))
# Each of these was a 500 ("Server got itself in trouble") before the fix:
@example([SimpleNamespace(kind="deployment", name="x", target="/v1/deployments/x", method="PUT",
                          authorization=GOOD_AUTHORIZATION, content_type=None, body=b"[" * 100_000)])  # RecursionError
@example([SimpleNamespace(kind="deployment", name="x", target="/v1/deployments/x", method="PUT",
                          authorization=GOOD_AUTHORIZATION, content_type=None, body=b"1" * 5000)])  # int digit limit
@example([SimpleNamespace(kind="deployment", name="x", target="/v1/deployments/x", method="PUT",
                          authorization=GOOD_AUTHORIZATION, content_type=b"application/json; charset=bogus",
                          body=b'{"handler": "a:b"}')])  # LookupError
# ...and these a 200 the controller must not give: NaN/1e400 echoed back as invalid JSON, and values no
# CRD allows (maxConcurrency 10**30 later broke haproxy.cfg).
@example([SimpleNamespace(kind="deployment", name="x", target="/v1/deployments/x", method="PUT",
                          authorization=GOOD_AUTHORIZATION, content_type=None,
                          body=b'{"handler": "a:b", "handlerArgs": {"x": NaN}}')])
@example([SimpleNamespace(kind="deployment", name="x", target="/v1/deployments/x", method="PUT",
                          authorization=GOOD_AUTHORIZATION, content_type=None,
                          body=b'{"handler": "a:b", "maxConcurrency": 1000000000000000000000000000000}')])
# ...and aiohttp's own 404/405 were text/plain, not {"error": ...}:
@example([SimpleNamespace(kind="any path", name="", target="/nowhere", method="GET",
                          authorization=GOOD_AUTHORIZATION, content_type=None, body=b"")])
@example([SimpleNamespace(kind="list", name="", target="/v1/deployments", method="POST",
                          authorization=GOOD_AUTHORIZATION, content_type=None, body=b"")])
def test_the_api_answers_any_request_with_a_result_or_a_json_error(api, requests):
    api.core.desired.clear()
    for req in requests:
        check_api_answer(api, req)


@settings(FIXED, max_examples=150)
@given(wrong_authorizations, st.sampled_from(["/v1/deployments", "/v1/deployments/echo", "/nowhere"]))
@example(b"Bearer \xff", "/v1/deployments")  # a header that isn't UTF-8 was a 500 (UnicodeEncodeError)
@example(b"Bearer " + TOKEN.encode() + b"\xff", "/v1/deployments")
def test_anything_but_the_exact_token_is_a_401(api, authorization, target):
    resp = api.send(http_request("GET", target, authorization, None, b""))
    if authorized(authorization):  # e.g. the token with spaces around it, which HTTP strips
        assert resp.status != 401
    else:
        assert resp.status == 401 and "error" in strict_json(resp.body)
        assert resp.headers["www-authenticate"].startswith("Bearer")


def test_the_exact_token_opens_it(api):
    assert api.send(http_request("GET", "/v1/deployments", GOOD_AUTHORIZATION, None, b"")).status == 200


# ---------------------------------------------------------------- 2. the HAProxy config

ECHO = ("echo", {"handler": "examples.echo:Echo", "routePrefix": "/echo", "replicas": 2})
ECHO_REPLICAS = [("echo-0", "10.0.0.1", 8001), ("echo-1", "10.0.0.2", 8002)]

replica_hosts = (st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str)
                 | st.sampled_from(["localhost", "127.0.0.1", "::1", "node-a.cluster.local"]))


@st.composite
def candidate_deployments(draw) -> tuple[str, Any, list[tuple[str, str, int]]]:
    """(name, body, ready replicas) as a client might send it: the controller takes it or not."""
    def sometimes() -> bool:  # one time in four
        return draw(st.integers(0, 3)) == 0

    name = draw(any_names if sometimes() else dns_shaped_names)
    body = draw(near_valid_desired_states(break_one=sometimes()))
    if draw(st.booleans()):
        body["routePrefix"] = draw(prefixes_the_pattern_allows | any_prefixes)
    # The right types at any size: whatever reaches haproxy.cfg must fit it.
    if sometimes():
        body["maxConcurrency"] = draw(st.integers(1, 2**100))
    if sometimes():
        body["requestTimeoutSeconds"] = draw(st.floats(1e-6, 1e300) | st.integers(1, 10**12))
    replicas = [(f"{name}-{i}", draw(replica_hosts), draw(st.integers(1, 65535)))
                for i in range(draw(st.integers(0, 3)))]
    return name, body, replicas


class NoRay(SimpleNamespace):
    """Just enough backend for ``ControllerCore`` to take deployments and build its routing table."""

    def __init__(self) -> None:
        super().__init__(ensure_ingress=None, node_ids=None)

    def write_checkpoint(self, name: str, data: bytes) -> None:
        pass


def table_the_controller_builds(candidates) -> tuple[RoutingTable, list[str]]:
    """PUT each candidate through the controller's own checks (name, body, routePrefix in use), give the
    accepted ones READY replicas, and return ``ControllerCore.routing_table()`` and the accepted names."""
    core = ControllerCore(NoRay())
    accepted = []
    for name, body, replicas in candidates:
        try:
            validate_name(name)
            desired = DesiredState.from_json(parse_json(json.dumps(body)))  # as the API reads it
            core.put_deployment(name, desired)
        except (SpecError, ValueError):
            continue  # the API would have answered 400
        accepted.append(name)
        core.deployments[name].replicas = {
            rid: ReplicaRecord(rid, desired.version, None, ReplicaState.READY, info={"host": host, "port": port})
            for rid, host, port in replicas}
    return core.routing_table(), accepted


@pytest.fixture(scope="module")
def haproxy_check(tmp_path_factory):
    """``check(config text)`` -> (ok, haproxy's output), with the HAProxy rayfleet runs."""
    from rayfleet_runtime.ingress.haproxy_bin import HAProxyNotFound, check_config, find_haproxy

    try:
        binary = find_haproxy()
    except HAProxyNotFound:
        pytest.skip("no HAProxy binary")
    path = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    open(WEIGHTS_MAP, "w").close()  # a map the config names must exist (its weights don't matter to a check)

    def check(config: str) -> tuple[bool, str]:
        path.write_text(config)
        return check_config(binary, str(path))

    return check


HAPROXY_MAX_TIMER_MS = 2**31 - 1  # "timer overflow ... (maximum value is 2147483647 ms or ~24.8 days)"
UNIT_MS = {"us": 0.001, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def assert_numbers_fit_haproxy(config: str) -> None:
    """What `haproxy -c` lets by: a timer past 2**31 ms can wrap around silently (1e300 s passes), so
    every timer and connection count is held to HAProxy's limits here."""
    for value, unit in re.findall(r"^\s*(?:timeout \S+|hard-stop-after) (\d+)(us|ms|s|m|h|d)\b", config, re.M):
        assert int(value) * UNIT_MS[unit] <= HAPROXY_MAX_TIMER_MS, (value, unit)
    for value in re.findall(r"(?:maxconn|queue\(\) ge) (\d+)", config):
        assert int(value) < 2**31, value


WEIGHTS_MAP = os.path.join(tempfile.gettempdir(), "rayfleet-test-canary-weights.map")  # haproxy_check makes it


def render(table: RoutingTable) -> str:
    return hc.render_config(table, port=8000, bind_host="0.0.0.0", runtime_socket="/tmp/rayfleet-admin.sock",
                            weights_map=WEIGHTS_MAP)


def routes_to(config: str, path: str) -> str:
    """The backend HAProxy picks for ``path``, read off the rendered frontend: first matching use_backend."""
    for backend, exact, beginning in re.findall(r"use_backend (\S+) if \{ path (\S+) \} \|\| \{ path_beg (\S+) \}",
                                                config):
        if path == exact or path.startswith(beginning):
            return backend
    return re.search(r"default_backend (\S+)", config).group(1)


def echo_block(config: str) -> str:
    """The echo backend's whole section, from its comment to the blank line."""
    return re.search(r"\n# deployment echo:.*?\n\n", config, re.S).group(0)


@settings(FIXED, max_examples=40)
@given(st.lists(candidate_deployments(), min_size=1, max_size=6))
@example([("slow", {"handler": "m:f", "routePrefix": "/slow", "maxConcurrency": 10**30}, [("slow-0", "10.0.0.9", 9)])])
@example([("slow", {"handler": "m:f", "routePrefix": "/slow", "requestTimeoutSeconds": 3e6}, [])])
def test_tables_the_controller_builds_pass_haproxy_check(haproxy_check, candidates):
    table, _ = table_the_controller_builds([(*ECHO, ECHO_REPLICAS), *candidates])
    config = render(table)
    ok, out = haproxy_check(config)
    assert ok, out
    assert_numbers_fit_haproxy(config)


@settings(FIXED, max_examples=200)
@given(st.lists(candidate_deployments(), max_size=6), st.text(max_size=10))
def test_another_deployment_never_reroutes_echo(candidates, tail):
    """Whatever else the controller accepts, /echo and /echo/... still reach echo's two replicas, unless a
    longer prefix the client asked for claims a path under /echo (longest prefix wins, by design)."""
    alone, _ = table_the_controller_builds([(*ECHO, ECHO_REPLICAS)])
    table, accepted = table_the_controller_builds([(*ECHO, ECHO_REPLICAS)] + [c for c in candidates if c[0] != "echo"])
    assert accepted[0] == "echo"
    assert table.backend("echo") == alone.backend("echo")

    config, config_alone = render(table), render(alone)
    assert echo_block(config) == echo_block(config_alone)
    assert "    use_backend be_echo if { path /echo } || { path_beg /echo/ }\n" in config
    prefixes = {be.prefix: be.deployment for be in table.backends}
    for path in ("/echo", "/echo/", "/echo/" + quote(tail), *(p + "/x" for p in prefixes)):
        owner = max((p for p in prefixes if p == "/" or path == p or path.startswith(p + "/")), key=len, default=None)
        if owner == "/echo":
            assert routes_to(config, path) == "be_echo", path
        else:
            assert routes_to(config, path) != "be_echo", path


@st.composite
def canary_routes(draw) -> Route:
    """A deployment and its canary as the controller routes them: two revisions the API takes (their limits
    may differ), some of each one's replicas READY, and a weight."""
    name = draw(dns_shaped_names)
    stable, canary = (DesiredState.from_json(draw(near_valid_desired_states(break_one=False))) for _ in range(2))

    def ready(revision: str, node: str) -> tuple:
        return tuple(ReplicaRow(f"{name}-{revision}{i}", draw(replica_hosts), draw(st.integers(1, 65535)), node)
                     for i in range(draw(st.integers(0, 2))))

    return Route(name, stable, ready("s", "n1"), CanaryRoute(canary, ready("c", "n2"), draw(st.integers(0, 100))))


@settings(FIXED, max_examples=40)
@given(st.lists(canary_routes(), max_size=5, unique_by=lambda route: route.deployment))  # as the controller has them
def test_tables_with_canaries_pass_haproxy_check(haproxy_check, routes):
    echo = DesiredState.from_json(ECHO[1])
    table = build_table([Route("echo", echo, tuple(ReplicaRow(*r, None) for r in ECHO_REPLICAS)), *routes])
    config = render(table)
    ok, out = haproxy_check(config)
    assert ok, out
    assert_numbers_fit_haproxy(config)


@st.composite
def garbage_replicas(draw) -> Any:
    return draw(json_values(max_leaves=3) | st.fixed_dictionaries({}, optional={
        "id": st.text(max_size=20) | weird_values,
        "host": replica_hosts | st.text(max_size=20) | weird_values,
        "port": st.integers(1, 65535) | weird_values,
    }))


usable_replicas = st.fixed_dictionaries({"id": st.text(max_size=20), "host": replica_hosts,
                                         "port": st.integers(1, 65535)})
# A canary that routes (a weight, a replica HAProxy can reach), with limits of any shape.
routing_canaries = st.fixed_dictionaries({"weight": st.integers(0, 100), "replicas": st.lists(
    usable_replicas | garbage_replicas(), min_size=1, max_size=3)}, optional={
    "maxConcurrency": weird_values,
    "requestTimeoutSeconds": weird_values,
    "maxQueued": weird_values,
    "maxRequestBodyBytes": weird_values,
})
garbage_canaries = routing_canaries | weird_values | st.fixed_dictionaries({}, optional={"weight": weird_values,
                                                                                        "replicas": weird_values})

garbage_specs = json_values(max_leaves=4) | st.fixed_dictionaries({}, optional={
    "routePrefix": any_prefixes | weird_values,
    "maxConcurrency": weird_values,
    "requestTimeoutSeconds": weird_values,
    "queueTimeoutSeconds": weird_values,
    "replicas": weird_values | st.lists(garbage_replicas(), max_size=3),
    "canary": garbage_canaries,
}) | st.fixed_dictionaries({"routePrefix": prefixes_the_pattern_allows, "canary": routing_canaries})


@settings(FIXED, max_examples=40)
@given(st.dictionaries(any_names, garbage_specs, max_size=5))
@example({"x": {"routePrefix": "/x", "replicas": [{"id": "x-0", "host": "10.0.0.1", "port": 99999}]}})  # bad port
@example({"x": {"routePrefix": "/x", "replicas": [{"id": "x-0", "host": "a b\nfrontend", "port": 80}]}})  # bad host
@example({"x": {"routePrefix": "/x", "maxConcurrency": float("inf")}})  # OverflowError
@example({"x": {"routePrefix": "/x", "requestTimeoutSeconds": 10**400}})  # OverflowError
@example({"x": {"routePrefix": "/x", "replicas": [{"id": "x-0", "host": "10.0.0.1", "port": float("inf")}]}})
@example({"x": ["not", "an", "object"]})  # AttributeError
@example({"/": {"canary": {"weight": 100, "maxConcurrency": 10**30, "maxRequestBodyBytes": 2**63,
                           "replicas": [{"id": "c x\n", "host": "::1", "port": 1}]}}})  # the catch-all's canary
def test_garbage_tables_still_render_a_config_haproxy_accepts(haproxy_check, deployments):
    """A table no controller would send (names, prefixes, numbers, replicas of any shape): what can't be
    used is skipped, and one bad deployment never takes the config, and every other route, down."""
    table = RoutingTable.from_wire({"deployments": {**deployments, "echo": {"routePrefix": "/echo", "replicas": [
        {"id": rid, "host": host, "port": port} for rid, host, port in ECHO_REPLICAS]}}})
    config = render(table)
    assert render(table) == config  # deterministic, so the ingress can skip reloads
    ok, out = haproxy_check(config)
    assert ok, out
    assert_numbers_fit_haproxy(config)


# ---------------------------------------------------------------- 3. the replica's HTTP surface

header_text = st.text(max_size=20)
replica_requests = st.builds(
    Request,
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]) | st.text(max_size=10),
    path=st.text(max_size=40).map("/".__add__),
    query=st.dictionaries(header_text, header_text, max_size=3),
    headers=st.lists(st.tuples(header_text, header_text), max_size=4).map(CIMultiDict),
    body=request_bodies,
)


def echo_json(request: Request) -> Any:
    return {"method": request.method, "path": request.path, "headers": dict(request.headers), "json": request.json()}


def echo_text(request: Request) -> Any:
    return request.text()


def as_async(fn):
    async def handler(request: Request) -> Any:
        return fn(request)
    return handler


def readable_as_json(body: bytes) -> bool:
    try:
        if body:
            value = strict_json(body)
            json.dumps(value, allow_nan=False)  # 1e400 reads as inf: not a number JSON can carry
        return True
    except ValueError:
        return False


def serve(handler, request: Request) -> tuple[tuple[int, dict[str, str], bytes], HandlerRunner]:
    runner = HandlerRunner(handler)
    try:
        return asyncio.run(runner.handle(request)), runner
    finally:
        runner.close()


def assert_well_formed(out: Any) -> None:
    status, headers, body = out
    assert isinstance(status, int) and isinstance(body, bytes)
    assert isinstance(headers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    assert "Content-Type" in headers


@settings(FIXED, max_examples=300)
@given(replica_requests, st.sampled_from([echo_json, echo_text]), st.booleans())
@example(Request("POST", "/", body=b"\xff"), echo_text, True)  # was a 500 counted as the handler's error
@example(Request("POST", "/", body=b"[" * 100_000), echo_json, True)  # RecursionError: was a 500
@example(Request("POST", "/", body=b"NaN"), echo_json, True)  # was a 200 with NaN: invalid JSON
@example(Request("POST", "/", body=b"[1e400]"), echo_json, False)  # read as inf, echoed as Infinity
def test_a_handler_reading_any_request_answers_200_or_400(req, handler, run_async):
    out, runner = serve(as_async(handler) if run_async else handler, req)
    assert_well_formed(out)
    status, headers, body = out
    readable = readable_as_json(req.body) if handler is echo_json else _utf8(req.body)
    assert status == (200 if readable else 400), body[:300]
    if status == 400:
        assert runner.errors == 0 and runner.last_error is None  # the client's error, not the handler's
        assert body.startswith(b"400 Bad Request")
    elif handler is echo_json:
        echoed = strict_json(body)
        assert echoed["json"] == (strict_json(req.body) if req.body else None)
        assert echoed["path"] == req.path
    else:
        assert body == req.body and headers["Content-Type"].startswith("text/plain")


def _utf8(body: bytes) -> bool:
    try:
        body.decode()
        return True
    except UnicodeDecodeError:
        return False


def deeply_nested(depth: int = 100_000) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


not_json_serialisable = st.sampled_from([
    object(), {1, 2}, 1j, float("nan"), float("inf"), [float("-inf")], {"x": object()}, {(1, 2): "tuple key"},
    Response({"nan": float("nan")}), Response(object()),
]) | st.builds(deeply_nested)


@settings(FIXED, max_examples=200)
@given(finite_json_values | st.text() | st.binary() | not_json_serialisable, st.booleans())
@example(float("nan"), True)  # was a 200 "NaN": invalid JSON sent as application/json
def test_whatever_a_handler_returns_is_a_well_formed_answer(value, run_async):
    out, runner = serve(as_async(lambda _: value) if run_async else (lambda _: value), Request("GET", "/"))
    assert_well_formed(out)
    status, headers, body = out
    if isinstance(value, (str, bytes)):
        assert status == 200 and body == (value.encode() if isinstance(value, str) else value)
    elif isinstance(value, Response) or not _serialisable(value):
        assert status == 500 and runner.errors == 1 and runner.last_error
        assert body.startswith(b"500 Internal Server Error")
    else:
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert strict_json(body) == value


def _serialisable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError, RecursionError):
        return False

