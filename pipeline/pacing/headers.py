"""What a service says about its limits, read from one response's headers.

The throttle loop of closed-loop pacing needs three things from a service:
how long to wait after a refusal, how fast it may go until a quota resets
(``remaining / reset_s``), and whether a quota is already spent. Services say
so in a handful of header dialects; this module reads all of them into one
:class:`ServiceSignal` and reads no clock of its own (``now`` is handed in,
for the formats that give a point in time rather than a delay).

    >>> read_signal({"x-ratelimit-remaining-requests": "30", "x-ratelimit-reset-requests": "6s"}).requests.rate
    5.0

Formats read
    ``Retry-After``            seconds, or an HTTP-date (RFC 9110 section 10.2.3;
                               IMF-fixdate and the two obsolete date forms)
    ``retry-after-ms``         milliseconds (OpenAI, Anthropic SDKs); wins over
                               ``Retry-After`` because it is the more precise of the two
    ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
                               OpenAI (and Groq, Azure OpenAI); resets are Go durations
                               such as ``6m0s``, ``1s``, ``20ms``, ``1h2m3.5s``; a bare
                               number is read as seconds (Azure sends those)
    ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}``
                               Anthropic; resets are RFC 3339 timestamps. ``tokens-*``
                               is already "the most restrictive token limit"; without
                               it, the tighter of ``input-tokens`` and ``output-tokens``
                               (by remaining share) stands for tokens, which is safe to
                               pace total tokens by, since total >= either part
    ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset``
                               IETF draft-ietf-httpapi-ratelimit-headers up to -06
                               (integers; reset in seconds), with ``RateLimit-Policy:
                               100;w=60`` giving the window
    ``RateLimit: limit=100, remaining=50, reset=5``
                               the same draft's -07 (a dictionary)
    ``RateLimit: "default";r=50;t=30`` and ``RateLimit-Policy: "default";q=100;w=60``
                               the draft from -08 on (structured-field lists; the
                               policy named in ``RateLimit`` gives ``q`` and ``w``).
                               Only policies counted in requests (no ``qu``, or
                               ``qu="requests"``) are read; of several, the one with
                               the lowest allowed rate wins, as the draft asks servers
                               to do in -07

    ``X-RateLimit-{Limit,Remaining,Reset}``
                               GitHub (reset in epoch seconds), Discord (epoch seconds
                               with a fraction, and ``X-RateLimit-Reset-After``, a delay,
                               which wins), and services that send a delay there; an
                               epoch and a delay are told apart by magnitude
                               (:func:`reset_seconds`). Twitter/X spells it
                               ``x-rate-limit-*``
    ``X-Shopify-Shop-Api-Call-Limit: 39/40``
                               Shopify's leaky bucket: used/size. The free slots are the
                               remaining budget, and the bucket's time to drain (used /
                               ``SHOPIFY_LEAK_PER_S``, the standard plan's 2 calls/s) its
                               reset: a nearly empty bucket allows a burst, a half-full one
                               the drain rate, a fuller one less, so workers settle where
                               the bucket stops filling, whatever its real drain rate

Where one response carries several dialects, the first of OpenAI, Anthropic,
IETF, the X-RateLimit family and Shopify that says anything about a quota gives all of that quota, so limit,
remaining and reset never mix two vendors' windows. An absent or malformed
header (a word, a negative number such as Azure's ``-1``, an infinite one, a
date that does not parse) reads as ``None``: headers are hints, and a bad hint
must never fail a call.

``pipeline.refusals`` reads the same headers when a call is refused, so the
throttle loop and the refusal's verdict never disagree about a quota.

References: RFC 9110 (HTTP Semantics) 10.2.3 and 5.6.7; RFC 3339; RFC 8941
(Structured Field Values); draft-ietf-httpapi-ratelimit-headers-06, -07 and
-10; the OpenAI and Anthropic "Rate limits" guides; Go's ``time.ParseDuration``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

__all__ = ["NO_SIGNAL", "Quota", "ServiceSignal", "read_signal", "reset_seconds", "retry_after_s"]

EPOCH_AFTER = 1_000_000_000.0
"""A reset above this is Unix time (after 2001-09-09), below it a delay in seconds (under 31 years):
no service asks for a wait of 31 years, and no quota resets before 2001."""

SHOPIFY_LEAK_PER_S = 2.0
"""The REST Admin API bucket drains 2 calls/s on standard plans (4 on Plus): assume the slower."""


@dataclass(frozen=True)
class Quota:
    """One budget as the service stated it: ``limit`` per window, ``remaining`` of it, ``reset_s`` until it refills.

    ``window_s`` is known only where the service names its window (IETF
    ``RateLimit-Policy``); a per-minute budget enforced per second shows here.
    """

    limit: float | None = None
    remaining: float | None = None
    reset_s: float | None = None
    window_s: float | None = None

    @property
    def known(self) -> bool:
        """True when the service said anything about this budget."""
        return self != Quota()

    @property
    def exhausted(self) -> bool:
        """Nothing left until the reset: the next call would be refused."""
        return self.remaining is not None and self.remaining < 1

    @property
    def rate(self) -> float | None:
        """Units per second the service allows until the reset (``remaining / reset_s``).

        ``None`` when either is unknown, or the reset is now (a refill is due,
        so the remaining count says nothing about the next second).
        """
        if self.remaining is None or not self.reset_s:
            return None
        return self.remaining / self.reset_s


@dataclass(frozen=True)
class ServiceSignal:
    """Everything one response said about the service's limits; every field may be unknown."""

    retry_after_s: float | None = None
    requests: Quota = field(default_factory=Quota)
    tokens: Quota = field(default_factory=Quota)

    @property
    def exhausted(self) -> bool:
        """A request or token quota is spent."""
        return self.requests.exhausted or self.tokens.exhausted

    @property
    def wait_s(self) -> float | None:
        """How long to hold before the next call, if the service said.

        Retry-After when sent (the draft says it takes precedence); else the
        latest reset among spent quotas, since every one of them must refill.
        """
        if self.retry_after_s is not None:
            return self.retry_after_s
        resets = [q.reset_s for q in (self.requests, self.tokens) if q.exhausted and q.reset_s is not None]
        return max(resets, default=None)


NO_SIGNAL = ServiceSignal()
"""What a response without rate-limit headers says: nothing."""


def read_signal(headers: Mapping[str, str], now: float | None = None) -> ServiceSignal:
    """Read every rate-limit dialect in ``headers`` (``httpx.Headers`` or a plain dict, any case).

    ``now`` (Unix seconds; default the wall clock) turns HTTP-dates and RFC
    3339 resets into delays; nothing else depends on it.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    at = time.time() if now is None else now
    requests = _first_known(
        _openai(lowered, "requests"),
        _anthropic(lowered, "requests", at),
        _ietf(lowered),
        _x_ratelimit(lowered, "x-ratelimit-", at),
        _x_ratelimit(lowered, "x-rate-limit-", at),
        _shopify(lowered),
    )
    tokens = _first_known(_openai(lowered, "tokens"), _anthropic_tokens(lowered, at))
    return ServiceSignal(retry_after_s(lowered, at), requests, tokens)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the service asked us to wait: ``retry-after-ms`` where sent, else ``Retry-After``.

    The one Retry-After reader of the project (``outcomes`` uses it for the
    wait after a 429/503). An HTTP-date in the past means "now": 0.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    millis = _number(lowered.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = lowered.get("retry-after")
    seconds = _number(value)
    if seconds is not None or value is None:
        return seconds
    return _until(_http_date(value), time.time() if now is None else now)


# --------------------------------------------------------------------------
# Dialects
# --------------------------------------------------------------------------


def _openai(headers: dict[str, str], unit: str) -> Quota:
    return Quota(
        limit=_number(headers.get(f"x-ratelimit-limit-{unit}")),
        remaining=_number(headers.get(f"x-ratelimit-remaining-{unit}")),
        reset_s=_go_duration(headers.get(f"x-ratelimit-reset-{unit}")),
    )


def _anthropic(headers: dict[str, str], unit: str, now: float) -> Quota:
    prefix = f"anthropic-ratelimit-{unit}-"
    return Quota(
        limit=_number(headers.get(prefix + "limit")),
        remaining=_number(headers.get(prefix + "remaining")),
        reset_s=_until(_rfc3339(headers.get(prefix + "reset")), now),
    )


def _anthropic_tokens(headers: dict[str, str], now: float) -> Quota:
    """``tokens-*``, else the input or output budget with the smaller share left."""
    combined = _anthropic(headers, "tokens", now)
    if combined.known:
        return combined
    parts = [q for q in (_anthropic(headers, u, now) for u in ("input-tokens", "output-tokens")) if q.known]
    return min(parts, key=_share_left, default=Quota())


def _x_ratelimit(headers: dict[str, str], prefix: str, now: float) -> Quota:
    """GitHub, Discord, Twitter/X and many others: ``limit``, ``remaining``, ``reset`` (epoch or delay)."""
    reset = _number(headers.get(prefix + "reset-after"))  # Discord's delay, more precise than its epoch
    return Quota(
        limit=_number(headers.get(prefix + "limit")),
        remaining=_number(headers.get(prefix + "remaining")),
        reset_s=reset if reset is not None else reset_seconds(headers.get(prefix + "reset"), now),
    )


def _shopify(headers: dict[str, str]) -> Quota:
    """``used/size``: the free slots are the remaining budget, refilled at the bucket's drain rate."""
    used, _, size = (headers.get("x-shopify-shop-api-call-limit") or "").partition("/")
    used_n, size_n = _number(used), _number(size)
    if used_n is None or not size_n:
        return Quota()
    free = max(0.0, size_n - used_n)
    return Quota(limit=size_n, remaining=free, reset_s=max(used_n, 1.0) / SHOPIFY_LEAK_PER_S)


def reset_seconds(value: str | None, now: float) -> float | None:
    """A reset written as epoch seconds or as a delay, as seconds from ``now`` (0 once it has passed)."""
    number = _number(value)
    if number is None:
        return None
    return max(0.0, number - now) if number >= EPOCH_AFTER else number


def _share_left(quota: Quota) -> float:
    if quota.remaining is None:
        return math.inf
    return quota.remaining / quota.limit if quota.limit else quota.remaining


def _ietf(headers: dict[str, str]) -> Quota:
    """The draft's three generations, newest first (see the module docstring)."""
    policies = dict(_sf_list(headers.get("ratelimit-policy")))
    current = _sf_list(headers.get("ratelimit"))
    if current and not any("=" in name for name, _ in current):  # -08 on: named policies
        return _tightest(_ietf_named(name, params, policies.get(name)) for name, params in current)
    if current:  # -07: one dictionary, its members read here as bare "key=value" items
        members = {key.strip(): value for key, _, value in (name.partition("=") for name, _ in current)}
        limit, remaining, reset = members.get("limit"), members.get("remaining"), members.get("reset")
    else:  # up to -06: three fields
        limit = _first_member(headers.get("ratelimit-limit"))
        remaining, reset = headers.get("ratelimit-remaining"), headers.get("ratelimit-reset")
    # Before -08 a policy is "quota;w=window": the window is that of the policy whose quota is the limit.
    window = policies.get(limit or "", {}).get("w")
    return Quota(_number(limit), _number(remaining), _number(reset), _number(window))


def _ietf_named(name: str, params: dict[str, str], policy: dict[str, str] | None) -> Quota | None:
    """One ``"name";r=..;t=..`` item with its policy's ``q`` and ``w``; ``None`` if not counted in requests."""
    policy = policy or {}
    if policy.get("qu", '"requests"') != '"requests"':
        return None
    return Quota(_number(policy.get("q")), _number(params.get("r")), _number(params.get("t")), _number(policy.get("w")))


def _tightest(quotas: Iterable[Quota | None]) -> Quota:
    """Of several policies, the one allowing the lowest rate now (an unknown rate counts as unlimited)."""
    known = [q for q in quotas if q is not None and q.known]
    return min(known, key=lambda q: (not q.exhausted, q.rate if q.rate is not None else math.inf), default=Quota())


def _first_known(*quotas: Quota) -> Quota:
    return next((q for q in quotas if q.known), Quota())


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def _number(value: str | None) -> float | None:
    """A finite, non-negative number, else ``None`` (a word, ``-1``, ``inf``, ``nan``)."""
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ms|us|µs|ns|h|m|s)")


def _go_duration(value: str | None) -> float | None:
    """``6m0s`` -> 360.0, ``20ms`` -> 0.02, ``1h2m3.5s`` -> 3723.5; a bare number is seconds."""
    if value is None:
        return None
    text = value.strip()
    plain = _number(text)
    if plain is not None or not text:
        return plain
    parts = _GO_PART.findall(text)
    if "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _GO_UNITS[unit] for number, unit in parts)


def _http_date(value: str) -> datetime | None:
    try:
        return parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None


def _rfc3339(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.strip())
    except ValueError:
        return None


def _until(moment: datetime | None, now: float) -> float | None:
    """Seconds from ``now`` to ``moment`` (a moment without a zone is UTC); 0 once it has passed."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - now)


# --------------------------------------------------------------------------
# Structured-field lists, just enough of RFC 8941 for the RateLimit fields
# --------------------------------------------------------------------------


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts, current, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts]


def _sf_list(value: str | None) -> list[tuple[str, dict[str, str]]]:
    """``'"a";q=1;w=2, "b";q=3'`` -> ``[('"a"', {"q": "1", "w": "2"}), ('"b"', {"q": "3"})]``.

    Bare items keep their quotes so a string is told from a token; parameter
    values are left as text for :func:`_number`. Empty members are dropped.
    """
    members = []
    for member in _split_outside_quotes(value or "", ","):
        item, *params = _split_outside_quotes(member, ";")
        if item:
            members.append((item, dict(_param(p) for p in params)))
    return members


def _param(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.strip().lower(), value.strip() or "?1"


def _first_member(value: str | None) -> str | None:
    """The first member of a list field: ``"100, 100;w=60"`` (early drafts) -> ``"100"``."""
    members = _sf_list(value)
    return members[0][0] if members else None
