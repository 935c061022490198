"""Limit utilisation: for each kind of limit, how much of the budget a run used, as the server saw it.

Every case runs a real backfill (LocalExecutor, the built-in workload where
there is one) against a local server that enforces the limit and logs every
arrival, for about ``DURATION`` seconds, at safety 0.9:

=====================  ===========================================  =========================================
limit                  server                                       measured on the server
=====================  ===========================================  =========================================
requests/s             http_api ``--rps L``                         arrivals/s; busiest sliding 1 s
per-worker politeness  http_api, no global limit                    arrivals/s; busiest 1 s of one worker
safe connections       Postgres (pgserver), a role capped at C      connections held (pg_stat_activity,
                       connections, key-range queries               sampled every 10 ms); peak
tokens/min             local LLM, short window, tokens scaled       accepted tokens/s; busiest window
=====================  ===========================================  =========================================

Reported: achieved / target (target = limit x safety; for per-worker
politeness, which the engine applies as written, target = P x workers) and
busiest server-side window / limit. Goal: at least 0.95 of target, never over
the limit.

    python -m benchmarks.utilisation [--quick]
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.common import Outcome, main
from pipeline.backfill import Backfill, RunResult, plan_backfill, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import ItemSource, JsonlPrompts, KeyRanges, Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices import start_http_api, start_llm
from pipeline.localservices.postgres import ConnectionSampler, start_postgres
from pipeline.manifests import ManifestStore
from pipeline.report import busiest_window
from pipeline.work import FunctionWork, Item, Work, WorkHooks
from pipeline.workloads.http_api import HttpWork
from pipeline.workloads.key_ranges import KeyRangeWork
from pipeline.workloads.llm import LlmWork

NAME = "utilisation"
DURATION = {False: 20.0, True: 4.0}
SAFETY = 0.9
GOAL_UTILISATION = 0.95

RPS = 200  # requests/s case: the server's limit
POLITE_RPS, POLITE_WORKERS = 10, 4
CONNECTIONS, KEY_STEP = 10, 100
QUERY_SECONDS = 0.04  # each range query really takes this long, so the run lasts as planned
LLM_WINDOW_S, LLM_TOKENS_PER_S = 10.0, 1_500  # the window shrinks to half the run in --quick mode
PROMPT = "word " * 40  # 200 characters: 54 prompt tokens by the server's rule
LLM_MAX_TOKENS = 16  # the local server's default completion length, so the estimate is exact
TOKENS_PER_PROMPT = math.ceil(len(PROMPT) / 4) + 4 + LLM_MAX_TOKENS


@dataclass
class Measured:
    """One case, in the units of its limit."""

    kind: str
    declared: str
    unit: str
    target: float
    achieved: float
    limit: float
    busiest: float
    window: str
    details: list[tuple[str, str]] = field(default_factory=list)

    @property
    def utilisation(self) -> float:
        return self.achieved / self.target

    @property
    def headroom_used(self) -> float:
        return self.busiest / self.limit


def _run_backfill(
    name: str, source: ItemSource, work: Work, limit: ServiceLimit, estimates: Estimates, root: str
) -> tuple[RunResult, Ledger]:
    """Plan and run attempt 0; return the run result and an open ledger over its manifests."""
    backfill = Backfill(name, source, work, limit, estimates)
    store = ManifestStore(os.path.join(root, name))
    plan_backfill(backfill, store)
    result = run_attempt(backfill, store, LocalExecutor())
    if result.counts["ok"] != result.counts["items"]:
        raise RuntimeError(f"{name}: {result.counts} — the utilisation run had failures: {result.report.errors}")
    return result, Ledger(store, backfill.max_attempts, name)


def _items_for(rate: float, duration: float) -> int:
    return math.ceil(rate * duration) + 1


def _arrival_rate(times: list[float]) -> float:
    """Calls per second between the first and the last arrival."""
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def requests_per_second(duration: float, root: str) -> Measured:
    """Global requests/s: the server enforces the limit; its arrival log gives the rate and busiest second."""
    limit = ServiceLimit("api", requests_per_second=RPS, safety=SAFETY)
    target = RPS * SAFETY
    with start_http_api(rps=RPS) as api:
        work = tagged(HttpWork(url_template="{base}/items/{id}", base=api.url))
        result, ledger = _run_backfill(
            "rps", Values.of(range(_items_for(target, duration))), work, limit, Estimates(), root
        )
        stats, arrivals = api.stats(), api.arrivals()
    achieved = _arrival_rate([a["t"] for a in arrivals if a["status"] == 200])
    measured = Measured(
        "requests/s",
        f"requests_per_second={RPS}, safety {SAFETY}",
        "req/s",
        target,
        achieved,
        RPS,
        stats["busiest_1s"],
        "1 s",
    )
    _add_plan_details(measured, result)
    with ledger:
        _loss_rows(measured, worker_timelines(ledger), result.execution.pacing.min_interval_s)
    measured.details.append(("429s from the server", str(stats["by_status"].get("429", 0))))
    return measured


def politeness(duration: float, root: str) -> Measured:
    """Per-worker politeness: each worker's busiest second, from server timestamps joined to the worker."""
    limit = ServiceLimit("site", per_worker_requests_per_second=POLITE_RPS, max_workers=POLITE_WORKERS, safety=SAFETY)
    target = POLITE_RPS * POLITE_WORKERS
    with start_http_api() as api:
        work = tagged(HttpWork(url_template="{base}/items/{id}", base=api.url))
        result, ledger = _run_backfill(
            "polite", Values.of(range(_items_for(target, duration))), work, limit, Estimates(), root
        )
        stats, arrivals = api.stats(), api.arrivals()
    with ledger:
        timelines = worker_timelines(ledger)
    worker_of = {item: worker for worker, calls in timelines.items() for _, _, item in calls}
    server_times: dict[int, list[float]] = {}
    for arrival in arrivals:
        server_times.setdefault(worker_of[arrival["item"]], []).append(arrival["t"])
    busiest_worker = max(busiest_window(np.sort(times), 1.0) for times in server_times.values())
    achieved = _arrival_rate([a["t"] for a in arrivals])
    measured = Measured(
        "per-worker politeness",
        f"per_worker_requests_per_second={POLITE_RPS}, max_workers={POLITE_WORKERS}",
        "req/s",
        target,
        achieved,
        POLITE_RPS,
        busiest_worker,
        "1 s, one worker",
    )
    _add_plan_details(measured, result)
    interval = result.execution.pacing.min_interval_s
    _loss_rows(measured, timelines, interval)
    measured.details += [
        (
            "engine's own pace (2 % below P, see limits.JITTER_HEADROOM)",
            f"{POLITE_WORKERS / interval:.2f} req/s = {POLITE_WORKERS / interval / target:.3f} of P x workers",
        ),
        ("workers seen by the server", str(len(server_times))),
        ("busiest 1 s of one connection (server stat)", f"{stats['max_peer_rps_1s']} (limit {POLITE_RPS})"),
        ("busiest 1 s, all workers", f"{stats['busiest_1s']} (P x workers = {target})"),
    ]
    return measured


def tagged(work: Work) -> FunctionWork:
    """The same work, its payload tagged with the worker thread, so arrivals can be grouped by worker.

    Cost, usage and one call at a time are forwarded, so pacing is unchanged.
    """
    hooks = WorkHooks.of(work)
    usage = hooks.usage

    def call_and_tag(client: Any, item: Item) -> Any:
        return {"worker": threading.get_ident(), "response": work.call(client, item)}

    return FunctionWork(
        work.connect,
        call_and_tag,
        cost_fn=hooks.cost,
        usage_fn=(lambda payload: usage(payload["response"])) if usage else None,
        one_call_at_a_time=hooks.one_call_at_a_time,
    )


def worker_timelines(ledger: Ledger) -> dict[int, list[tuple[float, int, str]]]:
    """Per worker, its calls as (client start time, chunk id, item id), in order, from the manifests."""
    rows = ledger.query("SELECT epoch(started_at) AS t, chunk_id, item_id, payload FROM results").to_pylist()
    timelines: dict[int, list[tuple[float, int, str]]] = {}
    for r in rows:
        timelines.setdefault(json.loads(r["payload"])["worker"], []).append((r["t"], r["chunk_id"], r["item_id"]))
    return {w: sorted(calls) for w, calls in timelines.items()}


def pacing_losses(timelines: dict[int, list[tuple[float, int, str]]], interval: float) -> dict[str, float]:
    """Where the budget went, as fractions of the calls the workers could have made.

    Over the span from the first to the last call (client-side start times,
    the pacer's own clock), each worker could call span / interval times. The shortfall splits exactly into: starting late,
    finishing early, gaps between calls of one chunk longer than the interval
    (sleep overshoot, GIL waits, slow responses), and gaps across chunk
    boundaries (finish hold, manifest write, new chunk, new connection).
    """
    first = min(calls[0][0] for calls in timelines.values())
    last = max(calls[-1][0] for calls in timelines.values())
    budget = len(timelines) * (last - first)
    lost = {"late start": 0.0, "early finish": 0.0, "within chunks": 0.0, "chunk boundaries": 0.0}
    for calls in timelines.values():
        lost["late start"] += calls[0][0] - first
        lost["early finish"] += last - calls[-1][0]
        for (t0, c0, _), (t1, c1, _) in zip(calls, calls[1:]):
            lost["within chunks" if c0 == c1 else "chunk boundaries"] += t1 - t0 - interval
    return {reason: seconds / budget for reason, seconds in lost.items()}


def _loss_rows(measured: Measured, timelines: dict[int, list[tuple[float, int, str]]], interval: float) -> None:
    """How far the run fell short of its pacing, and why (client-side start times from the manifests)."""
    losses = pacing_losses(timelines, interval)
    gaps = [t1 - t0 for calls in timelines.values() for (t0, c0, _), (t1, c1, _) in zip(calls, calls[1:]) if c0 == c1]
    measured.details.append(
        (
            "one worker's gap within a chunk, median / p99",
            f"{np.median(gaps) * 1000:.1f} / {np.percentile(gaps, 99) * 1000:.1f} ms (paced {interval * 1000:.1f} ms)",
        )
    )
    measured.details.append(
        ("budget lost to: " + ", ".join(losses), ", ".join(f"{share:.1%}" for share in losses.values()))
    )


def connections(duration: float, root: str) -> Measured:
    """Safe connections: key-range queries of ~40 ms each, connections counted by Postgres itself."""
    limit = ServiceLimit("pg", safe_connections=CONNECTIONS, safety=SAFETY)
    estimates = Estimates(seconds_per_call=0.05)
    workers = math.floor(CONNECTIONS * SAFETY)
    items = _items_for(workers / estimates.seconds_per_call, duration)
    with start_postgres() as pg:
        dsn = pg.create_role("loader", connection_limit=CONNECTIONS)
        _create_orders(dsn, items * KEY_STEP)
        work = tagged(
            KeyRangeWork(
                dsn=dsn,
                application_name="bench-utilisation",
                query=f"SELECT count(*) AS n, sum(amount) AS total FROM orders "
                f"CROSS JOIN pg_sleep({QUERY_SECONDS}) "
                "WHERE id >= %(lo)s AND id < %(hi)s",
            )
        )
        with ConnectionSampler(pg.url, "loader", by="usename", every_s=0.01) as sampler:
            result, ledger = _run_backfill(
                "keyranges", KeyRanges(0, items * KEY_STEP, KEY_STEP), work, limit, estimates, root
            )
    connections = held(sampler)
    measured = Measured(
        "safe connections",
        f"safe_connections={CONNECTIONS}, safety {SAFETY}",
        "connections",
        CONNECTIONS * SAFETY,
        connections.mean,
        CONNECTIONS,
        connections.peak,
        "10 ms samples",
    )
    _add_plan_details(measured, result)
    with ledger:
        _loss_rows(measured, worker_timelines(ledger), result.execution.pacing.min_interval_s)
    measured.details += [
        ("connections held, mean over the run", f"{connections.mean:.2f} ({connections.samples} samples)"),
        ("queries/s achieved vs paced", f"{result.report.achieved_rate:.1f} vs {_paced_rate(result)}"),
    ]
    return measured


def _paced_rate(result: RunResult) -> str:
    interval = result.execution.pacing.min_interval_s
    return f"{result.execution.max_parallelism / interval:.1f}" if interval > 0 else "unpaced"


def _create_orders(dsn: str, rows: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE orders (id integer PRIMARY KEY, amount integer NOT NULL)")
        connection.execute("INSERT INTO orders SELECT i, i %% 97 FROM generate_series(0, %s) AS i", [rows - 1])
        connection.execute("ANALYZE orders")


@dataclass(frozen=True)
class Held:
    """Connections a role held during a run: time-weighted mean, peak, and how many samples saw them."""

    mean: float
    peak: int
    samples: int


def held(sampler: ConnectionSampler) -> Held:
    """Time-weighted mean between the first and the last sample that saw a connection, and the peak."""
    samples = sampler.samples
    active = [i for i, (_, n) in enumerate(samples) if n > 0]
    if not active:
        return Held(0.0, 0, len(samples))
    span = samples[active[0] : active[-1] + 1]
    times = np.array([t for t, _ in span])
    counts = np.array([n for _, n in span], dtype=float)
    weights = np.diff(times)
    mean = float((counts[:-1] * weights).sum() / weights.sum()) if weights.sum() > 0 else float(counts.mean())
    return Held(mean, int(counts.max()), len(span))


def tokens_per_minute(duration: float, root: str) -> Measured:
    """Tokens/min against the local LLM with a short window: tokens per window scaled to match."""
    window_s = min(LLM_WINDOW_S, duration / 2)
    per_window = LLM_TOKENS_PER_S * window_s
    limit = ServiceLimit("llm", tokens_per_minute=LLM_TOKENS_PER_S * 60, safety=SAFETY)
    target = LLM_TOKENS_PER_S * SAFETY  # tokens/s
    estimates = Estimates(seconds_per_call=0.1, tokens_per_item=TOKENS_PER_PROMPT)
    prompts = os.path.join(root, "prompts.jsonl")
    with open(prompts, "w") as out:
        for n in range(_items_for(target / TOKENS_PER_PROMPT, duration)):
            out.write(json.dumps({"id": n, "prompt": PROMPT}) + "\n")
    with start_llm(tpm=per_window, window_s=window_s, completion_tokens=LLM_MAX_TOKENS) as llm:
        work = tagged(LlmWork(base_url=f"{llm.url}/v1", model="local", max_tokens=LLM_MAX_TOKENS))
        result, ledger = _run_backfill("tokens", JsonlPrompts(prompts), work, limit, estimates, root)
        stats, arrivals = llm.stats(), llm.arrivals()
    accepted = sorted((a["t"], a["tokens"]) for a in arrivals if a["status"] == 200)
    spent = sum(tokens for _, tokens in accepted[:-1])  # tokens spent before the last call started
    achieved = spent / (accepted[-1][0] - accepted[0][0])
    measured = Measured(
        "tokens/min",
        f"tokens_per_minute={limit.tokens_per_minute:,.0f} (server: {per_window:,.0f} "
        f"per {window_s:g} s window), safety {SAFETY}",
        "tokens/s",
        target,
        achieved,
        per_window,
        stats["busiest_window_tokens"],
        f"{window_s:g} s",
    )
    _add_plan_details(measured, result)
    pacing = result.execution.pacing
    with ledger:
        _loss_rows(
            measured, worker_timelines(ledger), max(pacing.min_interval_s, TOKENS_PER_PROMPT / pacing.tokens_per_second)
        )
    measured.details.append(("429s from the server", str(stats["by_status"].get("429", 0))))
    return measured


def _add_plan_details(measured: Measured, result: RunResult) -> None:
    execution = result.execution
    measured.details.insert(
        0,
        (
            "derived",
            f"{execution.max_parallelism} workers, one call every "
            f"{execution.pacing.min_interval_s * 1000:.1f} ms each, chunks of "
            f"{execution.chunk_size}; {result.report.rows} items in "
            f"{result.report.seconds:.1f} s; call latency p50 "
            f"{result.report.latency_p50_ms:.1f} ms",
        ),
    )


CASES: dict[str, Callable[[float, str], Measured]] = {
    "requests_per_second": requests_per_second,
    "politeness": politeness,
    "connections": connections,
    "tokens_per_minute": tokens_per_minute,
}


def run(quick: bool) -> Outcome:
    """Achieved / target and busiest server-side window / limit, for each kind of limit."""
    duration = DURATION[quick]
    with tempfile.TemporaryDirectory(prefix="paceline-bench-utilisation-") as root:
        measured = {key: case(duration, root) for key, case in CASES.items()}
    worst = min(m.utilisation for m in measured.values())
    outcome = Outcome(
        NAME,
        f"lowest utilisation {worst:.3f} of target; busiest window / limit at most "
        f"{max(m.headroom_used for m in measured.values()):.3f}",
    )
    outcome.row("run length", f"about {duration:g} s per case, safety {SAFETY}")
    for key, m in measured.items():
        outcome.row(f"{m.kind}", m.declared)
        outcome.row("  achieved / target", f"{m.achieved:,.2f} / {m.target:,.2f} {m.unit} = {m.utilisation:.3f}")
        outcome.row(f"  busiest ({m.window}) / limit", f"{m.busiest:,.0f} / {m.limit:,.0f} = {m.headroom_used:.3f}")
        for label, value in m.details:
            outcome.row(f"  {label}", value)
        outcome.metrics[f"{key}_utilisation"] = m.utilisation
        outcome.metrics[f"{key}_busiest_over_limit"] = m.headroom_used
        outcome.goal(
            f"{m.kind}: at least {GOAL_UTILISATION} of target",
            m.utilisation >= GOAL_UTILISATION,
            f"{m.utilisation:.3f}",
        )
        outcome.goal(
            f"{m.kind}: never over the limit", m.busiest <= m.limit, f"busiest {m.busiest:,.0f} <= {m.limit:,.0f}"
        )
    return outcome


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
