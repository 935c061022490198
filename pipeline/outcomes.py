"""What happened to one call, in the few classes a retry policy needs.

A call either returns a payload or raises. The exception decides the row:
throttled (429/503: wait Retry-After, try again in the chunk), retryable
(5xx, timeout, connection trouble: a later retry round may heal it) or
permanent (other 4xx, a payload we cannot decode, a bug in ``call``).
Work functions may raise ``Throttled``, ``Retryable`` or ``Permanent``
themselves; common httpx and psycopg errors are classified without them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from pipeline.pacing.headers import NO_SIGNAL, ServiceSignal, read_signal, retry_after_s

AUTH_STATUSES = frozenset({401, 403})
THROTTLE_STATUSES = frozenset({429, 503})
_RETRYABLE_HTTP = frozenset({408, 425, 500, 502, 504})
_RETRYABLE_DB_ERRORS = frozenset({"OperationalError", "InterfaceError", "SerializationFailure", "DeadlockDetected"})
_MAX_ERROR_CHARS = 500


class Throttled(Exception):
    """The service asked us to slow down; ``retry_after`` is in seconds, if it said."""

    def __init__(self, message: str = "throttled", retry_after: float | None = None, http_status: int = 429):
        super().__init__(message)
        self.retry_after = retry_after
        self.http_status = http_status


class Retryable(Exception):
    """A failure a later retry round may heal (the service was down, a timeout)."""

    def __init__(self, message: str, status: str = "retryable"):
        super().__init__(message)
        self.status = status


class Permanent(Exception):
    """A failure retrying will not fix (bad input, a missing record)."""

    def __init__(self, message: str, status: str = "permanent"):
        super().__init__(message)
        self.status = status


class CallAgain(Exception):
    """The call spent its paced slot on a prerequisite (a site's robots.txt): call the item again.

    The runner puts the item back at the head of the chunk, without counting a
    try, so every request the service receives went through the pacer.
    ``after_s`` > 0 also holds the worker's pacer that long first: a site's
    ``Crawl-delay`` then spaces the next call, with no call thread asleep
    inside ``call`` and no latency sample inflated by the wait.
    """

    def __init__(self, message: str = "call again", after_s: float = 0.0):
        super().__init__(message)
        self.after_s = after_s


@dataclass(frozen=True)
class Failure:
    """A failed call, classified. ``status`` is a short machine-friendly word."""

    status: str
    retryable: bool
    error: str
    http_status: int | None = None
    retry_after: float | None = None

    @property
    def throttled(self) -> bool:
        return self.http_status in THROTTLE_STATUSES

    @property
    def auth(self) -> bool:
        return self.http_status in AUTH_STATUSES


def classify(error: BaseException) -> Failure:
    """Map any exception raised by ``connect`` or ``call`` to a ``Failure``."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, Throttled):  # same words as an HTTP 429/503 classified below
        return Failure(f"http_{error.http_status}", True, text, error.http_status, error.retry_after)
    if isinstance(error, Retryable):
        return Failure(error.status, True, text)
    if isinstance(error, Permanent):
        return Failure(error.status, False, text)
    response = getattr(error, "response", None)
    if response is not None and hasattr(response, "status_code"):
        return _classify_http(response, text)
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
        return Failure("bad_payload", False, text)
    names = {cls.__name__ for cls in type(error).__mro__}
    if "TimeoutException" in names or isinstance(error, TimeoutError):
        return Failure("timeout", True, text)
    if "TransportError" in names or isinstance(error, (ConnectionError, OSError)):
        return Failure("connection", True, text)
    if type(error).__module__.startswith("psycopg") and names & _RETRYABLE_DB_ERRORS:
        return Failure("db_unavailable", True, text)
    return Failure("exception", False, text)


def _classify_http(response: object, text: str) -> Failure:
    code = int(response.status_code)  # type: ignore[attr-defined]
    status = f"http_{code}"
    if code in THROTTLE_STATUSES:
        return Failure(status, True, text, code, retry_after_s(response.headers))  # type: ignore[attr-defined]
    if code in _RETRYABLE_HTTP or code >= 500:
        return Failure(status, True, text, code)
    return Failure(status, False, text, code)


def service_signal(outcome: object, now: float | None = None) -> ServiceSignal:
    """What the service said about its limits, from a call's result or the exception it raised.

    The throttle loop feeds on successes too (remaining quota shrinks before
    any 429), so a returned ``httpx.Response`` is read like the response
    inside an ``httpx.HTTPStatusError`` (or any error with ``.response``). A
    ``Throttled`` raised by a work function carries only its Retry-After.
    Anything else says nothing.
    """
    import httpx

    if isinstance(outcome, Throttled):
        return ServiceSignal(retry_after_s=outcome.retry_after)
    response = outcome if isinstance(outcome, httpx.Response) else getattr(outcome, "response", None)
    headers = getattr(response, "headers", None)
    return read_signal(headers, now) if headers is not None else NO_SIGNAL


_SECRETISH = re.compile(r"(?i)(bearer\s+|(?:api[_-]?key|token|secret|password)=)[^\s&'\"]+")


def redact(text: str | None, secrets: tuple[str, ...] = ()) -> str | None:
    """Remove secrets from text that is about to be stored or logged.

    Known secret values are removed wherever they appear; bearer tokens and
    key-like query parameters are removed even when we were not told about them.
    """
    if text is None:
        return None
    text = _SECRETISH.sub(lambda m: m.group(1) + "***", scrub(text, secrets))
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every known secret value in ``text`` (payloads keep their full length otherwise)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
