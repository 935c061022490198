"""Service limits → max_parallelism, pacing, chunk size; and the admission check."""

import pytest

from pipeline.limits import Estimates, LimitError, Overrides, ServiceLimit, derive_plan


def test_guide_example_api_backfill():
    plan = derive_plan(ServiceLimit("api", requests_per_second=1000), Estimates(seconds_per_call=1.0))
    assert plan.max_parallelism == 500
    assert plan.pacing.min_interval_s == pytest.approx(1.0)
    assert plan.target_rate == pytest.approx(500)
    assert "1,000 req/s x safety 0.5 = 500 req/s" in plan.describe()


def test_workers_times_per_worker_rate_never_exceeds_target():
    for rps in (3, 17, 250, 999):
        for latency in (0.01, 0.3, 2.0):
            plan = derive_plan(ServiceLimit(requests_per_second=rps), Estimates(seconds_per_call=latency))
            assert plan.max_parallelism / plan.pacing.min_interval_s <= rps * 0.5 * (1 + 1e-9)


def test_connections_cap_workers_with_safety():
    plan = derive_plan(ServiceLimit("pg", safe_connections=200), Estimates(seconds_per_call=0.2))
    assert plan.max_parallelism == 100


def test_safety_scales_global_limits_but_not_politeness():
    limit = ServiceLimit("site", per_worker_requests_per_second=2, max_workers=100, safety=0.5)
    plan = derive_plan(limit, Estimates(seconds_per_call=0.1))
    assert plan.max_parallelism == 100
    assert plan.pacing.min_interval_s == pytest.approx(0.5 / 0.98)


def test_tokens_per_minute_sets_token_pacing_per_worker():
    limit = ServiceLimit("llm", tokens_per_minute=60_000, requests_per_minute=600, safety=0.5)
    plan = derive_plan(limit, Estimates(seconds_per_call=2.0, tokens_per_item=500))
    total_tokens_per_s = plan.pacing.tokens_per_second * plan.max_parallelism
    assert total_tokens_per_s == pytest.approx(60_000 * 0.5 / 60)
    assert plan.target_rate == pytest.approx(1.0)  # 30,000 tokens/min / 500 per item / 60


def test_pinned_product_over_declared_limit_is_refused_with_numbers_and_fix():
    limit = ServiceLimit("api", requests_per_second=1000)
    with pytest.raises(LimitError) as error:
        derive_plan(limit, overrides=Overrides(max_parallelism=800, per_worker_requests_per_second=2))
    message = str(error.value)
    assert "800 workers x 2 req/s each = 1,600 req/s" in message
    assert "Lower max_parallelism to 500" in message


def test_pin_between_target_and_limit_is_allowed():
    limit = ServiceLimit("api", requests_per_second=1000)
    plan = derive_plan(limit, overrides=Overrides(max_parallelism=450, per_worker_requests_per_second=2))
    assert plan.max_parallelism == 450 and plan.pacing.min_interval_s == pytest.approx(0.5)


def test_pinned_parallelism_alone_is_paced_to_the_target():
    plan = derive_plan(ServiceLimit(requests_per_second=100), overrides=Overrides(max_parallelism=50))
    assert plan.max_parallelism == 50
    assert 50 / plan.pacing.min_interval_s == pytest.approx(50)


def test_parallelism_over_safe_connections_is_refused():
    with pytest.raises(LimitError, match="exceeds the 200 safe connections"):
        derive_plan(ServiceLimit("pg", safe_connections=200), overrides=Overrides(max_parallelism=300))


def test_pinned_politeness_above_declared_is_refused():
    limit = ServiceLimit("site", per_worker_requests_per_second=2, max_workers=10)
    with pytest.raises(LimitError, match="exceeds the declared politeness"):
        derive_plan(limit, overrides=Overrides(per_worker_requests_per_second=5))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"requests_per_second": -5}, "requests_per_second"),
        ({"requests_per_second": 0}, "requests_per_second"),
        ({"safe_connections": 2.5}, "safe_connections"),
        ({"requests_per_second": 10, "safety": 0}, "safety"),
        ({"requests_per_second": 10, "safety": 1.5}, "safety"),
        ({"requests_per_second": 10, "jitter_s": -1}, "jitter_s"),
        ({}, "no limit declared"),
    ],
)
def test_invalid_declarations_name_the_field(kwargs, field):
    with pytest.raises(LimitError, match=field):
        ServiceLimit("svc", **kwargs)


def test_politeness_alone_needs_a_worker_cap():
    with pytest.raises(LimitError, match="unbounded"):
        derive_plan(ServiceLimit(per_worker_requests_per_second=1))


def test_chunks_leave_at_least_two_per_worker():
    plan = derive_plan(ServiceLimit(requests_per_second=100), Estimates(seconds_per_call=0.1), item_count=1000)
    assert plan.chunk_size * plan.max_parallelism * 2 <= 1000 + plan.max_parallelism * 2


def test_latency_sizes_workers_but_never_paces_a_connection_limit():
    plan = derive_plan(ServiceLimit("pg", safe_connections=20), Estimates(seconds_per_call=0.5))
    assert plan.max_parallelism == 10
    assert plan.pacing.min_interval_s == 0  # a fast query must not wait for a pessimistic estimate


def test_tokens_per_minute_without_a_token_estimate_says_what_to_add():
    with pytest.raises(LimitError, match=r"Add Estimates\(tokens_per_item=...\)"):
        derive_plan(ServiceLimit("llm", tokens_per_minute=60_000))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_parallelism": 0}, "max_parallelism"),
        ({"chunk_size": -3}, "chunk_size"),
        ({"per_worker_requests_per_second": -1}, "per_worker_requests_per_second"),
        ({"per_worker_requests_per_second": 0}, "per_worker_requests_per_second"),
        ({"max_retry_after_s": -1}, "max_retry_after_s"),
    ],
)
def test_bad_pins_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(LimitError, match=field):
        Overrides(**kwargs)


def test_a_pinned_worker_rate_means_fewer_workers_not_a_higher_rate():
    limit = ServiceLimit("api", requests_per_second=100, safety=1)
    plan = derive_plan(limit, Estimates(seconds_per_call=0.1), Overrides(per_worker_requests_per_second=20))
    assert plan.max_parallelism == 5 and plan.pacing.min_interval_s == pytest.approx(0.05)
    half = derive_plan(
        ServiceLimit("api", requests_per_second=100), overrides=Overrides(per_worker_requests_per_second=20)
    )
    assert half.max_parallelism / half.pacing.min_interval_s <= 50 + 1e-9  # the target, not the limit


@pytest.mark.parametrize("safety", [0.5, 0.9])
@pytest.mark.parametrize("seconds_per_call", [0.005, 0.2, 2.0])
def test_even_the_worst_phases_of_the_workers_keep_the_busiest_second_under_the_limit(safety, seconds_per_call):
    limit = ServiceLimit("api", requests_per_second=100, safety=safety)
    plan = derive_plan(limit, Estimates(seconds_per_call=seconds_per_call))
    # each worker may place one call more than its share in any second: target + workers <= limit
    assert plan.target_rate + plan.max_parallelism <= 100


def test_a_token_budget_counted_per_second_is_held_even_if_every_worker_is_early():
    limit = ServiceLimit("llm", tokens_per_minute=90_000, safety=0.9)
    plan = derive_plan(limit, Estimates(seconds_per_call=0.3, tokens_per_item=70))
    assert plan.max_parallelism * 70 + 90_000 * 0.9 / 60 <= 90_000 / 60


def test_short_runs_get_several_chunks_per_worker_but_no_chunk_shorter_than_its_drain():
    limit = ServiceLimit("api", requests_per_second=100, safety=0.5)
    quick = derive_plan(limit, Estimates(seconds_per_call=0.01), item_count=4000)
    assert 4000 / quick.chunk_size >= 8 * quick.max_parallelism, "eight chunks per worker, for balance"
    slow = derive_plan(limit, Estimates(seconds_per_call=2.0), item_count=4000)
    seconds_per_chunk = slow.chunk_size * slow.pacing.period()
    assert seconds_per_chunk >= min(50 * 2.0, Estimates().target_chunk_seconds), "the drain stays a small part"
