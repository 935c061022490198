"""The pacer's schedule, on a simulated clock (the server-side tests prove the real thing)."""

import random

import pytest

from pipeline.limits import Pacing
from pipeline.pacing.schedule import Pacer
from tests.simclock import FakeClock


def _run(pacing: Pacing, latencies: list[float]) -> tuple[list[float], list[float]]:
    clock = FakeClock()
    pacer = Pacer(pacing, clock, clock.sleep)
    starts, returns = [], []
    for latency in latencies:
        pacer.before_call()
        starts.append(clock.now)
        clock.now += latency
        pacer.after_call()
        returns.append(clock.now)
    return starts, returns


def test_politeness_window_counts_from_returns_whatever_the_latency():
    rng = random.Random(3)  # one seeded generator: a fresh Random(3) per draw would give one latency 200 times
    latencies = [rng.choice([0.001, 0.05, 0.3]) for _ in range(200)]
    assert len(set(latencies)) == 3
    starts, returns = _run(Pacing(min_interval_s=0.102, window_calls=10, window_s=1.0), latencies)
    # A call starts only a full window after the call ten before it *returned*: the server
    # can never see eleven calls of this worker inside one second, however late they arrive.
    assert all(starts[k] >= returns[k - 10] + 1.0 - 1e-9 for k in range(10, len(starts)))


def test_spacing_alone_when_no_window():
    starts, _ = _run(Pacing(min_interval_s=0.25), [0.01] * 20)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) == pytest.approx(0.25)


def test_tokens_are_paid_for_and_reconciled():
    clock = FakeClock()
    pacer = Pacer(Pacing(tokens_per_second=100.0), clock, clock.sleep)
    pacer.before_call(estimated_tokens=300)  # charged 3 s up front
    pacer.reconcile(estimated_tokens=300, actual_tokens=100)  # it really cost 1 s
    pacer.before_call(estimated_tokens=0)
    assert clock.now == pytest.approx(1.0)


def test_retry_after_holds_the_next_call_even_when_unpaced():
    clock = FakeClock()
    pacer = Pacer(Pacing(), clock, clock.sleep)
    pacer.before_call()
    pacer.hold(2.0)
    pacer.before_call()
    assert clock.now == pytest.approx(2.0)


def test_a_share_scales_the_ceiling_and_a_smaller_one_holds_from_the_next_call():
    clock = FakeClock()
    pacer = Pacer(Pacing(min_interval_s=0.1, tokens_per_second=1000.0), clock, clock.sleep)
    pacer.before_call(estimated_tokens=50)  # spacing 0.1 s, tokens 0.05 s
    pacer.share(0.25)  # a newcomer took three quarters: the call already spaced waits the new spacing
    pacer.before_call(estimated_tokens=200)
    assert clock.now == pytest.approx(0.4)
    pacer.before_call()  # 200 tokens at a quarter of 1,000/s: 0.8 s, more than the 0.4 s spacing
    assert clock.now == pytest.approx(1.2)
    pacer.share(1.0)  # the newcomer left: back to the whole ceiling from the next spacing on
    pacer.before_call()
    pacer.before_call()
    assert clock.now == pytest.approx(1.2 + 0.4 + 0.1)
    assert "share 1.000" in repr(pacer)


def test_a_share_and_the_throttle_factor_multiply():
    clock = FakeClock()
    pacer = Pacer(Pacing(min_interval_s=0.1), clock, clock.sleep)
    pacer.slow_to(0.5)
    pacer.share(0.5)
    assert pacer.spacing() == pytest.approx(0.4)
    assert pacer.calls_per_second(None) == pytest.approx(2.5)


def test_a_smaller_share_keeps_staggered_workers_spread_over_the_longer_period():
    """Four workers staggered over one 0.1 s period; at half the share the period is 0.2 s, and their calls
    spread over all of it rather than bunching in its first half."""
    clock = FakeClock()
    pacers = [Pacer(Pacing(min_interval_s=0.1), clock, clock.sleep) for _ in range(4)]
    starts = []
    for k, pacer in enumerate(pacers):
        clock.now = k * 0.025
        pacer.before_call()
        pacer.share(0.5, phase_s=k * 0.025)
        starts.append(pacer.wait_s() + clock.now)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps == pytest.approx([0.05, 0.05, 0.05])
