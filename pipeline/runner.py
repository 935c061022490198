"""The chunk runner: the code a worker executes, locally or on Burla.

It holds the promises that matter most, so it is small and paranoid:

* pace before every call (spacing, jitter, tokens), so N workers x one
  worker's rate never exceeds the target, whatever the other workers do;
* honour Retry-After on 429/503 with a bounded number of in-chunk retries;
* give every item exactly one row, whatever happens — including a failing
  ``connect()`` and a runner that dies half-way;
* stop early when the first calls all fail authentication, instead of
  recording a million 401s.

Nothing here imports Dagster; everything here pickles with cloudpickle.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.limits import Pacing
from pipeline.outcomes import Failure, Permanent, classify, redact, scrub
from pipeline.work import Item, Work, work_secrets


@dataclass
class Chunk:
    """A list of items for one worker. Not a tuple: Burla would unpack it."""

    backfill: str
    attempt: int
    run_id: str
    chunk_id: int
    item_ids: list[str]
    payloads: list[str | None]
    pacing: Pacing = field(default_factory=Pacing)

    def items(self) -> list[Item]:
        return [Item(i, p) for i, p in zip(self.item_ids, self.payloads)]


ROW_FIELDS = (
    "item_id", "ok", "retryable", "status", "http_status", "error", "tries",
    "started_at", "finished_at", "payload", "tokens", "retry_after_s",
)  # fmt: skip


def _column(index: int) -> property:
    return property(lambda self: [row[index] for row in self.rows], doc=f"the {ROW_FIELDS[index]} of every row")


@dataclass
class ChunkResult:
    """One row per item of a chunk.

    Rows are plain tuples in ``ROW_FIELDS`` order: the cheapest thing to build
    per item and to pickle back from a worker. The result names its own chunk,
    because Burla returns results in no particular order and without their
    input index.
    """

    backfill: str
    attempt: int
    run_id: str
    chunk_id: int
    rows: list[tuple] = field(default_factory=list)
    auth_aborted: bool = False

    item_id = _column(0)
    ok = _column(1)
    status = _column(3)
    http_status = _column(4)
    error = _column(5)
    retryable = _column(2)

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> dict[str, list]:
        """All rows as columns, in one pass (for the manifest writer)."""
        if not self.rows:
            return {name: [] for name in ROW_FIELDS}
        return dict(zip(ROW_FIELDS, map(list, zip(*self.rows))))

    def add_ok(self, item_id: str, started: float, tries: int, payload: str | None, tokens: float | None) -> None:
        self.rows.append((item_id, True, False, "ok", None, None, tries, started, time.time(), payload, tokens, None))

    def add_failure(self, item_id: str, started: float, tries: int, failure: Failure,
                    retry_after: float | None = None) -> None:
        self.rows.append((
            item_id, False, failure.retryable, failure.status, failure.http_status, failure.error, tries,
            started, time.time(), None, None, retry_after,
        ))  # fmt: skip


def failed_chunk_result(chunk: Chunk, status: str, error: str, done: set[str] | None = None) -> ChunkResult:
    """Every item (not already done) failed and retryable: used when a chunk could not run."""
    result = ChunkResult(chunk.backfill, chunk.attempt, chunk.run_id, chunk.chunk_id)
    fill_failed(result, chunk, Failure(status, True, error), done or set())
    return result


def fill_failed(result: ChunkResult, chunk: Chunk, failure: Failure, done: set[str]) -> None:
    now = time.time()
    for item_id in chunk.item_ids:
        if item_id not in done:
            result.add_failure(item_id, now, 0, failure)


class Pacer:
    """One worker's schedule: a virtual clock that each call pushes forward.

    A call may start once the clock allows it; it then moves the clock by the
    larger of the request spacing and its token cost at the worker's token
    rate. Reconciling with the reported usage moves it again, so a bad
    estimate is paid back on the next call instead of accumulating.
    """

    def __init__(self, pacing: Pacing, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self._pacing = pacing
        self._clock = clock
        self._sleep = sleep
        self._ready_at = clock()
        self._spaced_until = self._ready_at
        self._idle = not (pacing.min_interval_s or pacing.jitter_s or pacing.tokens_per_second)
        self._returns = deque(maxlen=pacing.window_calls) if pacing.window_calls else None

    def before_call(self, estimated_tokens: float = 0.0) -> None:
        if self._idle:
            return  # nothing to pace (no rate, no politeness, no tokens, no Retry-After pending)
        now = self._clock()
        if self._returns is not None and len(self._returns) == self._returns.maxlen:
            self._ready_at = max(self._ready_at, self._returns[0] + self._pacing.window_s)
        if self._ready_at > now:
            self._sleep(self._ready_at - now)
            now = self._clock()  # sleep can overshoot; space the next call from the real start
        start = now
        spacing = self._pacing.min_interval_s
        if self._pacing.jitter_s:
            spacing += random.uniform(0, self._pacing.jitter_s)
        self._spaced_until = start + spacing
        self._ready_at = start + max(spacing, self._token_seconds(estimated_tokens))

    def after_call(self) -> None:
        """Note when a call returned (politeness windows count from returns, see ``Pacing``)."""
        if self._returns is not None:
            self._returns.append(self._clock())

    def reconcile(self, estimated_tokens: float, actual_tokens: float) -> None:
        """Pay back (or charge) the estimate's error, but never schedule inside the request spacing."""
        moved = self._ready_at + self._token_seconds(actual_tokens) - self._token_seconds(estimated_tokens)
        self._ready_at = max(moved, self._spaced_until)

    def hold(self, seconds: float) -> None:
        """Wait at least ``seconds`` before the next call (Retry-After)."""
        self._idle = False
        self._ready_at = max(self._ready_at, self._clock() + seconds)

    def finish(self) -> None:
        """Keep the slot until the schedule allows another call.

        Without this, a chunk that ends right after a call would let the next
        chunk on the same slot call at once: two calls inside one interval.
        """
        remaining = self._ready_at - self._clock()
        if remaining > 0:
            self._sleep(remaining)

    def _token_seconds(self, tokens: float) -> float:
        rate = self._pacing.tokens_per_second
        return tokens / rate if rate and tokens else 0.0


def make_chunk_function(work: Work) -> Callable[[Chunk], ChunkResult]:
    """The function executors map over chunks; it carries the work by value."""

    def run_paceline_chunk(chunk: Chunk) -> ChunkResult:
        return run_chunk(work, chunk)

    return run_paceline_chunk


def run_chunk(work: Work, chunk: Chunk) -> ChunkResult:
    """Run one chunk and return exactly one row per item."""
    result = ChunkResult(chunk.backfill, chunk.attempt, chunk.run_id, chunk.chunk_id)
    secrets = work_secrets(work)
    try:
        client = work.connect()
    except Exception as error:  # noqa: BLE001 - a connect failure fails the whole chunk
        # Retryable (the database was down, the network blipped) unless the work said it is permanent.
        retryable = not isinstance(error, Permanent)
        message = redact(classify(error).error, secrets) or ""
        fill_failed(result, chunk, Failure("connect_failed", retryable, message), set())
        return result
    pacer = Pacer(chunk.pacing)
    try:
        _run_items(work, client, chunk, pacer, result, secrets)
        pacer.finish()
    except BaseException as error:  # the runner itself died: record the rest, then let it go
        done = set(result.item_id)
        fill_failed(result, chunk, Failure("runner_error", True, redact(repr(error), secrets) or ""), done)
        if not isinstance(error, Exception):
            raise
    finally:
        _close(client)
    return result


@dataclass
class _Retried:
    """How an item whose first call failed ended, after any in-chunk retries."""

    started: float
    tries: int
    failure: Failure | None = None
    value: Any = None
    retry_after: float | None = None


_encode_json = json.JSONEncoder(default=str).encode


def _run_items(work: Work, client: Any, chunk: Chunk, pacer: Pacer, result: ChunkResult,
               secrets: tuple[str, ...]) -> None:
    """The hot loop: one paced call per item, success handled inline, failures aside.

    It runs once per item of a million-item backfill, so it avoids a function
    call or an object per item wherever it can; the rare paths live in helpers.
    """
    call, cost, usage = work.call, getattr(work, "cost", None), getattr(work, "usage", None)
    auth_failures = 0
    for position, item in enumerate(chunk.items()):
        try:
            estimate = cost(item) if cost else 0.0
        except Exception as error:  # noqa: BLE001 - an item the estimate cannot read is this item's failure
            result.add_failure(item.id, time.time(), 0, _scrubbed(classify(error), secrets))
            continue
        pacer.before_call(estimate)
        started, tries, retry_after = time.time(), 1, None
        try:
            value = call(client, item)
        except Exception as error:  # noqa: BLE001 - every failure becomes a row
            pacer.after_call()
            retried = _retry_in_chunk(work, client, item, chunk.pacing, pacer, estimate, error)
            started, tries, retry_after = retried.started, retried.tries, retried.retry_after
            if retried.failure is not None:
                failure = _scrubbed(retried.failure, secrets)
                result.add_failure(item.id, started, tries, failure, retry_after)
                auth_failures += failure.auth
                # Fail fast only while *every* call so far was refused: bad credentials, not one odd 403.
                if failure.auth and auth_failures == position + 1 >= chunk.pacing.auth_fail_fast:
                    _abort_for_credentials(result, chunk, failure)
                    return
                continue
            value = retried.value
        else:
            pacer.after_call()
        actual = _reported_usage(usage, value)
        if actual is not None:
            pacer.reconcile(estimate, actual)
        try:
            payload = None if value is None else scrub(_encode_json(value), secrets)
        except (TypeError, ValueError) as error:  # a payload JSON cannot hold is a bug in call: permanent
            result.add_failure(item.id, started, tries, _scrubbed(classify(error), secrets), retry_after)
            continue
        result.add_ok(item.id, started, tries, payload, actual if actual is not None else (estimate or None))


def _reported_usage(usage: Callable[[Any], float | None] | None, value: Any) -> float | None:
    """Tokens the response says it used; a payload without them falls back to the estimate."""
    try:
        return usage(value) if usage else None
    except Exception:  # noqa: BLE001 - the call succeeded; only the reconciliation is lost
        return None


def _scrubbed(failure: Failure, secrets: tuple[str, ...]) -> Failure:
    return dataclasses.replace(failure, error=redact(failure.error, secrets) or "")


def _abort_for_credentials(result: ChunkResult, chunk: Chunk, failure: Failure) -> None:
    result.auth_aborted = True
    fill_failed(result, chunk, Failure("auth_aborted", True, failure.error, failure.http_status), set(result.item_id))


def _retry_in_chunk(work: Work, client: Any, item: Item, pacing: Pacing, pacer: Pacer, estimate: float,
                    error: Exception) -> _Retried:
    """After a failed call: wait out throttling and call again, up to the bounded number of retries."""
    retried = _Retried(started=time.time(), tries=1)
    while True:
        failure = classify(error)
        if failure.retry_after is not None:
            retried.retry_after = max(retried.retry_after or 0.0, failure.retry_after)
        if not failure.throttled or retried.tries > pacing.max_throttle_retries:
            retried.failure = failure
            return retried
        wait = failure.retry_after if failure.retry_after is not None else 1.0
        pacer.hold(min(wait, pacing.max_retry_after_s))
        pacer.before_call(estimate)
        retried.started = time.time()
        retried.tries += 1
        try:
            retried.value = work.call(client, item)
            return retried
        except Exception as again:  # noqa: BLE001 - every failure becomes a row
            error = again
        finally:
            pacer.after_call()


def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - a failing close must not lose the chunk's rows
            pass
