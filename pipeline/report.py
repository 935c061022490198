"""What a run achieved, computed from its manifests (never from in-memory counters).

The same numbers feed the CLI, the Dagster metadata and the asset checks:
counts, achieved rate against the target, latency percentiles, an error
breakdown, the busiest one-second window, and calls per second over time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.ledger import Ledger
from pipeline.limits import ServiceLimit


@dataclass(frozen=True)
class AttemptReport:
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


def attempt_report(ledger: Ledger, backfill: str, attempt: int, run_id: str | None) -> AttemptReport:
    """Numbers for the rows one run wrote (a resumed run reports only its own calls); all runs without ``run_id``."""
    where = "backfill = ? AND attempt = ?" + (" AND run_id = ?" if run_id else "")
    args = [backfill, attempt, *([run_id] if run_id else [])]
    rows, ok, p50, p95, retry_after = ledger.con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE ok), quantile_cont(latency_ms, 0.5), "
        f"quantile_cont(latency_ms, 0.95), coalesce(max(retry_after_s), 0) FROM results WHERE {where} AND tries > 0",
        args,
    ).fetchall()[0]
    errors = ledger.con.execute(
        f"SELECT status, count(*) AS n, any_value(error) FROM results WHERE {where} AND NOT ok "
        "GROUP BY status ORDER BY n DESC LIMIT 10",
        args,
    ).fetchall()
    in_flight, tokens_per_item = ledger.con.execute(
        f"SELECT avg(in_flight), (SELECT avg(tokens) FROM results WHERE {where} AND ok) FROM ("
        f"{_IN_FLIGHT_PER_CHUNK} WHERE {where} AND tries > 0 GROUP BY chunk_id)",
        args + args,
    ).fetchall()[0]
    throttled, sustainable = ledger.con.execute(_THROTTLING.format(where=where), args).fetchall()[0]
    times, tokens = ledger.call_times(backfill, attempt, run_id)
    seconds = float(times[-1] - times[0]) if len(times) > 1 else 0.0
    return AttemptReport(
        backfill=backfill,
        attempt=attempt,
        run_id=run_id,
        rows=int(rows),
        ok=int(ok),
        failed=int(rows - ok),
        seconds=seconds,
        achieved_rate=(len(times) - 1) / seconds if seconds > 0 else 0.0,
        busiest_1s=busiest_window(times, 1.0),
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        errors=[(s, int(n), e or "") for s, n, e in errors],
        per_second=calls_per_second(times),
        max_tokens_per_minute=busiest_sum(times, tokens, 60.0) if tokens.any() else None,
        max_retry_after_s=float(retry_after),
        in_flight_per_worker=float(in_flight or 0.0),
        tokens_per_item=None if tokens_per_item is None else float(tokens_per_item),
        throttled_calls=int(throttled or 0),
        sustainable_rate=None if sustainable is None else float(sustainable),
    )


_THROTTLING = (
    # Only throttles are retried inside a chunk, so an ok row's tries - 1 are calls the service throttled
    # and then let through: evidence about the pace. Items that never went through are left out, since a
    # hot key is throttled whatever the pace. In the seconds where the service throttled, the calls it let
    # through are what it sustains: the rate at which throttling began.
    "WITH s AS (SELECT floor(epoch(started_at)) AS second, count(*) FILTER (WHERE ok) AS ok, "
    "sum(tries - 1) FILTER (WHERE ok) AS throttled "
    "FROM results WHERE {where} AND tries > 0 GROUP BY second) "
    "SELECT sum(throttled), quantile_cont(ok, 0.5) FILTER (WHERE throttled > 0) FROM s"
)


_IN_FLIGHT_PER_CHUNK = (
    # Little's law on a chunk's rows: time spent in calls / time the chunk ran = calls in flight on average.
    "SELECT sum(latency_ms) / 1000 / greatest(epoch(max(finished_at)) - epoch(min(started_at)), 1e-3) AS in_flight "
    "FROM results"
)


def measured_by_attempt(ledger: Ledger) -> pa.Table:
    """Per backfill and attempt, what the service did: latency, tokens per item, calls in flight per worker."""
    return ledger.query(
        "SELECT backfill, attempt, count(*) AS calls, round(quantile_cont(latency_ms, 0.5), 1) AS p50_ms, "
        "round(quantile_cont(latency_ms, 0.95), 1) AS p95_ms, round(avg(tokens) FILTER (WHERE ok), 1) AS tokens_per_item, "
        "round((SELECT avg(in_flight) FROM (" + _IN_FLIGHT_PER_CHUNK + " AS c WHERE c.backfill = r.backfill "
        "AND c.attempt = r.attempt AND c.tries > 0 GROUP BY c.run_id, c.chunk_id)), 1) AS in_flight_per_worker "
        "FROM results AS r WHERE tries > 0 GROUP BY backfill, attempt ORDER BY backfill, attempt"
    )


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
