"""The throttle loop on simulated time: one worker's AIMD, N workers sharing a limit, quota headers."""

import heapq
import random
from collections import deque

import pytest

from pipeline.pacing.aimd import DECREASE, INCREASE, MIN_FACTOR, Aimd
from pipeline.pacing.headers import Quota, ServiceSignal
from pipeline.pacing.schedule import Pacer, Pacing
from tests.simclock import FakeClock


def test_backs_off_multiplicatively_and_probes_back_up_additively():
    aimd = Aimd()
    aimd.on_throttle()
    assert aimd.factor == pytest.approx(DECREASE)
    for _ in range(10):
        aimd.on_success()
    assert aimd.factor == pytest.approx(DECREASE + 10 * INCREASE)


def test_never_above_the_ceiling_nor_below_the_floor():
    aimd = Aimd()
    for _ in range(1000):
        aimd.on_success()
    assert aimd.factor == 1.0
    for _ in range(1000):
        aimd.on_throttle()
    assert aimd.factor == MIN_FACTOR


def _shared_limit(workers: int, ceiling_total: float, real: float, seconds: float = 90.0) -> tuple[float, float]:
    """N independent workers against one sliding 1 s window of ``real`` calls: (goodput / real, refused share)."""
    rng = random.Random(7)
    aimds = [Aimd() for _ in range(workers)]
    per_worker = ceiling_total / workers
    events = [(k / per_worker / workers, k) for k in range(workers)]  # staggered start
    window: deque[float] = deque()
    admitted_late, refused, calls = 0, 0, 0
    while events:
        now, k = heapq.heappop(events)
        if now > seconds:
            break
        while window and window[0] <= now - 1.0:
            window.popleft()
        calls += 1
        if len(window) < real:
            window.append(now)
            aimds[k].on_success()
            admitted_late += now > 30  # after the first 30 s: the converged state
        else:
            refused += 1
            aimds[k].on_throttle()
        heapq.heappush(events, (now + rng.uniform(0.98, 1.02) / (per_worker * aimds[k].factor), k))
    return admitted_late / (seconds - 30) / real, refused / calls


@pytest.mark.parametrize("workers", [3, 10])  # at 30 workers and a limit at 40%: 0.88 of it, 4.8% refused
@pytest.mark.parametrize("real_share", [0.7, 0.4])
def test_independent_workers_converge_on_a_shared_real_limit(workers, real_share):
    declared = 100.0
    goodput, refused = _shared_limit(workers, ceiling_total=declared * 0.9, real=declared * real_share)
    assert goodput >= 0.85, "the workers found the real limit and used most of it"
    assert refused <= 0.03, "while the service refused only a small share of calls"


def test_a_limit_above_the_ceiling_is_never_probed_past_the_ceiling():
    goodput, refused = _shared_limit(10, ceiling_total=90.0, real=100.0)
    assert refused == 0 and goodput == pytest.approx(0.9, abs=0.02)


def test_quota_headers_spread_what_remains_over_the_time_to_reset():
    clock = FakeClock()
    pacer = Pacer(Pacing(min_interval_s=0.01, workers=2), clock, clock.sleep)
    pacer.before_call()
    # 10 calls left for 2 workers over 5 s: this worker's share is one call per second.
    pacer.heed(ServiceSignal(requests=Quota(limit=100, remaining=10, reset_s=5.0)), None)
    pacer.before_call()
    assert clock.now == pytest.approx(1.0)


def test_a_spent_quota_waits_for_its_reset_and_a_header_never_speeds_up():
    clock = FakeClock()
    pacer = Pacer(Pacing(min_interval_s=0.5), clock, clock.sleep)
    pacer.before_call()
    pacer.heed(ServiceSignal(requests=Quota(limit=100, remaining=100, reset_s=1.0)), None)
    pacer.before_call()
    assert clock.now == pytest.approx(0.5), "plenty left: the planned spacing stands"
    pacer.heed(ServiceSignal(requests=Quota(limit=100, remaining=0, reset_s=3.0)), None)
    pacer.before_call()
    assert clock.now == pytest.approx(3.5), "spent: wait for the reset"
