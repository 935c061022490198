"""The manifest row, declared once: every column's name, Arrow type, nullability and meaning.

Everything else derives from ``MANIFEST_COLUMNS``: the Parquet schema
(``MANIFEST_SCHEMA``, which the ledger and compaction read), the order of the
runner's row tuples (``ROW_FIELDS``), the writer's table
(``manifests.result_table``) and the README's column table (checked by
``tests/test_rows.py``). Adding a column is one entry here, its value where
the runner builds rows (``chunks.ChunkResult``), and its README line.

Three kinds of column, by where the value comes from:

* ``CHUNK``: the same for every row of a chunk, taken from the ``ChunkResult``;
* ``ITEM``: one value per row, in the runner's row tuple (timestamps travel as
  Unix seconds, the cheapest thing to build and pickle, and become Arrow
  timestamps when the table is built);
* ``DERIVED``: computed from other columns when the table is built.

Every field of the Parquet schema is nullable, whatever ``nullable`` says:
manifests already written have nullable fields, and Arrow refuses to
concatenate or compact tables whose nullability differs. ``nullable`` is the
row's contract (a column declared not nullable is never null in a row the
runner writes), tested rather than written into the file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pyarrow as pa


class Source(enum.Enum):
    CHUNK = "chunk"
    ITEM = "item"
    DERIVED = "derived"


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    nullable: bool
    source: Source
    description: str


_UTC = pa.timestamp("us", tz="UTC")

MANIFEST_COLUMNS: tuple[Column, ...] = (
    Column("backfill", pa.string(), False, Source.CHUNK, "the backfill's name"),
    Column("attempt", pa.int32(), False, Source.CHUNK, "0 for the first pass, n+1 for each retry round"),
    Column("run_id", pa.string(), False, Source.CHUNK, "the run that wrote the row"),
    Column("chunk_id", pa.int32(), False, Source.CHUNK, "the item's chunk in the plan of this attempt"),
    Column("item_id", pa.string(), False, Source.ITEM, "the item's id"),
    Column("ok", pa.bool_(), False, Source.ITEM, "the item went through"),
    Column("retryable", pa.bool_(), False, Source.ITEM, "a failure a retry round may fix (false when ok)"),
    Column("status", pa.string(), False, Source.ITEM, "`ok`, or what went wrong (`http_503`, `capacity`, ...)"),
    Column("http_status", pa.int32(), True, Source.ITEM, "the HTTP status of a failure, when it had one"),
    Column("error", pa.string(), True, Source.ITEM, "what the failure said, secrets redacted"),
    Column("tries", pa.int32(), False, Source.ITEM, "calls made for the item in this attempt (0: never called)"),
    Column("started_at", _UTC, False, Source.ITEM, "when the item's last call started"),
    Column("finished_at", _UTC, False, Source.ITEM, "when the item's last call returned"),
    Column("latency_ms", pa.float64(), False, Source.DERIVED, "`finished_at - started_at`, in milliseconds"),
    Column("tokens", pa.float64(), True, Source.ITEM, "tokens the call spent: the response's count, else the estimate"),
    Column("retry_after_s", pa.float64(), True, Source.ITEM, "the longest wait the service asked of this item"),
    Column("payload", pa.string(), True, Source.ITEM, "what `call` returned, as JSON, secrets scrubbed"),
)

MANIFEST_SCHEMA = pa.schema([pa.field(column.name, column.type) for column in MANIFEST_COLUMNS])
"""The Parquet schema of every manifest file (all fields nullable: see the module docstring)."""

ROW_FIELDS: tuple[str, ...] = tuple(column.name for column in MANIFEST_COLUMNS if column.source is Source.ITEM)
"""The order of the values in a runner's row tuple."""

ROW_TYPE = pa.struct(
    [
        pa.field(column.name, pa.float64() if pa.types.is_timestamp(column.type) else column.type)
        for column in MANIFEST_COLUMNS
        if column.source is Source.ITEM
    ]
)
"""A runner's row tuple as Arrow sees it (timestamps still Unix seconds): the whole list converts in one call."""
