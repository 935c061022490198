"""Item sources: where the IDs, URLs, prompts, keys or key ranges come from.

Every source returns an Arrow table with an ``item_id`` string column and an
optional ``payload`` string column (JSON text, for items that carry more than
their id — a prompt, a key range). Arrow all the way, so that ten million IDs
never become ten million Python objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import ConfigError

ITEM_SCHEMA = pa.schema([("item_id", pa.string()), ("payload", pa.string())])


class ItemsError(ConfigError):
    """Input that cannot become items; the message names the file, line and fix."""


class ItemSource(Protocol):
    def read(self) -> pa.Table: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class NormalizeReport:
    """What normalisation did, reported in the chunk plan's metadata."""

    read: int
    blanks_dropped: int
    duplicates_dropped: int

    @property
    def kept(self) -> int:
        return self.read - self.blanks_dropped - self.duplicates_dropped


def normalize(table: pa.Table) -> tuple[pa.Table, NormalizeReport]:
    """Strip whitespace, drop blanks, drop repeats (keeping first occurrence and order).

    Memory matters at ten million items: the common case (no repeats) costs
    one hash pass; only when there are repeats are first occurrences found.
    """
    read = table.num_rows
    ids = pc.utf8_trim_whitespace(table["item_id"])
    keep = pc.and_(pc.is_valid(ids), pc.not_equal(ids, ""))
    table = table.set_column(0, "item_id", ids)
    del ids
    blanks = read - (pc.sum(keep).as_py() or 0)
    if blanks:
        table = table.filter(keep)
    kept = table.num_rows
    if len(pc.unique(table["item_id"])) < kept:
        table = table.filter(_first_occurrences(table["item_id"]))
    return table, NormalizeReport(read, blanks, kept - table.num_rows)


def _first_occurrences(ids: pa.ChunkedArray) -> pa.Array:
    """True where a value appears for the first time.

    Dictionary codes are handed out in order of first appearance, so a row
    is a first occurrence exactly when its code exceeds every earlier code.
    """
    codes = pc.dictionary_encode(ids).combine_chunks().indices.to_numpy(zero_copy_only=False)
    first = np.empty(len(codes), dtype=bool)
    if len(codes):
        first[0] = True
        first[1:] = codes[1:] > np.maximum.accumulate(codes)[:-1]
    return pa.array(first)


@dataclass(frozen=True)
class TextLines:
    """One item per line of a UTF-8 text file (user_ids.txt, urls.txt)."""

    path: str

    def read(self) -> pa.Table:
        path = _existing(self.path)
        options = pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False, ignore_empty_lines=False)
        read = pacsv.ReadOptions(column_names=["item_id"], block_size=1 << 24)
        convert = pacsv.ConvertOptions(column_types={"item_id": pa.string()}, strings_can_be_null=False)
        try:
            ids = pacsv.read_csv(path, read_options=read, parse_options=options, convert_options=convert)
        except pa.ArrowInvalid as error:
            raise _decode_error(path, error) from None
        return _with_null_payload(ids["item_id"])

    def describe(self) -> str:
        return f"lines of {self.path}"


@dataclass(frozen=True)
class FileColumn:
    """One column of a Parquet or CSV file."""

    path: str
    column: str

    def read(self) -> pa.Table:
        path = _existing(self.path)
        if path.suffix == ".parquet":
            names = pq.read_schema(path).names
            self._check_column(names)
            ids = pq.read_table(path, columns=[self.column])[self.column]
        else:
            with pacsv.open_csv(path) as reader:  # the header first: a missing column is named, not a parse error
                self._check_column(reader.schema.names)
            # Read the id column as text: type inference would turn "007" into 7.
            convert = pacsv.ConvertOptions(column_types={self.column: pa.string()}, include_columns=[self.column])
            try:
                ids = pacsv.read_csv(path, convert_options=convert)[self.column]
            except pa.ArrowInvalid as error:
                raise _decode_error(path, error) from None
        return _with_null_payload(pc.cast(ids, pa.string()))

    def _check_column(self, names: list[str]) -> None:
        if self.column not in names:
            raise ItemsError(f"{self.path} has no column {self.column!r}. Its columns are: {', '.join(names)}.")

    def describe(self) -> str:
        return f"column {self.column!r} of {self.path}"


@dataclass(frozen=True)
class Values:
    """Items given directly as a Python iterable (small lists, tests, notebooks)."""

    values: tuple[str, ...]

    @classmethod
    def of(cls, values: Iterable[object]) -> Values:
        return cls(tuple(str(v) for v in values))

    def read(self) -> pa.Table:
        return _with_null_payload(pa.array(self.values, pa.string()))

    def describe(self) -> str:
        return f"{len(self.values):,} values given in code"


@dataclass(frozen=True)
class KeyRanges:
    """Integer key ranges [lo, hi) in steps, for bounded database queries.

    The item id is ``"lo-hi"`` and the payload carries both bounds as JSON.
    """

    lo: int
    hi: int
    step: int

    def __post_init__(self) -> None:
        if self.step <= 0:
            raise ItemsError(f"KeyRanges step must be positive, got {self.step}.")
        if self.hi <= self.lo:
            raise ItemsError(f"KeyRanges needs hi > lo, got lo={self.lo}, hi={self.hi}.")

    def read(self) -> pa.Table:
        starts = range(self.lo, self.hi, self.step)
        bounds = [(lo, min(lo + self.step, self.hi)) for lo in starts]
        return pa.table(
            {
                "item_id": pa.array([f"{lo}-{hi}" for lo, hi in bounds], pa.string()),
                "payload": pa.array([json.dumps({"lo": lo, "hi": hi}) for lo, hi in bounds]),
            },
            schema=ITEM_SCHEMA,
        )

    def describe(self) -> str:
        return f"key ranges {self.lo:,}..{self.hi:,} step {self.step:,}"


@dataclass(frozen=True)
class JsonlPrompts:
    """Prompts from a JSON-lines file: an id field and the record as payload."""

    path: str
    id_field: str = "id"

    def read(self) -> pa.Table:
        path = _existing(self.path)
        ids: list[str] = []
        payloads: list[str] = []
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                text = _decode_line(path, number, raw).strip()
                if not text:
                    continue
                record = _parse_record(path, number, text)
                if self.id_field not in record:
                    raise ItemsError(
                        f"{path}:{number}: record has no {self.id_field!r} field. "
                        f"Add it, or pass id_field= naming the field that identifies a prompt."
                    )
                ids.append(str(record[self.id_field]))
                payloads.append(text)
        return pa.table({"item_id": ids, "payload": payloads}, schema=ITEM_SCHEMA)

    def describe(self) -> str:
        return f"prompts in {self.path}"


@dataclass(frozen=True)
class S3Prefix:
    """Object keys under an S3 prefix, listed with boto3 (files to load)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    suffix: str = ""

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ItemsError("S3Prefix needs a bucket name, for example S3Prefix(bucket='my-events').")

    def read(self) -> pa.Table:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint_url)
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(self.suffix))
        return _with_null_payload(pa.array(keys, pa.string()))

    def describe(self) -> str:
        return f"keys under s3://{self.bucket}/{self.prefix}"


def _with_null_payload(ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    return pa.table({"item_id": ids, "payload": pa.nulls(len(ids), pa.string())}, schema=ITEM_SCHEMA)


def _existing(path: str) -> Path:
    resolved = Path(path)
    if not resolved.is_file():
        raise ItemsError(f"item file {path} does not exist. Check the path (relative to {Path.cwd()}).")
    return resolved


def _decode_error(path: Path, error: Exception) -> ItemsError:
    """Find the first undecodable line, so the user can fix it directly."""
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                _decode_line(path, number, raw)
            except ItemsError as bad:
                return bad
    return ItemsError(f"{path}: could not be read as items: {error}")


def _decode_line(path: Path, number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise ItemsError(
            f"{path}:{number}: not valid UTF-8 ({bad.reason} at byte {bad.start}). "
            "Re-encode the file as UTF-8 or remove that line."
        ) from None


def _parse_record(path: Path, number: int, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as bad:
        raise ItemsError(f"{path}:{number}: not valid JSON ({bad.msg}). Each line must be one JSON object.") from None
    if not isinstance(record, dict):
        raise ItemsError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
    return record
