"""Rollouts on a real local Ray, controller and HAProxy ingress, under traffic: a bad version is rolled
back without costing a client of the old one a request, and a canary gets its share of the requests."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.runtime.test_dataplane import wait_ingress
from tests.traffic import Traffic

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

OLD = {"handler": "examples.echo:Echo", "handlerArgs": {"greeting": "old"}}


def rolled_back(reason: str, replicas: int = 2):
    return lambda o: ((o["rollout"] or {}).get("state") == "Failed" and o["rollout"]["reason"] == reason
                      and o["readyReplicas"] == replicas and o["status"] == "Running"
                      and o["rollout"]["rolledBackTo"] is not None
                      and {r["version"] for r in o["replicas"]} == {o["servingVersion"]})


def test_versions_that_cannot_start_are_rolled_back_and_the_old_one_loses_no_request(api):
    api.put("bad", replicas=2, version="a", **OLD)
    url = wait_ingress(api, api.wait_ready("bad", 2), pids=2)
    with Traffic(url + "/x") as traffic:
        api.put("bad", replicas=2, version="b", handler="no_such_module:Handler")
        api.wait("bad", rolled_back("HandlerImportError"), 120, "the import error rolled back")
        api.put("bad", replicas=2, version="c", handler="rf_test_handlers:BrokenInit")
        obs = api.wait("bad", rolled_back("HandlerInitError"), 120, "the constructor error rolled back")
    assert traffic.failures == [], traffic.failures[:3]
    assert traffic.answers > 0 and traffic.last["greeting"] == "old"
    assert obs["version"] == "c" and obs["servingVersion"] == "a"
    assert [(r["revision"], r["state"]) for r in obs["revisions"]] == [(3, "Failed"), (2, "Failed"), (1, "Serving")]
    api.delete("bad")


def test_without_spare_cpu_a_bad_version_costs_one_replica_at_most_and_is_rolled_back(api):
    """4 CPUs; two replicas of 1.5 leave no room for a surge: an old replica drains to make room, the new
    one fails, and the old version comes back at full strength; never fewer than one serving, no request lost."""
    tight = {"replicas": 2, "rayActorOptions": {"numCpus": 1.5}}
    api.put("tight", version="a", **OLD, **tight)
    url = wait_ingress(api, api.wait_ready("tight", 2), pids=2)
    lowest = [2]

    def back(o) -> bool:
        lowest[0] = min(lowest[0], o["readyReplicas"])
        return rolled_back("HandlerImportError")(o)
    with Traffic(url + "/x") as traffic:
        api.put("tight", version="b", handler="no_such_module:Handler", **tight)
        api.wait("tight", back, 120, "the bad version rolled back in place")
    assert lowest[0] >= 1
    assert traffic.failures == [] and traffic.last["greeting"] == "old", traffic.failures[:3]
    api.delete("tight")


def test_a_canary_that_answers_500s_is_rolled_back_and_only_its_own_requests_failed(api):
    api.put("sour", replicas=2, version="a", **OLD)
    url = wait_ingress(api, api.wait_ready("sour", 2), pids=2)
    with Traffic(url + "/x") as traffic:
        api.put("sour", replicas=2, version="b", handler="rf_test_handlers:Failing",
                rollout={"canary": {"weight": 20, "maxErrorRate": 0.05}})
        obs = api.wait("sour", rolled_back("CanaryErrorRate"), 120, "the failing canary rolled back")
        served = traffic.answers + len(traffic.failures)
        api.wait("sour", lambda o: traffic.answers + len(traffic.failures) > served + 50, 60, "traffic after it")
    # What failed was the canary's own (its handler's 500), none of the old revision's requests.
    assert traffic.failures and {code for code, _ in traffic.failures} == {500}, traffic.failures[:3]
    assert all("RuntimeError" in body["error"] for _, body in traffic.failures), traffic.failures[:3]
    assert "5xx" in obs["rollout"]["message"] and traffic.last["greeting"] == "old"
    api.delete("sour")


async def greetings(url: str, n: int) -> list[str]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as client:
        out: list[str] = []
        for start in range(0, n, 500):
            answers = await asyncio.gather(*(client.get(f"{url}/{i}") for i in range(start, min(n, start + 500))))
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:3]
            out += [a.json()["greeting"] for a in answers]
        return out


def test_a_canary_at_10_percent_gets_10_percent_of_the_requests_then_all_once_promoted(api):
    api.put("split", replicas=2, version="a", **OLD)
    url = wait_ingress(api, api.wait_ready("split", 2), pids=2)
    canary = {"handler": "examples.echo:Echo", "handlerArgs": {"greeting": "new"}, "version": "b", "replicas": 2}
    api.put("split", **canary, rollout={"canary": {"weight": 10}})
    obs = api.wait("split", lambda o: o["rollout"]["reason"] == "CanaryWaiting", 120, "the canary ready")
    assert obs["rollout"]["canaryWeight"] == 10 and obs["readyReplicas"] == 3  # both old ones, one canary
    seen = asyncio.run(greetings(url, 10_000))
    share = seen.count("new") / len(seen)
    assert 0.08 <= share <= 0.12, share  # 10 % +- 2 % (the binomial spread over 10k is 0.3 %)
    assert set(seen) == {"old", "new"}
    api.put("split", **canary, rollout={"canary": {"weight": 100}})
    api.wait("split", lambda o: o["rollout"]["state"] == "Complete" and o["servingVersion"] == "b"
             and len(o["replicas"]) == 2, 120, "the canary promoted")
    assert set(asyncio.run(greetings(url, 200))) == {"new"}
    api.delete("split")
