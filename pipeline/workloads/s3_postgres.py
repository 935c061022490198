"""Load gzipped JSON-lines files from S3 into PostgreSQL, exactly once per row.

Items are object keys (``pipeline.items.S3Prefix`` lists them). Each worker
holds one database connection and one S3 client for its chunk; the number
of connections held is therefore ``max_parallelism``, which the engine
derives from the declared ``safe_connections``.

Each file is streamed and loaded in batches of ``batch_rows``: the batch is
copied (``COPY``) into a temporary staging table, then moved with
``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. The whole file is one
transaction, so a file that fails half-way loads nothing, and a file loaded
again (a retry round, a rerun) inserts no duplicate row — provided the target
table has a primary key or unique constraint on the rows' natural key, which
``connect`` checks.

Not done: creating or migrating the table, updating rows that already exist
(``DO NOTHING`` keeps the first version), formats other than gzipped JSON lines.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.outcomes import Permanent, Retryable, Throttled
from pipeline.spec import Service
from pipeline.work import Item
from pipeline.workloads.common import check, translated
from pipeline.workloads.database import (
    PostgresConfig,
    database_fields,
    identifier_parts,
    statement_timeout_as_retryable,
)

STAGING_TABLE = "paceline_staging"


@dataclass(frozen=True, kw_only=True)
class S3ToPostgresWork(PostgresConfig):
    """Copy the records of each S3 object (gzipped JSON lines) into ``table``.

    ``columns`` are read from each record by name (a missing key loads as
    NULL; nested objects load as JSON text). S3 credentials come from the
    usual AWS chain (environment, config files, instance role);
    ``endpoint_url`` points at S3-compatible stores (MinIO, moto).
    """

    bucket: str
    table: str
    columns: tuple[str, ...]
    endpoint_url: str | None = None
    region: str | None = None
    batch_rows: int = 1000

    def __post_init__(self) -> None:
        owner = "S3ToPostgresWork"
        self._check_database()
        check(bool(self.bucket), owner, "bucket", "is empty", "Name the bucket the files are in, e.g. bucket='events'.")
        identifier_parts(owner, "table", self.table)
        check(
            bool(self.columns) and not isinstance(self.columns, str),
            owner,
            "columns",
            f"must be a non-empty tuple of column names, got {self.columns!r}",
            "List the columns to load.",
        )
        for column in self.columns:
            identifier_parts(owner, "columns", column)
        check(
            len(set(self.columns)) == len(self.columns), owner, "columns", "repeats a column", "List each column once."
        )
        check(
            isinstance(self.batch_rows, int) and self.batch_rows >= 1,
            owner,
            "batch_rows",
            f"must be a whole number >= 1, got {self.batch_rows!r}",
            "1000 is a good default.",
        )

    def connect(self) -> Any:
        import boto3

        connection = super().connect()
        try:
            self._check_unique_key(connection)
            self._create_staging(connection)
            s3 = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)
        except BaseException:
            connection.close()
            raise
        return _Loader(connection, s3)

    def call(self, client: Any, item: Item) -> Any:
        with translated(_outcome):
            body = client.s3.get_object(Bucket=self.bucket, Key=item.id)["Body"]
            try:
                rows, inserted = self._load(client.connection, _records(item.id, body))
            finally:
                body.close()
        return {"key": item.id, "rows": rows, "inserted": inserted}

    def _load(self, connection: Any, records: Iterable[dict[str, Any]]) -> tuple[int, int]:
        """One transaction per file: COPY each batch into staging, move it over, empty staging."""
        from psycopg import sql

        columns = sql.SQL(", ").join(map(sql.Identifier, self.columns))
        staging = sql.Identifier(STAGING_TABLE)
        copy = sql.SQL("COPY {} ({}) FROM STDIN").format(staging, columns)
        move = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
            self._target(), columns, columns, staging
        )
        rows = inserted = 0
        with connection.transaction(), connection.cursor() as cursor:
            for batch in _batches(records, self.batch_rows):
                with cursor.copy(copy) as writer:
                    for record in batch:
                        writer.write_row([_column_value(record.get(c)) for c in self.columns])
                cursor.execute(move)
                inserted += cursor.rowcount
                rows += len(batch)
                cursor.execute(sql.SQL("TRUNCATE {}").format(staging))
        return rows, inserted

    def _target(self) -> Any:
        from psycopg import sql

        return sql.Identifier(*identifier_parts("S3ToPostgresWork", "table", self.table))

    def _create_staging(self, connection: Any) -> None:
        """A temporary table with exactly the loaded columns and their types (no constraints)."""
        from psycopg import sql

        connection.execute(
            sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
                sql.Identifier(STAGING_TABLE), sql.SQL(", ").join(map(sql.Identifier, self.columns)), self._target()
            )
        )

    def _check_unique_key(self, connection: Any) -> None:
        """Without a unique key, ON CONFLICT DO NOTHING cannot stop a retried file's duplicates."""
        row = connection.execute(
            "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass AND indisunique",
            [self._target().as_string(connection)],
        ).fetchone()
        if not row[0]:
            raise Permanent(
                f"table {self.table} has no primary key or unique constraint, so a retried file would "
                "insert duplicates. Add one on the rows' natural key (ALTER TABLE ... ADD PRIMARY KEY (...)).",
                status="no_unique_key",
            )


def s3_postgres_work(
    bucket: str, table: str, columns: tuple[str, ...], **options: Any
) -> Callable[[Service], S3ToPostgresWork]:
    """``BackfillSpec.work`` loading into the service's database (its URL is the DSN, its secret the password)."""

    def build(service: Service) -> S3ToPostgresWork:
        return S3ToPostgresWork(
            bucket=bucket,
            table=table,
            columns=tuple(columns),
            **database_fields(service, "S3ToPostgresWork"),
            **options,
        )

    return build


def gzip_jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    """The file format this workload reads: one JSON object per line, gzipped."""
    return gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())


@dataclass
class _Loader:
    """The chunk's database connection and S3 client, closed together by the runner."""

    connection: Any
    s3: Any

    @property
    def closed(self) -> bool:
        """True once the database connection is gone (a terminated backend): the runner then reconnects."""
        return bool(self.connection.closed)

    def close(self) -> None:
        self.connection.close()


def _outcome(error: Exception) -> Exception:
    """S3 and statement-timeout errors as the engine's outcomes; anything else unchanged."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(error, ClientError):
        return _s3_status_outcome(error)
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return Permanent(f"S3 credentials missing: {error}. Configure AWS credentials.", status="s3_credentials")
    if isinstance(error, BotoCoreError):
        return Retryable(f"S3 unreachable: {error}", status="s3_unavailable")
    return statement_timeout_as_retryable(error)


def _s3_status_outcome(error: Any) -> Exception:
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = error.response.get("Error", {}).get("Code", "")
    text = f"S3 {code or status}: {error}"
    if status in (429, 503) or code in ("SlowDown", "Throttling"):
        return Throttled(text, http_status=status or 503)
    if status >= 500:
        return Retryable(text, status="s3_unavailable")
    return Permanent(text, status="s3_missing" if status == 404 else f"s3_{status}")


def _records(key: str, body: Any) -> Iterator[dict[str, Any]]:
    """Records of a gzipped JSON-lines stream; a corrupt file is a permanent ``bad_payload``."""
    number = 0
    try:
        with gzip.GzipFile(fileobj=body) as lines:
            for number, raw in enumerate(lines, start=1):
                if raw.strip():
                    yield _record(key, number, raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise Permanent(
            f"{key}: not a valid gzip file near line {number + 1} ({error})", status="bad_payload"
        ) from None


def _record(key: str, number: int, raw: bytes) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise Permanent(f"{key}:{number}: not valid JSON ({error})", status="bad_payload") from None
    if not isinstance(record, dict):
        raise Permanent(f"{key}:{number}: expected a JSON object, got {type(record).__name__}", status="bad_payload")
    return record


def _batches(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _column_value(value: Any) -> Any:
    """Nested JSON is loaded as its JSON text (fits json/jsonb/text columns)."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value
