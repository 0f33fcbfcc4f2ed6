"""HAProxy's ``show stat`` read per deployment (rayfleet_runtime.ingress.show_stat), as the ingress's
``stats()`` gives it to the controller: a canary's backend counts for its deployment."""
from __future__ import annotations

from rayfleet_runtime.controller.route_publisher import waiting_per_deployment
from rayfleet_runtime.ingress.show_stat import parse_show_stat, stats_by_deployment
from rayfleet_runtime.routing import RoutingTable

TABLE = RoutingTable.from_wire({"deployments": {"web": {
    "routePrefix": "/web", "replicas": [{"id": "web-0", "host": "10.0.0.1", "port": 8000}],
    "canary": {"weight": 10, "replicas": [{"id": "web-c0", "host": "10.0.0.2", "port": 8000}]}}}})

SHOW_STAT = """\
# pxname,svname,qcur,qmax,scur,smax,slim,stot,econ,wretr,wredis,status,hrsp_5xx,check_status,
rayfleet,FRONTEND,,,4,9,4000,120,,,,OPEN,,,
be_web,web-0,0,0,2,5,100,90,0,0,0,UP,1,L7OK,
be_web,BACKEND,3,7,2,5,100,90,0,1,0,UP,1,,
be_web:canary,web-c0,0,0,1,2,100,10,0,0,0,UP,0,L7OK,
be_web:canary,BACKEND,2,4,1,2,100,10,1,0,0,UP,0,,
rayfleet_no_route,BACKEND,0,0,0,0,1,0,0,0,0,UP,0,,
"""


def test_a_canarys_backend_counts_for_its_deployment_and_its_queue_adds_to_the_stable_ones():
    deployments, frontends, raw = stats_by_deployment(parse_show_stat(SHOW_STAT), TABLE.names())
    web = deployments["web"]
    assert (web["backend"], web["queue"], web["sessions"], web["total"], web["retries"]) == ("be_web", 5, 3, 100, 1)
    assert (web["max_queue"], web["connect_errors"]) == (7, 1)  # a peak stays the stable backend's own
    assert (web["canary"]["backend"], web["canary"]["queue"], web["canary"]["total"]) == ("be_web:canary", 2, 10)
    assert set(web["servers"]) == {"web-0", "web-c0"}  # both revisions' replicas, by id
    assert frontends["rayfleet"]["sessions"] == 4 and set(raw) == {"rayfleet_no_route"}
    # What the autoscaler reads: one load for the deployment, whichever revision the requests wait for.
    assert waiting_per_deployment({"deployments": deployments, "held": {"web": 1}}) == {"web": 6}


def test_without_a_canary_a_deployment_is_its_backends_row():
    table = RoutingTable.from_wire({"deployments": {"web": {"routePrefix": "/web", "replicas": [
        {"id": "web-0", "host": "10.0.0.1", "port": 8000}]}}})
    rows = [row for row in parse_show_stat(SHOW_STAT) if row["svname"] != "web-c0"]  # its empty canary slot stays
    deployments, _, raw = stats_by_deployment(rows, table.names())
    web = deployments["web"]
    assert "canary" not in web and (web["queue"], web["total"], set(web["servers"])) == (3, 90, {"web-0"})
    assert set(raw) == {"rayfleet_no_route"}  # the slot is the deployment's, with nothing to report
