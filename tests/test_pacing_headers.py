"""Reading a service's own word on its limits, one header dialect at a time.

Fixed inputs only: each test hands ``read_signal`` the headers a vendor
really sends (values from the vendors' documentation and captured replies)
and a fixed ``now``, so nothing here depends on the clock. The formats:

- ``Retry-After`` (RFC 9110 10.2.3): delay-seconds or an HTTP-date;
  ``retry-after-ms`` (OpenAI/Anthropic) wins when both are sent.
- OpenAI ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, resets
  as Go durations (``6m0s``, ``20ms``).
- Anthropic ``anthropic-ratelimit-*``, resets as RFC 3339 timestamps.
- IETF draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Limit``/``-Remaining``/
  ``-Reset`` (up to -06), the ``RateLimit`` dictionary (-07) and the
  ``RateLimit: "name";r=;t=`` / ``RateLimit-Policy: "name";q=;w=`` lists (-08 on).

Malformed values must read as unknown, never raise: a bad hint must not fail a call.
"""

from __future__ import annotations

from datetime import datetime, timezone

import httpx
import pytest

from pipeline.outcomes import classify, response_answer
from pipeline.pacing import headers
from pipeline.pacing.headers import NO_SIGNAL, Quota, ServiceSignal, read_signal, retry_after_s
from pipeline.refusals import read

NOW = datetime(2025, 8, 21, 12, 40, 0, tzinfo=timezone.utc).timestamp()


# --------------------------------------------------------------------------
# Retry-After
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after": " 7 "}, 7.0),
        ({"Retry-After": "Thu, 21 Aug 2025 12:40:30 GMT"}, 30.0),  # IMF-fixdate
        ({"Retry-After": "Thursday, 21-Aug-25 12:40:30 GMT"}, 30.0),  # obsolete RFC 850 form
        ({"Retry-After": "Thu Aug 21 12:40:30 2025"}, 30.0),  # obsolete asctime form, read as GMT
        ({"Retry-After": "Thu, 21 Aug 2025 12:39:00 GMT"}, 0.0),  # already past: go now
        ({"retry-after-ms": "250", "Retry-After": "1"}, 0.25),  # the precise one wins
        ({"retry-after-ms": "soon", "Retry-After": "2"}, 2.0),  # a bad ms value falls back
        ({}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "Thu, 99 Aug 2025 12:40:30 GMT"}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers, NOW) == expected
    assert read_signal(headers, NOW).retry_after_s == expected


def test_httpx_headers_are_read_case_insensitively() -> None:
    headers = httpx.Headers({"RETRY-AFTER": "3", "X-RateLimit-Remaining-Requests": "9"})
    signal = read_signal(headers, NOW)
    assert (signal.retry_after_s, signal.requests.remaining) == (3.0, 9.0)


# --------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------


def test_openai_requests_and_tokens() -> None:
    signal = read_signal(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        NOW,
    )
    assert signal.requests == Quota(limit=60, remaining=59, reset_s=1.0)
    assert signal.tokens == Quota(limit=150000, remaining=149984, reset_s=360.0)
    assert signal.requests.rate == 59.0
    assert not signal.exhausted and signal.wait_s is None


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("1.5ms", 0.0015),
        ("250us", 0.00025),
        ("17", 17.0),  # Azure OpenAI sends bare seconds
        ("", None),
        ("6 minutes", None),
        ("5x", None),
        ("1s2", None),
        ("-1s", None),
    ],
)
def test_openai_resets_are_go_durations(reset: str, seconds: float | None) -> None:
    assert read_signal({"x-ratelimit-reset-tokens": reset}, NOW).tokens.reset_s == pytest.approx(seconds)


def test_openai_exhausted_tokens_say_how_long_to_wait() -> None:
    signal = read_signal(
        {
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "20ms",
            "x-ratelimit-remaining-requests": "5",
        },
        NOW,
    )
    assert signal.tokens.exhausted and not signal.requests.exhausted
    assert signal.exhausted
    assert signal.tokens.rate == 0.0
    assert signal.wait_s == pytest.approx(0.02)


def test_azure_minus_one_reads_as_unknown() -> None:
    signal = read_signal(
        {"x-ratelimit-limit-tokens": "-1", "x-ratelimit-remaining-tokens": "-1", "x-ratelimit-reset-tokens": "0"},
        NOW,
    )
    assert signal.tokens == Quota(reset_s=0.0)
    assert not signal.exhausted and signal.tokens.rate is None


# --------------------------------------------------------------------------
# Anthropic
# --------------------------------------------------------------------------

ANTHROPIC = {
    "anthropic-ratelimit-requests-limit": "1000",
    "anthropic-ratelimit-requests-remaining": "999",
    "anthropic-ratelimit-requests-reset": "2025-08-21T12:40:06Z",
    "anthropic-ratelimit-input-tokens-limit": "80000",
    "anthropic-ratelimit-input-tokens-remaining": "8000",
    "anthropic-ratelimit-input-tokens-reset": "2025-08-21T12:40:30Z",
    "anthropic-ratelimit-output-tokens-limit": "16000",
    "anthropic-ratelimit-output-tokens-remaining": "12000",
    "anthropic-ratelimit-output-tokens-reset": "2025-08-21T12:40:10Z",
}


def test_anthropic_resets_are_timestamps() -> None:
    signal = read_signal(
        {
            **ANTHROPIC,
            "anthropic-ratelimit-tokens-limit": "96000",
            "anthropic-ratelimit-tokens-remaining": "20000",
            "anthropic-ratelimit-tokens-reset": "2025-08-21T12:40:20.500+00:00",
        },
        NOW,
    )
    assert signal.requests == Quota(limit=1000, remaining=999, reset_s=6.0)
    assert signal.tokens == Quota(limit=96000, remaining=20000, reset_s=20.5)


def test_anthropic_without_combined_tokens_takes_the_tighter_part() -> None:
    tokens = read_signal(ANTHROPIC, NOW).tokens
    assert tokens == Quota(limit=80000, remaining=8000, reset_s=30.0), "input has 10% left, output 75%"


def test_anthropic_reset_in_the_past_or_malformed() -> None:
    past = read_signal(
        {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": "2025-08-21T12:00:00Z"},
        NOW,
    )
    assert past.requests == Quota(remaining=0, reset_s=0.0) and past.wait_s == 0.0
    bad = read_signal(
        {"anthropic-ratelimit-requests-remaining": "x", "anthropic-ratelimit-requests-reset": "tomorrow"}, NOW
    )
    assert bad.requests == Quota() and bad == NO_SIGNAL


# --------------------------------------------------------------------------
# IETF RateLimit drafts
# --------------------------------------------------------------------------


def test_ietf_three_fields_up_to_draft_06() -> None:
    signal = read_signal(
        {
            "RateLimit-Limit": "100",
            "RateLimit-Remaining": "50",
            "RateLimit-Reset": "25",
            "RateLimit-Policy": "10;w=1, 100;w=60",
        },
        NOW,
    )
    assert signal.requests == Quota(limit=100, remaining=50, reset_s=25.0, window_s=60.0)
    assert signal.requests.rate == 2.0


def test_ietf_early_limit_field_carries_its_policies() -> None:
    signal = read_signal({"RateLimit-Limit": "10, 10;w=1, 50;w=60", "RateLimit-Remaining": "3"}, NOW)
    assert (signal.requests.limit, signal.requests.remaining) == (10.0, 3.0)


def test_ietf_dictionary_of_draft_07() -> None:
    signal = read_signal({"RateLimit": "limit=100, remaining=0, reset=5", "RateLimit-Policy": "100;w=10"}, NOW)
    assert signal.requests == Quota(limit=100, remaining=0, reset_s=5.0, window_s=10.0)
    assert signal.exhausted and signal.wait_s == 5.0


def test_ietf_structured_lists_from_draft_08() -> None:
    signal = read_signal({"RateLimit": '"default";r=50;t=30', "RateLimit-Policy": '"default";q=100;w=60'}, NOW)
    assert signal.requests == Quota(limit=100, remaining=50, reset_s=30.0, window_s=60.0)


def test_ietf_several_policies_the_tightest_wins() -> None:
    signal = read_signal(
        {
            "RateLimit": '"permin";r=40;t=20, "perhr";r=100;t=3000, "bytes";r=0;t=9',
            "RateLimit-Policy": '"permin";q=50;w=60, "perhr";q=1000;w=3600, "bytes";q=65535;qu="content-bytes";w=10',
        },
        NOW,
    )
    # permin allows 2/s, perhr 0.033/s; the content-bytes policy is not a request quota.
    assert signal.requests == Quota(limit=1000, remaining=100, reset_s=3000.0, window_s=3600.0)
    assert not signal.exhausted


def test_ietf_spent_policy_wins_and_unknown_policy_still_gives_remaining() -> None:
    spent = read_signal({"RateLimit": '"a";r=100;t=1, "b";r=0;t=4'}, NOW)
    assert spent.requests == Quota(remaining=0, reset_s=4.0) and spent.wait_s == 4.0


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit": '"default";r=;t=abc'},
        {"RateLimit": ";;,,"},
        {"RateLimit": '"unterminated;r=5'},
        {"RateLimit": "limit=lots, remaining=-3"},
        {"RateLimit-Remaining": "many", "RateLimit-Reset": "Thu, 21 Aug 2025 12:40:30 GMT"},
        {"RateLimit-Policy": '"default";q=100;w=60'},  # a policy alone says nothing about now
    ],
)
def test_ietf_malformed_reads_as_unknown(headers: dict[str, str]) -> None:
    assert read_signal(headers, NOW).requests == Quota()


# --------------------------------------------------------------------------
# Several dialects, and signals off results and exceptions
# --------------------------------------------------------------------------


def test_one_vendor_gives_a_whole_quota() -> None:
    signal = read_signal({"x-ratelimit-remaining-requests": "5", "RateLimit-Limit": "100", "RateLimit-Reset": "9"}, NOW)
    assert signal.requests == Quota(remaining=5), "the IETF reset must not be paired with OpenAI's remaining"


def test_no_headers_no_signal() -> None:
    signal = read_signal({"content-type": "application/json"}, NOW)
    assert signal == NO_SIGNAL == ServiceSignal()
    assert not signal.requests.known and not signal.exhausted and signal.wait_s is None


def _response(status: int, headers: dict[str, str]) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("GET", "http://service/"))


def test_a_refusal_and_a_success_read_the_same_headers_the_same_way() -> None:
    headers = {"x-ratelimit-remaining-requests": "4", "x-ratelimit-reset-requests": "2s"}
    assert read_signal(_response(200, headers).headers, NOW).requests.rate == 2.0
    refused = _response(429, {**headers, "Retry-After": "Thu, 21 Aug 2025 12:40:05 GMT"})
    signal = read_signal(refused.headers, NOW)
    assert signal.requests.rate == 2.0 and signal.retry_after_s == 5.0
    assert read(response_answer(refused, NOW)).wait_s == 5.0, "the refusal's verdict waits what the headers say"


def test_classify_reads_retry_after_through_the_same_parser() -> None:
    refused = _response(503, {"Retry-After": "Thu, 01 Jan 2099 00:00:00 GMT"})
    failure = classify(httpx.HTTPStatusError("503", request=refused.request, response=refused))
    assert failure.throttled and failure.retry_after is not None and failure.retry_after > 365 * 86400


def test_exported_names_are_pinned() -> None:
    assert headers.__all__ == ["NO_SIGNAL", "Quota", "ServiceSignal", "read_signal", "reset_seconds", "retry_after_s"]
