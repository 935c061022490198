"""A crowded database: another client holds most of a role's connections, and no item fails for it.

The server is the judge: ``pg_stat_activity`` (sampled by role and by the
backfill's ``application_name``) shows the role's limit held, and the
server's own log counts the logins it refused. The client's count of the
refusals it waited out (logged by ``pipeline.connection``) must match the
server's: every refusal was read as "no room", none as the items' fault.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from pipeline.connection import CapacityBackoff, ChunkClient
from pipeline.items import KeyRanges
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices.postgres import ConnectionSampler, PostgresHandle
from pipeline.outcomes import classify
from pipeline.spec import BackfillSpec, Service
from pipeline.work import FunctionWork
from pipeline.workloads import key_range_work

ROLE_LIMIT = 4
OTHER_APP_HOLDS = 3  # one connection is really free; the backfill declared four
RANGES = 200
# 10 ms a range: 2 s of work on the one free connection. The other app lets go at 0.5 s, when a waiting
# worker's backoff ceiling is below 1 s (level 5 at most by then), so the 1.5 s left always see it get in.
QUERY = "SELECT count(*) AS n, sum(balance) AS total FROM {table} CROSS JOIN pg_sleep(0.01) WHERE id >= %(lo)s AND id < %(hi)s"


def _role_and_table(postgres: PostgresHandle) -> tuple[str, str, str]:
    role = f"crowded_{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_role(role, connection_limit=ROLE_LIMIT)
    table = f"accounts_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, balance int NOT NULL)")
        connection.execute(f"INSERT INTO {table} SELECT n, n % 100 FROM generate_series(0, {RANGES * 10 - 1}) AS n")
    return role, dsn, table


def _backfill(dsn: str, table: str, app: str):
    service = Service(ServiceLimit(name="db", safe_connections=ROLE_LIMIT, safety=1.0), dsn)
    return BackfillSpec(
        name=f"crowded_{uuid.uuid4().hex[:6]}",
        service="db",
        items=KeyRanges(0, RANGES * 10, 10),
        work=key_range_work(QUERY.format(table=table), application_name=app),
        estimates=Estimates(seconds_per_call=0.01),
    ).build(service)


def _refusals_waited_out(caplog: pytest.LogCaptureFixture) -> int:
    """The client's own count: ``connected after N refused logins`` lines of ``pipeline.connection``."""
    return sum(r.args[0] for r in caplog.records if r.name == "pipeline.connection" and "refused logins" in r.msg)


def test_no_item_fails_when_another_client_holds_most_of_the_role(
    runner, postgres: PostgresHandle, pg_connections, caplog: pytest.LogCaptureFixture
) -> None:
    role, dsn, table = _role_and_table(postgres)
    app = f"crowded-{uuid.uuid4().hex[:8]}"
    backfill = _backfill(dsn, table, app)
    caplog.set_level(logging.INFO, logger="pipeline.connection")
    with (
        ConnectionSampler(postgres.url, role, by="usename") as by_role,
        pg_connections(app) as ours,
        postgres.crowd(dsn, OTHER_APP_HOLDS),
    ):
        ran = runner.run(backfill)

    rows = runner.latest(backfill)
    assert len(rows) == RANGES and all(row["ok"] and row["tries"] == 1 for row in rows.values()), "nothing failed"
    assert (ran.counts["ok"], ran.counts["failed"]) == (RANGES, 0)
    assert by_role.peak <= ROLE_LIMIT, "the server held the role's limit"
    assert 1 <= ours.peak <= ROLE_LIMIT - OTHER_APP_HOLDS, "the backfill used the one free connection"
    refused = postgres.refused_logins(role)
    assert refused == _refusals_waited_out(caplog), "every login the server refused was waited out as 'no room'"
    chunks = runner.chunks(backfill)
    assert refused <= 2 * chunks, f"{refused} refused logins for {chunks} connects: few, not one per item"


def test_capacity_freed_mid_run_is_taken_up(runner, postgres: PostgresHandle, pg_connections) -> None:
    role, dsn, table = _role_and_table(postgres)
    app = f"freed-{uuid.uuid4().hex[:8]}"
    backfill = _backfill(dsn, table, app)
    with pg_connections(app) as ours, postgres.crowd(dsn, OTHER_APP_HOLDS) as other_app:
        released: list[float] = []
        timer = threading.Timer(0.5, lambda: (other_app.release(), released.append(time.monotonic())))
        timer.start()
        ran = runner.run(backfill)
        timer.join()

    assert (ran.counts["ok"], ran.counts["failed"]) == (RANGES, 0)
    before = max((n for t, n in ours.samples if t < released[0]), default=0)
    after = max((n for t, n in ours.samples if t >= released[0]), default=0)
    assert before <= ROLE_LIMIT - OTHER_APP_HOLDS < after <= ROLE_LIMIT, (before, after)


def test_a_full_server_refuses_logins_in_words_that_read_as_capacity(postgres: PostgresHandle) -> None:
    """``max_connections`` reached: "remaining connection slots are reserved" (non-superusers), then
    "sorry, too many clients already" (everyone). psycopg gives no SQLSTATE at login, only the words."""
    dsn = postgres.create_role(f"filler_{uuid.uuid4().hex[:8]}")
    with _filled(dsn) as reserved, _filled(postgres.url) as too_many:
        for error, words in ((reserved, "remaining connection slots are reserved"), (too_many, "too many clients")):
            assert words in str(error) and error.sqlstate is None
            failure = classify(error)
            assert (failure.status, failure.retryable, failure.capacity) == ("capacity", True, True), failure


def test_a_role_full_of_connections_reads_as_capacity(postgres: PostgresHandle) -> None:
    role = f"full_{uuid.uuid4().hex[:8]}"
    dsn = postgres.create_role(role, connection_limit=1)
    with postgres.crowd(dsn, 1), pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(dsn)
    assert f'too many connections for role "{role}"' in str(refused.value)
    assert classify(refused.value).convention == "postgres-too-many-connections"
    assert postgres.refused_logins(role) == 1


def test_a_server_starting_up_is_waited_out() -> None:
    """57P03 as PostgreSQL sends it on the wire (a stand-in server: a real restart is not cheap to time)."""
    with _starting_up() as dsn:
        with pytest.raises(psycopg.OperationalError) as starting:
            psycopg.connect(dsn)
        failure = classify(starting.value)
        assert (failure.status, failure.capacity, failure.convention) == (
            "capacity",
            True,
            "postgres-cannot-connect-now",
        )
        logins: list[float] = []

        def connect() -> object:
            logins.append(time.monotonic())
            return psycopg.connect(dsn) if len(logins) <= 3 else "up"

        backoff = CapacityBackoff(first_wait_s=0.01, max_wait_s=0.05, budget_s=5.0)
        connection = ChunkClient(FunctionWork(connect, lambda client, item: None), backoff=backoff)
        assert (connection.open(), connection.refused) == ("up", 3)


# -- helpers ---------------------------------------------------------------------------------------


@contextmanager
def _filled(dsn: str) -> Iterator[psycopg.OperationalError]:
    """Open connections as ``dsn`` until the server refuses one; yield that refusal, then close them."""
    held: list[psycopg.Connection] = []
    try:
        while len(held) < 500:
            try:
                held.append(psycopg.connect(dsn, autocommit=True))
            except psycopg.OperationalError as error:
                yield error
                return
        raise AssertionError("the server never refused a login")
    finally:
        for connection in held:
            connection.close()


@contextmanager
def _starting_up() -> Iterator[str]:
    """A TCP server that answers every startup message with PostgreSQL's FATAL 57P03 ErrorResponse."""
    listener = socket.create_server(("127.0.0.1", 0))
    fields = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0"

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn:
                (length,) = struct.unpack("!I", conn.recv(4))
                conn.recv(length - 4)
                conn.sendall(b"E" + struct.pack("!I", len(fields) + 4) + fields)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"host=127.0.0.1 port={listener.getsockname()[1]} dbname=x user=x sslmode=disable connect_timeout=5"
    finally:
        listener.close()
