"""Finding the service's real limit (issue #9): a run declared above what the service enforces.

Every cell declares ``requests_per_second=100`` at safety 0.9 (not the
default 0.5, which would aim at half the limit and never meet it), runs a
real backfill (``HttpWork``, LocalExecutor) against the bundled API with a
*real* limit below or at the declared one, and is judged by the server's
arrival log:

=================  ===============================================================================
goodput            arrivals answered 200 per second, first to last, over the real limit (>= 0.85)
429 share          server-side 429s / all requests the server saw (<= 2 %)
busiest second     all arrivals (429s included) in the busiest sliding second (<= the declared 100)
nothing lost       after a retry round, every item has exactly one latest row and it is ok
advice             the run's ``requests_per_second`` advice vs the real limit (within 15 %);
                   without throttling there is no rate advice, which is what is expected then
=================  ===============================================================================

Each cell also runs, against a fresh server with the same limit, the plain
asyncio + aiolimiter script at the declared limit (``baseline_aiolimiter``)
over the same items, judged the same way. A few ``heal1-`` items (a 500 the
first time, 200 after) leave failures for a retry round, which must pace
itself from the advice of the throttled round before it.

The headers-only case is a fixed-window quota (``--quota``) that sends
``x-ratelimit-remaining`` on every response and refuses nothing until the
quota is spent: a client that reads the headers should see no 429 at all.

    python -m benchmarks.real_limit [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.baseline_aiolimiter import run_baseline
from benchmarks.common import Outcome, main
from pipeline.advice import THROTTLED_SHARE
from pipeline.backfill import Backfill, RunResult, plan_backfill, plan_retry, run_attempt
from pipeline.chunks import Chunk, ChunkResult
from pipeline.executors import ChunkFunction, LocalExecutor
from pipeline.items import Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices import start_http_api
from pipeline.manifests import ManifestStore
from pipeline.report import busiest_window
from pipeline.workloads.http_api import HttpWork

NAME = "real_limit"
DECLARED_RPS = 100.0
SAFETY = 0.9  # the default 0.5 would aim at half the declared limit: a real limit at 100 % could never be met
SHARES = (1.0, 0.7, 0.4)  # the real limit as a share of the declared one
SECONDS = {False: 31.0, True: 2.0}  # items = real limit x this: a run that never exceeds the real limit lasts longer
LATENCY_MS = 20.0  # the baseline's default, so both clients see the same service
CONCURRENCY = 32  # the baseline's semaphore (its default)
HEAL_ITEMS = {False: 10, True: 3}  # 500 on their first call: something for the retry round to do
QUOTA_SHARE = 0.6  # headers only: a fixed-window quota worth 60 % of the declared rate ...
QUOTA_WINDOW_S = {False: 10.0, True: 1.0}  # ... per window of this many seconds

GOAL_GOODPUT = 0.85
GOAL_THROTTLED = 0.02
GOAL_ADVICE = 0.15


@dataclass
class Served:
    """What one server saw of one client's run (its arrival log, 429s included)."""

    requests: int
    ok: int
    throttled: int
    goodput: float  # 200s per second, first to last 200
    busiest_1s: int  # all arrivals, 429s included
    seconds: float  # first to last arrival
    ok_per_s: list[int] = field(default_factory=list)
    throttled_per_s: list[int] = field(default_factory=list)

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0


def served(arrivals: list[dict[str, Any]]) -> Served:
    """Goodput, 429 share, busiest second and per-second counts from a server's arrival log."""
    arrivals = [a for a in arrivals if a.get("item")]  # /items/ calls only
    times = np.sort(np.array([a["t"] for a in arrivals]))
    ok = np.sort(np.array([a["t"] for a in arrivals if a["status"] == 200]))
    throttled = [a["t"] for a in arrivals if a["status"] == 429]
    start = times[0] if len(times) else 0.0
    span = int(times[-1] - start) + 1 if len(times) else 0
    return Served(
        requests=len(times),
        ok=len(ok),
        throttled=len(throttled),
        goodput=(len(ok) - 1) / (ok[-1] - ok[0]) if len(ok) > 1 else 0.0,
        busiest_1s=busiest_window(times, 1.0),
        seconds=float(times[-1] - start) if len(times) else 0.0,
        ok_per_s=np.bincount((ok - start).astype(np.int64), minlength=span).tolist(),
        throttled_per_s=np.bincount((np.array(throttled) - start).astype(np.int64), minlength=span).tolist(),
    )


@dataclass
class Tail:
    """The end of a run, once the first worker has no chunk left: the others finish at their own pace."""

    chunks: int
    workers: int
    starts_after_s: float  # from the first 200 the server saw
    seconds: float  # to the last 200
    goodput_before: float  # 200s per second while every worker had a chunk
    goodput_in_tail: float


def tail(ledger: Ledger, name: str, workers: int, ok_times: np.ndarray) -> Tail:
    """When the first worker ran out of chunks (client clock = server clock: one machine), and goodput either side.

    A worker takes the next chunk when its chunk ends, so the first worker left
    without one is the one whose chunk was the (chunks - workers + 1)-th to end.
    """
    ends = sorted(
        r[0]
        for r in ledger.con.execute(
            "SELECT epoch(max(finished_at)) FROM results WHERE backfill = ? AND attempt = 0 GROUP BY chunk_id", [name]
        ).fetchall()
    )
    idle = ends[max(0, len(ends) - workers)]
    before, after = ok_times[ok_times < idle], ok_times[ok_times >= idle]
    return Tail(
        len(ends),
        workers,
        float(idle - ok_times[0]),
        float(ok_times[-1] - idle),
        len(before) / (idle - ok_times[0]) if len(before) else 0.0,
        len(after) / (ok_times[-1] - idle) if len(after) > 1 else 0.0,
    )


@dataclass
class Cell:
    """One server limit, run by Paceline and by the aiolimiter baseline."""

    label: str
    real_rps: float  # requests/s the server sustains (for the quota: quota / window)
    paceline: Served
    baseline: Served
    baseline_client: dict[str, Any]
    items: int
    lost: int
    not_ok: int
    rate_advice: float | None
    sustainable: float | None  # what the run measured, advised or not (AttemptReport.sustainable_rate)
    advice_lines: list[str]
    retry_explanation: str
    retry_items: int
    pace_factors: list[float]
    loads: tuple[float, float]
    tail: Tail


class _LastFactors:
    """The local executor, keeping the AIMD factor each chunk's worker had when the chunk ended.

    The last ``max_parallelism`` of them stand for the workers' factors at
    the end of the run: the chunks that ended last, about one per worker.
    """

    name = "local"

    def __init__(self) -> None:
        self.factors: list[float] = []

    def map(self, fn: ChunkFunction, chunks: Iterable[Chunk], max_parallelism: int) -> Iterator[ChunkResult]:
        for result in LocalExecutor().map(fn, chunks, max_parallelism):
            if result.learned is not None:
                self.factors.append(result.learned.pace_factor)
            yield result


def _items(count: int, heal: int) -> list[str]:
    heal_every = count // (heal + 1) if heal else 0
    return [
        f"heal1-{n}" if heal_every and n % heal_every == heal_every - 1 and n // heal_every < heal else f"item-{n}"
        for n in range(count)
    ]


def run_cell(label: str, server: dict[str, Any], real_rps: float, seconds: float, heal: int, root: str) -> Cell:
    """Paceline (attempt 0, then a retry round) against one server, the baseline against a twin of it."""
    items = _items(round(real_rps * seconds), heal)
    load_before = os.getloadavg()[0]
    limit = ServiceLimit("api", requests_per_second=DECLARED_RPS, safety=SAFETY)
    store = ManifestStore(os.path.join(root, label))
    run_id = f"{label}-{uuid.uuid4().hex[:8]}"
    executor = _LastFactors()
    with start_http_api(latency_ms=LATENCY_MS, **server) as api:
        work = HttpWork(url_template="{base}/items/{id}", base=api.url)
        backfill = Backfill(label, Values.of(items), work, limit, Estimates())
        plan_backfill(backfill, store)
        first = run_attempt(backfill, store, executor, run_id=run_id)
        factors = sorted(executor.factors[-first.execution.max_parallelism :])
        arrivals = api.arrivals()
        retry = _retry_round(backfill, store, first)
        ok_times = np.sort(np.array([a["t"] for a in arrivals if a["status"] == 200 and a.get("item")]))
        with Ledger(store, backfill.max_attempts, label) as ledger:
            end = tail(ledger, label, first.execution.max_parallelism, ok_times)
            latest, distinct, ok = ledger.con.execute(
                "SELECT count(*), count(DISTINCT item_id), count(*) FILTER (WHERE ok) FROM latest"
            ).fetchall()[0]
    lost = len(items) - distinct + (latest - distinct)  # no row, or more than one latest row
    with start_http_api(latency_ms=LATENCY_MS, **server) as twin:
        baseline_client = run_baseline(twin.url, items, DECLARED_RPS, CONCURRENCY)
        baseline = served(twin.arrivals())
    rate = next((a.value for a in first.advice if a.field == "requests_per_second"), None)
    explanation, retry_items = retry
    return Cell(
        label,
        real_rps,
        served(arrivals),
        baseline,
        baseline_client,
        len(items),
        lost,
        len(items) - ok,
        rate,
        first.report.sustainable_rate,
        [a.line() for a in first.advice],
        explanation,
        retry_items,
        factors,
        (load_before, os.getloadavg()[0]),
        end,
    )


def _retry_round(backfill: Backfill, store: ManifestStore, first: RunResult) -> tuple[str, int]:
    """Attempt 1 over what attempt 0 left failed; its first line of explanation (how it was paced)."""
    if first.counts["failed"] == 0:
        return "no retry round: nothing failed", 0
    plan = plan_retry(backfill, store, 1)
    result = run_attempt(backfill, store, LocalExecutor(), attempt=1, run_id=f"{backfill.name}-{uuid.uuid4().hex[:8]}")
    return result.execution.explanation[0], plan.plan.num_rows


def run(quick: bool) -> Outcome:
    """Goodput, 429 share, busiest second and advice at a real limit of 100 %, 70 %, 40 % of the declared one."""
    seconds, heal = SECONDS[quick], HEAL_ITEMS[quick]
    window = QUOTA_WINDOW_S[quick]
    quota = round(DECLARED_RPS * QUOTA_SHARE * window)
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory(prefix="paceline-bench-real-limit-") as root:
        for share in SHARES:
            real = DECLARED_RPS * share
            cells.append(run_cell(f"real{share * 100:.0f}", {"rps": real}, real, seconds, heal, root))
        headers = run_cell("headers", {"quota": quota, "quota_window_s": window}, quota / window, seconds, 0, root)
    return _outcome(cells, headers, quota, window, quick)


def _outcome(cells: list[Cell], headers: Cell, quota: int, window: float, quick: bool) -> Outcome:
    worst = min(c.paceline.goodput / c.real_rps for c in cells)
    outcome = Outcome(
        NAME,
        f"lowest goodput {worst:.2f} of the real limit, most 429s "
        f"{max(c.paceline.throttled_share for c in cells):.1%}; headers only: "
        f"{headers.paceline.throttled} 429s (aiolimiter: {headers.baseline.throttled})",
    )
    outcome.row(
        "declared",
        f"requests_per_second={DECLARED_RPS:g}, safety {SAFETY} (target {DECLARED_RPS * SAFETY:g}"
        f" req/s); server latency {LATENCY_MS:g} ms; aiolimiter at {DECLARED_RPS:g} req/s, "
        f"concurrency {CONCURRENCY}",
    )
    for cell in cells:
        _cell_rows(outcome, cell)
        _cell_goals(outcome, cell, quick)
    _cell_rows(outcome, headers, f"quota {quota} per {window:g} s window, headers on every response")
    p = headers.paceline
    outcome.goal(
        "headers only: zero 429s",
        p.throttled == 0,
        f"{p.throttled} of {p.requests} requests (aiolimiter: {headers.baseline.throttled} of "
        f"{headers.baseline.requests})",
    )
    outcome.goal(
        "headers only: busiest second never above the declared limit",
        p.busiest_1s <= DECLARED_RPS,
        f"{p.busiest_1s} <= {DECLARED_RPS:g}",
    )
    outcome.goal(
        "headers only: nothing lost",
        headers.lost == 0 and headers.not_ok == 0,
        f"{headers.lost} lost, {headers.not_ok} not ok of {headers.items}",
    )
    outcome.metrics["headers_429"] = p.throttled
    outcome.metrics["headers_busiest_1s"] = p.busiest_1s
    outcome.metrics["headers_lost"] = headers.lost
    outcome.metrics["headers_goodput_over_quota"] = p.goodput / headers.real_rps
    outcome.metrics["declared_rps"] = DECLARED_RPS
    return outcome


def _cell_rows(outcome: Outcome, cell: Cell, server: str | None = None) -> None:
    p, b = cell.paceline, cell.baseline
    outcome.row(
        f"{cell.label}",
        server
        or f"real limit {cell.real_rps:g} req/s = {cell.real_rps / DECLARED_RPS:.0%}"
        f" of the declared; {cell.items} items",
    )
    outcome.row(
        "  goodput / real limit",
        f"Paceline {p.goodput:.1f} / {cell.real_rps:g} = {p.goodput / cell.real_rps:.3f}"
        f"; aiolimiter {b.goodput:.1f} = {b.goodput / cell.real_rps:.3f}; "
        f"ratio {p.goodput / b.goodput:.2f}",
    )
    outcome.row(
        "  429 share (server)",
        f"Paceline {p.throttled_share:.2%} ({p.throttled} of {p.requests}); aiolimiter "
        f"{b.throttled_share:.2%} ({b.throttled} of {b.requests})",
    )
    outcome.row("  busiest second (server, all arrivals)", f"Paceline {p.busiest_1s}; aiolimiter {b.busiest_1s}")
    outcome.row("  run length (server, first to last)", f"Paceline {p.seconds:.1f} s; aiolimiter {b.seconds:.1f} s")
    steady = p.ok_per_s[1:-1] or p.ok_per_s
    outcome.row(
        "  Paceline 200s per second: median / min..max (inner seconds)",
        f"{statistics.median(steady):g} / {min(steady)}..{max(steady)}",
    )
    outcome.row("  Paceline 200s per second", " ".join(map(str, p.ok_per_s)))
    outcome.row("  Paceline 429s per second", " ".join(map(str, p.throttled_per_s)))
    t = cell.tail
    outcome.row(
        "  tail (first worker out of chunks)",
        f"{t.chunks} chunks over {t.workers} workers; starts {t.starts_after_s:.1f} s after the first 200, "
        f"lasts {t.seconds:.1f} s; goodput before {t.goodput_before:.1f} "
        f"({t.goodput_before / cell.real_rps:.3f} of the real limit), in the tail {t.goodput_in_tail:.1f}",
    )
    outcome.row("  workers' AIMD factor at the end", ", ".join(f"{f:.3f}" for f in cell.pace_factors) or "-")
    outcome.row(
        "  rate advice",
        f"requests_per_second={cell.rate_advice:g}: {cell.rate_advice / cell.real_rps:.3f} of the real limit"
        if cell.rate_advice
        else "none (no rate advice)",
    )
    if cell.sustainable is not None:
        outcome.row(
            "  measured sustainable rate (report, advised or not)",
            f"{cell.sustainable:.1f} = {cell.sustainable / cell.real_rps:.3f} of the real limit",
        )
    for line in cell.advice_lines:
        outcome.row("    advice", line)
    outcome.row("  retry round", f"{cell.retry_items} items; {cell.retry_explanation}")
    outcome.row("  items lost / not ok after the retry round", f"{cell.lost} / {cell.not_ok}")
    outcome.row("  aiolimiter items failed", str(cell.baseline_client["failed"]))
    outcome.row("  load average (1 min) before / after", f"{cell.loads[0]:.2f} / {cell.loads[1]:.2f}")
    key = cell.label
    outcome.metrics[f"{key}_goodput_over_real"] = p.goodput / cell.real_rps
    outcome.metrics[f"{key}_throttled_share"] = p.throttled_share
    outcome.metrics[f"{key}_busiest_1s"] = p.busiest_1s
    outcome.metrics[f"{key}_lost"] = cell.lost
    outcome.metrics[f"{key}_not_ok"] = cell.not_ok
    outcome.metrics[f"{key}_rate_advice"] = cell.rate_advice
    outcome.metrics[f"{key}_seconds"] = p.seconds
    outcome.metrics[f"{key}_baseline_goodput_over_real"] = b.goodput / cell.real_rps
    outcome.metrics[f"{key}_baseline_throttled_share"] = b.throttled_share
    outcome.metrics[f"{key}_baseline_busiest_1s"] = b.busiest_1s
    outcome.metrics[f"{key}_retry_explanation"] = cell.retry_explanation
    outcome.metrics[f"{key}_goodput_before_tail_over_real"] = t.goodput_before / cell.real_rps
    outcome.metrics[f"{key}_tail_s"] = t.seconds


def _cell_goals(outcome: Outcome, cell: Cell, quick: bool) -> None:
    p, name = cell.paceline, f"real limit {cell.real_rps / DECLARED_RPS:.0%}"
    if not quick:
        outcome.goal(f"{name}: run of at least 30 s", p.seconds >= 30, f"{p.seconds:.1f} s")
    outcome.goal(
        f"{name}: goodput >= {GOAL_GOODPUT} of the real limit",
        p.goodput >= GOAL_GOODPUT * cell.real_rps,
        f"{p.goodput:.1f} / {cell.real_rps:g} = {p.goodput / cell.real_rps:.3f}",
    )
    outcome.goal(
        f"{name}: <= {GOAL_THROTTLED:.0%} of calls throttled",
        p.throttled_share <= GOAL_THROTTLED,
        f"{p.throttled_share:.2%} ({p.throttled} of {p.requests})",
    )
    outcome.goal(
        f"{name}: busiest second never above the declared limit",
        p.busiest_1s <= DECLARED_RPS,
        f"{p.busiest_1s} <= {DECLARED_RPS:g}",
    )
    outcome.goal(
        f"{name}: nothing lost",
        cell.lost == 0 and cell.not_ok == 0,
        f"{cell.lost} lost, {cell.not_ok} not ok of {cell.items} after the retry round",
    )
    if cell.real_rps >= DECLARED_RPS:  # the declaration was right: nothing to advise about the rate
        outcome.goal(
            f"{name}: no rate advice where the declared limit is the real one",
            cell.rate_advice is None,
            f"{'none' if cell.rate_advice is None else cell.rate_advice}; {p.throttled} calls throttled",
        )
    elif cell.rate_advice is None:
        outcome.goal(
            f"{name}: advice within {GOAL_ADVICE:.0%} of the real limit",
            False,
            f"no rate advice at all: {p.throttled_share:.2%} of calls throttled, under the "
            f"{THROTTLED_SHARE:.0%} the advice needs (pipeline.advice.THROTTLED_SHARE)",
        )
    else:
        off = cell.rate_advice / cell.real_rps - 1
        outcome.goal(
            f"{name}: advice within {GOAL_ADVICE:.0%} of the real limit",
            abs(off) <= GOAL_ADVICE,
            f"requests_per_second={cell.rate_advice:g} vs {cell.real_rps:g} ({off:+.1%})",
        )
    if cell.rate_advice is not None and cell.retry_items:
        outcome.goal(
            f"{name}: the retry round paced itself from the advice",
            cell.retry_explanation.startswith("paced from the advice"),
            cell.retry_explanation,
        )


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
