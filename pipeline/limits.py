"""Service limits, and the execution plan derived from them.

A user writes down the contract of the service they are about to hit (1,000
requests/s, 200 safe connections, 60,000 tokens/min...). Everything else —
how many workers run at once, how far apart one worker spaces its calls, how
many items a chunk holds — is derived here, so that the declared limit holds
*by construction*: no worker ever needs to know what the others are doing.

The arithmetic is the one from the Burla guide,

    global throughput = live workers x per-worker throughput,

applied with a ``safety`` factor so a first run aims well below the contract.
``safety`` scales the *global* limits (rates, tokens, connections, batches).
Per-worker politeness and the worker cap are ceilings the user chose
themselves, so they are applied as written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.defaults import (
    DEFAULT_JITTER_S,
    DEFAULT_MAX_RETRY_AFTER_S,
    DEFAULT_MAX_THROTTLE_RETRIES,
    DEFAULT_SAFETY,
    DEFAULT_TARGET_CHUNK_SECONDS,
)
from pipeline.errors import ConfigError
from pipeline.pacing.schedule import DEFAULT_MAX_IN_FLIGHT, DEFAULT_SECONDS_PER_CALL, Pacing

JITTER_HEADROOM = 0.02
"""Per-worker ceilings are hard (no safety factor), so pacing keeps this margin below them."""


class LimitError(ConfigError):
    """A declaration or an override that cannot be run safely.

    The message always names the field, the numbers and the fix, because it is
    shown to the user as is, before any external call is made.
    """


DESCRIPTION = "description"
"""The metadata key of a field's description: the Dagster resource and the YAML component read it."""


def _declared(default: object, description: str) -> Any:
    """A field with the words a user reads beside it, kept with the field so every layer shows the same."""
    return field(default=default, metadata={DESCRIPTION: description})


@dataclass(frozen=True)
class ServiceLimit:
    """The external contract of one service. Declare any combination.

    The resource and the YAML component declare none of these fields again:
    they derive theirs, types, defaults and descriptions, from this class.
    """

    name: str = _declared("service", "The service's name: resource key, concurrency pool and folder-safe label.")
    requests_per_second: float | None = _declared(None, "Requests per second the service allows in total.")
    requests_per_minute: float | None = _declared(None, "Requests per minute the service allows in total.")
    tokens_per_minute: float | None = _declared(None, "LLM token budget per minute (the llm workload needs it).")
    safe_connections: int | None = _declared(
        None, "Connections the database tolerates (the database workloads need it)."
    )
    concurrent_batches: int | None = _declared(
        None, "Batches the service accepts in flight (the batch workload needs it)."
    )
    per_worker_requests_per_second: float | None = _declared(
        None, "Politeness: at most this many requests/s from any one worker, applied as written."
    )
    jitter_s: float = _declared(DEFAULT_JITTER_S, "Random extra wait (seconds) between one worker's calls.")
    max_workers: int | None = _declared(None, "At most this many workers at once, applied as written.")
    max_workers_per_domain: int | None = _declared(
        None, "Scraping: at most this many workers on any one domain (ByDomain items)."
    )
    safety: float = _declared(DEFAULT_SAFETY, "Fraction of the limit a run aims at (0.5 for a first run).")

    def __post_init__(self) -> None:
        for name in _POSITIVE_FIELDS:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LimitError(
                    f"{self.name}: {name} must be a positive number, got {value!r}. "
                    f"Write the service's real limit, or leave {name} unset."
                )
        for name in ("safe_connections", "concurrent_batches", "max_workers", "max_workers_per_domain"):
            value = getattr(self, name)
            if value is not None and int(value) != value:
                raise LimitError(f"{self.name}: {name} must be a whole number, got {value!r}.")
        if not 0 < self.safety <= 1:
            raise LimitError(
                f"{self.name}: safety must be in (0, 1], got {self.safety!r}. "
                "It is the fraction of the limit a run aims at: 0.5 is a good first run."
            )
        if self.jitter_s < 0:
            raise LimitError(f"{self.name}: jitter_s must be >= 0 seconds, got {self.jitter_s!r}.")
        if not any(getattr(self, name) is not None for name in _LIMIT_FIELDS):
            raise LimitError(
                f"{self.name}: no limit declared. Set at least one of "
                f"{', '.join(_LIMIT_FIELDS)} (for example requests_per_second=1000)."
            )

    def global_rate(self) -> float | None:
        """Requests/s the service allows in total (the tighter of /s and /min)."""
        rates = [self.requests_per_second]
        if self.requests_per_minute is not None:
            rates.append(self.requests_per_minute / 60)
        return _min_defined(rates)

    def budget(self) -> dict[str, float]:
        """What a run may spend in total, per unit (``limit x safety``): the budget backfills share by lease.

        Connections and batches in flight are not in it: a pace cannot split
        them, so they stay with the Dagster pool (README, "Shared budgets").
        """
        budget = {}
        if (rate := self.global_rate()) is not None:
            budget["requests_per_second"] = rate * self.safety
        if self.tokens_per_minute is not None:
            budget["tokens_per_minute"] = self.tokens_per_minute * self.safety
        return budget

    def in_flight_budget(self) -> int | None:
        """Connections or batches a run may hold at once (declared x safety, at least one), if the limit counts them."""
        declared = self.concurrency_cap()
        return None if declared is None else max(1, math.floor(declared * self.safety))

    def concurrency_cap(self) -> int | None:
        """Live workers the service tolerates (connections or batches in flight)."""
        caps = [self.safe_connections, self.concurrent_batches]
        return None if all(c is None for c in caps) else int(_min_defined(caps))


_LIMIT_FIELDS = (
    "requests_per_second",
    "requests_per_minute",
    "tokens_per_minute",
    "safe_connections",
    "concurrent_batches",
    "per_worker_requests_per_second",
    "max_workers",
)
_POSITIVE_FIELDS = (*_LIMIT_FIELDS, "max_workers_per_domain")


@dataclass(frozen=True)
class Estimates:
    """What the user knows about the work, used to size chunks and token pacing.

    ``seconds_per_call`` is the service's typical latency; a worker cannot go
    faster than one call per latency, so it bounds per-worker throughput.
    """

    seconds_per_call: float = _declared(DEFAULT_SECONDS_PER_CALL, "The service's typical latency.")
    tokens_per_item: float | None = _declared(None, "LLM: tokens one item uses, prompt and answer.")
    target_chunk_seconds: float = _declared(
        DEFAULT_TARGET_CHUNK_SECONDS, "How long one chunk should take; sizes the chunks."
    )

    def __post_init__(self) -> None:
        if not self.seconds_per_call > 0:
            raise LimitError(f"seconds_per_call must be > 0, got {self.seconds_per_call!r}.")
        if self.tokens_per_item is not None and not self.tokens_per_item > 0:
            raise LimitError(f"tokens_per_item must be > 0, got {self.tokens_per_item!r}.")
        if not self.target_chunk_seconds > 0:
            raise LimitError(f"target_chunk_seconds must be > 0, got {self.target_chunk_seconds!r}.")


@dataclass(frozen=True)
class Overrides:
    """Values the user pins instead of letting Paceline derive them.

    Pinned values still pass the admission check: a pin that would exceed the
    declared limit is refused, never silently lowered.
    """

    max_parallelism: int | None = _declared(None, "Pin live workers (still admitted against the limit).")
    per_worker_requests_per_second: float | None = _declared(
        None, "Pin one worker's rate (still admitted against the limit)."
    )
    chunk_size: int | None = _declared(None, "Pin items per chunk.")
    max_throttle_retries: int = _declared(
        DEFAULT_MAX_THROTTLE_RETRIES, "429/503 retries inside a chunk before the item is left for a round."
    )
    max_retry_after_s: float = _declared(DEFAULT_MAX_RETRY_AFTER_S, "Longest Retry-After honoured in a chunk.")

    def __post_init__(self) -> None:
        for name in ("max_parallelism", "chunk_size"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise LimitError(f"{name} must be a whole number of at least 1, got {value!r}. Or leave it unset.")
        if self.per_worker_requests_per_second is not None and not self.per_worker_requests_per_second > 0:
            raise LimitError(
                f"per_worker_requests_per_second must be > 0, got {self.per_worker_requests_per_second!r}. "
                "Or leave it unset to let Paceline pace the workers."
            )
        if self.max_throttle_retries < 0 or not self.max_retry_after_s >= 0:
            raise LimitError(
                f"max_throttle_retries and max_retry_after_s must be >= 0, got "
                f"{self.max_throttle_retries!r} and {self.max_retry_after_s!r}."
            )


@dataclass(frozen=True)
class ExecutionPlan:
    """The derived numbers, plus the reasoning in words for the UI and CLI."""

    max_parallelism: int
    chunk_size: int
    pacing: Pacing
    target_rate: float | None
    target_tokens_per_minute: float | None
    explanation: list[str] = field(default_factory=list)
    max_chunks_per_group: int | None = None

    def describe(self) -> str:
        return "\n".join(self.explanation)


def derive_plan(
    limit: ServiceLimit,
    estimates: Estimates = Estimates(),
    overrides: Overrides = Overrides(),
    item_count: int | None = None,
) -> ExecutionPlan:
    """Turn a service limit into max_parallelism, pacing and chunk size.

    Raises ``LimitError`` when the user's pins would exceed the declared limit.
    """
    why: list[str] = []
    rate = _target_rate(limit, estimates, why)
    cap = _worker_cap(limit, why)
    per_worker = _per_worker_ceiling(limit, estimates, overrides, why)

    workers = _choose_workers(rate, cap, per_worker, overrides, limit, estimates, why)
    request_rate = _declared_request_rate(limit)
    interval = _choose_interval(request_rate, workers, _politeness(limit, overrides), overrides, why)
    _admit(limit, workers, interval, estimates, overrides)

    tokens_per_second = None
    if limit.tokens_per_minute is not None:
        tokens_per_second = limit.tokens_per_minute * limit.safety / 60 / workers
        why.append(
            f"token pacing: each worker spends at most {tokens_per_second:,.1f} tokens/s "
            f"({limit.tokens_per_minute:,.0f} tokens/min x safety {limit.safety:g} / {workers} workers), "
            "charged what each response reports it used"
            + (
                ""
                if estimates.tokens_per_item is None
                else f"; ~{estimates.tokens_per_item:,.0f} tokens per item is only the first guess"
            )
        )
    window_calls, window_s = _politeness_window(limit, overrides)
    pacing = Pacing(
        min_interval_s=interval,
        jitter_s=limit.jitter_s,
        tokens_per_second=tokens_per_second,
        window_calls=window_calls,
        window_s=window_s,
        seconds_per_call=estimates.seconds_per_call,
        tokens_per_call=estimates.tokens_per_item,
        max_in_flight=_in_flight_cap(limit, window_calls, why),
        workers=workers,
        max_throttle_retries=overrides.max_throttle_retries,
        max_retry_after_s=overrides.max_retry_after_s,
    )
    chunk_size = _choose_chunk_size(workers, pacing, estimates, overrides, item_count, why)
    target_tpm = None if limit.tokens_per_minute is None else limit.tokens_per_minute * limit.safety
    if limit.max_workers_per_domain is not None:
        why.append(
            f"per domain: at most {limit.max_workers_per_domain} chunk(s) per domain in the plan, so at most "
            f"{limit.max_workers_per_domain} worker(s) x {_fmt(1 / interval) if interval else 'unpaced'} req/s "
            "on any one domain"
        )
    return ExecutionPlan(workers, chunk_size, pacing, rate, target_tpm, why, limit.max_workers_per_domain)


def _target_rate(limit: ServiceLimit, estimates: Estimates, why: list[str]) -> float | None:
    rates: list[float] = []
    declared = limit.global_rate()
    if declared is not None:
        rates.append(declared * limit.safety)
        why.append(f"{_fmt(declared)} req/s x safety {limit.safety:g} = {_fmt(declared * limit.safety)} req/s target")
    if limit.tokens_per_minute is not None and estimates.tokens_per_item:
        by_tokens = limit.tokens_per_minute * limit.safety / 60 / estimates.tokens_per_item
        rates.append(by_tokens)
        why.append(
            f"{limit.tokens_per_minute:,.0f} tokens/min x safety {limit.safety:g} / "
            f"~{estimates.tokens_per_item:,.0f} tokens per item = {_fmt(by_tokens)} req/s target"
        )
    return min(rates) if rates else None


def _declared_request_rate(limit: ServiceLimit) -> float | None:
    """The request rate the workers are paced to: declared rates only.

    A rate derived from ``tokens_per_item`` sizes the workers but never spaces
    their calls: the token pacing does that from what calls really cost, so a
    token estimate that is off no longer caps the run below its budget.
    """
    declared = limit.global_rate()
    return None if declared is None else declared * limit.safety


def _in_flight_cap(limit: ServiceLimit, window_calls: int, why: list[str]) -> int:
    """Calls a worker may keep in flight: one where the limit counts connections, batches or a polite worker."""
    if limit.concurrency_cap() is not None or window_calls:
        why.append("in flight: one call per worker (the limit counts connections, batches or one polite client)")
        return 1
    why.append(
        "in flight: each worker keeps as many calls in flight as its pace x the latency it measures "
        f"(seconds_per_call is only the starting point), at most {DEFAULT_MAX_IN_FLIGHT}"
    )
    return DEFAULT_MAX_IN_FLIGHT


def _worker_cap(limit: ServiceLimit, why: list[str]) -> int | None:
    caps: list[int] = []
    declared, safe = limit.concurrency_cap(), limit.in_flight_budget()
    if declared is not None and safe is not None:
        caps.append(safe)
        why.append(f"{declared} connections/batches in flight x safety {limit.safety:g} = {safe} workers at most")
    if limit.max_workers is not None:
        caps.append(limit.max_workers)
        why.append(f"worker cap: {limit.max_workers} workers at most")
    return min(caps) if caps else None


def _per_worker_ceiling(limit: ServiceLimit, estimates: Estimates, overrides: Overrides, why: list[str]) -> float:
    """The fastest one worker may (politeness) or can (latency) call."""
    natural = 1 / estimates.seconds_per_call
    ceiling = _politeness(limit, overrides)
    if overrides.per_worker_requests_per_second is not None:
        why.append(f"per-worker rate pinned at {_fmt(overrides.per_worker_requests_per_second)} req/s")
    elif ceiling is not None:
        why.append(
            f"politeness: each worker calls at most {_fmt(limit.per_worker_requests_per_second)} times/s "
            f"(paced {JITTER_HEADROOM:.0%} below, so network jitter cannot squeeze an extra call into a second)"
        )
    return natural if ceiling is None else min(natural, ceiling)


def _politeness(limit: ServiceLimit, overrides: Overrides) -> float | None:
    """The per-worker rate ceiling, if any: a pin, or the declared politeness less its jitter headroom."""
    if overrides.per_worker_requests_per_second is not None:
        return overrides.per_worker_requests_per_second
    polite = limit.per_worker_requests_per_second
    return None if polite is None else polite * (1 - JITTER_HEADROOM)


def _politeness_window(limit: ServiceLimit, overrides: Overrides) -> tuple[int, float]:
    """A per-worker ceiling as "n calls per window", held on the service's side of the wire.

    Spacing call *starts* is not enough: a call that reaches the server late
    (a busy CPU, the GIL) lets the next on-time call land in the same server
    second. So a call also waits until ``window_s`` after the call ``n`` before
    it *returned* — whatever the delays, the server then never counts more than
    ``n`` calls of one worker in a window.
    """
    polite = overrides.per_worker_requests_per_second or limit.per_worker_requests_per_second
    if polite is None:
        return 0, 0.0
    if polite >= 1:
        return math.floor(polite), 1.0
    return 1, 1 / polite


def _choose_workers(
    rate: float | None,
    cap: int | None,
    per_worker: float,
    overrides: Overrides,
    limit: ServiceLimit,
    estimates: Estimates,
    why: list[str],
) -> int:
    if overrides.max_parallelism is not None:
        why.append(f"max_parallelism pinned at {overrides.max_parallelism}")
        return overrides.max_parallelism
    if rate is None:
        if cap is None and limit.tokens_per_minute is not None:
            raise LimitError(
                f"{limit.name}: tokens_per_minute alone cannot size the workers without knowing how many "
                "tokens an item costs. Add Estimates(tokens_per_item=...) (for example 600), or declare "
                "requests_per_minute or max_workers as well."
            )
        if cap is None:
            raise LimitError(
                f"{limit.name}: only a per-worker rate was declared, so the number of workers is "
                "unbounded. Add max_workers, requests_per_second or safe_connections."
            )
        workers = cap
    else:
        workers = max(1, math.ceil(rate / per_worker - 1e-9))
        if overrides.per_worker_requests_per_second is not None:  # a pinned pace is kept, so fewer workers
            workers = max(1, math.floor(rate / overrides.per_worker_requests_per_second + 1e-9))
        if cap is not None:
            workers = min(workers, cap)
        if overrides.per_worker_requests_per_second is None:  # a pinned pace is the user's; admission judges it
            workers = _within_the_shortest_window(workers, limit, estimates, why)
    why.append(f"max_parallelism = {workers}")
    return workers


def _within_the_shortest_window(workers: int, limit: ServiceLimit, estimates: Estimates, why: list[str]) -> int:
    """Fewer workers, so the busiest short window holds by construction, not only on average (``early_calls``)."""
    bound = early_calls(limit, estimates)
    if bound is None or bound >= workers:
        return workers
    why.append(
        f"at most {bound} workers: each may be one call early in any second (its phase is its own), so "
        f"workers <= the limit per second x (1 - safety {limit.safety:g}) keeps the busiest second under the "
        "limit; calls in flight make up the rate"
    )
    return bound


def early_calls(limit: ServiceLimit, estimates: Estimates = Estimates()) -> int | None:
    """How many workers may run against this limit at once, however their phases line up (None: no such bound).

    Each worker spaces its own calls, but its phase is its own: in any window,
    a worker may place one call more than its share. So the busiest window can
    hold target + workers calls (tokens: + workers x tokens per call), and a
    worker whose period is longer than the window can land anywhere in it.
    Keeping workers <= limit per window x (1 - safety) keeps even that worst
    case under the limit. Windows are one second: the limit's own for
    requests_per_second, and a sixtieth of the minute for per-minute budgets,
    which providers may enforce that finely. Calls in flight per worker make
    up the rate, so a worker with one connection or a politeness ceiling
    (which cannot keep more than one call in flight) is never capped here.
    Backfills that share a budget share this bound too (``pipeline.backfill``).
    """
    if limit.per_worker_requests_per_second is not None or limit.concurrency_cap() is not None:
        return None
    headroom = 1 - limit.safety
    caps = []
    if limit.global_rate() is not None:
        caps.append(limit.global_rate() * headroom)
    if limit.tokens_per_minute is not None and estimates.tokens_per_item:
        caps.append(limit.tokens_per_minute / 60 * headroom / estimates.tokens_per_item)
    if not caps:
        return None
    return max(1, math.floor(min(caps) + 1e-9))


def _choose_interval(
    rate: float | None, workers: int, ceiling: float | None, overrides: Overrides, why: list[str]
) -> float:
    """Spacing between one worker's calls so that workers x per-worker rate <= target.

    A pinned per-worker rate is kept as written (the admission check judges it);
    otherwise the spacing is stretched until the workers together meet the target.
    """
    interval = 1 / ceiling if ceiling else 0.0  # latency alone sizes the workers; it never paces them
    if rate is not None and overrides.per_worker_requests_per_second is None:
        interval = max(interval, workers / rate)
    if interval > 0:
        why.append(
            f"pacing: one call every {interval:.3g} s per worker "
            f"= {_fmt(workers / interval)} req/s across {workers} workers"
        )
    return interval


def _admit(limit: ServiceLimit, workers: int, interval: float, estimates: Estimates, overrides: Overrides) -> None:
    """Refuse pinned numbers whose product breaks the declared (not the target) limit."""
    cap = limit.concurrency_cap()
    if cap is not None and workers > cap:
        raise LimitError(
            f"{limit.name}: max_parallelism {workers} exceeds the {cap} safe connections/batches "
            f"declared. Lower max_parallelism to at most {cap} (a first run should use "
            f"{max(1, math.floor(cap * limit.safety))})."
        )
    if limit.max_workers is not None and workers > limit.max_workers:
        raise LimitError(
            f"{limit.name}: max_parallelism {workers} exceeds max_workers {limit.max_workers}. "
            f"Lower max_parallelism or raise max_workers."
        )
    polite = limit.per_worker_requests_per_second
    pinned_rate = overrides.per_worker_requests_per_second
    if polite is not None and pinned_rate is not None and pinned_rate > polite:
        raise LimitError(
            f"{limit.name}: per-worker rate {_fmt(pinned_rate)} req/s exceeds the declared politeness "
            f"of {_fmt(polite)} req/s per worker. Lower it to {_fmt(polite)} or less."
        )
    declared = limit.global_rate()
    if declared is None or interval <= 0:
        return
    planned = workers / interval
    if planned > declared * (1 + 1e-9):
        raise LimitError(
            f"{limit.name}: {workers} workers x {_fmt(1 / interval)} req/s each = {_fmt(planned)} req/s, "
            f"over the declared limit of {_fmt(declared)} req/s. Lower max_parallelism to "
            f"{max(1, math.floor(declared * interval))} or the per-worker rate to "
            f"{_fmt(declared / workers)} req/s."
        )


def _choose_chunk_size(
    workers: int,
    pacing: Pacing,
    estimates: Estimates,
    overrides: Overrides,
    item_count: int | None,
    why: list[str],
) -> int:
    period = pacing.period()
    # A worker with calls in flight finishes an item per period; with one in flight, it also waits out the latency.
    seconds_per_item = period if period and pacing.max_in_flight > 1 else max(period, estimates.seconds_per_call)
    if overrides.chunk_size is not None:
        size = overrides.chunk_size
    else:
        size = max(1, min(10_000, math.floor(estimates.target_chunk_seconds / seconds_per_item)))
        if item_count:
            size = min(size, _balanced_chunk_size(workers, pacing, seconds_per_item, estimates, item_count))
    minutes = size * seconds_per_item / 60
    why.append(f"chunks of {size:,} items take about {_fmt_duration(minutes * 60)} each")
    return size


CHUNKS_PER_WORKER = 8
"""Chunks each worker should get in a short run, so workers that end up at different paces (each one
backs off on its own throttles) finish close together: whoever is done first takes the next chunk."""

DRAIN_LATENCIES = 50
"""A chunk with calls in flight lasts at least this many call latencies: it waits for its last calls
at its end, so its drain costs at most 2% of it."""


def _balanced_chunk_size(
    workers: int, pacing: Pacing, seconds_per_item: float, estimates: Estimates, item_count: int
) -> int:
    """The same number of chunks for every worker: up to ``CHUNKS_PER_WORKER``, fewer where chunks
    would get shorter than their drain is worth (``DRAIN_LATENCIES``)."""
    per_worker_seconds = math.ceil(item_count / workers) * seconds_per_item
    drain_s = DRAIN_LATENCIES * estimates.seconds_per_call if pacing.max_in_flight > 1 else 0.0
    chunks_each = CHUNKS_PER_WORKER if not drain_s else math.floor(per_worker_seconds / drain_s)
    return max(1, math.ceil(item_count / (max(1, min(CHUNKS_PER_WORKER, chunks_each)) * workers)))


def _min_defined(values: list[float | int | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return min(defined) if defined else None


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.3g}"


def _fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
