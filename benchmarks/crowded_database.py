"""A crowded database: the backfill declared more connections than the role has free (issue: refusals).

Every cell is a real key-range load (LocalExecutor, ``KeyRangeWork``) into the
bundled PostgreSQL, where each range INSERTs its rows stamped with the
server's ``clock_timestamp()``. Goodput is ranges per second between the
first and the last stamp, on the server; refused logins are the server's own
log lines (``too many connections for role``); connections are sampled from
``pg_stat_activity`` by role and by the backfill's ``application_name``.

=====================  ==========================================================================
cell                   what runs
=====================  ==========================================================================
free capacity          role limit = the connections the crowded cell really has free, nothing else
                       on the role, declared = that limit: the goodput to match
crowded                declared 8, role limit 8, another application holds 5 idle for the whole run
crowd leaves           as crowded, and the other application closes its 5 half-way through
=====================  ==========================================================================

Goals (crowded): goodput >= 0.9 of the free-capacity cell, refused logins <=
1 % of the calls the server saw (item calls + logins), no item failed, none
lost (each key loaded exactly once), the role's limit held on the server.

    python -m benchmarks.crowded_database [--quick]
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass

from benchmarks.common import Outcome, main
from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import KeyRanges
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices.postgres import ConnectionSampler, PostgresHandle, start_postgres
from pipeline.manifests import ManifestStore
from pipeline.workloads.key_ranges import KeyRangeWork

NAME = "crowded_database"
ROLE_LIMIT, OTHER_APP_HOLDS = 8, 5
FREE = ROLE_LIMIT - OTHER_APP_HOLDS
KEY_STEP, QUERY_S = 10, 0.02  # rows per range; server time per range (pg_sleep)
DURATION = {False: 30.0, True: 8.0}  # seconds of work at the free capacity
GOAL_GOODPUT, GOAL_REFUSED = 0.9, 0.01
APP = "bench-crowded"


@dataclass
class Cell:
    """One run as the server saw it."""

    name: str
    declared: int
    role_limit: int
    crowd: int
    items: int
    ok: int
    failed: int
    rows: int
    distinct: int
    goodput: float  # ranges per second, first to last server stamp
    connects: int  # logins the backfill attempted: chunks + refused
    refused: int
    peak_role: int
    peak_ours: int

    @property
    def lost(self) -> int:
        return self.items * KEY_STEP - self.distinct

    @property
    def refused_share(self) -> float:
        return self.refused / (self.ok + self.connects)


def _cell(pg: PostgresHandle, name: str, root: str, role_limit: int, crowd: int, items: int, leave_at: float | None):
    role = f"{name.replace(' ', '_')}_role"
    dsn = pg.create_role(role, connection_limit=role_limit)
    _tables(dsn, items)
    work = KeyRangeWork(
        dsn=dsn,
        application_name=APP,
        query=f"INSERT INTO loaded SELECT id, clock_timestamp() FROM orders CROSS JOIN pg_sleep({QUERY_S}) "
        "WHERE id >= %(lo)s AND id < %(hi)s ON CONFLICT (id) DO NOTHING",
    )
    limit = ServiceLimit("pg", safe_connections=ROLE_LIMIT if crowd else role_limit, safety=1.0)
    backfill = Backfill(
        name.replace(" ", "_"),
        KeyRanges(0, items * KEY_STEP, KEY_STEP),
        work,
        limit,
        Estimates(seconds_per_call=QUERY_S),
        Overrides(),
    )
    store = ManifestStore(os.path.join(root, backfill.name))
    planned = plan_backfill(backfill, store)
    with (
        ConnectionSampler(pg.url, role, by="usename") as by_role,
        ConnectionSampler(pg.url, APP) as ours,
        pg.crowd(dsn, crowd) as other_app,
    ):
        timer = threading.Timer(leave_at, other_app.release) if leave_at else None
        if timer:
            timer.start()
        result = run_attempt(backfill, store, LocalExecutor())
        if timer:
            timer.join()
    rows, distinct, goodput = _loaded(pg.url)
    refused = pg.refused_logins(role)
    return Cell(
        name, limit.safe_connections, role_limit, crowd, items, int(result.counts["ok"]),
        items - int(result.counts["ok"]), rows, distinct, goodput, planned.chunks + refused, refused,
        by_role.peak, ours.peak,
    )  # fmt: skip


def _tables(dsn: str, items: int) -> None:
    """``orders`` to load from, ``loaded`` to load into (each key once, stamped by the server)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
        connection.execute("INSERT INTO orders SELECT generate_series(0, %s)", [items * KEY_STEP - 1])
        connection.execute("CREATE TABLE loaded (id integer PRIMARY KEY, at timestamptz NOT NULL)")
        connection.execute("ANALYZE orders")


def _loaded(dsn: str) -> tuple[int, int, float]:
    """Rows, distinct keys, and ranges per second between the first and the last server stamp."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as connection:
        rows, distinct, span = connection.execute(
            "SELECT count(*), count(DISTINCT id), extract(epoch FROM max(at) - min(at)) FROM loaded"
        ).fetchone()
    return int(rows), int(distinct), (distinct / KEY_STEP) / float(span or math.inf)


def run(quick: bool) -> Outcome:
    """Crowded role vs the same free capacity uncrowded: goodput, refused logins, items failed and lost."""
    items = math.ceil(DURATION[quick] * FREE / QUERY_S)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paceline-crowd-") as root:
        cells = []
        for name, role_limit, crowd, leave_at in (
            ("free capacity", FREE, 0, None),
            ("crowded", ROLE_LIMIT, OTHER_APP_HOLDS, None),
            ("crowd leaves", ROLE_LIMIT, OTHER_APP_HOLDS, DURATION[quick] / 2),
        ):
            with start_postgres() as pg:  # one server per cell: its log counts this cell's refusals only
                cells.append(_cell(pg, name, root, role_limit, crowd, items, leave_at))
    return _outcome(cells, items, time.perf_counter() - started)


def _outcome(cells: list[Cell], items: int, seconds: float) -> Outcome:
    free, crowded, leaves = cells
    out = Outcome(NAME, f"declared {ROLE_LIMIT}, role limit {ROLE_LIMIT}, another app holds {OTHER_APP_HOLDS}")
    for cell in cells:
        out.row(
            cell.name,
            f"declared {cell.declared}, role limit {cell.role_limit}, crowd {cell.crowd}: "
            f"{cell.goodput:.1f} ranges/s ({cell.goodput / free.goodput:.2f} of free capacity), "
            f"refused logins {cell.refused} = {cell.refused_share:.2%} of calls, "
            f"{cell.refused / cell.connects:.0%} of {cell.connects} logins; failed {cell.failed}, lost {cell.lost}; "
            f"peak connections role {cell.peak_role}/{cell.role_limit}, backfill {cell.peak_ours}",
        )
    out.row("items per cell", f"{items} ranges of {KEY_STEP} rows, {QUERY_S * 1000:.0f} ms each on the server")
    out.row("wall time", f"{seconds:.0f} s")
    goals = [
        (
            f"crowded: goodput >= {GOAL_GOODPUT} of free capacity",
            crowded.goodput >= GOAL_GOODPUT * free.goodput,
            f"{crowded.goodput / free.goodput:.2f}",
        ),
        (
            f"crowded: refused logins <= {GOAL_REFUSED:.0%} of calls",
            crowded.refused_share <= GOAL_REFUSED,
            f"{crowded.refused_share:.2%}",
        ),
        *(
            (
                f"{c.name}: nothing failed, nothing lost, each key once",
                c.failed == 0 and c.lost == 0 and c.rows == c.distinct == items * KEY_STEP,
                f"failed {c.failed}, lost {c.lost}, rows {c.rows}",
            )
            for c in cells
        ),
        *(
            (
                f"{c.name}: role limit held on the server",
                c.peak_role <= c.role_limit,
                f"peak {c.peak_role} of {c.role_limit}",
            )
            for c in cells
        ),
        (
            "crowd leaves: freed capacity used",
            leaves.peak_ours > FREE,
            f"peak {leaves.peak_ours} connections (free before: {FREE})",
        ),
    ]
    for text, met, detail in sorted(goals, key=lambda goal: goal[1]):  # missed first
        out.goal(text, met, detail)
    out.metrics.update(
        goodput_ratio=crowded.goodput / free.goodput,
        refused_share=crowded.refused_share,
        failed=sum(c.failed for c in cells),
        lost=sum(c.lost for c in cells),
    )
    return out


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
