"""LLM prompts against the local OpenAI-compatible server, which enforces tokens and requests per window."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.backfill import AuthenticationFailed
from pipeline.items import JsonlPrompts
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices import ServiceHandle, start_llm
from pipeline.localservices.llm import prompt_tokens as server_prompt_tokens
from pipeline.spec import BackfillSpec, Service
from pipeline.work import Item
from pipeline.workloads import LlmWork, WorkloadConfigError, llm_work
from pipeline.workloads.llm import prompt_tokens

KEY = "sk-local-7d1e0c"
WINDOW_S = 2.0


def write_prompts(folder: Path, count: int, words: int) -> JsonlPrompts:
    path = folder / "prompts.jsonl"
    lines = [json.dumps({"id": f"p{n:03d}", "prompt": " ".join(["budget"] * (words + n % 7))}) for n in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return JsonlPrompts(str(path))


def per_minute(per_window: float) -> float:
    """The server's budgets are per WINDOW_S; the declared limit is per minute."""
    return per_window * 60 / WINDOW_S


def budget_use(stats: dict, arrivals: list[dict], key: str, per_window: float) -> float:
    """Mean rate the server admitted over the run, as a fraction of its budget rate."""
    accepted = sorted((a["t"], a["tokens"] if key == "tokens" else 1) for a in arrivals if a["status"] == 200)
    span = accepted[-1][0] - accepted[0][0]
    spent = sum(weight for _, weight in accepted[:-1])  # what was spent between the first and the last start
    return spent / span / (per_window / WINDOW_S)


@pytest.mark.parametrize(
    ("bound", "tpm", "rpm", "words", "count", "max_tokens"),
    [
        # long prompts: the token budget binds
        ("tokens", 1_500, 40, 40, 24, 64),
        # short prompts: the request budget binds, while each estimate (max_tokens=200 against the
        # 16 the server charges) is 10x too high: paying it back must not shrink the request spacing
        ("requests", 1_500, 20, 2, 30, 200),
    ],
)
def test_no_window_over_either_budget_and_the_budget_is_used(
    runner, tmp_path: Path, bound: str, tpm: int, rpm: int, words: int, count: int, max_tokens: int
) -> None:
    limit = ServiceLimit(name="llm", tokens_per_minute=per_minute(tpm), requests_per_minute=per_minute(rpm), safety=0.8)
    prompts = write_prompts(tmp_path, count, words)
    tokens_per_item = (words * 7 + 20) / 4 + 4 + 16  # the average prompt, its message overhead, the answer
    with start_llm(tpm=tpm, rpm=rpm, window_s=WINDOW_S, key=KEY, completion_tokens=16) as server:
        backfill = BackfillSpec(
            name=f"llm_{bound}",
            service="llm",
            items=prompts,
            work=llm_work("local-llm", max_tokens=max_tokens),  # the estimate is an upper bound; usage says 16
            estimates=Estimates(seconds_per_call=0.2, tokens_per_item=tokens_per_item),
        ).build(Service(limit, f"{server.url}/v1", KEY))
        result = runner.run(backfill)
        stats, arrivals = server.stats(), server.arrivals()

    assert result.counts["ok"] == count, result.report.errors
    assert stats["by_status"] == {"200": count}, "never throttled: the pacing kept under both budgets"
    assert stats["busiest_window_tokens"] <= tpm and stats["busiest_window_requests"] <= rpm
    used = budget_use(stats, arrivals, bound, tpm if bound == "tokens" else rpm)
    print(f"{bound}-bound: {used:.0%} of the {bound} budget used; {result.execution.max_parallelism} workers")
    assert used >= 0.6, f"only {used:.0%} of the {bound} budget used"
    rows = runner.latest(backfill)
    payload = json.loads(rows["p000"]["payload"])
    assert payload["content"].startswith("[local-llm] budget") and payload["usage"]["completion_tokens"] == 16
    assert rows["p000"]["tokens"] == payload["usage"]["total_tokens"], "the row records what the server charged"


def test_fallback_token_rule_is_the_servers_rule() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 4001}]
    assert prompt_tokens(messages) == server_prompt_tokens(messages)
    work = LlmWork(base_url="http://127.0.0.1:1/v1", model="m", max_tokens=50, system_prompt="Be brief.")
    item = Item("p1", json.dumps({"id": "p1", "prompt": "x" * 4001}))
    assert work.cost(item) == server_prompt_tokens(work.messages(item)) + 50
    assert work.usage({"usage": {"total_tokens": 77}}) == 77


def test_throttling_and_bad_answers(runner, tmp_path: Path) -> None:
    """A prompt bigger than the whole budget is refused for good; 429s are waited out per Retry-After."""
    prompts = tmp_path / "p.jsonl"
    records = [{"id": "huge", "prompt": "x" * 1700}, {"id": "no-prompt", "text": "?"}]
    records += [{"id": f"q{n}", "prompt": "hi"} for n in range(8)]  # more than the 2 per second it admits
    prompts.write_text("\n".join(json.dumps(r) for r in records))
    with start_llm(tpm=400, rpm=2, window_s=1, completion_tokens=8) as server:
        limit = ServiceLimit(name="llm", tokens_per_minute=10**6, requests_per_minute=10**4)  # declared too high
        backfill = BackfillSpec(
            name="llm_faults",
            service="llm",
            items=JsonlPrompts(str(prompts)),
            work=llm_work("m", max_tokens=8),
            overrides=Overrides(max_throttle_retries=8),  # every worker retries at once: leave room to get in
        ).build(Service(limit, f"{server.url}/v1"))
        runner.run(backfill)
        statuses = server.stats()["by_status"]
    rows = runner.latest(backfill)
    assert (rows["huge"]["status"], rows["huge"]["retryable"]) == ("http_400", False)
    assert (rows["no-prompt"]["status"], rows["no-prompt"]["retryable"]) == ("bad_item", False)
    assert all(rows[f"q{n}"]["ok"] for n in range(8)), "429 Retry-After honoured until admitted"
    assert int(statuses.get("429", 0)) >= 1, "the server did throttle the over-declared run"


def test_wrong_key_stops_the_backfill_after_the_first_calls(runner, tmp_path: Path) -> None:
    limit = ServiceLimit(name="llm", tokens_per_minute=60_000, requests_per_minute=6_000)
    with start_llm(key=KEY) as server:
        backfill = BackfillSpec(
            name="llm_auth",
            service="llm",
            items=write_prompts(tmp_path, 12, 3),
            work=llm_work("m"),
            overrides=Overrides(chunk_size=12),
        ).build(Service(limit, f"{server.url}/v1", "sk-wrong"))
        with pytest.raises(AuthenticationFailed):
            runner.run(backfill)
        assert server.stats()["by_status"] == {"401": 5}, "fail fast: 5 refused calls, not 12"


@pytest.mark.parametrize(
    ("options", "url", "limit", "message"),
    [
        ({"model": ""}, "/v1", {"tokens_per_minute": 1000}, "LlmWork.model: is empty"),
        ({"model": "m", "max_tokens": 0}, "/v1", {"tokens_per_minute": 1000}, "LlmWork.max_tokens"),
        ({"model": "m", "temperature": 3}, "/v1", {"tokens_per_minute": 1000}, "LlmWork.temperature"),
        ({"model": "m"}, None, {"tokens_per_minute": 1000}, "LlmWork.base_url: .* is not an absolute http"),
        ({"model": "m"}, "/v1", {"requests_per_minute": 10}, "needs tokens_per_minute declared"),
    ],
)
def test_bad_declarations_are_refused_before_any_call(
    llm: ServiceHandle, tmp_path: Path, options: dict, url: str | None, limit: dict, message: str
) -> None:
    service = Service(ServiceLimit(name="llm", **limit), llm.url + url if url else "localhost:8000/v1")
    model = options.pop("model")
    with pytest.raises(WorkloadConfigError, match=message):
        BackfillSpec(
            name="llm_bad", service="llm", items=write_prompts(tmp_path, 1, 1), work=llm_work(model, **options)
        ).build(service)
    assert llm.stats()["count"] == 0


def test_two_backfills_share_one_token_budget(runner, tmp_path: Path) -> None:
    """Two prompt backfills of one organisation, the second started while the first runs: together they stay
    under the token budget the server enforces, without one refusal (each alone would aim at all of it)."""
    tpm, words, count = 1_500, 40, 24
    limit = ServiceLimit(name="llm", tokens_per_minute=per_minute(tpm), requests_per_minute=per_minute(200), safety=0.8)
    tokens_per_item = (words * 7 + 20) / 4 + 4 + 16
    results = {}
    with start_llm(tpm=tpm, rpm=200, window_s=WINDOW_S, key=KEY, completion_tokens=16) as server:

        def run(name: str, folder: Path) -> None:
            folder.mkdir()
            backfill = BackfillSpec(
                name=name,
                service="llm",
                items=write_prompts(folder, count, words),
                work=llm_work("local-llm", max_tokens=64),
                estimates=Estimates(seconds_per_call=0.2, tokens_per_item=tokens_per_item),
            ).build(Service(limit, f"{server.url}/v1", KEY))
            results[name] = runner.run(backfill)

        first = threading.Thread(target=run, args=("org_nightly", tmp_path / "a"))
        first.start()
        time.sleep(1.0)
        run("org_adhoc", tmp_path / "b")
        first.join()
        stats = server.stats()

    assert [results[name].counts["ok"] for name in ("org_nightly", "org_adhoc")] == [count, count]
    assert stats["by_status"] == {"200": 2 * count}, "never throttled: the two shared the budget"
    assert stats["busiest_window_tokens"] <= tpm
    assert any(change.leases == 2 for change in results["org_nightly"].shares), "the first saw the second arrive"
