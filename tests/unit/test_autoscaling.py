"""Autoscaling decisions (pure): recorded load traces in, replica counts and reasons over time out."""
from __future__ import annotations

from rayfleet_api.desired import Autoscaling
from rayfleet_runtime.controller.autoscaling import AutoscalerState, Decision, LoadSample, ReplicaLoad, decide

TARGET_8 = Autoscaling(max_replicas=10, target_in_flight=8)  # delays: the defaults, 3 s up and 60 s down


def serving(load: float, ready: int, starting: int = 0, ingress: float = 0) -> LoadSample:
    """`load` spread over `ready` replicas, `starting` more that take none yet, `ingress` held by the ingress."""
    replicas = [ReplicaLoad(in_flight=load / ready, queued=0)] * ready + [ReplicaLoad(0, 0, ready=False)] * starting
    return LoadSample(tuple(replicas), ingress_queued=ingress)


def seconds(start: int, stop: int, sample: LoadSample) -> list[tuple[float, LoadSample]]:
    """One sample a second, as the controller takes them."""
    return [(float(t), sample) for t in range(start, stop)]


def replay(trace: list[tuple[float, LoadSample]], config: Autoscaling, current: int) -> dict[float, Decision]:
    """Each sample through `decide` as the controller does: the previous decision is the current count."""
    state, decisions = AutoscalerState(), {}
    for t, sample in trace:
        decisions[t], state = decide(config, state, current, sample, now=t)
        current = decisions[t].replicas
    return decisions


def changes(decisions: dict[float, Decision], start: int) -> list[tuple[float, int]]:
    out, current = [], start
    for t, decision in decisions.items():
        if decision.replicas != current:
            out.append((t, decision.replicas))
            current = decision.replicas
    return out


def test_a_step_up_scales_once_it_has_held_for_the_upscale_delay():
    trace = seconds(0, 5, serving(16, 2)) + seconds(5, 9, serving(41, 2)) + seconds(9, 20, serving(41, 6))
    d = replay(trace, TARGET_8, current=2)
    assert changes(d, 2) == [(8, 6)]  # first seen at 5, held 3 s: ceil(41 / 8)
    assert d[4].reason == "load 16 over 2 replicas (target 8 each): 2 replicas"
    assert d[5].reason == "load 41 over 2 replicas (target 8 each) asks for 6; adding replicas once that holds 3s"
    assert d[8].reason == "load 41 over 2 replicas (target 8 each); at least 41 for 3s -> 6 replicas"
    assert d[8].load == 41


def test_upscale_goes_to_the_lowest_count_asked_for_during_the_delay():
    trace = seconds(0, 2, serving(8, 1)) + [(2.0, serving(30, 1)), (3.0, serving(80, 1)), (4.0, serving(50, 1)),
                                            (5.0, serving(80, 1))]
    assert changes(replay(trace, TARGET_8, current=1), 1) == [(5, 4)]  # the ramp's 30 held, not the 80 peak


def test_a_spike_shorter_than_the_upscale_delay_changes_nothing():
    spike = seconds(0, 10, serving(16, 2)) + seconds(10, 13, serving(80, 2)) + seconds(13, 30, serving(16, 2))
    assert changes(replay(spike, TARGET_8, current=2), 2) == []
    held = seconds(0, 10, serving(16, 2)) + seconds(10, 14, serving(80, 2)) + seconds(14, 30, serving(80, 10))
    assert changes(replay(held, TARGET_8, current=2), 2) == [(13, 10)]
    at_once = Autoscaling(max_replicas=10, target_in_flight=8, upscale_delay_seconds=0)
    d = replay(spike, at_once, current=2)
    assert changes(d, 2)[0] == (10, 10)
    assert d[10].reason == "load 80 over 2 replicas (target 8 each) -> 10 replicas"


def test_a_step_down_scales_to_the_highest_count_asked_for_during_the_downscale_delay():
    trace = seconds(0, 10, serving(41, 6)) + seconds(10, 40, serving(20, 6)) + seconds(40, 200, serving(10, 6))
    d = replay(trace, TARGET_8, current=6)
    assert changes(d, 6) == [(70, 3), (100, 2)]  # 20 held 60 s: 3; then only 10 for 60 s: 2
    assert d[30].reason == "load 20 over 6 replicas (target 8 each) asks for 3; removing replicas once that holds 60s"
    assert d[70].reason == "load 10 over 6 replicas (target 8 each); at most 20 for 60s -> 3 replicas"


def test_flapping_load_keeps_its_peaks_replicas():
    flapping = [(float(t), serving(40 if (t // 10) % 2 == 0 else 4, 5)) for t in range(0, 290)]
    d = replay(flapping + seconds(290, 420, serving(4, 5)), TARGET_8, current=1)
    assert changes(d, 1) == [(3, 5), (350, 1)]  # up once; down only after 60 s without a peak
    every_second = [(float(t), serving(40 if t % 2 else 4, 5)) for t in range(0, 300)]
    assert changes(replay(every_second, TARGET_8, current=5), 5) == []


def test_scale_to_zero_after_no_load_for_the_downscale_delay_and_back_at_once():
    to_zero = Autoscaling(min_replicas=0, max_replicas=4, target_in_flight=2)
    starting = LoadSample((ReplicaLoad(0, 0, ready=False),), ingress_queued=1)
    trace = (seconds(0, 10, serving(1, 1)) + seconds(10, 40, serving(0, 1)) + [(40.0, serving(1, 1))]
             + seconds(41, 101, serving(0, 1)) + seconds(101, 130, LoadSample())
             + [(130.0, LoadSample(ingress_queued=1)), (131.0, starting), (132.0, serving(1, 1))])
    d = replay(trace, to_zero, current=1)
    assert changes(d, 1) == [(101, 0), (130, 1)]  # the request seen at 40 (until 41) put zero off to 101
    assert d[100].reason == "load 0 over 1 replica (target 2 each) asks for 0; removing replicas once that holds 60s"
    assert d[101].reason == "no load for 60s -> 0 replicas"
    assert d[129].reason == "load 0 over 0 replicas (target 2 each): 0 replicas"
    assert d[130].reason == "1 request held at 0 replicas -> 1 replica at once"
    assert d[131].replicas == 1
    # Requests held at zero are known demand: all of it is asked for at once.
    burst = replay([(0.0, LoadSample(ingress_queued=5))], to_zero, current=0)[0.0]
    assert (burst.replicas, burst.reason) == (3, "5 requests held at 0 replicas -> 3 replicas at once")
    # A sliver of load (an average over the interval) still asks for a replica.
    assert replay([(0.0, LoadSample(ingress_queued=0.01))], to_zero, current=0)[0.0].replicas == 1


def test_never_to_zero_while_min_replicas_is_above_it():
    trace = seconds(0, 10, serving(1, 1)) + seconds(10, 200, serving(0, 1))
    assert changes(replay(trace, Autoscaling(max_replicas=4, target_in_flight=2), current=1), 1) == []


def test_starting_replicas_count_as_capacity_coming():
    # Six asked for; four start slowly (say, on new worker pods) while the load they will take queues on
    # the two that serve and in the ingress. Reading that queue as more demand would over-provision.
    queueing = [(float(t), serving(48, 2, starting=4, ingress=5 * (t - 3))) for t in range(4, 14)]
    trace = seconds(0, 4, serving(48, 2)) + queueing + seconds(14, 40, serving(48, 6))
    d = replay(trace, TARGET_8, current=2)
    assert changes(d, 2) == [(3, 6)]
    assert d[13].reason == ("load 98 over 6 replicas, 4 starting (target 8 each) asks for 10; "
                            "waiting for the starting ones first")
    # Once they all serve, load that is still higher scales up after the upscale delay, counted from then.
    more = seconds(0, 4, serving(48, 2)) + queueing + seconds(14, 40, serving(80, 6))
    d = replay(more, TARGET_8, current=2)
    assert changes(d, 2) == [(3, 6), (17, 10)]
    assert d[14].reason == "load 80 over 6 replicas (target 8 each) asks for 10; adding replicas once that holds 3s"


def test_never_below_min_or_above_max():
    bounded = Autoscaling(min_replicas=2, max_replicas=10, target_in_flight=8)
    idle = replay([(0.0, LoadSample())], bounded, current=0)[0.0]
    assert (idle.replicas, idle.reason) == (2, "0 replicas outside minReplicas..maxReplicas (2..10) -> 2")
    assert replay([(0.0, serving(0, 12))], bounded, current=12)[0.0].replicas == 10  # maxReplicas just lowered
    d = replay(seconds(0, 4, serving(1000, 10)), bounded, current=10)
    assert changes(d, 10) == []
    d = replay(seconds(0, 4, serving(1000, 4)), bounded, current=4)
    assert d[3].reason == "load 1000 over 4 replicas (target 8 each); at least 1000 for 3s -> 10 replicas (maxReplicas)"


def test_no_decision_before_the_samples_cover_the_delay():
    # A controller that just started (empty state) has seen no idle minute yet.
    d = replay(seconds(1000, 1100, serving(0, 5)), TARGET_8, current=5)
    assert changes(d, 5) == [(1060, 1)]
    # A gap in sampling: the last load seen holds until the next sample, so one sample decides nothing.
    d = replay([(0.0, serving(40, 5)), (100.0, serving(0, 5)), (160.0, serving(0, 5))], TARGET_8, current=5)
    assert changes(d, 5) == [(160, 1)]


def test_fractional_targets_round_up_exactly():
    fine = Autoscaling(max_replicas=20, target_in_flight=0.1, upscale_delay_seconds=0)
    assert replay([(0.0, serving(1.1, 1))], fine, current=1)[0.0].replicas == 11  # 1.1 / 0.1 is 11.000000000000002


def test_the_state_stays_small():
    state = AutoscalerState()
    for t in range(1000):
        _, state = decide(TARGET_8, state, 2, serving(16, 2), now=float(t))
    assert len(state.loads) == 61  # the downscale delay's samples and the one in effect when it began
