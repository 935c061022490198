"""The share arithmetic (``pipeline.shares``): how a budget is split, and when a worker may use its part.

Pure functions on explicit times: no store, no clock, no thread.
"""

import itertools
import random
import re

import pytest

from pipeline.errors import ConfigError
from pipeline.shares import Lease, LeaseTiming, ShareView, allocate, fraction

TIMING = LeaseTiming()
BUDGET = {"requests_per_second": 100.0}


def lease(lease_id: str, weight: float = 1.0, min_share: float = 0.0, **times) -> Lease:
    stamps = {"written_at": 0.0, "expires_at": 1e9, "active_from": 0.0, **times}
    budget = stamps.pop("budget", BUDGET)
    return Lease(lease_id, "api", lease_id, 0, "run", weight, min_share, budget, **stamps)


# -- allocate -------------------------------------------------------------------------------------------


def test_equal_weights_split_the_budget_evenly():
    assert allocate([lease("a"), lease("b")]) == {"a": 0.5, "b": 0.5}


def test_weights_three_to_one():
    shares = allocate([lease("nightly", 3), lease("adhoc", 1)])
    assert shares == pytest.approx({"nightly": 0.75, "adhoc": 0.25})


def test_a_floor_is_kept_and_the_rest_is_shared_by_weight():
    shares = allocate([lease("small", 1, min_share=0.4), lease("big", 9)])
    assert shares == pytest.approx({"small": 0.4, "big": 0.6})


def test_a_floor_below_the_weighted_share_changes_nothing():
    assert allocate([lease("a", 1, min_share=0.1), lease("b", 1)]) == pytest.approx({"a": 0.5, "b": 0.5})


def test_floors_over_the_whole_budget_are_scaled_down_together():
    shares = allocate([lease("a", min_share=0.6), lease("b", min_share=0.9), lease("c")])
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["a"] == pytest.approx(0.4) and shares["b"] == pytest.approx(0.6) and shares["c"] == 0.0


def test_alone_a_lease_has_the_whole_budget():
    assert allocate([lease("a", 0.1)]) == {"a": 1.0}
    assert allocate([]) == {}


def test_a_lease_added_never_gives_another_lease_more():
    """The property the protocol rests on: views that count extra leases only ever use less."""
    rng = random.Random(17)
    for _ in range(3000):
        leases = [lease(f"l{i}", rng.choice([0.5, 1, 2, 3, 10]), rng.choice([0, 0, 0.1, 0.3, 0.6])) for i in range(6)]
        for size in range(1, 6):
            before = allocate(leases[:size])
            after = allocate(leases[: size + 1])
            assert sum(after.values()) <= 1 + 1e-9
            for lease_id, share in before.items():
                assert after[lease_id] <= share + 1e-9, (leases[: size + 1], before, after)


def test_every_order_of_the_same_leases_gives_the_same_shares():
    leases = [lease("a", 3, 0.1), lease("b", 1, 0.3), lease("c", 2)]
    results = [allocate(list(order)) for order in itertools.permutations(leases)]
    assert all(result == pytest.approx(results[0]) for result in results)


# -- fraction ---------------------------------------------------------------------------------------------


def view(*leases: Lease, read_at: float = 100.0) -> ShareView:
    return ShareView(tuple(leases), read_at)


def test_two_live_leases_of_equal_weight_use_half_each():
    allowed = fraction(view(lease("a"), lease("b")), "a", BUDGET, 100.2, TIMING)
    assert allowed.value == 0.5


def test_no_view_or_a_stale_one_means_wait():
    assert fraction(None, "a", BUDGET, 100.0, TIMING).value == 0
    stale = fraction(view(lease("a")), "a", BUDGET, 100.0 + TIMING.stale_s + 0.01, TIMING)
    assert stale.value == 0 and "last read" in stale.why


def test_a_view_without_the_own_lease_means_wait():
    assert fraction(view(lease("b")), "a", BUDGET, 100.0, TIMING).value == 0


def test_a_newcomer_waits_until_its_active_from_plus_the_skew():
    newcomer = lease("a", active_from=101.0)
    early = fraction(view(newcomer, lease("b")), "a", BUDGET, 101.0 + TIMING.skew_s - 0.01, TIMING)
    assert early.value == 0 and early.until == pytest.approx(101.0 + TIMING.skew_s)
    on_time = fraction(view(newcomer, lease("b"), read_at=101.0), "a", BUDGET, 101.0 + TIMING.skew_s, TIMING)
    assert on_time.value == 0.5


def test_a_lease_about_to_lapse_by_its_own_clock_stops_its_workers():
    own = lease("a", expires_at=110.0)
    assert fraction(view(own, read_at=109.0), "a", BUDGET, 110.0 - TIMING.skew_s - 0.01, TIMING).value == 1
    assert fraction(view(own, read_at=109.0), "a", BUDGET, 110.0 - TIMING.skew_s, TIMING).value == 0


def test_another_lease_counts_until_its_expiry_plus_the_skew():
    other = lease("b", expires_at=100.0)
    counted = fraction(view(lease("a"), other), "a", BUDGET, 100.0 + TIMING.skew_s - 0.01, TIMING)
    assert counted.value == 0.5
    gone = fraction(view(lease("a"), other), "a", BUDGET, 100.0 + TIMING.skew_s, TIMING)
    assert gone.value == 1.0


def test_the_smallest_budget_any_live_lease_declares_holds_for_all():
    other = lease("b", budget={"requests_per_second": 50.0})
    assert fraction(view(lease("a"), other), "a", BUDGET, 100.0, TIMING).value == pytest.approx(0.25)
    tokens_only = lease("c", budget={"tokens_per_minute": 1000.0})
    assert fraction(view(lease("a"), tokens_only), "a", BUDGET, 100.0, TIMING).value == 0.5


# -- timing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"reread_s": 0}, "reread_s must be a positive number"),
        ({"skew_s": float("nan")}, "skew_s must be a positive number"),
        ({"reread_s": 2.0, "stale_s": 1.0}, "stale_s (1) must be at least reread_s (2)"),
        ({"ttl_s": 3.0}, "ttl_s (3) must exceed renew_s + 2 x skew_s (3)"),
    ],
)
def test_lease_timing_that_cannot_work_is_refused_with_the_field(fields, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        LeaseTiming(**fields)


def test_the_stated_bounds_follow_from_the_timing():
    assert TIMING.newcomer_wait_s == TIMING.stale_s + TIMING.skew_s
    assert TIMING.regrow_after_crash_s == TIMING.ttl_s + TIMING.skew_s + TIMING.stale_s
