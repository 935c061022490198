"""The chunk loop's policies, one outcome at a time, on simulated time (no clock, no service)."""

from __future__ import annotations

import heapq
import random
from collections import deque

import pytest

from pipeline.outcomes import Failure
from pipeline.pacing.aimd import DECREASE
from pipeline.pacing.schedule import Pacing
from pipeline.policies.credentials import CredentialGuard
from pipeline.policies.throttle import DEFAULT_WAIT_S, END_OF_CHUNK_WAIT_S, ISOLATED_AFTER, ThrottlePolicy
from pipeline.refusals import ITEM, SERVICE, Meaning

PACING = Pacing(max_throttle_retries=2, max_retry_after_s=10.0)


def throttle(wait: float | None = 1.0, scope: str | None = None, meaning: Meaning = Meaning.THROTTLED) -> Failure:
    return Failure("http_429", True, "throttled", 429, wait, meaning, scope)


# -- whose fault is a throttle -----------------------------------------------------------------


def test_a_throttle_among_successes_is_about_its_item_the_pace_stays():
    policy = _after_clean_calls()
    step = policy.on_throttle("hot", 1, throttle(), now=10.0)
    assert policy.factor == 1.0
    assert (step.defer_until, step.hold_s) == (11.0, 0.0), "set aside for its Retry-After; the worker goes on"


def test_throttles_a_few_calls_apart_are_about_the_pace():
    policy = ThrottlePolicy(PACING)
    policy.on_throttle("a", 1, throttle(), now=0.0)
    assert policy.factor == pytest.approx(DECREASE), "before any call went through, nothing speaks for the pace"
    policy.on_success(None, first_try=True, now=0.1)
    policy.on_throttle("b", 1, throttle(), now=0.5)
    assert policy.factor == pytest.approx(DECREASE**2, rel=0.01), "a second throttle two calls later: slower still"


def test_one_cut_per_refusal_episode():
    policy = ThrottlePolicy(PACING)
    for n in range(5):  # the calls in flight when the service started refusing all come back refused
        policy.on_throttle(f"item{n}", 1, throttle(wait=2.0, scope=SERVICE), now=0.1 * n)
    assert policy.factor == pytest.approx(DECREASE), "five refusals of one episode cut once, not five times"
    policy.on_throttle("later", 1, throttle(wait=2.0, scope=SERVICE), now=2.5)
    assert policy.factor == pytest.approx(DECREASE**2), "after the wait it asked for, a new refusal cuts again"


def test_the_service_saying_its_budget_is_spent_holds_the_worker():
    policy = ThrottlePolicy(PACING)
    step = policy.on_throttle("a", 1, throttle(wait=30.0, meaning=Meaning.QUOTA_SPENT, scope=SERVICE), now=0.0)
    assert step.hold_s == 10.0, "the whole service waits, capped by max_retry_after_s"
    assert policy.factor == pytest.approx(DECREASE)


def test_a_refusal_the_service_says_is_about_one_item_never_slows_or_holds():
    policy = ThrottlePolicy(PACING)
    policy.on_throttle("locked", 1, throttle(scope=ITEM), now=0.0)
    step = policy.on_throttle("locked-too", 1, throttle(scope=ITEM), now=0.1)
    assert (policy.factor, step.hold_s) == (1.0, 0.0), "two in a row, but Stripe said each was about its object"


def test_two_throttles_in_a_row_hold_the_worker():
    policy = ThrottlePolicy(PACING)
    assert policy.on_throttle("a", 1, throttle(wait=2.0), now=0.0).hold_s == 0.0
    assert policy.on_throttle("b", 1, throttle(wait=2.0), now=0.1).hold_s == 2.0
    policy.on_success(None, first_try=True, now=0.0)
    assert policy.on_throttle("c", 1, throttle(wait=2.0), now=3.0).hold_s == 0.0, "a success broke the run"


def test_an_item_throttled_again_on_its_retry_was_hot_the_pace_stays():
    policy = _after_clean_calls()
    policy.on_throttle("hot", 1, throttle(), now=0.0)
    policy.on_success(None, first_try=True, now=0.5)
    policy.on_throttle("hot", 2, throttle(), now=1.0)
    assert policy.factor == 1.0


def _after_clean_calls(now: float = 0.0) -> ThrottlePolicy:
    policy = ThrottlePolicy(PACING)
    for _ in range(ISOLATED_AFTER):
        policy.on_success(None, first_try=True, now=now)
    return policy


def test_an_isolated_throttle_whose_item_then_goes_through_was_about_the_pace():
    policy = _after_clean_calls()
    policy.on_throttle("doubtful", 1, throttle(), now=0.1)
    assert policy.factor == 1.0, "isolated: the benefit of the doubt"
    policy.on_success("doubtful", first_try=False, now=1.1)
    assert policy.factor == pytest.approx(DECREASE), "its retry went through: the item was fine, the pace was not"


def test_a_second_throttle_while_a_doubtful_one_waits_is_the_pace():
    policy = _after_clean_calls()
    policy.on_throttle("doubtful", 1, throttle(), now=0.1)
    for _ in range(ISOLATED_AFTER):
        policy.on_success(None, first_try=True, now=0.2)
    policy.on_throttle("another", 1, throttle(), now=0.3)
    assert policy.factor == pytest.approx(DECREASE), "two throttles within one wait: cut at once"
    policy.on_success("doubtful", first_try=False, now=1.1)
    assert policy.factor > DECREASE, "and only once: the doubtful one's retry adds no second cut"


def test_a_hot_item_first_in_a_fresh_worker_costs_the_pace_only_until_its_retry_is_refused():
    policy = ThrottlePolicy(PACING)
    policy.on_throttle("hot", 1, throttle(), now=0.0)
    assert policy.factor == pytest.approx(DECREASE), "no call went through yet: nothing speaks for the pace"
    for n in range(ISOLATED_AFTER):
        policy.on_success(f"fine{n}", first_try=True, now=0.01 * n)
    before_retry = policy.factor
    policy.on_throttle("hot", 2, throttle(), now=1.0)
    undone = min(1.0, before_retry / DECREASE)
    assert before_retry < 1.0 and policy.factor == pytest.approx(undone), "refused again among clean calls: hot"
    policy.on_throttle("hot", 3, throttle(), now=2.0)
    assert policy.factor == pytest.approx(undone), "undone once, not again"


def test_a_cut_whose_item_is_refused_again_among_other_throttles_stays():
    policy = ThrottlePolicy(PACING)
    policy.on_throttle("a", 1, throttle(), now=0.0)
    policy.on_success("b", first_try=True, now=0.1)
    policy.on_throttle("a", 2, throttle(), now=1.0)
    assert policy.factor == pytest.approx(DECREASE, abs=0.01), "too few calls went through to call it hot: the pace"


def test_a_throttle_without_a_wait_waits_the_default_and_tries_run_out():
    policy = ThrottlePolicy(PACING)
    assert policy.on_throttle("a", 1, throttle(wait=None), now=0.0).defer_until == DEFAULT_WAIT_S
    assert policy.on_throttle("a", 3, throttle(), now=5.0).defer_until is None, "3rd try > 2 retries: record it"


def test_the_pace_probes_back_up_after_a_cut():
    policy = ThrottlePolicy(PACING, factor=0.5)
    assert policy.on_success(None, first_try=True, now=0.0) is True and policy.factor > 0.5
    assert ThrottlePolicy(PACING).on_success(None, first_try=True, now=0.0) is False, "at the ceiling nothing moves"


# -- many workers against one service, on simulated time --------------------------------------


class _Item:
    __slots__ = ("hot", "tries")

    def __init__(self, hot: bool):
        self.hot, self.tries = hot, 0


def _simulate(workers: int, real: float, hot_share: float = 0.0, seconds: float = 120.0) -> tuple[float, float]:
    """Workers with a ceiling of 90 calls/s in all against a sliding 1 s window of ``real`` calls.

    Returns (goodput after 30 s / what the service allows, refused share of calls after 30 s); hot
    items are refused always and do not count as refused by the limit.
    """
    rng = random.Random(7)
    ceiling = 90.0 / workers
    policies = [ThrottlePolicy(Pacing(max_throttle_retries=3, max_retry_after_s=1.0)) for _ in range(workers)]
    events = [(rng.uniform(0, 1 / ceiling), k) for k in range(workers)]
    heapq.heapify(events)
    window: deque[float] = deque()
    admitted = refused = calls = 0
    while events:
        now, k = heapq.heappop(events)
        if now > seconds:
            break
        while window and window[0] <= now - 1.0:
            window.popleft()
        item = policies[k].due(now) or _Item(rng.random() < hot_share)
        item.tries += 1
        late = now > 30
        calls += late
        if len(window) < real and not item.hot:
            window.append(now)
            policies[k].on_success(item, item.tries == 1, now)
            admitted += late
        else:
            refused += late and not item.hot
            policies[k].on_throttle(item, item.tries, throttle(), now)
        heapq.heappush(events, (now + rng.uniform(0.98, 1.02) / (ceiling * policies[k].factor), k))
    return admitted / (seconds - 30) / min(real, 90.0), refused / calls


@pytest.mark.parametrize(("workers", "real"), [(3, 70.0), (10, 70.0), (3, 40.0), (10, 40.0)])
def test_independent_workers_find_a_real_limit_below_their_ceiling(workers: int, real: float):
    goodput, refused = _simulate(workers, real)
    assert goodput >= 0.9, "most of what the service allows is used"
    assert refused <= 0.025, "with few calls refused once converged"


def test_a_limit_above_the_ceiling_is_never_probed_past_the_ceiling():
    goodput, refused = _simulate(10, real=100.0)
    assert refused == 0 and goodput == pytest.approx(1.0, abs=0.02), "all of the 90 calls/s ceiling, no more"


def test_hot_items_cost_only_their_own_calls():
    goodput, _ = _simulate(10, 1000.0, hot_share=0.005)
    assert goodput >= 0.97, "0.5% of items refused forever: 4 tries each (2%), and no pace cut"


# -- the items set aside -----------------------------------------------------------------------


def test_items_come_back_in_the_order_they_are_due():
    policy = ThrottlePolicy(PACING)
    policy.on_throttle("late", 1, throttle(wait=3.0, scope=ITEM), now=0.0)
    policy.on_throttle("early", 1, throttle(wait=1.0, scope=ITEM), now=0.0)
    assert policy.next_due() == 1.0 and policy.due(0.5) is None
    assert policy.due(1.0) == "early" and policy.due(2.0) is None and policy.due(3.0) == "late"
    assert not policy and policy.next_due() is None


def test_at_a_chunks_end_long_waits_go_to_the_retry_round_short_ones_are_sat_out():
    policy = ThrottlePolicy(PACING)
    for _ in range(18):  # two throttles in twenty first tries: rare, about their items
        policy.on_success(None, first_try=True, now=0.0)
    policy.on_throttle("soon", 1, throttle(wait=END_OF_CHUNK_WAIT_S / 2, scope=ITEM), now=0.0)
    policy.on_throttle("later", 1, throttle(wait=5.0, scope=ITEM), now=0.0)
    assert policy.leave_to_retry_round(now=0.0) == ["later"]
    assert len(policy) == 1 and policy.due(END_OF_CHUNK_WAIT_S) == "soon"


def test_at_a_chunks_end_a_throttling_service_is_waited_for_not_handed_to_the_round():
    policy = ThrottlePolicy(PACING)
    policy.on_success(None, first_try=True, now=0.0)
    policy.on_throttle("a", 1, throttle(wait=5.0), now=0.0)  # one throttle in two first tries: the service
    assert policy.leave_to_retry_round(now=0.0) == [] and policy.next_due() == 5.0


# -- the credential guard ----------------------------------------------------------------------


def test_the_guard_stops_after_threshold_refusals_when_every_call_was_refused():
    guard = CredentialGuard(threshold=3)
    assert [guard.on_outcome(refused=True) for _ in range(3)] == [False, False, True]


def test_one_odd_refusal_among_successes_is_not_bad_credentials():
    guard = CredentialGuard(threshold=2)
    guard.on_outcome(refused=False, ok=True)
    assert not any(guard.on_outcome(refused=True) for _ in range(10))


def test_a_failure_of_another_kind_means_not_every_call_was_refused():
    guard = CredentialGuard(threshold=2)
    guard.on_outcome(refused=False)  # a 500: not a success, but not a refused key either
    assert not any(guard.on_outcome(refused=True) for _ in range(5))


def test_once_answered_and_until_proven_the_guard_caps_calls_in_flight_at_the_refusals_it_still_allows():
    guard = CredentialGuard(threshold=5)
    assert guard.slots(30) == 30, "before any answer the pace and the latency decide (a slow service's start-up)"
    guard.on_outcome(refused=True)
    assert guard.slots(30) == 4, "refused once: no more out than the four refusals the check still allows"
    guard.on_outcome(refused=True)
    assert guard.slots(30) == 3
    guard.on_outcome(refused=False, ok=True)
    assert guard.slots(30) == 30
    assert CredentialGuard(threshold=5, proven=True).slots(30) == 30, "a worker proven by an earlier chunk"
