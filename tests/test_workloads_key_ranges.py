"""Key-range queries against a real PostgreSQL: aggregates, updates, the connection cap, timeouts."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid

import psycopg
import pytest

from pipeline.items import KeyRanges
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices.postgres import PostgresHandle
from pipeline.spec import BackfillSpec, Service
from pipeline.workloads import WorkloadConfigError, key_range_work

ROWS = 2_000


def accounts_table(dsn: str) -> str:
    table = f"accounts_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, balance int NOT NULL, doubled int)")
        connection.execute(f"INSERT INTO {table} SELECT n, n % 100 FROM generate_series(0, {ROWS - 1}) AS n")
    return table


def spec(name: str, query: str, **options: object) -> BackfillSpec:
    return BackfillSpec(
        name=name,
        service="db",
        items=KeyRanges(0, ROWS, 100),
        work=key_range_work(query, **options),
        estimates=Estimates(seconds_per_call=0.02),
    )


def test_aggregate_and_update_per_range_within_the_connection_cap(
    runner, postgres: PostgresHandle, pg_connections
) -> None:
    cap, app = 2, f"ranges-{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_role(f"ranges_{uuid.uuid4().hex[:8]}", connection_limit=cap)
    table = accounts_table(dsn)
    service = Service(ServiceLimit(name="db", safe_connections=cap, safety=1.0), dsn)

    totals = spec(
        "range_sums",
        f"SELECT count(*) AS n, sum(balance) AS total FROM {table} WHERE id >= %(lo)s AND id < %(hi)s",
        application_name=app,
    ).build(service)
    updates = spec(
        "range_updates",
        f"UPDATE {table} SET doubled = balance * 2 WHERE id >= %(lo)s AND id < %(hi)s",
        application_name=app,
    ).build(service)
    with pg_connections(app) as sampled:
        summed = runner.run(totals)
        updated = runner.run(updates)

    assert summed.counts["ok"] == updated.counts["ok"] == ROWS // 100
    sums = [json.loads(r["payload"]) for r in runner.latest(totals).values()]
    assert all(p["rows"][0]["n"] == 100 for p in sums)
    assert sum(p["rows"][0]["total"] for p in sums) == sum(n % 100 for n in range(ROWS))
    assert sum(json.loads(r["payload"])["rowcount"] for r in runner.latest(updates).values()) == ROWS
    with psycopg.connect(dsn) as connection:
        assert connection.execute(f"SELECT count(*) FROM {table} WHERE doubled = balance * 2").fetchone()[0] == ROWS
    assert 1 <= sampled.peak <= cap


def test_slow_range_times_out_retryably_and_big_results_are_refused(runner, postgres: PostgresHandle) -> None:
    table = accounts_table(postgres.url)
    service = Service(ServiceLimit(name="db", safe_connections=4), postgres.url)
    slow = spec(
        "range_slow",
        f"SELECT count(*), pg_sleep(CASE WHEN %(lo)s = 500 THEN 5 ELSE 0 END) FROM {table} "
        "WHERE id >= %(lo)s AND id < %(hi)s",
        statement_timeout_s=0.3,
    ).build(service)
    runner.run(slow)
    rows = runner.latest(slow)
    assert (rows["500-600"]["status"], rows["500-600"]["retryable"]) == ("statement_timeout", True)
    assert all(row["ok"] for key, row in rows.items() if key != "500-600"), "the connection survives a timeout"

    listing = spec("range_listing", f"SELECT id FROM {table} WHERE id >= %(lo)s AND id < %(hi)s", max_rows=50).build(
        service
    )
    runner.run(listing)
    assert {row["status"] for row in runner.latest(listing).values()} == {"too_many_rows"}


@pytest.mark.parametrize(
    ("query", "options", "limit", "message"),
    [
        ("SELECT count(*) FROM t", {}, {"safe_connections": 2}, "must bound the keys with both"),
        ("SELECT 1 WHERE %(lo)s < %(hi)s", {"max_rows": 0}, {"safe_connections": 2}, "max_rows"),
        ("SELECT 1 WHERE %(lo)s < %(hi)s", {"statement_timeout_s": -1}, {"safe_connections": 2}, "statement_timeout"),
        ("SELECT 1 WHERE %(lo)s < %(hi)s", {"application_name": ""}, {"safe_connections": 2}, "application_name"),
        ("SELECT 1 WHERE %(lo)s < %(hi)s", {}, {"requests_per_second": 9}, "needs safe_connections declared"),
    ],
)
def test_bad_declarations_are_refused_before_any_connection(
    postgres: PostgresHandle, pg_connections, query: str, options: dict, limit: dict, message: str
) -> None:
    app = f"refused-{uuid.uuid4().hex[:8]}"
    service = Service(ServiceLimit(name="db", **limit), postgres.url)
    with pg_connections(app) as sampled, pytest.raises(WorkloadConfigError, match=message):
        spec("range_bad", query, **{"application_name": app, **options}).build(service)
    assert sampled.peak == 0


def test_unparsable_dsn_is_refused() -> None:
    service = Service(ServiceLimit(name="db", safe_connections=2), "localhost:5432/db")
    with pytest.raises(WorkloadConfigError, match="KeyRangeWork.dsn: cannot be parsed"):
        spec("range_dsn", "SELECT %(lo)s, %(hi)s").build(service)


def test_two_backfills_share_the_connection_cap(runner, postgres: PostgresHandle, pg_connections) -> None:
    """A second backfill of one database, started while the first holds three of its four connections, runs
    with the one left; the server never sees more than four. Leases split connections first come, first served."""
    cap, app = 4, f"shared-{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_role(f"shared_{uuid.uuid4().hex[:8]}", connection_limit=10)  # the lease must hold it
    table = accounts_table(dsn)
    service = Service(ServiceLimit(name="db", safe_connections=cap, safety=1.0), dsn)
    query = f"SELECT pg_sleep(0.1), count(*) AS n FROM {table} WHERE id >= %(lo)s AND id < %(hi)s"
    first = dataclasses.replace(
        spec("slow_sums", query, application_name=app).build(service), overrides=Overrides(max_parallelism=3)
    )
    second = spec("slow_counts", query, application_name=app).build(service)
    results = {}
    with pg_connections(app) as sampled:
        running = threading.Thread(target=lambda: results.setdefault("first", runner.run(first)))
        running.start()
        time.sleep(0.5)  # the first holds its three connections by now (twenty ranges of 0.1 s on three)
        results["second"] = runner.run(second)
        running.join()

    assert 1 <= sampled.peak <= cap  # judged by the server (7 without leases)
    assert results["first"].counts["ok"] == results["second"].counts["ok"] == ROWS // 100
    assert results["second"].execution.max_parallelism == 1
    assert any("hold the rest of its connections" in line for line in results["second"].execution.explanation)
