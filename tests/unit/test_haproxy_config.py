"""Pure rendering tests for rayfleet_runtime.ingress.haproxy_config (no Ray; haproxy -c when available)."""

from __future__ import annotations

import re

import pytest

from rayfleet_runtime.ingress import haproxy_config as hc
from rayfleet_runtime.routing import RoutingTable, server_name

SOCK = "/tmp/rayfleet-test/admin.sock"
WEIGHTS = "/tmp/rayfleet-test/canary_weights.map"


def render(table, **kw):
    kw.setdefault("port", 8000)
    kw.setdefault("bind_host", "127.0.0.1")
    kw.setdefault("runtime_socket", SOCK)
    kw.setdefault("maxconn", 4000)
    kw.setdefault("weights_map", WEIGHTS)
    return hc.render_config(RoutingTable.from_wire(table), **kw)


def rep(rid, port, host="127.0.0.1"):
    return {"id": rid, "host": host, "port": port}


TABLE = {
    "deployments": {
        "echo": {"routePrefix": "/echo", "maxConcurrency": 7, "maxRequestBodyBytes": 1024,
                 "replicas": [rep("echo-1", 9002), rep("echo-0", 9001)]},
        "echo-api": {"routePrefix": "/echo/api/", "maxConcurrency": 3, "requestTimeoutSeconds": 2.5, "replicas": [rep("a-0", 9003)]},
        "root": {"routePrefix": "/", "maxConcurrency": 1, "replicas": [rep("root-0", 9004)]},
        "zz": {"routePrefix": "/z", "replicas": []},
    }
}


def section(cfg: str, header: str) -> str:
    """The lines of one section (from its header up to the next blank line)."""
    lines = cfg.splitlines()
    start = lines.index(header)
    out = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        out.append(line.strip())
    return "\n".join(out)


def test_prefixes_longest_first_and_catch_all_default():
    cfg = render(TABLE)
    fe = section(cfg, f"frontend {hc.FRONTEND_NAME}")
    uses = re.findall(r"use_backend (\S+) if \{ path (\S+) \} \|\| \{ path_beg (\S+) \}", fe)
    assert uses == [
        ("be_echo-api", "/echo/api", "/echo/api/"),
        ("be_echo", "/echo", "/echo/"),
        ("be_zz", "/z", "/z/"),
    ]
    # "/" is not an ACL: it's the default backend, so it is matched last.
    assert fe.splitlines()[-1] == "default_backend be_root"
    assert hc.NOT_FOUND_BACKEND not in cfg


def test_ready_path_answers_only_with_a_route():
    rule = f"http-request return status 200 content-type text/plain string ready if {{ path {hc.INGRESS_READY_PATH} }}"
    fe = section(render(TABLE), f"frontend {hc.FRONTEND_NAME}").splitlines()
    assert rule in fe and fe.index(rule) < min(i for i, line in enumerate(fe) if "backend" in line)
    assert rule not in render({"deployments": {}})


def test_unknown_prefix_404_without_catch_all():
    table = {"deployments": {"echo": {"routePrefix": "/echo", "replicas": [rep("e", 1)]}}}
    cfg = render(table)
    assert f"default_backend {hc.NOT_FOUND_BACKEND}" in cfg
    nf = section(cfg, f"backend {hc.NOT_FOUND_BACKEND}")
    assert "http-request return status 404" in nf
    assert "application/json" in nf


def test_backend_settings():
    cfg = render(TABLE)
    be = section(cfg, "backend be_echo")
    assert "balance random(2)" in be
    assert "http-reuse always" in be
    assert "option httpchk" in be
    assert "http-check send meth GET uri /-/ready" in be
    assert "http-check expect status 200" in be
    assert re.search(r"^server echo-0 127.0.0.1:9001 check inter \d+ms .* maxconn 7 init-addr last,libc,none$", be, re.M)
    # Servers sorted by stable name, address host:port.
    assert re.findall(r"^server (\S+) (\S+)", be, re.M) == [("echo-0", "127.0.0.1:9001"), ("echo-1", "127.0.0.1:9002")]
    # Bounded queue: maxConcurrency x the replicas up (HAProxy's count: a change of replicas needs no reload),
    # plus a short queue timeout.
    assert "http-request set-var(txn.max_queued) nbsrv,mul(7)" in be and "if { queue,sub(txn.max_queued) ge 0 }" in be
    assert "timeout queue 2s" in be
    assert "timeout server 60s" in be
    api = section(cfg, "backend be_echo-api")
    assert "timeout server 2500ms" in api
    assert "maxconn 3" in api
    # The body limit is checked on the headers; a table without one leaves it to the replica.
    assert "hdr Connection close if { req.hdr_val(content-length) gt 1024 }" in be
    assert "content-length" not in api
    # Every 503 HAProxy makes itself tells the client when to come back, as the replica's own does.
    assert all(line.endswith("hdr Retry-After 1") or "hdr Retry-After 1 if {" in line
               for line in cfg.splitlines() if "status 503" in line)
    assert "option http-buffer-request" in section(cfg, "defaults")
    assert "option abortonclose" in section(cfg, "defaults")  # a client that left cancels its handler
    assert "timeout tunnel 2500ms" in section(cfg, "backend be_echo-api")  # a silent WebSocket: requestTimeoutSeconds


def test_retry_policy_only_safe_errors():
    cfg = render(TABLE)
    defaults = section(cfg, "defaults")
    assert "retry-on conn-failure 503" in defaults
    assert "option redispatch 1" in defaults
    assert "response-timeout" not in defaults  # the handler may still be running: never re-sent
    # What may have reached a handler (a 503, a connection that died mid-request) is re-sent only for
    # GET/HEAD/OPTIONS: every other method has its L7 retries turned off in the frontend.
    assert "retry-on conn-failure 503 empty-response junk-response" in defaults
    assert "http-request disable-l7-retry unless METH_GET || METH_OPTIONS" in section(cfg, "frontend rayfleet")
    # Client keep-alive stays on, and reloads don't reset idle keep-alive connections.
    assert "option http-keep-alive" in defaults
    assert "option idle-close-on-response" in defaults
    assert "http-server-close" not in cfg and "httpclose" not in cfg


def test_global_section():
    cfg = render(TABLE, nbthread=2, maxconn=1234)
    glob = section(cfg, "global")
    assert f"stats socket {SOCK} mode 600 level admin expose-fd listeners" in glob
    assert "nbthread 2" in glob
    assert "maxconn 1234" in glob
    assert "hard-stop-after" in glob
    assert "bind 127.0.0.1:8000" in cfg


def test_a_backend_with_no_replica_up_returns_503():
    cfg = render(TABLE)
    be = section(cfg, "backend be_zz")
    assert not re.search(r"^server ", be, re.M)
    # With none in the table, or all of them down: the same rule, HAProxy's own count.
    for name in ("be_zz", "be_echo"):
        no_replicas = [line for line in section(cfg, f"backend {name}").splitlines() if "no ready replicas" in line]
        assert len(no_replicas) == 1 and no_replicas[0].endswith("if { nbsrv() eq 0 }"), no_replicas


def shape(table):
    """What a change of replicas alone leaves as it is (the ingress reloads only when it changes)."""
    return hc.render_config(RoutingTable.from_wire(table).without_servers(), port=8000, bind_host="127.0.0.1",
                            runtime_socket=SOCK, maxconn=4000, weights_map=WEIGHTS)


def test_a_change_of_replicas_alone_keeps_the_shape_and_gives_the_runtime_api_the_config_lines():
    other = {"deployments": {**TABLE["deployments"],
                             "echo": {**TABLE["deployments"]["echo"], "replicas": [rep("echo-2", 9010)]},
                             "zz": {"routePrefix": "/z", "replicas": [rep("zz-0", 9011)]}}}
    assert render(other) != render(TABLE) and shape(other) == shape(TABLE)
    servers = hc.runtime_servers(RoutingTable.from_wire(other), None)
    assert set(servers) == {("be_echo", "echo-2"), ("be_echo-api", "a-0"), ("be_root", "root-0"), ("be_zz", "zz-0")}
    assert all(line.own and line.enabled for line in servers.values())
    # What `add server` gets is the config's own server line, less init-addr (no dynamic server takes it).
    lines = re.findall(r"^\s+server (\S+) (.*) init-addr last,libc,none$", render(other), re.M)
    assert sorted(lines) == sorted((name, line.args) for (_, name), line in servers.items())
    # A deployment's own setting is its shape: that change is a reload.
    limits = {"deployments": {**TABLE["deployments"], "zz": {"routePrefix": "/z", "maxConcurrency": 3, "replicas": []}}}
    assert shape(limits) != shape(TABLE)


def test_sanitised_stable_server_names():
    table = {
        "deployments": {
            "my app/v1": {
                "routePrefix": "/app",
                "replicas": [rep("my app/v1#0", 1), rep("ok-1.x:y", 2), rep("ok-1.x:y", 3)],
            }
        }
    }
    cfg = render(table)
    again = render(table)
    assert cfg == again  # deterministic
    names = re.findall(r"^\s+server (\S+) ", cfg, re.M)
    assert len(names) == len(set(names)) == 3
    for n in names:
        assert re.fullmatch(r"[A-Za-z0-9_.:-]+", n)
    assert "ok-1.x:y" in names
    assert server_name("my app/v1#0") in names
    assert server_name("my app/v1#0") != server_name("my app/v1_0")
    assert re.search(r"^backend be_my_app_v1-[0-9a-f]{8}$", cfg, re.M)
    # Replica order in the table doesn't matter.
    shuffled = {"deployments": {"my app/v1": dict(table["deployments"]["my app/v1"])}}
    shuffled["deployments"]["my app/v1"]["replicas"] = list(reversed(table["deployments"]["my app/v1"]["replicas"]))
    assert "server ok-1.x:y 127.0.0.1:2" in render(shuffled)


def test_invalid_and_duplicate_prefixes_are_skipped_not_fatal():
    table = {
        "deployments": {
            "a": {"routePrefix": "/same", "replicas": [rep("a", 1)]},
            "b": {"routePrefix": "/same/", "replicas": [rep("b", 2)]},
            "c": {"routePrefix": "/bad path' #x", "replicas": [rep("c", 3)]},
        }
    }
    cfg = render(table)
    assert "backend be_a" in cfg
    assert "backend be_b" not in cfg and "backend be_c" not in cfg
    assert cfg.count("# SKIPPED") == 2


def test_names_map_back_to_table():
    plan = RoutingTable.from_wire(TABLE)
    names = plan.names()
    assert names["be_echo"] == {"deployment": "echo", "servers": {"echo-0": "echo-0", "echo-1": "echo-1"}}


ACTIVATOR = "/tmp/rayfleet-test/activator.sock"


def test_a_scale_from_zero_deployment_with_no_replica_up_is_served_by_the_activator():
    table = {"deployments": {
        "cold": {"routePrefix": "/cold", "scaleFromZero": True, "requestTimeoutSeconds": 2.5,
                 "maxRequestBodyBytes": 1024, "replicas": []},
        "warm": {"routePrefix": "/warm", "scaleFromZero": True, "replicas": [rep("warm-0", 9001)]},
        "fixed": {"routePrefix": "/fixed", "replicas": []},
    }}
    cfg = render(table, activator_socket=ACTIVATOR)
    cold = section(cfg, "backend be_cold:activator").splitlines()
    assert cold[-1] == f"server {hc.ACTIVATOR_SERVER} unix@{ACTIVATOR}"  # its only server: no check, no maxconn
    assert f"http-request set-header {hc.ACTIVATOR_BACKEND_HEADER} be_cold" in cold  # the deployment's backend
    assert "timeout server 3500ms" in cold  # requestTimeoutSeconds + the margin: the activator's own 504 comes first
    assert "retry-on conn-failure" in cold  # its 503s and 504s are final
    too_large = [i for i, line in enumerate(cold) if line.startswith("http-request return status 413")]
    assert too_large and "gt 1024" in cold[too_large[0]] and too_large[0] < len(cold) - 1  # refused before it
    assert not any("status 503" in line or "check" in line for line in cold)
    # The frontend sends there while the deployment's own backend has no server up, whatever the table
    # lists (a replica added or removed is no reload): before the deployment's own rule.
    fe = section(cfg, f"frontend {hc.FRONTEND_NAME}").splitlines()
    none_up = "{ nbsrv(be_cold) eq 0 }"
    rule = f"use_backend be_cold:activator if {{ path /cold }} {none_up} || {{ path_beg /cold/ }} {none_up}"
    assert fe.index(rule) + 2 == fe.index("use_backend be_cold if { path /cold } || { path_beg /cold/ }")  # its canary's rule between
    assert "use_backend be_warm:activator if" in section(cfg, f"frontend {hc.FRONTEND_NAME}")
    # The deployment's own backend is as any other; without scaleFromZero there is no activator at all.
    assert re.findall(r"^server (\S+) (\S+)", section(cfg, "backend be_warm"), re.M) == [("warm-0", "127.0.0.1:9001")]
    assert section(cfg, "backend be_cold") == section(render(table), "backend be_cold")
    assert "be_fixed:activator" not in cfg
    assert cfg.count(f"server {hc.ACTIVATOR_SERVER} ") == 2 and cfg.count(hc.ACTIVATOR_BACKEND_HEADER) == 2
    # An ingress without an activator answers 503 for all three as any deployment with no replica.
    assert f"server {hc.ACTIVATOR_SERVER} " not in render(table) and ":activator" not in render(table)
    # A replica shows up under its id in show stat; the activator is no replica.
    assert RoutingTable.from_wire(table).names()["be_cold"] == {"deployment": "cold", "servers": {}}


def test_a_scale_from_zero_catch_all_reaches_the_activator_only_for_the_paths_left():
    table = {"deployments": {"cold": {"routePrefix": "/", "scaleFromZero": True, "replicas": []},
                             "x": {"routePrefix": "/x", "replicas": [rep("x-0", 9001)]}}}
    fe = section(render(table, activator_socket=ACTIVATOR), f"frontend {hc.FRONTEND_NAME}").splitlines()
    assert fe[-3] == "use_backend be_cold:activator if { nbsrv(be_cold) eq 0 }" and fe[-1] == "default_backend be_cold"


def test_scale_from_zero_must_be_true_itself():
    table = {"deployments": {"x": {"routePrefix": "/x", "scaleFromZero": "yes", "replicas": []}}}
    assert ":activator" not in render(table, activator_socket=ACTIVATOR)


CANARY_TABLE = {"deployments": {
    "echo": {"routePrefix": "/echo", "maxConcurrency": 7, "replicas": [rep("echo-0", 9001), rep("echo-1", 9002)],
             "canary": {"weight": 10, "maxConcurrency": 3, "maxRequestBodyBytes": 64, "requestTimeoutSeconds": 2.5,
                        "replicas": [rep("echo-c0", 9005)]}},
    "off": {"routePrefix": "/off", "replicas": [rep("off-0", 9006)],
            "canary": {"weight": 0, "replicas": [rep("off-c0", 9007)]}},
    "none": {"routePrefix": "/none", "replicas": [rep("none-0", 9008)], "canary": {"weight": 50, "replicas": []}},
    "root": {"routePrefix": "/", "replicas": [rep("root-0", 9004)],
             "canary": {"weight": 100, "replicas": [rep("root-c0", 9009)]}},
}}


def test_a_canary_takes_its_weight_of_its_deployments_requests_before_the_stable_rule():
    fe = section(render(CANARY_TABLE), f"frontend {hc.FRONTEND_NAME}").splitlines()
    assert "http-request set-var(txn.canary_draw) rand(100)" in fe  # one draw per request, 0..99
    # Its weight, from the map, less the draw: positive for `weight` of the 100 draws.
    draw = (f"{{ str(be_echo:canary),map_str_int({WEIGHTS},0),sub(txn.canary_draw) gt 0 }}"
            " { nbsrv(be_echo:canary) gt 0 }")
    canary = f"use_backend be_echo:canary if {{ path /echo }} {draw} || {{ path_beg /echo/ }} {draw}"
    assert fe.index(canary) + 1 == fe.index("use_backend be_echo if { path /echo } || { path_beg /echo/ }")
    # The catch-all's canary takes what no prefix matched: after every prefix rule, before the default.
    assert fe[-2:] == [f"use_backend be_root:canary if {{ str(be_root:canary),map_str_int({WEIGHTS},0),"
                       "sub(txn.canary_draw) gt 0 } { nbsrv(be_root:canary) gt 0 }", "default_backend be_root"]
    # The weights are the map file's, not the config's: a change of weight alone is no reload.
    weights = hc.canary_weights(RoutingTable.from_wire(CANARY_TABLE))
    assert weights == {"be_echo:canary": 10, "be_off:canary": 0, "be_none:canary": 50, "be_root:canary": 100}
    assert hc.canary_weights_text(RoutingTable.from_wire(CANARY_TABLE)).splitlines()[0] == "be_echo:canary 10"
    stepped = {"deployments": {**CANARY_TABLE["deployments"], "echo": {
        **CANARY_TABLE["deployments"]["echo"], "canary": {**CANARY_TABLE["deployments"]["echo"]["canary"], "weight": 50}}}}
    assert render(stepped) == render(CANARY_TABLE)


def test_every_deployment_has_an_empty_canary_backend_with_its_limits_so_a_canary_like_it_is_no_reload():
    plain = {"deployments": {"d": {"routePrefix": "/d", "maxConcurrency": 7, "replicas": [rep("d-0", 9001)]}}}
    slot = section(render(plain), "backend be_d:canary")
    assert not re.search(r"^server ", slot, re.M) and "nbsrv,mul(7)" in slot
    assert hc.canary_weights(RoutingTable.from_wire(plain)) == {"be_d:canary": 0}
    canary = {"deployments": {"d": {**plain["deployments"]["d"], "canary": {
        "weight": 10, "maxConcurrency": 7, "replicas": [rep("d-c0", 9002)]}}}}
    assert shape(canary) == shape(plain)  # the same limits: its replicas and weight go in at runtime
    other_limits = {"deployments": {"d": {**canary["deployments"]["d"], "canary": {
        **canary["deployments"]["d"]["canary"], "maxConcurrency": 3}}}}
    assert shape(other_limits) != shape(plain)
    assert RoutingTable.from_wire(plain).names()["be_d:canary"] is None  # nothing to report while empty


def test_a_canary_backend_has_every_backend_setting_with_its_own_limits():
    cfg = render(CANARY_TABLE)
    canary = section(cfg, "backend be_echo:canary")
    assert "# deployment echo: its canary, for a share of prefix /echo" in cfg
    assert re.findall(r"^server (\S+) (\S+)", canary, re.M) == [("echo-c0", "127.0.0.1:9005")]
    assert re.search(r"^server echo-c0 \S+ check inter \d+ms .* maxconn 3\b", canary, re.M)
    assert "option httpchk" in canary and "timeout server 2500ms" in canary and "nbsrv,mul(3)" in canary
    assert "if { req.hdr_val(content-length) gt 64 }" in canary
    assert '"deployment":"echo"' in canary  # its 503s and 413 name the deployment, as the stable one's
    assert "maxconn 7" in section(cfg, "backend be_echo") and "content-length" not in section(cfg, "backend be_echo")
    # A canary routing nothing still gets its backend: its replicas are checked before the weight goes up.
    assert "server off-c0 127.0.0.1:9007" in section(cfg, "backend be_off:canary")
    assert "http-request return status 503" in section(cfg, "backend be_none:canary")
    assert render(CANARY_TABLE) == cfg


def test_the_activator_serves_a_stable_backend_scaled_to_zero_never_its_canary():
    table = {"deployments": {"cold": {"routePrefix": "/cold", "scaleFromZero": True, "replicas": [],
                                      "canary": {"weight": 20, "replicas": [rep("cold-c0", 9001)]}}}}
    cfg = render(table, activator_socket=ACTIVATOR)
    assert f"server {hc.ACTIVATOR_SERVER} unix@{ACTIVATOR}" in section(cfg, "backend be_cold:activator")
    assert "server cold-c0 127.0.0.1:9001" in section(cfg, "backend be_cold:canary")
    assert cfg.count(f"server {hc.ACTIVATOR_SERVER} ") == 1
    # The activator holds only while the stable backend has no replica up, and the canary's rule comes
    # after: the canary's share is drawn from what the stable revision would serve.
    fe = section(cfg, f"frontend {hc.FRONTEND_NAME}").splitlines()
    order = [line.split()[1] for line in fe if line.startswith("use_backend")]
    assert order == ["be_cold:activator", "be_cold:canary", "be_cold"]


@pytest.fixture(scope="module")
def haproxy():
    from rayfleet_runtime.ingress.haproxy_bin import HAProxyNotFound, find_haproxy

    try:
        return find_haproxy()
    except HAProxyNotFound:
        pytest.skip("no HAProxy binary")


@pytest.mark.parametrize(
    "table",
    [
        TABLE,
        {"deployments": {}},
        None,
        {"deployments": {"v6": {"routePrefix": "/v6", "replicas": [rep("v6-0", 9, host="::1"), rep("h", 8, host="localhost")]}}},
        {"deployments": {"x y": {"routePrefix": "/x", "maxQueuedRequests": 0, "replicas": [rep("x y#1", 1)]}}},
        {"deployments": {"cold x": {"routePrefix": "/", "scaleFromZero": True, "maxRequestBodyBytes": 10,
                                    "replicas": []},
                         "warm": {"routePrefix": "/w", "scaleFromZero": True, "replicas": [rep("w-0", 2)]}}},
        CANARY_TABLE,
        {"deployments": {"cold x": {"routePrefix": "/", "scaleFromZero": True, "replicas": [],
                                    "canary": {"weight": 1, "replicas": [rep("c x#0", 3, host="::1")]}}}},
    ],
)
def test_config_passes_haproxy_check(haproxy, tmp_path, table):
    from rayfleet_runtime.ingress.haproxy_bin import check_config

    path, weights = tmp_path / "haproxy.cfg", tmp_path / "canary_weights.map"
    weights.write_text(hc.canary_weights_text(RoutingTable.from_wire(table)))
    path.write_text(render(table, runtime_socket=str(tmp_path / "admin.sock"), bind_host="0.0.0.0",
                           activator_socket=str(tmp_path / "activator.sock"), weights_map=str(weights)))
    ok, out = check_config(haproxy, str(path))
    assert ok, out


def test_haproxy_version(haproxy):
    from rayfleet_runtime.ingress.haproxy_bin import haproxy_version

    assert re.match(r"\d+\.\d+", haproxy_version(haproxy))


def test_an_autoscaled_deployment_queues_what_its_max_replicas_could_run():
    table = {"deployments": {"d": {"routePrefix": "/d", "maxConcurrency": 10, "maxQueued": 80, "queueTimeoutSeconds": 60,
                                   "replicas": [{"id": "d-0", "host": "127.0.0.1", "port": 9000}]},
                             "e": {"routePrefix": "/e", "maxConcurrency": 10, "maxQueued": True,
                                   "replicas": [{"id": "e-0", "host": "127.0.0.1", "port": 9001}]}}}
    backends = {b.deployment: b for b in RoutingTable.from_wire(table).backends}
    assert (backends["d"].max_queued, backends["d"].queue_timeout_s) == (80, 60)
    assert backends["e"].max_queued is None  # not a count: maxConcurrency x replicas up, as without autoscaling
    cfg = render(table)
    assert "if { queue() ge 80 }" in section(cfg, "backend be_d") and "nbsrv,mul(10)" in section(cfg, "backend be_e")


def test_with_shared_health_each_ingress_checks_its_own_nodes_replicas_and_follows_the_table_for_the_others():
    table = {"sharedHealth": True, "deployments": {"d": {"routePrefix": "/d", "replicas": [
        {"id": "d-0", "host": "10.0.0.1", "port": 1, "nodeId": "n1"},
        {"id": "d-1", "host": "10.0.0.2", "port": 2, "nodeId": "n2", "up": False},
        {"id": "d-2", "host": "10.0.0.2", "port": 3, "nodeId": "n2"},
        {"id": "d-3", "host": "10.0.0.9", "port": 4}]}}}  # no node known: checked everywhere
    on_n1 = {name: line for (_, name), line in hc.runtime_servers(RoutingTable.from_wire(table), "n1").items()}
    assert [name for name, line in sorted(on_n1.items()) if line.own] == ["d-0", "d-3"]
    assert not on_n1["d-1"].enabled and on_n1["d-2"].enabled  # as n2's ingress found them
    # n2's replicas are checked here only once traffic fails to reach them (observe needs check on), then
    # every second until they answer again; up, only hourly.
    assert f"check inter {hc.ELSEWHERE_HEALTH_INTER_MS}ms downinter 1000ms" in on_n1["d-2"].args
    assert "observe layer4 error-limit 3 on-error mark-down" in on_n1["d-2"].args
    assert "check inter 1000ms downinter 1000ms" in on_n1["d-0"].args
    be = section(render(table, node_id="n1"), "backend be_d")
    assert re.search(r"^server d-1 10.0.0.2:2 check .* maxconn 100 disabled init-addr", be, re.M)
    assert re.search(r"^server d-2 10.0.0.2:3 check .* maxconn 100 init-addr", be, re.M)
    # n2 checks its own, and its own down one stays in rotation until its checks say otherwise.
    on_n2 = {name: line for (_, name), line in hc.runtime_servers(RoutingTable.from_wire(table), "n2").items()}
    assert on_n2["d-1"].own and on_n2["d-1"].enabled and not on_n2["d-0"].own
    # Without shared health (one ingress for the cluster), every ingress checks every replica.
    alone = {**table, "sharedHealth": False}
    assert all(line.own and line.enabled for line in hc.runtime_servers(RoutingTable.from_wire(alone), "n1").values())


def test_maxconn_leaves_haproxy_its_fds_and_changes_with_no_change_of_replicas(monkeypatch):
    import resource

    from rayfleet_runtime.ingress import actor

    monkeypatch.setattr(resource, "getrlimit", lambda _: (20_000, 20_000))
    for servers in (0, 1_000, actor.SERVER_FDS, 6_000):
        maxconn = actor.default_maxconn(20_000, servers)
        assert 2 * maxconn + servers + actor.OWN_FDS <= 20_000, servers  # else HAProxy refuses to start
    assert actor.default_maxconn(20_000, 0) == actor.default_maxconn(20_000, actor.SERVER_FDS)  # no reload
    assert actor.default_maxconn(20_000, 6_000) < actor.default_maxconn(20_000, 0)
    assert actor.default_maxconn(500, 1_000) == 500  # what was asked, when it fits
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert actor.default_maxconn(20_000, 10_000) == 20_000


LOCAL_TABLE = {"deployments": {"d": {"routePrefix": "/d", "replicas": [
    {"id": "d-0", "host": "10.0.0.1", "port": 1, "nodeId": "n1", "local": "rayfleet/7/1"},
    {"id": "d-1", "host": "10.0.0.2", "port": 2, "nodeId": "n2", "local": "rayfleet/8/2"},
    {"id": "d-2", "host": "10.0.0.1", "port": 3, "nodeId": "n1"}]}}}  # a replica with no local socket


def test_an_ingress_reaches_its_own_nodes_replicas_by_their_local_socket_and_the_others_by_tcp(haproxy, tmp_path):
    from rayfleet_runtime.ingress.haproxy_bin import check_config

    on_n1 = {name: line.args.split()[0]
             for (_, name), line in hc.runtime_servers(RoutingTable.from_wire(LOCAL_TABLE), "n1").items()}
    assert on_n1 == {"d-0": "abns@rayfleet/7/1", "d-1": "10.0.0.2:2", "d-2": "10.0.0.1:3"}
    # a node it doesn't know: TCP for all (a local socket is only reachable from its own pod)
    assert all(":" in line.args.split()[0] and "@" not in line.args.split()[0]
               for line in hc.runtime_servers(RoutingTable.from_wire(LOCAL_TABLE), None).values())
    path, weights = tmp_path / "haproxy.cfg", tmp_path / "canary_weights.map"
    weights.write_text(hc.canary_weights_text(RoutingTable.from_wire(LOCAL_TABLE)))
    cfg = render(LOCAL_TABLE, node_id="n1", runtime_socket=str(tmp_path / "admin.sock"), weights_map=str(weights))
    assert re.search(r"^server d-0 abns@rayfleet/7/1 check .* init-addr", section(cfg, "backend be_d"), re.M)
    path.write_text(cfg)
    ok, out = check_config(haproxy, str(path))
    assert ok, out
