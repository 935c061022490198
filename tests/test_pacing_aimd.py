"""The throttle loop on simulated time: one worker's AIMD, N workers sharing a limit, quota headers."""

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
