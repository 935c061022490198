"""What happened to one call, in the few classes a retry policy needs.

A call either returns a payload or raises. When the service answered (an HTTP
status, a SQLSTATE, an AWS error code), ``pipeline.refusals`` reads what it
meant from its table of conventions, and the row's status follows from that
one verdict: throttled (wait, try again in the chunk), quota spent, out of
credit, bad credentials, no room for a connection, retryable or permanent.
Failures the service never answered are classified by their type: timeouts
and connection trouble are retryable, a payload we cannot decode or a bug in
``call`` is permanent. Work functions may raise ``Throttled``, ``Retryable``
or ``Permanent`` themselves.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PacelineError
from pipeline.refusals import UNRECOGNISED, Answer, Convention, Meaning, Verdict, read

_RETRYABLE_DB_ERRORS = frozenset({"OperationalError", "InterfaceError", "SerializationFailure", "DeadlockDetected"})
_MAX_ERROR_CHARS = 500
_MAX_BODY_CHARS = 4000
OUT_OF_CREDIT = "out_of_credit"
"""The status of an item an empty account stopped: retryable, never an attempt spent (``pipeline.ledger``)."""
_STATUS_OF_MEANING = {Meaning.OUT_OF_CREDIT: OUT_OF_CREDIT, Meaning.CAPACITY: "capacity"}
"""Row statuses of the meanings whose HTTP status alone would mislead a reader of the manifest."""


class CallSignal(PacelineError):
    """Raised inside ``Work.call`` to say what a failure means (or to ask for the item again).

    The runner turns each into the item's row, so none ever reaches a user.
    """


class Throttled(CallSignal):
    """The service asked us to slow down; ``retry_after`` is in seconds, if it said."""

    def __init__(self, message: str = "throttled", retry_after: float | None = None, http_status: int = 429):
        super().__init__(message)
        self.retry_after = retry_after
        self.http_status = http_status


class Retryable(CallSignal):
    """A failure a later retry round may heal (the service was down, a timeout)."""

    def __init__(self, message: str, status: str = "retryable"):
        super().__init__(message)
        self.status = status


class Permanent(CallSignal):
    """A failure retrying will not fix (bad input, a missing record)."""

    def __init__(self, message: str, status: str = "permanent"):
        super().__init__(message)
        self.status = status


class CallAgain(CallSignal):
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


class Refused(CallSignal):
    """The service answered, and the refusal table reads the answer as a "no" (a 4xx/5xx, or Slack's 200
    ``"ok": false``). ``response`` is the answer, for ``classify``."""

    def __init__(self, response: Any, words: str):
        super().__init__(f"HTTP {response.status_code} from {response.request.url}: {words}")
        self.response = response


def raise_for_refusal(response: Any, conventions: tuple[Convention, ...] = ()) -> None:
    """``raise_for_status`` that also knows the services whose refusals come with a 2xx status.

    Raises ``Refused`` unless the table (and ``conventions``, the work's own
    rows) reads the response as what was asked for.
    """
    answer = response_answer(response, time.time())
    verdict = read(answer, conventions)
    if verdict.meaning is not Meaning.OK:
        raise Refused(response, verdict.said)


@dataclass(frozen=True)
class Failure:
    """A failed call, classified. ``status`` is a short machine-friendly word, the row's status.

    ``meaning`` is what the service meant (``pipeline.refusals``); without a
    verdict it follows ``retryable``. ``scope`` says whether a throttle is
    about the item or the whole service, where the service said so.
    """

    status: str
    retryable: bool
    error: str
    http_status: int | None = None
    retry_after: float | None = None
    meaning: Meaning | None = None
    scope: str | None = None
    convention: str = ""

    def __post_init__(self) -> None:
        if self.meaning is None:
            object.__setattr__(self, "meaning", Meaning.RETRYABLE if self.retryable else Meaning.PERMANENT)

    @property
    def throttled(self) -> bool:
        return self.meaning in (Meaning.THROTTLED, Meaning.QUOTA_SPENT)

    @property
    def auth(self) -> bool:
        return self.meaning is Meaning.BAD_CREDENTIALS

    @property
    def out_of_credit(self) -> bool:
        return self.meaning is Meaning.OUT_OF_CREDIT

    @property
    def capacity(self) -> bool:
        return self.meaning is Meaning.CAPACITY


def classify(error: BaseException, conventions: tuple[Convention, ...] = (), now: float | None = None) -> Failure:
    """Map any exception raised by ``connect`` or ``call`` to a ``Failure``.

    ``conventions`` are the work's own rows, asked before the built-in table.
    """
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, Throttled):  # same words as an HTTP 429/503 classified below
        return Failure(f"http_{error.http_status}", True, text, error.http_status, error.retry_after, Meaning.THROTTLED)
    if isinstance(error, Retryable):
        return Failure(error.status, True, text)
    if isinstance(error, Permanent):
        return Failure(error.status, False, text)
    answer = answer_of(error, time.time() if now is None else now)
    if answer is not None:
        verdict = read(answer, conventions)
        if verdict.convention != UNRECOGNISED or answer.http_status is not None:
            return _from_verdict(verdict, answer, text, _status_word(error, answer, verdict))
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


def _status_word(error: BaseException, answer: Answer, verdict: Verdict) -> str:
    if answer.http_status is not None and answer.http_status >= 400:
        return f"http_{answer.http_status}"
    if answer.http_status is not None:  # a refusal in a success's clothes (Slack's 200 "ok": false)
        return "refused"
    if verdict.meaning is Meaning.RETRYABLE and type(error).__module__.startswith("psycopg"):
        return "db_unavailable"
    return verdict.meaning.value


def _from_verdict(verdict: Verdict, answer: Answer, text: str, status: str) -> Failure:
    return Failure(
        _STATUS_OF_MEANING.get(verdict.meaning, status),
        verdict.retryable,
        _with_words(text, verdict),
        answer.http_status,
        verdict.wait_s,
        verdict.meaning,
        verdict.scope,
        verdict.convention,
    )


def _with_words(text: str, verdict: Verdict) -> str:
    """The error as raised, plus the convention that read it and the service's own words when not in it yet."""
    if verdict.convention == UNRECOGNISED:
        return text
    words = f": {verdict.said}" if verdict.said and verdict.said not in text else ""
    return f"{text} [{verdict.convention}{words}]"


def answer_of(error: BaseException, now: float) -> Answer | None:
    """What the service answered, where ``error`` carries an answer: an HTTP response, a SQLSTATE, an AWS code.

    None for failures the service never answered (a timeout, a reset, a bug).
    """
    response = getattr(error, "response", None)
    if response is not None and hasattr(response, "status_code"):
        return response_answer(response, now)
    if isinstance(response, dict) and "Error" in response:  # botocore's ClientError
        return _aws_answer(response, now)
    sqlstate = getattr(error, "sqlstate", None)
    if type(error).__module__.startswith("psycopg"):
        return Answer(code=sqlstate or type(error).__name__, text=str(error), now=now)
    return None


def response_answer(response: Any, now: float) -> Answer:
    """An httpx response as an ``Answer`` (the body read as JSON when it is JSON)."""
    headers = {name.lower(): value for name, value in response.headers.items()}
    try:
        text = response.text[:_MAX_BODY_CHARS]
    except Exception:  # noqa: BLE001 - a streamed or undecodable body says nothing we can read
        text = ""
    return Answer(int(response.status_code), headers, _json_or_none(text), text, None, now)


def _aws_answer(response: dict[str, Any], now: float) -> Answer:
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    headers = {k.lower(): str(v) for k, v in (meta.get("HTTPHeaders") or {}).items()}
    return Answer(meta.get("HTTPStatusCode"), headers, None, str(error.get("Message", "")), error.get("Code"), now)


def _json_or_none(text: str) -> Any:
    if not text.lstrip().startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


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
