"""The bundled services speak providers' "slow down" dialects exactly, driven with plain httpx (no engine).

These servers judge the engine's refusal classifier, so what they say must be
what GitHub, Discord, Shopify and OpenAI say, to the header, and they must
refuse exactly when their quota, bucket or credit says. Times are the
server's own (``/_arrivals``); nothing asserts on sub-second client timing.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import httpx
import pytest

from pipeline.localservices import ServiceHandle, _common, start_http_api, start_llm
from pipeline.localservices._common import LeakyBucket, leaky_bucket_peak
from pipeline.localservices.http_api import DISCORD_BUCKET, GITHUB_DOCS, GITHUB_MESSAGE, SHOPIFY_ERRORS
from pipeline.localservices.http_api import main as http_api_main
from pipeline.localservices.llm import OUT_OF_CREDIT

CHAT = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}  # 5 prompt + 16 completion tokens
CHAT_TOKENS = 21


def calls(api: ServiceHandle, count: int, pause_s: float = 0.0) -> list[httpx.Response]:
    """``count`` sequential GETs on one connection, so arrival i in the log is response i."""
    with httpx.Client(base_url=api.url, trust_env=False) as client:
        responses = []
        for n in range(count):
            responses.append(client.get(f"/items/n{n}"))
            time.sleep(pause_s)
        return responses


def arrival_times(api: ServiceHandle) -> list[float]:
    return [a["t"] for a in api.arrivals()]


# --------------------------------------------------------------------------
# GitHub: X-RateLimit-* with an epoch reset, 403 once spent
# --------------------------------------------------------------------------


def test_github_states_its_quota_and_answers_403_without_retry_after_once_spent() -> None:
    with start_http_api(dialect="github", quota=3, quota_window_s=60) as api:
        responses = calls(api, 5)
        times, stats = arrival_times(api), api.stats()

    assert [r.status_code for r in responses] == [200, 200, 200, 403, 403]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0", "0"]
    assert [r.headers["X-RateLimit-Used"] for r in responses] == ["1", "2", "3", "3", "3"]
    assert {r.headers["X-RateLimit-Limit"] for r in responses} == {"3"}
    assert {r.headers["X-RateLimit-Resource"] for r in responses} == {"core"}
    resets = {r.headers["X-RateLimit-Reset"] for r in responses}
    assert len(resets) == 1 and resets.pop().isdigit(), "one window, its end in integer epoch seconds"
    reset = int(responses[0].headers["X-RateLimit-Reset"])
    assert all(reset - 60 <= t < reset for t in times), "every arrival lies in the window the header ends"
    refused = responses[3]
    assert "Retry-After" not in refused.headers
    assert refused.json() == {"message": GITHUB_MESSAGE, "documentation_url": GITHUB_DOCS}
    assert refused.json()["message"].startswith("API rate limit exceeded for user ID 1.")
    assert GITHUB_DOCS == "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
    assert not any(name.lower().startswith(("x-ratelimit-limit-", "ratelimit")) for name in refused.headers)
    assert (stats["by_status"], stats["refused"], stats["busiest_window"]) == ({"200": 3, "403": 2}, 2, 3)
    assert stats["dialect"] == "github" and stats["busiest_1s"] == 3, "403 refusals are not counted as admitted"


def test_github_windows_end_on_the_epoch_second_the_header_states() -> None:
    """Over several 1 s windows: each response's reset names its window, exactly Q admitted per window."""
    with start_http_api(dialect="github", quota=2, quota_window_s=1) as api:
        responses = calls(api, 30, pause_s=0.1)
        times = arrival_times(api)

    windows: dict[int, list[tuple[float, httpx.Response]]] = {}
    for t, response in zip(times, responses, strict=True):
        reset = int(response.headers["X-RateLimit-Reset"])
        assert reset - 1 <= t < reset, "the reset is the end of the window the arrival fell in, unrounded"
        windows.setdefault(reset, []).append((t, response))
    assert len(windows) >= 3
    for group in windows.values():
        statuses = [r.status_code for _, r in group]
        admitted = min(2, len(group))
        assert statuses == [200] * admitted + [403] * (len(group) - admitted)
        used = [int(r.headers["X-RateLimit-Used"]) for _, r in group]
        assert used == [*range(1, admitted + 1), *[2] * (len(group) - admitted)]


# --------------------------------------------------------------------------
# Discord: epoch and delta resets with fractions, 429 with retry_after in the body
# --------------------------------------------------------------------------


def test_discord_states_its_bucket_and_answers_429_with_retry_after() -> None:
    with start_http_api(dialect="discord", quota=3, quota_window_s=60) as api:
        responses = calls(api, 4)
        times, stats = arrival_times(api), api.stats()

    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in responses] == ["2", "1", "0", "0"]
    assert {r.headers["X-RateLimit-Limit"] for r in responses} == {"3"}
    assert {r.headers["X-RateLimit-Bucket"] for r in responses} == {DISCORD_BUCKET}
    assert len(DISCORD_BUCKET) == 32 and int(DISCORD_BUCKET, 16) >= 0
    for t, response in zip(times, responses, strict=True):
        reset, after = response.headers["X-RateLimit-Reset"], response.headers["X-RateLimit-Reset-After"]
        assert len(reset.partition(".")[2]) == len(after.partition(".")[2]) == 3, "fractions, to the millisecond"
        assert 0 < float(after) <= 60
        assert abs(float(reset) - t - float(after)) <= 0.0015, "epoch reset = arrival + reset-after"
    refused = responses[3]
    body = refused.json()
    assert body == {"message": "You are being rate limited.", "retry_after": body["retry_after"], "global": False}
    assert body["retry_after"] == float(refused.headers["X-RateLimit-Reset-After"])
    assert refused.headers["Retry-After"] == str(math.ceil(body["retry_after"]))
    assert refused.headers["X-RateLimit-Scope"] == "user"
    assert all("X-RateLimit-Scope" not in r.headers for r in responses[:3]), "the scope comes with the 429 only"
    assert (stats["by_status"], stats["refused"], stats["busiest_window"]) == ({"200": 3, "429": 1}, 1, 3)


def test_discord_bucket_refills_when_reset_after_says() -> None:
    with (
        start_http_api(dialect="discord", quota=2, quota_window_s=3) as api,
        httpx.Client(base_url=api.url, trust_env=False) as client,
    ):
        responses = [client.get("/items/a")]
        while responses[-1].status_code == 200 and len(responses) < 10:
            responses.append(client.get("/items/a"))
        time.sleep(float(responses[-1].headers["X-RateLimit-Reset-After"]) + 0.2)
        again = client.get("/items/a")

    assert responses[-1].status_code == 429
    assert (again.status_code, again.headers["X-RateLimit-Remaining"]) == (200, "1"), "a fresh window of 2"


# --------------------------------------------------------------------------
# Shopify: a leaky bucket
# --------------------------------------------------------------------------


def replay(times: list[float], size: int, leak_rate: float) -> list[tuple[bool, int]]:
    """What a leaky bucket of ``size`` leaking ``leak_rate``/s does with these arrivals: (admitted, used after)."""
    level, last, out = Fraction(0), None, []
    for t in times:
        if last is not None:
            level = max(Fraction(0), level - Fraction(leak_rate) * (Fraction(t) - Fraction(last)))
        last = t
        admitted = level + 1 <= size
        level += admitted
        out.append((admitted, math.ceil(level)))
    return out


def test_shopify_refuses_exactly_when_the_bucket_would_overflow() -> None:
    size, leak_rate = 5, 0.5
    with start_http_api(dialect="shopify", bucket=size, leak_rate=leak_rate) as api:
        responses = calls(api, 9) + calls(api, 3, pause_s=1.1)
        times, stats = arrival_times(api), api.stats()

    expected = replay(times, size, leak_rate)
    assert [r.status_code for r in responses] == [200 if ok else 429 for ok, _ in expected]
    assert [r.headers["X-Shopify-Shop-Api-Call-Limit"] for r in responses] == [f"{u}/{size}" for _, u in expected]
    assert [r.status_code for r in responses[:5]] == [200] * 5, "a fresh bucket takes a burst of its size"
    refused = [r for r in responses if r.status_code == 429]
    assert refused, "nine calls within seconds overflow a bucket of 5 leaking 0.5/s"
    assert all(r.headers["Retry-After"] == "2.0" and r.json() == {"errors": SHOPIFY_ERRORS} for r in refused)
    assert SHOPIFY_ERRORS.startswith("Exceeded 2 calls per second for api client.")
    assert stats["refused"] == stats["by_status"]["429"] == len(refused)
    assert stats["bucket_peak"] <= size and stats["dialect"] == "shopify"


def test_shopify_defaults_to_a_bucket_of_40_leaking_2_per_second() -> None:
    with start_http_api(dialect="shopify") as api:
        response = calls(api, 1)[0]
        stats = api.stats()
    assert response.headers["X-Shopify-Shop-Api-Call-Limit"] == "1/40"
    assert (stats["limit_per_window"], stats["window_s"]) == (40, 20.0)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """``clock[0]`` is what ``time.time()`` returns inside the limiters."""
    now = [1000.0]
    monkeypatch.setattr(_common.time, "time", lambda: now[0])
    yield now


def test_leaky_bucket_drains_continuously_and_says_when_a_request_fits(clock: list[float]) -> None:
    bucket = LeakyBucket(2, 0.5)
    assert bucket.try_admit({"requests": 1}).wait == 0
    full = bucket.try_admit({"requests": 1})
    assert (full.wait, full.remaining, full.reset_s) == (0, {"requests": 0.0}, 4.0)
    assert bucket.try_admit({"requests": 1}).wait == 2.0, "one request leaks out in 2 s"
    clock[0] += 1.0
    half = bucket.try_admit({"requests": 1})
    assert (half.wait, half.remaining, half.reset_s) == (1.0, {"requests": 0.0}, 3.0), "refusals add nothing"
    clock[0] += 1.0
    assert bucket.try_admit({"requests": 1}).wait == 0
    assert bucket.try_admit({"requests": 3}).wait == math.inf, "larger than the bucket: never"
    clock[0] += 100.0
    empty = bucket.try_admit({"requests": 1})
    assert (empty.wait, empty.remaining) == (0, {"requests": 1.0}), "it never drains below empty"
    bucket.clear()
    assert bucket.try_admit({"requests": 2}).remaining == {"requests": 0.0}


def test_leaky_bucket_and_its_replay_agree_exactly_on_awkward_times(clock: list[float]) -> None:
    """Times a float subtraction would round: the admitted arrivals replay to at most the size, never over."""
    rng = random.Random(7)
    bucket = LeakyBucket(3, 0.3)
    admitted = []
    for _ in range(2000):
        clock[0] += rng.choice((0.1, 0.3, 1 / 3, 0.7, 1e-9, 0.0))
        admission = bucket.try_admit({"requests": 1})
        if admission.wait == 0:
            admitted.append(admission.t)
        else:
            assert leaky_bucket_peak([*admitted, admission.t], 0.3) > 3, "refused only if it would overflow"
    assert leaky_bucket_peak(admitted, 0.3) <= 3
    assert len(admitted) > 0.3 * (clock[0] - 1000.0)


# --------------------------------------------------------------------------
# Flags that cannot be honoured are refused at start
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--dialect", "github"],  # no quota
        ["--dialect", "github", "--quota", "5", "--quota-window-s", "1.5"],  # epoch reset needs whole seconds
        ["--dialect", "discord", "--rps", "5"],
        ["--dialect", "shopify", "--quota", "5"],
        ["--bucket", "5"],  # the bucket is shopify's
        ["--dialect", "discord", "--quota", "5", "--ratelimit-headers"],
        ["--dialect", "shopify", "--leak-rate", "0"],
    ],
)
def test_dialect_flags_that_cannot_be_honoured_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        http_api_main(argv)


# --------------------------------------------------------------------------
# OpenAI out of credit
# --------------------------------------------------------------------------


def chat(llm: ServiceHandle, count: int, **extra: Any) -> list[httpx.Response]:
    with httpx.Client(base_url=llm.url, trust_env=False) as client:
        return [client.post("/v1/chat/completions", json={**CHAT, **extra}) for _ in range(count)]


def test_llm_out_of_credit_refuses_every_later_call_until_topped_up() -> None:
    with start_llm(credit_tokens=4 * CHAT_TOKENS + 10, latency_ms=0) as llm:
        spent = chat(llm, 5)
        small = chat(llm, 1, max_tokens=1)[0]  # 6 tokens: the 10 left would cover it, but the account is dry
        dry = llm.stats()
        topped = llm.post_admin("/_topup", {"tokens": 2 * CHAT_TOKENS})
        after = chat(llm, 3)
        final = llm.stats()
        with httpx.Client(base_url=llm.url, trust_env=False) as client:
            bad = [client.post("/_topup", json=body).status_code for body in ({"tokens": 0}, {"tokens": "5"}, [])]
        llm.reset()
        restored = llm.stats()

    assert [r.status_code for r in spent] == [200, 200, 200, 200, 429]
    for refused in (spent[4], small, after[2]):
        assert refused.status_code == 429 and "Retry-After" not in refused.headers
        assert refused.json() == {
            "error": {
                "message": OUT_OF_CREDIT,
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
    assert OUT_OF_CREDIT.startswith("You exceeded your current quota, please check your plan and billing details.")
    assert (dry["credit_left"], dry["refused_for_credit"], dry["accepted_tokens"]) == (10, 2, 4 * CHAT_TOKENS)
    assert topped == {"credit_left": 10 + 2 * CHAT_TOKENS}
    assert [r.status_code for r in after] == [200, 200, 429], "the top-up covers two more calls, then dry again"
    assert (final["credit_left"], final["refused_for_credit"], final["count"]) == (10, 3, 9), "/_topup not logged"
    assert final["refused"] == 3, "the arrival log marks credit refusals as refused too"
    assert bad == [400, 400, 400]
    assert (restored["credit_left"], restored["refused_for_credit"]) == (4 * CHAT_TOKENS + 10, 0)


def test_llm_credit_refusals_spend_no_rate_budget_and_unlimited_credit_is_none(llm: ServiceHandle) -> None:
    with start_llm(credit_tokens=CHAT_TOKENS, rpm=2, window_s=60, latency_ms=0) as limited:
        statuses = [r.status_code for r in chat(limited, 4)]
        stats = limited.stats()
        limited.post_admin("/_topup", {"tokens": 10 * CHAT_TOKENS})
        refilled = chat(limited, 2)
    assert statuses == [200, 429, 429, 429] and stats["refused_for_credit"] == stats["refused"] == 3
    assert [r.status_code for r in refilled] == [200, 429], "one request of the rpm budget was left for it"
    assert refilled[1].json()["error"]["type"] == "rate_limit_exceeded" and "Retry-After" in refilled[1].headers
    assert llm.stats()["credit_left"] is None and llm.stats()["refused_for_credit"] == 0
