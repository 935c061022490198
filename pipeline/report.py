"""What a run achieved, computed from its manifests (never from in-memory counters).

The same numbers feed the CLI, the Dagster metadata and the asset checks:
counts, achieved rate against the target, latency percentiles, an error
breakdown, the busiest one-second window, and calls per second over time.
The ledger asks the manifests (``Ledger.attempt_report``); this module holds
the report and the window arithmetic on call times, which needs no SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.limits import ServiceLimit


@dataclass(frozen=True)
class AttemptReport:
    """What one run of an attempt (or all its runs) did, as its manifest rows tell it."""

    backfill: str
    attempt: int
    run_id: str
    rows: int
    ok: int
    failed: int
    seconds: float
    achieved_rate: float
    busiest_1s: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    errors: list[tuple[str, int, str]] = field(default_factory=list)
    per_second: list[int] = field(default_factory=list)
    max_tokens_per_minute: float | None = None
    max_retry_after_s: float = 0.0
    in_flight_per_worker: float = 0.0
    tokens_per_item: float | None = None
    throttled_calls: int = 0
    sustainable_rate: float | None = None


def busiest_window(times: np.ndarray, width: float) -> int:
    """Most events in any half-open window [t, t + width) of sorted timestamps."""
    if len(times) == 0:
        return 0
    ends = np.searchsorted(times, times + width, side="left")
    return int((ends - np.arange(len(times))).max())


def busiest_sum(times: np.ndarray, weights: np.ndarray, width: float) -> float:
    """Largest total weight (tokens) in any half-open window [t, t + width)."""
    if len(times) == 0:
        return 0.0
    cumulative = np.concatenate(([0.0], np.cumsum(weights)))
    ends = np.searchsorted(times, times + width, side="left")
    return float((cumulative[ends] - cumulative[np.arange(len(times))]).max())


def calls_per_second(times: np.ndarray) -> list[int]:
    if len(times) == 0:
        return []
    seconds = (times - times[0]).astype(np.int64)
    return np.bincount(seconds).tolist()


def measure_against_limit(times: np.ndarray, tokens: np.ndarray, limit: ServiceLimit) -> dict[str, tuple[float, float]]:
    """Busiest windows of sorted call start times, next to each declared rate limit they answer to."""
    measured: dict[str, tuple[float, float]] = {}
    if limit.requests_per_second is not None:
        measured["busiest_1s"] = (busiest_window(times, 1.0), limit.requests_per_second)
    if limit.requests_per_minute is not None:
        measured["busiest_60s"] = (busiest_window(times, 60.0), limit.requests_per_minute)
    if limit.tokens_per_minute is not None:
        measured["busiest_tokens_60s"] = (busiest_sum(times, tokens, 60.0), limit.tokens_per_minute)
    return measured
