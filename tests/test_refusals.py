"""Every row of the refusal table, tested with its provider's documented example.

Each case is a real ``httpx.Response`` (or the exception a real client library
raises) shaped exactly as the provider's documentation shows it, read through
the same path the runner uses (``outcomes.classify`` -> ``refusals.read``).
The table must also be complete: a test fails if a row has no example here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from botocore.exceptions import ClientError
from psycopg_pool import PoolTimeout

from pipeline.outcomes import Failure, classify
from pipeline.pacing.headers import read_signal, reset_seconds
from pipeline.refusals import CONVENTIONS, ITEM, SERVICE, Answer, Convention, Meaning, read

NOW = 1_691_589_563.0  # 30 minutes before GitHub's documented reset, 1691591363


def refused(status: int, headers: dict[str, str] | None = None, body: Any = None, text: str | None = None) -> Failure:
    """A response as the client library raises it (``raise_for_status``), classified as the runner does."""
    content = text if text is not None else (json.dumps(body) if body is not None else "")
    request = httpx.Request("GET", "https://api.example.com/thing")
    response = httpx.Response(status, headers=headers or {}, content=content.encode(), request=request)
    return classify(httpx.HTTPStatusError(str(status), request=request, response=response), now=NOW)


# (row name, the provider's documented example, meaning, wait_s, scope)
EXAMPLES: list[tuple[str, Failure, Meaning, float | None, str | None]] = [
    (
        "openai-insufficient-quota",
        refused(
            429,
            body={
                "error": {
                    "message": "You exceeded your current quota, please check your plan and billing details.",
                    "type": "insufficient_quota",
                    "param": None,
                    "code": "insufficient_quota",
                }
            },
        ),
        Meaning.OUT_OF_CREDIT,
        None,
        None,
    ),
    (
        "openai-billing-hard-limit",
        refused(
            400,
            body={
                "error": {
                    "message": "Billing hard limit has been reached",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "billing_hard_limit_reached",
                }
            },
        ),
        Meaning.OUT_OF_CREDIT,
        None,
        None,
    ),
    (
        "anthropic-credit-balance",
        refused(
            400,
            body={
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": "Your credit balance is too low to access the Anthropic API. "
                    "Please go to Plans & Billing to upgrade or purchase credits.",
                },
            },
        ),
        Meaning.OUT_OF_CREDIT,
        None,
        None,
    ),
    (
        "discord-rate-limit",
        refused(
            429,
            headers={
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": "1470173023.123",
                "X-RateLimit-Reset-After": "64.57",
                "X-RateLimit-Bucket": "abcd1234",
                "X-RateLimit-Scope": "user",
                "Retry-After": "65",
            },
            body={"message": "You are being rate limited.", "retry_after": 64.57, "global": False},
        ),
        Meaning.THROTTLED,
        64.57,
        SERVICE,
    ),
    (
        "github-quota",
        refused(
            403,
            headers={
                "x-ratelimit-limit": "60",
                "x-ratelimit-remaining": "0",
                "x-ratelimit-used": "60",
                "x-ratelimit-reset": "1691591363",
                "x-ratelimit-resource": "core",
            },
            body={
                "message": "API rate limit exceeded for xxx.xxx.xxx.xxx. (But here's the good news: "
                "Authenticated requests get a higher rate limit. Check out the documentation for more details.)",
                "documentation_url": "https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting",
            },
        ),
        Meaning.QUOTA_SPENT,
        1800.0,
        SERVICE,
    ),
    (
        "twitter-quota",
        refused(
            429,
            headers={"x-rate-limit-limit": "900", "x-rate-limit-remaining": "0", "x-rate-limit-reset": "1691590463"},
            body={"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429},
        ),
        Meaning.QUOTA_SPENT,
        900.0,
        SERVICE,
    ),
    (
        "github-secondary-limit",
        refused(
            403,
            headers={"retry-after": "60"},
            body={
                "message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
                "documentation_url": "https://docs.github.com/free-pro-team@latest/rest/overview/rate-limits",
            },
        ),
        Meaning.THROTTLED,
        60.0,
        SERVICE,
    ),
    (
        "google-quota-exceeded",
        refused(
            403,
            body={
                "error": {
                    "errors": [
                        {"domain": "usageLimits", "reason": "dailyLimitExceeded", "message": "Daily Limit Exceeded"}
                    ],
                    "code": 403,
                    "message": "Daily Limit Exceeded",
                }
            },
        ),
        Meaning.QUOTA_SPENT,
        None,
        SERVICE,
    ),
    (
        "google-rate-limit-exceeded",
        refused(
            403,
            body={
                "error": {
                    "errors": [
                        {
                            "domain": "usageLimits",
                            "reason": "userRateLimitExceeded",
                            "message": "User Rate Limit Exceeded",
                        }
                    ],
                    "code": 403,
                    "message": "User Rate Limit Exceeded",
                }
            },
        ),
        Meaning.THROTTLED,
        None,
        SERVICE,
    ),
    (
        "google-resource-exhausted",
        refused(
            429,
            body={
                "error": {
                    "code": 429,
                    "message": "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute'.",
                    "status": "RESOURCE_EXHAUSTED",
                    "details": [
                        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED"},
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"},
                    ],
                }
            },
        ),
        Meaning.THROTTLED,
        30.0,
        SERVICE,
    ),
    (
        "shopify-leaky-bucket",
        refused(
            429,
            headers={"X-Shopify-Shop-Api-Call-Limit": "40/40", "Retry-After": "2.0"},
            body={
                "errors": "Exceeded 2 calls per second for api client. Reduce request rates to resume uninterrupted service."
            },
        ),
        Meaning.THROTTLED,
        2.0,
        SERVICE,
    ),
    (
        "stripe-lock-timeout",
        refused(
            429,
            body={
                "error": {
                    "code": "lock_timeout",
                    "message": "This object cannot be accessed right now because another API request or Stripe "
                    "process is currently accessing it.",
                    "type": "invalid_request_error",
                }
            },
        ),
        Meaning.THROTTLED,
        None,
        ITEM,
    ),
    (
        "stripe-rate-limit",
        refused(
            429,
            body={
                "error": {
                    "code": "rate_limit",
                    "message": "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
                    "type": "invalid_request_error",
                }
            },
        ),
        Meaning.THROTTLED,
        None,
        SERVICE,
    ),
    (
        "slack-ratelimited",
        refused(200, body={"ok": False, "error": "ratelimited"}),
        Meaning.THROTTLED,
        None,
        SERVICE,
    ),
    (
        "anthropic-overloaded",
        refused(529, body={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        Meaning.THROTTLED,
        None,
        SERVICE,
    ),
    (
        "aws-throttling",
        refused(
            503,
            headers={"Content-Type": "application/xml"},
            text='<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            "<Message>Please reduce your request rate.</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>",
        ),
        Meaning.THROTTLED,
        None,
        SERVICE,
    ),
    (
        "openai-rate-limit",
        refused(
            429,
            headers={
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-limit-tokens": "150000",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            body={
                "error": {
                    "message": "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 60, Used 60, "
                    "Requested 1. Please try again in 1s.",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            },
        ),
        Meaning.THROTTLED,
        1.0,
        SERVICE,
    ),
    (
        "anthropic-rate-limit",
        refused(
            429,
            headers={
                "retry-after": "30",
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": "2023-08-09T14:39:53Z",
            },
            body={
                "type": "error",
                "error": {"type": "rate_limit_error", "message": "Number of requests has exceeded your rate limit."},
            },
        ),
        Meaning.THROTTLED,
        30.0,
        SERVICE,
    ),
    (
        "ietf-ratelimit",
        refused(
            429,
            headers={"RateLimit-Policy": '"default";q=100;w=60', "RateLimit": '"default";r=0;t=30'},
        ),
        Meaning.THROTTLED,
        30.0,
        SERVICE,
    ),
    ("retry-after", refused(429, headers={"Retry-After": "120"}), Meaning.THROTTLED, 120.0, None),
    (
        "slack-invalid-auth",
        refused(200, body={"ok": False, "error": "invalid_auth"}),
        Meaning.BAD_CREDENTIALS,
        None,
        None,
    ),
    (
        "aws-credentials",
        classify(
            ClientError(
                {
                    "Error": {
                        "Code": "InvalidAccessKeyId",
                        "Message": "The AWS Access Key Id you provided does not exist.",
                    },
                    "ResponseMetadata": {"HTTPStatusCode": 403},
                },
                "GetObject",
            ),
            now=NOW,
        ),
        Meaning.BAD_CREDENTIALS,
        None,
        None,
    ),
    (
        "postgres-bad-password",
        classify(psycopg.errors.lookup("28P01")('password authentication failed for user "loader"'), now=NOW),
        Meaning.BAD_CREDENTIALS,
        None,
        None,
    ),
    (
        "http-unauthorized",
        refused(401, body={"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}),
        Meaning.BAD_CREDENTIALS,
        None,
        None,
    ),
    (
        "postgres-too-many-connections",
        classify(psycopg.errors.lookup("53300")("sorry, too many clients already"), now=NOW),
        Meaning.CAPACITY,
        None,
        None,
    ),
    (
        "postgres-cannot-connect-now",
        classify(psycopg.errors.lookup("57P03")("the database system is starting up"), now=NOW),
        Meaning.CAPACITY,
        None,
        None,
    ),
    (
        "pool-timeout",
        classify(PoolTimeout("couldn't get a connection after 30.00 sec")),
        Meaning.CAPACITY,
        None,
        None,
    ),
    (
        "postgres-connection-failure",
        classify(psycopg.errors.lookup("08006")("server closed the connection unexpectedly"), now=NOW),
        Meaning.RETRYABLE,
        None,
        None,
    ),
    ("http-retryable", refused(502), Meaning.RETRYABLE, None, None),
    ("http-success", refused(200, body={"ok": True}), Meaning.OK, None, None),
    ("http-client-error", refused(404, body={"message": "Not Found"}), Meaning.PERMANENT, None, None),
]


@pytest.mark.parametrize(("row", "failure", "meaning", "wait_s", "scope"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_each_convention_reads_its_documented_example(
    row: str, failure: Failure, meaning: Meaning, wait_s: float | None, scope: str | None
) -> None:
    assert failure.convention == row, f"decided by {failure.convention!r}"
    assert failure.meaning is meaning
    assert failure.retry_after == (pytest.approx(wait_s) if wait_s is not None else None)
    assert failure.scope == scope


def test_every_row_of_the_table_has_its_example() -> None:
    assert sorted(row.name for row in CONVENTIONS) == sorted(e[0] for e in EXAMPLES)
    assert all(row.source.startswith("https://") for row in CONVENTIONS), "each row says where it is documented"


def test_the_row_status_says_what_the_refusal_meant() -> None:
    quota = EXAMPLES[[e[0] for e in EXAMPLES].index("github-quota")][1]
    assert (quota.status, quota.retryable, quota.throttled, quota.auth) == ("http_403", True, True, False)
    assert "[github-quota: API rate limit exceeded" in quota.error, "the row names the convention and its words"
    credit = refused(429, body={"error": {"code": "insufficient_quota", "type": "insufficient_quota"}})
    assert (credit.status, credit.retryable, credit.out_of_credit, credit.throttled) == (
        "out_of_credit",
        True,
        True,
        False,
    )
    crowded = classify(psycopg.errors.lookup("53300")("too many connections for role"))
    assert (crowded.status, crowded.retryable, crowded.capacity) == ("capacity", True, True)
    assert refused(403).auth and not refused(403).retryable, "a 403 without quota signs is about the key"


def test_a_login_refused_before_any_sqlstate_is_read_from_the_server_message() -> None:
    """libpq reports a refused login as text; psycopg then gives no SQLSTATE."""
    error = psycopg.OperationalError(
        'connection failed: connection to server on socket "/tmp/.s.PGSQL.5432" failed: '
        'FATAL:  too many connections for role "loader"'
    )
    assert classify(error).meaning is Meaning.CAPACITY


@pytest.mark.parametrize(
    ("value", "now", "seconds"),
    [
        ("60", NOW, 60.0),  # a delay
        ("1691591363", NOW, 1800.0),  # GitHub's epoch, 30 minutes ahead
        ("1470173023.123", 1470173020.0, 3.123),  # Discord's epoch with a fraction
        ("1691589000", NOW, 0.0),  # an epoch already passed: now
        ("soon", NOW, None),
        ("-5", NOW, None),
    ],
)
def test_a_reset_is_told_apart_as_an_epoch_or_a_delay(value: str, now: float, seconds: float | None) -> None:
    assert reset_seconds(value, now) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("headers", "wait_s"),
    [
        ({"Retry-After": "1.5"}, 1.5),  # fractional, sent by some services
        ({"Retry-After": "Fri, 31 Dec 1999 23:59:59 GMT"}, 0.0),  # RFC 9110's own example: a date in the past
        ({"retry-after-ms": "250", "Retry-After": "1"}, 0.25),  # the more precise one wins
    ],
)
def test_retry_after_in_its_forms(headers: dict[str, str], wait_s: float) -> None:
    assert refused(429, headers=headers).retry_after == pytest.approx(wait_s)


def test_a_work_adds_its_own_row_and_it_is_asked_first() -> None:
    teapot = Convention("teapot-busy", Meaning.THROTTLED, lambda a: a.http_status == 418, lambda a: 5.0, ITEM)
    verdict = read(Answer(http_status=418), extra=(teapot,))
    assert (verdict.convention, verdict.meaning, verdict.wait_s, verdict.scope) == (
        "teapot-busy",
        Meaning.THROTTLED,
        5.0,
        ITEM,
    )
    assert read(Answer(http_status=418)).meaning is Meaning.PERMANENT, "without the row: a plain 4xx"


def test_the_headers_loop_reads_the_quota_of_the_x_ratelimit_family_and_shopify() -> None:
    github = {"X-RateLimit-Remaining": "4", "X-RateLimit-Reset": str(int(NOW) + 2)}
    assert read_signal(github, NOW).requests.rate == 2.0, "GitHub's remaining over its epoch reset: 4 calls in 2 s"

    def bucket_rate(used: int) -> float:
        return read_signal({"X-Shopify-Shop-Api-Call-Limit": f"{used}/40"}, NOW).requests.rate

    assert bucket_rate(20) == 2.0, "half full: the drain rate, 2 calls/s on a standard plan"
    assert bucket_rate(39) < 0.11 and bucket_rate(1) == 78.0, "nearly full: a trickle; nearly empty: a burst"


def test_the_readme_table_names_every_row() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### When a service says no") :]
    assert [row.name for row in CONVENTIONS if f"`{row.name}`" not in section] == []
