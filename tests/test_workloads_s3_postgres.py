"""S3 -> Postgres against moto's S3 server and a real PostgreSQL: connection cap and exactly-once rows."""

from __future__ import annotations

import gzip
import json
import uuid

import psycopg
import pytest

from pipeline.items import S3Prefix, Values
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices.postgres import PostgresHandle
from pipeline.localservices.s3 import S3Handle
from pipeline.spec import BackfillSpec, Service
from pipeline.workloads import WorkloadConfigError, gzip_jsonl, s3_postgres_work

COLUMNS = ("id", "user_id", "attributes")
FILES, ROWS_PER_FILE = 12, 250


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def seed_bucket(s3: S3Handle, files: int = FILES) -> str:
    bucket = unique("events").replace("_", "-")
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    for part in range(files):
        first = part * ROWS_PER_FILE
        records = [{"id": n, "user_id": n % 7, "attributes": {"n": n}} for n in range(first, first + ROWS_PER_FILE)]
        client.put_object(Bucket=bucket, Key=f"in/part-{part:03d}.jsonl.gz", Body=gzip_jsonl(records))
    return bucket


def make_table(dsn: str, table: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, user_id int NOT NULL, attributes jsonb)")


def table_counts(dsn: str, table: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as connection:
        return connection.execute(f"SELECT count(*), count(DISTINCT id) FROM {table}").fetchone()


def load_spec(name: str, s3: S3Handle, bucket: str, table: str, app: str, items: object = None) -> BackfillSpec:
    return BackfillSpec(
        name=name,
        service="warehouse",
        items=items or S3Prefix(bucket=bucket, prefix="in/", endpoint_url=s3.url),
        work=s3_postgres_work(bucket, table, COLUMNS, endpoint_url=s3.url, batch_rows=100, application_name=app),
        estimates=Estimates(seconds_per_call=0.05),
    )


def test_connections_never_exceed_the_cap_and_every_row_arrives_once(
    runner, postgres: PostgresHandle, s3: S3Handle, pg_connections
) -> None:
    cap, app = 3, unique("load")
    dsn = postgres.create_role(unique("loader"), connection_limit=cap)  # one more would be refused by the server
    table = unique("events")
    make_table(dsn, table)
    bucket = seed_bucket(s3)
    service = Service(ServiceLimit(name="warehouse", safe_connections=cap, safety=1.0), dsn)

    first = load_spec("load", s3, bucket, table, app).build(service)
    with pg_connections(app) as sampled:
        result = runner.run(first)
    assert result.execution.max_parallelism == cap
    assert result.counts["ok"] == FILES, result.report.errors
    assert 1 <= sampled.peak <= cap, f"the server saw {sampled.peak} connections at once"
    assert table_counts(dsn, table) == (FILES * ROWS_PER_FILE,) * 2
    payloads = [json.loads(r["payload"]) for r in runner.latest(first).values()]
    assert sum(p["inserted"] for p in payloads) == FILES * ROWS_PER_FILE

    again = load_spec("load_again", s3, bucket, table, app).build(service)  # every file loaded a second time
    rerun = runner.run(again)
    assert rerun.counts["ok"] == FILES, rerun.report.errors
    assert sum(json.loads(r["payload"])["inserted"] for r in runner.latest(again).values()) == 0
    assert table_counts(dsn, table) == (FILES * ROWS_PER_FILE,) * 2


def test_a_file_cut_off_midway_loads_nothing_then_exactly_once_on_retry(
    runner, postgres: PostgresHandle, s3: S3Handle
) -> None:
    table, sequence = unique("events"), unique("kills")
    make_table(postgres.url, table)
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        # The database drops the connection in the middle of the first file's third batch.
        connection.execute(f"CREATE SEQUENCE {sequence}")
        connection.execute(
            f"""CREATE FUNCTION {sequence}_fn() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('{sequence}') = 3 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
                RETURN NULL;
            END $$"""
        )
        connection.execute(
            f"CREATE TRIGGER {sequence} AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {sequence}_fn()"
        )
    bucket = seed_bucket(s3, files=4)
    service = Service(ServiceLimit(name="warehouse", safe_connections=1, safety=1.0), postgres.url)
    backfill = load_spec("cut", s3, bucket, table, unique("cut")).build(service)

    first = runner.run(backfill)
    rows = runner.latest(backfill)
    assert runner.chunks(backfill) == 4, "one worker, a chunk per file (limits.CHUNKS_PER_WORKER)"
    failed = {key for key, row in rows.items() if not row["ok"]}
    assert failed == {"in/part-000.jsonl.gz"}, "only the cut file: the rest of its chunk ran on a new connection"
    assert {rows[key]["status"] for key in failed} == {"db_unavailable"} and first.counts["failed"] == 1
    assert table_counts(postgres.url, table) == (3 * ROWS_PER_FILE,) * 2, "the cut file's first batches rolled back"

    retry = runner.run(backfill, attempt=1)
    assert retry.counts == {"items": 4, "ok": 4, "failed": 0, "dead": 0, "last_attempt": 1}
    assert table_counts(postgres.url, table) == (4 * ROWS_PER_FILE,) * 2


def test_bad_files_are_permanent_failures(runner, postgres: PostgresHandle, s3: S3Handle) -> None:
    table = unique("events")
    make_table(postgres.url, table)
    bucket = seed_bucket(s3, files=1)
    client = s3.client()
    client.put_object(Bucket=bucket, Key="in/not-gzip.jsonl.gz", Body=b'{"id": 1}\n')
    client.put_object(Bucket=bucket, Key="in/bad-line.jsonl.gz", Body=gzip.compress(b'{"id": 1}\n{oops\n'))
    service = Service(ServiceLimit(name="warehouse", safe_connections=2), postgres.url)
    keys = ["in/part-000.jsonl.gz", "in/not-gzip.jsonl.gz", "in/bad-line.jsonl.gz", "in/missing.jsonl.gz"]
    backfill = load_spec("bad_files", s3, bucket, table, unique("bad"), items=Values.of(keys)).build(service)
    runner.run(backfill)
    outcome = {key: (row["status"], row["retryable"]) for key, row in runner.latest(backfill).items()}
    assert outcome == {
        keys[0]: ("ok", False),
        keys[1]: ("bad_payload", False),
        keys[2]: ("bad_payload", False),
        keys[3]: ("s3_missing", False),
    }
    assert "in/bad-line.jsonl.gz:2: not valid JSON" in runner.latest(backfill)[keys[2]]["error"]
    assert table_counts(postgres.url, table) == (ROWS_PER_FILE, ROWS_PER_FILE), "a bad file loads no row"


def test_a_table_without_unique_key_is_refused(runner, postgres: PostgresHandle, s3: S3Handle) -> None:
    table = unique("events")
    with psycopg.connect(postgres.url, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {table} (id bigint, user_id int, attributes jsonb)")
    bucket = seed_bucket(s3, files=1)
    service = Service(ServiceLimit(name="warehouse", safe_connections=2), postgres.url)
    backfill = load_spec("no_key", s3, bucket, table, unique("nokey")).build(service)
    runner.run(backfill)
    (row,) = runner.latest(backfill).values()
    assert row["status"] == "connect_failed" and "no primary key or unique constraint" in row["error"]
    assert table_counts(postgres.url, table) == (0, 0)


@pytest.mark.parametrize(
    ("options", "limit", "message"),
    [
        ({"bucket": ""}, {"safe_connections": 2}, "S3ToPostgresWork.bucket: is empty"),
        ({"table": "events; DROP TABLE x"}, {"safe_connections": 2}, "is not a plain SQL identifier"),
        ({"columns": ()}, {"safe_connections": 2}, "S3ToPostgresWork.columns: must be a non-empty tuple"),
        ({"columns": ("id", "id")}, {"safe_connections": 2}, "repeats a column"),
        ({"batch_rows": 0}, {"safe_connections": 2}, "batch_rows"),
        ({}, {"requests_per_second": 5}, "needs safe_connections declared"),
    ],
)
def test_bad_declarations_are_refused_before_any_connection(
    postgres: PostgresHandle, pg_connections, options: dict, limit: dict, message: str
) -> None:
    declared = {"bucket": "events", "table": "events", "columns": COLUMNS, **options}
    app = unique("refused")
    factory = s3_postgres_work(
        declared.pop("bucket"), declared.pop("table"), declared.pop("columns"), application_name=app, **declared
    )
    service = Service(ServiceLimit(name="warehouse", **limit), postgres.url)
    with pg_connections(app) as sampled, pytest.raises(WorkloadConfigError, match=message):
        BackfillSpec(name="refused", service="warehouse", items=S3Prefix(bucket="x"), work=factory).build(service)
    assert sampled.peak == 0
