"""Each feedback loop against a real server, judged by what the server saw.

The bounds are generous on purpose (benchmarks measure the exact numbers): each
test fails by a wide margin under the open-loop runner it replaces.
"""

import httpx
import pytest

from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import JsonlPrompts, Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices import start_http_api, start_llm
from pipeline.manifests import ManifestStore
from pipeline.work import FunctionWork
from pipeline.workloads.llm import LlmWork


def _api_work(url: str, close_on: str = "") -> FunctionWork:
    def connect():
        return httpx.Client(base_url=url, timeout=10)

    def call(client, item):
        if item.id == close_on:
            client.close()  # the pool dies under the chunk, as when a proxy drops every connection
        response = client.get(f"/items/{item.id}")
        response.raise_for_status()
        return response.json()

    return FunctionWork(connect, call)


def _run(tmp_path, items, work, limit, **options):
    backfill = Backfill("loop", Values.of(items), work, limit, **options)
    store = ManifestStore(str(tmp_path))
    plan_backfill(backfill, store)
    result = run_attempt(backfill, store, LocalExecutor())
    with Ledger(store) as ledger:
        rows = {r["item_id"]: r for r in ledger.query("SELECT * FROM latest").to_pylist()}
    return result, rows


def _server_rate(arrivals: list[dict]) -> float:
    times = sorted(a["t"] for a in arrivals)
    return (len(times) - 1) / (times[-1] - times[0])


def test_a_slow_service_still_gets_its_target_rate_without_a_latency_estimate(tmp_path):
    """300 ms per call, planned for the default 50 ms: the open-loop runner reached 0.15 of target."""
    target = 40.0
    with start_http_api(rps=target * 2, latency_ms=300) as api:
        limit = ServiceLimit("api", requests_per_second=target * 2, safety=0.5)
        result, rows = _run(
            tmp_path, [str(i) for i in range(240)], _api_work(api.url), limit, overrides=Overrides(chunk_size=120)
        )
        arrivals, stats = api.arrivals(), api.stats()
    assert len(rows) == 240 and all(r["ok"] for r in rows.values())
    # One call in flight per worker would reach 0.15 of the target; the benchmarks measure the exact number.
    assert _server_rate(arrivals) >= 0.6 * target, "in-flight calls made up for the latency"
    assert stats["busiest_1s"] <= target * 2, "and the limit held on the server"
    assert result.report.in_flight_per_worker > 2, "the report says how many calls each worker kept in flight"


def test_always_throttled_items_cost_only_their_own_calls(tmp_path):
    """Two items the server always throttles (Retry-After: 1) among 198 that go through: 1 %, one per chunk.

    At 1 % the throttle policy reads them as hot items, not as the pace: they cost their own six calls
    (0.96 of the target, measured). At 2 % it cuts the pace too (0.76 measured): that is the policy's
    threshold, which ``tests/test_policies.py`` and the benchmarks measure, not this test's subject.
    """
    target = 40.0
    items = [str(i) for i in range(198)]
    for n, position in enumerate((50, 150)):  # one in each chunk, as hot keys would be spread
        items.insert(position, f"throttle-{n}")
    with start_http_api(rps=target * 2) as api:
        limit = ServiceLimit("api", requests_per_second=target * 2, safety=0.5)
        result, rows = _run(
            tmp_path,
            items,
            _api_work(api.url),
            limit,
            estimates=Estimates(seconds_per_call=0.01),
            overrides=Overrides(chunk_size=100, max_throttle_retries=2, max_retry_after_s=0.5),
        )
        arrivals = api.arrivals()
    throttled = [rows[f"throttle-{i}"] for i in range(2)]
    assert all((r["ok"], r["retryable"], r["tries"]) == (False, True, 3) for r in throttled), "failed-retryable"
    assert sum(r["ok"] for r in rows.values()) == 198
    # Holding the worker for each wait would cost 2 items x 2 waits x 0.5 s: 5 / 7 = 0.71 of the target
    # for this 5 s run. The floor sits between that and the 0.96 measured. (A chunk still waits at its
    # end for a throttled item's last try.)
    assert _server_rate([a for a in arrivals if a["status"] == 200]) >= 0.8 * target


def test_a_closed_client_is_replaced_and_only_the_call_at_the_break_fails(tmp_path):
    with start_http_api(rps=400) as api:
        limit = ServiceLimit("api", requests_per_second=400, safety=0.5)
        items = [str(i) for i in range(60)]
        _, rows = _run(tmp_path, items, _api_work(api.url, close_on="20"), limit, overrides=Overrides(chunk_size=60))
    failed = sorted(item for item, row in rows.items() if not row["ok"])
    assert failed == ["20"], "one call was on the dead client; the 39 after it ran on a new one"
    assert rows["20"]["retryable"]


@pytest.mark.parametrize("estimate_ratio", [0.5, 2.0])
def test_a_wrong_token_estimate_still_spends_the_budget(tmp_path, estimate_ratio):
    # 150 calls of 120 tokens at a 3,000 tokens/s target: about 6 s. The loop learns per call, so the
    # rate sets only the run's length (at 1,000 tokens/s it took 18 s and reached the same share).
    tokens_per_s, window_s = 6000.0, 2.0
    prompt = "x" * 400  # 104 prompt tokens + 16 completion = 120 per call (the server's rule)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": {n}, "prompt": "{prompt}"}}\n' for n in range(150)))
    limit = ServiceLimit("llm", tokens_per_minute=tokens_per_s * 60, safety=0.5)
    with start_llm(tpm=tokens_per_s * window_s, window_s=window_s, completion_tokens=16) as llm:
        work = LlmWork(base_url=f"{llm.url}/v1", model="local", max_tokens=16)
        backfill = Backfill(
            "tokens",
            JsonlPrompts(str(prompts)),
            work,
            limit,
            Estimates(seconds_per_call=0.02, tokens_per_item=120 * estimate_ratio),
        )
        store = ManifestStore(str(tmp_path / "m"))
        plan_backfill(backfill, store)
        run_attempt(backfill, store, LocalExecutor())
        arrivals, stats = llm.arrivals(), llm.stats()
    accepted = sorted((a["t"], a["tokens"]) for a in arrivals if a["status"] == 200)
    spent = sum(tokens for _, tokens in accepted[:-1])
    achieved = spent / (accepted[-1][0] - accepted[0][0])
    assert len(accepted) == 150 and stats["by_status"].get("429", 0) == 0
    assert achieved >= 0.85 * tokens_per_s * 0.5, "the token pace followed what calls cost, not the estimate"
