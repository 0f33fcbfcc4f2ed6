"""The canary split through a real HAProxy: an ``Ingress`` run in-process (no Ray), stand-in replicas
answering with their ids, the share each revision gets counted from the answers."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import math

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("aiohttp.web")

from rayfleet.ports import free_port  # noqa: E402
from rayfleet.waiting import eventually  # noqa: E402
from rayfleet_runtime.ingress.haproxy_bin import HAProxyNotFound, find_haproxy  # noqa: E402
from rayfleet_runtime.routing import RoutingTable  # noqa: E402
from tests.runtime.stand_ins import Replicas  # noqa: E402

try:
    find_haproxy()
except HAProxyNotFound:  # pragma: no cover
    pytest.skip("no HAProxy binary", allow_module_level=True)


@pytest.fixture(scope="module")
def replicas():
    r = Replicas()
    yield r
    r.close()


@contextlib.contextmanager
def ingress_in_process(tmp_path):
    """An ``Ingress`` without Ray, as the actor runs it (HAProxy, the activator), stopped on the way out."""
    from rayfleet_runtime.ingress.actor import Ingress

    ing = Ingress(port=free_port(), bind_host="127.0.0.1", workdir=str(tmp_path / "ing"), nbthread=1)
    try:
        asyncio.run(ing.ready())
        yield ing
    finally:
        asyncio.run(ing.stop(1))


def apply(ing, table) -> dict:
    result = asyncio.run(ing.update(RoutingTable.from_wire(table)))
    assert result["applied"] and result["error"] is None, result
    return result


def answers(port: int, path: str, n: int) -> collections.Counter:
    """Which replica answered each of ``n`` GETs of ``path`` (a failure counts under its status)."""
    seen: collections.Counter = collections.Counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        for i in range(n):
            r = client.get(f"{path}/{i}")
            seen[r.json()["replica"] if r.status_code == 200 else r.status_code] += 1
    return seen


def with_canary(stable, canary, weight, prefix="/split"):
    return {"routePrefix": prefix, "replicas": stable, "canary": {"weight": weight, "replicas": canary}}


def test_a_canary_gets_its_weight_of_the_requests_and_none_once_it_is_down(replicas, tmp_path):
    stable = [replicas.start("split-s0"), replicas.start("split-s1")]
    canary = replicas.start("split-c0")
    with ingress_in_process(tmp_path) as ing:
        apply(ing, {"deployments": {"split": with_canary(stable, [canary], 10)}})
        n, p = 2000, 0.10
        seen = answers(ing.port, "/split", n)
        assert set(seen) == {"split-s0", "split-s1", "split-c0"}, seen  # no failure among them
        # A binomial draw per request: 5 standard deviations (~67 of 2000, 3.4 %) is a bound that can't flake.
        assert abs(seen["split-c0"] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), seen
        dep_stats = asyncio.run(ing.stats())["deployments"]["split"]
        assert set(dep_stats["servers"]) == {"split-s0", "split-s1", "split-c0"}
        assert dep_stats["total"] == dep_stats["canary"]["total"] + sum(
            dep_stats["servers"][rid]["total"] for rid in ("split-s0", "split-s1"))

        replicas.stop("split-c0")
        eventually(lambda: asyncio.run(ing.stats())["deployments"]["split"]["canary"]["status"] == "DOWN", 15, 0.1,
                   what="HAProxy to find the canary's only replica down")
        assert set(answers(ing.port, "/split", 300)) <= {"split-s0", "split-s1"}  # every one stable, none failed


def test_weight_0_sends_the_canary_nothing_and_100_everything_the_catch_alls_too(replicas, tmp_path):
    stable, canary = [replicas.start("edge-s0")], [replicas.start("edge-c0")]
    root, root_canary = [replicas.start("root-s0")], [replicas.start("root-c0")]
    with ingress_in_process(tmp_path) as ing:
        apply(ing, {"deployments": {"edge": with_canary(stable, canary, 0, "/edge"),
                                    "root": with_canary(root, root_canary, 100, "/")}})
        assert answers(ing.port, "/edge", 200) == {"edge-s0": 200}
        assert answers(ing.port, "/elsewhere", 200) == {"root-c0": 200}  # paths no prefix matched
        apply(ing, {"deployments": {"edge": with_canary(stable, canary, 100, "/edge"),
                                    "root": with_canary(root, root_canary, 0, "/")}})
        assert answers(ing.port, "/edge", 200) == {"edge-c0": 200}
        assert answers(ing.port, "/elsewhere", 200) == {"root-s0": 200}


def test_a_canary_starts_steps_and_is_promoted_with_no_reload(replicas, tmp_path):
    """A new version of the code alone (the canary has the deployment's limits): its replicas and weights
    change through HAProxy's runtime API, the process that serves stays the same."""
    stable, canary = [replicas.start("step-s0")], [replicas.start("step-c0")]
    with ingress_in_process(tmp_path) as ing:
        apply(ing, {"deployments": {"step": {"routePrefix": "/step", "replicas": stable}}})
        before = asyncio.run(ing.ready())
        for weight in (0, 50, 100):
            result = apply(ing, {"deployments": {"step": with_canary(stable, canary, weight, "/step")}})
            assert result["via"] == "runtime", (weight, result)
            seen = answers(ing.port, "/step", 200)
            assert set(seen) == ({"step-s0"} if weight == 0 else {"step-c0"} if weight == 100
                                 else {"step-s0", "step-c0"}), (weight, seen)
        result = apply(ing, {"deployments": {"step": {"routePrefix": "/step", "replicas": canary}}})  # promoted
        assert result["via"] == "runtime", result
        assert answers(ing.port, "/step", 200) == {"step-c0": 200}
        after = asyncio.run(ing.ready())
        assert (after["reloads"], after["restarts"], after["pid"]) == (
            before["reloads"], before["restarts"], before["pid"]), (before, after)
