"""What a service means when it says no: one table of conventions, one answer.

A refusal is a message, and services phrase it in their own dialects: GitHub
answers a spent quota with 403 and ``X-RateLimit-Remaining: 0``, OpenAI an
empty account with 429 and ``insufficient_quota``, PostgreSQL a crowded role
with SQLSTATE 53300. Read one wrong and a backfill either breaks the service's
rules (retrying into an empty account) or stops for nothing (taking a quota for
bad credentials). So every dialect is a named row of :data:`CONVENTIONS`, and
:func:`read` asks the rows in order; the first that recognises the answer
gives the :class:`Verdict`. The runner's credential guard, its throttle policy,
its reconnect policy and the manifest row all act on that one verdict, so they
cannot disagree about what the service meant.

    >>> read(Answer(http_status=403, headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1700000060"},
    ...             now=1_700_000_000.0)).meaning
    <Meaning.QUOTA_SPENT: 'quota_spent'>

Each row's test (``tests/test_refusals.py``) is the provider's own documented
example. A ``Work`` adds rows of its own with a ``conventions`` attribute:
they are asked before the built-in ones.

Waits a service states as a point in time and waits it states as a delay share
header names across providers (``X-RateLimit-Reset`` is epoch seconds at
GitHub and Discord, a delay elsewhere): ``pipeline.pacing.headers.reset_seconds``
tells them apart by magnitude.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pipeline.pacing.headers import read_signal, reset_seconds, retry_after_s

__all__ = ["CONVENTIONS", "Answer", "Convention", "Meaning", "Verdict", "read"]


class Meaning(str, Enum):
    """What a refusal asks of a backfill (DESIGN.md, "Refusals")."""

    OK = "ok"  # the answer is what was asked for
    THROTTLED = "throttled"  # slow down and try again after the wait (the item or the service: see scope)
    QUOTA_SPENT = "quota_spent"  # a budget is spent until its reset: the whole service waits
    OUT_OF_CREDIT = "out_of_credit"  # the account cannot pay: stop the run, keep the items for a rerun
    BAD_CREDENTIALS = "bad_credentials"  # the key is wrong: fail fast, record nothing of it
    CAPACITY = "capacity"  # no room for another connection: wait, reconnect, use fewer connections
    RETRYABLE = "retryable"  # 5xx, a timeout, a reset: a later try may heal it
    PERMANENT = "permanent"  # trying again will not help (bad input, a missing record)


SERVICE = "service"
"""Scope of a refusal about the caller's whole budget (a spent quota, a global limit)."""
UNRECOGNISED = "unrecognised"
"""The convention of an answer no row knew (then ``outcomes.classify`` falls back on the error's type)."""
ITEM = "item"
"""Scope of a refusal about one item (a locked record, a hot key): the worker's pace stays."""


@dataclass(frozen=True)
class Answer:
    """What the service said, in the terms conventions are written in.

    ``headers`` have lower-case names; ``body`` is the decoded JSON body when
    there was one; ``text`` is the body or the error message as text;
    ``code`` is a machine code the client library extracted (a SQLSTATE, an
    AWS error code). ``now`` is Unix time, for resets given as a moment.
    """

    http_status: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    text: str = ""
    code: str | None = None
    now: float = 0.0

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def field(self, *path: str | int) -> Any:
        """``body[path[0]][path[1]]...``, or None where any step is missing."""
        value = self.body
        for step in path:
            try:
                value = value[step]
            except (KeyError, IndexError, TypeError):
                return None
        return value


@dataclass(frozen=True)
class Verdict:
    """The one reading of an answer that every policy of the runner acts on.

    ``wait_s`` is how long the service asked us to wait (None: it did not
    say). ``scope`` is ``"service"`` or ``"item"`` where the convention says
    so, None where only the pattern of refusals can tell (the throttle policy
    judges that). ``said`` is the service's own words, short, for errors.
    """

    meaning: Meaning
    convention: str
    wait_s: float | None = None
    scope: str | None = None
    said: str = ""

    @property
    def retryable(self) -> bool:
        """A later try (this round or the next) may succeed."""
        return self.meaning not in (Meaning.OK, Meaning.PERMANENT, Meaning.BAD_CREDENTIALS)


Matcher = Callable[[Answer], bool]
Waiter = Callable[[Answer], "float | None"]


def _no_wait(answer: Answer) -> float | None:
    return None


def _retry_after(answer: Answer) -> float | None:
    return retry_after_s(answer.headers, answer.now)


@dataclass(frozen=True)
class Convention:
    """One dialect of "no": a named row of the table.

    ``matches`` recognises the answer; ``wait_s`` reads the wait it asks for;
    ``scope`` is fixed by the convention (or ``scope_of`` reads it from the
    answer); ``source`` is where the provider documents it.
    """

    name: str
    meaning: Meaning
    matches: Matcher
    wait_s: Waiter = _no_wait
    scope: str | None = None
    scope_of: Callable[[Answer], str | None] | None = None
    source: str = ""

    def verdict(self, answer: Answer) -> Verdict:
        scope = self.scope_of(answer) if self.scope_of else self.scope
        return Verdict(
            self.meaning,
            self.name,
            self.wait_s(answer),
            scope,
            said(answer),
        )


def read(answer: Answer, extra: Iterable[Convention] = ()) -> Verdict:
    """The verdict of the first row (``extra`` first, then :data:`CONVENTIONS`) that recognises ``answer``."""
    for convention in (*extra, *CONVENTIONS):
        if convention.matches(answer):
            return convention.verdict(answer)
    return _FALLBACK.verdict(answer)


def said(answer: Answer, limit: int = 200) -> str:
    """The service's own words: its error message or code, else the start of its body."""
    for path in (("error", "message"), ("message",), ("errors",), ("error",)):
        value = answer.field(*path)
        if isinstance(value, str) and value:
            return value[:limit]
    return answer.text.strip()[:limit]


# --------------------------------------------------------------------------
# Small readers the rows are written with
# --------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if 0 <= number < float("inf") else None


def _status(*codes: int) -> Matcher:
    return lambda a: a.http_status in codes


def _error_code(answer: Answer) -> str | None:
    """OpenAI, Anthropic and Stripe put a machine code in ``error.code`` or ``error.type``."""
    error = answer.field("error")
    if not isinstance(error, dict):
        return None
    return error.get("code") or error.get("type")


def _codes(*codes: str) -> Callable[[Answer], bool]:
    wanted = set(codes)
    return lambda a: _error_code(a) in wanted or (a.field("error", "type") in wanted)


def _sql(*states: str, words: tuple[str, ...] = ()) -> Matcher:
    """A SQLSTATE, or (where the driver could not give one, as at login) the server's own message."""
    lowered = tuple(w.lower() for w in words)
    return lambda a: a.code in states or (a.http_status is None and any(w in a.text.lower() for w in lowered))


def _duration(value: Any) -> float | None:
    """A protobuf Duration as JSON writes it: ``"30s"``, ``"1.5s"``."""
    if isinstance(value, str) and value.endswith("s"):
        return _number(value[:-1])
    return None


def _google_retry_delay(answer: Answer) -> float | None:
    for detail in answer.field("error", "details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            return _duration(detail.get("retryDelay"))
    return _retry_after(answer)


def _google_reasons(answer: Answer) -> set[str]:
    errors = answer.field("error", "errors") or []
    return {str(e.get("reason")) for e in errors if isinstance(e, dict)}


def _quota_spent(remaining: str, reset: str) -> Matcher:
    """The ``X-RateLimit-*`` family: remaining 0 and a reset, whatever the status (GitHub uses 403)."""
    return lambda a: a.http_status in (403, 429) and _number(a.header(remaining)) == 0 and reset in a.headers


def _reset_wait(reset: str) -> Waiter:
    return lambda a: _retry_after(a) if "retry-after" in a.headers else reset_seconds(a.header(reset), a.now)


def _discord_wait(answer: Answer) -> float | None:
    for value in (answer.field("retry_after"), answer.header("x-ratelimit-reset-after")):
        if _number(value) is not None:
            return _number(value)
    return _retry_after(answer)


def _discord_scope(answer: Answer) -> str:
    """``shared`` is a limit on one resource (a channel): about the item; ``user`` and ``global``: about us."""
    shared = answer.header("x-ratelimit-scope") == "shared" and answer.field("global") is not True
    return ITEM if shared else SERVICE


def _aws_code(*codes: str) -> Matcher:
    wanted = set(codes)
    return lambda a: a.code in wanted or (a.code is None and _xml_code(a.text) in wanted)


_XML_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


def _xml_code(text: str) -> str | None:
    """S3 and the XML AWS APIs: ``<Error><Code>SlowDown</Code>...``."""
    match = _XML_CODE.search(text[:2000])
    return match.group(1) if match else None


def _slack_error(*errors: str) -> Matcher:
    wanted = set(errors)
    return lambda a: a.field("ok") is False and a.field("error") in wanted


def _retry_after_or_reset(answer: Answer) -> float | None:
    """Retry-After where sent; else the reset of a quota the OpenAI, Anthropic or IETF headers say is spent."""
    return read_signal(answer.headers, answer.now).wait_s if answer.headers else None


def _scope_from_quotas(answer: Answer) -> str | None:
    """A refusal that comes with a spent quota in its headers is about our budget; without, only evidence tells."""
    return SERVICE if answer.headers and read_signal(answer.headers, answer.now).exhausted else None


def _has_prefix(answer: Answer, prefix: str) -> bool:
    return any(name.startswith(prefix) for name in answer.headers)


def _rate_limit_words(answer: Answer) -> bool:
    return "rate limit" in said(answer).lower()


# --------------------------------------------------------------------------
# The table. Order matters: the first row that matches decides, so a refusal
# that looks like another (GitHub's quota 403 looks like bad credentials, an
# empty OpenAI account like a rate limit) comes before it.
# --------------------------------------------------------------------------

AWS_THROTTLING_CODES = (
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "BandwidthLimitExceeded",
    "EC2ThrottledException",
)
AWS_CREDENTIAL_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "AuthFailure",
)

CONVENTIONS: tuple[Convention, ...] = (
    # -- out of credit: stop, never retry into an empty account --------------------------------
    Convention(
        "openai-insufficient-quota",
        Meaning.OUT_OF_CREDIT,
        _codes("insufficient_quota"),
        source="https://platform.openai.com/docs/guides/error-codes/api-errors",
    ),
    Convention(
        "openai-billing-hard-limit",
        Meaning.OUT_OF_CREDIT,
        _codes("billing_hard_limit_reached"),
        source="https://platform.openai.com/docs/guides/error-codes/api-errors",
    ),
    Convention(
        "anthropic-credit-balance",
        Meaning.OUT_OF_CREDIT,
        lambda a: _error_code(a) == "billing_error" or "credit balance is too low" in said(a).lower(),
        source="https://docs.anthropic.com/en/api/errors",
    ),
    # -- Discord's 429 carries X-RateLimit-* too: its own row first, for its scope ---------------
    Convention(
        "discord-rate-limit",
        Meaning.THROTTLED,
        lambda a: (
            a.http_status == 429 and (a.field("retry_after") is not None or "x-ratelimit-reset-after" in a.headers)
        ),
        _discord_wait,
        scope_of=_discord_scope,
        source="https://discord.com/developers/docs/topics/rate-limits",
    ),
    # -- a quota spent until its reset ---------------------------------------------------------
    Convention(
        "github-quota",
        Meaning.QUOTA_SPENT,
        _quota_spent("x-ratelimit-remaining", "x-ratelimit-reset"),
        _reset_wait("x-ratelimit-reset"),
        SERVICE,
        source="https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api",
    ),
    Convention(
        "twitter-quota",
        Meaning.QUOTA_SPENT,
        _quota_spent("x-rate-limit-remaining", "x-rate-limit-reset"),
        _reset_wait("x-rate-limit-reset"),
        SERVICE,
        source="https://developer.x.com/en/docs/x-api/rate-limits",
    ),
    Convention(
        "google-quota-exceeded",
        Meaning.QUOTA_SPENT,
        lambda a: a.http_status == 403 and bool(_google_reasons(a) & {"quotaExceeded", "dailyLimitExceeded"}),
        _retry_after,
        SERVICE,
        source="https://developers.google.com/drive/api/guides/handle-errors",
    ),
    Convention(
        "google-rate-limit-exceeded",
        Meaning.THROTTLED,
        lambda a: a.http_status == 403 and bool(_google_reasons(a) & {"rateLimitExceeded", "userRateLimitExceeded"}),
        _retry_after,
        SERVICE,
        source="https://developers.google.com/drive/api/guides/handle-errors",
    ),
    Convention(
        "github-secondary-limit",
        Meaning.THROTTLED,
        lambda a: a.http_status == 403 and ("retry-after" in a.headers or _rate_limit_words(a)),
        _retry_after,
        SERVICE,
        source="https://docs.github.com/en/rest/using-the-rest-api/rate-limits-for-the-rest-api",
    ),
    # -- slow down ------------------------------------------------------------------------------
    Convention(
        "google-resource-exhausted",
        Meaning.THROTTLED,
        lambda a: a.field("error", "status") == "RESOURCE_EXHAUSTED",
        _google_retry_delay,
        SERVICE,
        source="https://cloud.google.com/apis/design/errors",
    ),
    Convention(
        "shopify-leaky-bucket",
        Meaning.THROTTLED,
        lambda a: a.http_status == 429 and "x-shopify-shop-api-call-limit" in a.headers,
        _retry_after,
        SERVICE,
        source="https://shopify.dev/docs/api/usage/limits",
    ),
    Convention(
        "stripe-lock-timeout",
        Meaning.THROTTLED,
        lambda a: a.http_status == 429 and _error_code(a) == "lock_timeout",
        _retry_after,
        ITEM,
        source="https://docs.stripe.com/rate-limits",
    ),
    Convention(
        "stripe-rate-limit",
        Meaning.THROTTLED,
        lambda a: a.http_status == 429 and _error_code(a) == "rate_limit",
        _retry_after,
        SERVICE,
        source="https://docs.stripe.com/rate-limits",
    ),
    Convention(
        "slack-ratelimited",
        Meaning.THROTTLED,
        _slack_error("ratelimited"),
        _retry_after,
        SERVICE,
        source="https://api.slack.com/apis/rate-limits",
    ),
    Convention(
        "anthropic-overloaded",
        Meaning.THROTTLED,
        lambda a: a.http_status == 529 or _error_code(a) == "overloaded_error",
        _retry_after,
        SERVICE,
        source="https://docs.anthropic.com/en/api/errors",
    ),
    Convention(
        "aws-throttling",
        Meaning.THROTTLED,
        _aws_code(*AWS_THROTTLING_CODES),
        _retry_after,
        SERVICE,
        source="https://docs.aws.amazon.com/sdkref/latest/guide/feature-retry-behavior.html",
    ),
    Convention(
        "openai-rate-limit",
        Meaning.THROTTLED,
        lambda a: (
            a.http_status == 429
            and (_error_code(a) == "rate_limit_exceeded" or _has_prefix(a, "x-ratelimit-remaining-"))
        ),
        _retry_after_or_reset,
        scope_of=_scope_from_quotas,
        source="https://platform.openai.com/docs/guides/rate-limits",
    ),
    Convention(
        "anthropic-rate-limit",
        Meaning.THROTTLED,
        lambda a: (
            a.http_status == 429 and (_error_code(a) == "rate_limit_error" or _has_prefix(a, "anthropic-ratelimit-"))
        ),
        _retry_after_or_reset,
        scope_of=_scope_from_quotas,
        source="https://docs.anthropic.com/en/api/rate-limits",
    ),
    Convention(
        "ietf-ratelimit",
        Meaning.THROTTLED,
        lambda a: a.http_status in (429, 503) and ("ratelimit" in a.headers or "ratelimit-remaining" in a.headers),
        _retry_after_or_reset,
        scope_of=_scope_from_quotas,
        source="https://datatracker.ietf.org/doc/draft-ietf-httpapi-ratelimit-headers/",
    ),
    Convention(
        "retry-after",
        Meaning.THROTTLED,
        _status(429, 503),
        _retry_after_or_reset,
        scope_of=_scope_from_quotas,
        source="https://www.rfc-editor.org/rfc/rfc9110#field.retry-after",
    ),
    # -- bad credentials -----------------------------------------------------------------------
    Convention(
        "slack-invalid-auth",
        Meaning.BAD_CREDENTIALS,
        _slack_error("invalid_auth", "not_authed", "token_revoked", "token_expired", "account_inactive"),
        source="https://api.slack.com/methods/auth.test",
    ),
    Convention(
        "aws-credentials",
        Meaning.BAD_CREDENTIALS,
        _aws_code(*AWS_CREDENTIAL_CODES),
        source="https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html",
    ),
    Convention(
        "postgres-bad-password",
        Meaning.BAD_CREDENTIALS,
        _sql("28P01", "28000", words=("password authentication failed",)),
        source="https://www.postgresql.org/docs/current/errcodes-appendix.html",
    ),
    Convention(
        "http-unauthorized",
        Meaning.BAD_CREDENTIALS,
        _status(401, 403),
        source="https://www.rfc-editor.org/rfc/rfc9110#name-401-unauthorized",
    ),
    # -- no room for another connection -----------------------------------------------------------
    Convention(
        "postgres-too-many-connections",
        Meaning.CAPACITY,
        _sql(
            "53300",
            words=("too many connections", "too many clients already", "remaining connection slots are reserved"),
        ),
        source="https://www.postgresql.org/docs/current/errcodes-appendix.html",
    ),
    Convention(
        "postgres-cannot-connect-now",
        Meaning.CAPACITY,
        _sql("57P03", words=("the database system is starting up", "the database system is shutting down")),
        source="https://www.postgresql.org/docs/current/errcodes-appendix.html",
    ),
    Convention(
        "pool-timeout",
        Meaning.CAPACITY,
        lambda a: a.code == "PoolTimeout",
        source="https://www.psycopg.org/psycopg3/docs/api/pool.html#psycopg_pool.PoolTimeout",
    ),
    # -- try again later ------------------------------------------------------------------------
    Convention(
        "postgres-connection-failure",
        Meaning.RETRYABLE,
        _sql("08006", "08001", "08003", "08004", "57P01", "40001", "40P01"),
        source="https://www.postgresql.org/docs/current/errcodes-appendix.html",
    ),
    Convention(
        "http-success",
        Meaning.OK,
        lambda a: a.http_status is not None and a.http_status < 400,
        source="https://www.rfc-editor.org/rfc/rfc9110#name-successful-2xx",
    ),
    Convention(
        "http-retryable",
        Meaning.RETRYABLE,
        lambda a: a.http_status in (408, 425) or (a.http_status or 0) >= 500,
        source="https://www.rfc-editor.org/rfc/rfc9110#name-server-error-5xx",
    ),
    Convention(
        "http-client-error",
        Meaning.PERMANENT,
        lambda a: a.http_status is not None and 400 <= a.http_status < 500,
        source="https://www.rfc-editor.org/rfc/rfc9110#name-client-error-4xx",
    ),
)

_FALLBACK = Convention(UNRECOGNISED, Meaning.PERMANENT, lambda a: True)
"""No row knew the answer: permanent, so an unknown failure is looked at rather than retried forever."""
