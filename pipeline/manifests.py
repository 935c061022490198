"""The manifest store: one Parquet file per finished chunk, on disk or on S3.

A manifest is both the record of what happened and the checkpoint: a rerun
of the same attempt skips every chunk whose manifest exists and reads. Files
are written whole or not at all (temp file + rename locally; S3 objects only
appear when their upload completes), so a killed run leaves no half file.

Layout (Hive-style, so DuckDB and Spark read it as a table)::

    <root>/manifests/backfill=<name>/attempt=<n>/chunk-<id>.parquet
    <root>/plans/backfill=<name>/attempt=<n>.parquet
    <root>/failed/backfill=<name>.parquet

Two runs writing the same chunk of the same attempt replace each other's
file: one file per chunk, latest wins, never a duplicate row.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.runner import ChunkResult

MANIFEST_SCHEMA = pa.schema(
    [
        ("backfill", pa.string()),
        ("attempt", pa.int32()),
        ("run_id", pa.string()),
        ("chunk_id", pa.int32()),
        ("item_id", pa.string()),
        ("ok", pa.bool_()),
        ("retryable", pa.bool_()),
        ("status", pa.string()),
        ("http_status", pa.int32()),
        ("error", pa.string()),
        ("tries", pa.int32()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("latency_ms", pa.float64()),
        ("tokens", pa.float64()),
        ("retry_after_s", pa.float64()),
        ("payload", pa.string()),
    ]
)

_CHUNK_FILE = re.compile(r"^chunk-(\d+)\.parquet$")
_TEMP_FILE = re.compile(r"^\.(\d+)-[0-9a-f]+\.tmp$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ManifestError(RuntimeError):
    """A manifest store that cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class ChunkScan:
    """What a resume found: chunks already finished, and files that did not read."""

    finished: set[int]
    unreadable: list[str]


def result_table(result: ChunkResult) -> pa.Table:
    """A chunk's rows as an Arrow table in the manifest schema."""
    columns = result.columns()
    started = pa.array(columns["started_at"], pa.float64())
    finished = pa.array(columns["finished_at"], pa.float64())
    n = len(result)
    return pa.table(
        {
            "backfill": pa.array([result.backfill] * n, pa.string()),
            "attempt": pa.array([result.attempt] * n, pa.int32()),
            "run_id": pa.array([result.run_id] * n, pa.string()),
            "chunk_id": pa.array([result.chunk_id] * n, pa.int32()),
            "item_id": pa.array(columns["item_id"], pa.string()),
            "ok": pa.array(columns["ok"], pa.bool_()),
            "retryable": pa.array(columns["retryable"], pa.bool_()),
            "status": pa.array(columns["status"], pa.string()),
            "http_status": pa.array(columns["http_status"], pa.int32()),
            "error": pa.array(columns["error"], pa.string()),
            "tries": pa.array(columns["tries"], pa.int32()),
            "started_at": _timestamps(started),
            "finished_at": _timestamps(finished),
            "latency_ms": pc.multiply(pc.subtract(finished, started), 1000.0),
            "tokens": pa.array(columns["tokens"], pa.float64()),
            "retry_after_s": pa.array(columns["retry_after_s"], pa.float64()),
            "payload": pa.array(columns["payload"], pa.string()),
        },
        schema=MANIFEST_SCHEMA,
    )


class ManifestStore:
    """Where manifests, plans and failed-item tables live: a folder or an ``s3://`` URI."""

    def __init__(self, root: str, s3_endpoint_url: str | None = None):
        if not root:
            raise ManifestError("manifest root is empty. Give a folder (./data) or an s3://bucket/prefix URI.")
        self.root = root
        self.fs, self._base = _filesystem(root, s3_endpoint_url)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    # --- paths -----------------------------------------------------------------
    def attempt_dir(self, backfill: str, attempt: int) -> str:
        return f"{self._base}/manifests/backfill={check_name(backfill)}/attempt={attempt}"

    def chunk_path(self, backfill: str, attempt: int, chunk_id: int) -> str:
        return f"{self.attempt_dir(backfill, attempt)}/chunk-{chunk_id:06d}.parquet"

    def plan_path(self, backfill: str, attempt: int) -> str:
        return f"{self._base}/plans/backfill={check_name(backfill)}/attempt={attempt}.parquet"

    def failed_path(self, backfill: str) -> str:
        return f"{self._base}/failed/backfill={check_name(backfill)}.parquet"

    def uri(self, path: str) -> str:
        """A path as the user would type it (s3:// for S3)."""
        return path if self.is_local else f"s3://{path}"

    # --- writing -----------------------------------------------------------------
    def write_chunk(self, result: ChunkResult) -> str:
        path = self.chunk_path(result.backfill, result.attempt, result.chunk_id)
        self.write_table(path, result_table(result))
        return path

    def write_table(self, path: str, table: pa.Table) -> None:
        """Write whole or not at all."""
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:
            pq.write_table(table, path, filesystem=self.fs)
            return
        temp = f"{parent}/.{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            pq.write_table(table, temp)
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)

    def read_table(self, path: str) -> pa.Table:
        try:
            return pq.read_table(path, filesystem=self.fs)
        except (OSError, pa.ArrowInvalid) as error:
            raise ManifestError(f"cannot read {self.uri(path)}: {error}") from None

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    # --- reading -----------------------------------------------------------------
    def scan_chunks(self, backfill: str, attempt: int) -> ChunkScan:
        """Chunks of this attempt that have a readable manifest (for resume)."""
        finished: set[int] = set()
        unreadable: list[str] = []
        for info in self._list(self.attempt_dir(backfill, attempt)):
            match = _CHUNK_FILE.match(info.base_name)
            if not match:
                self._remove_orphaned_temp_file(info)
                continue
            if self._readable(info.path):
                finished.add(int(match.group(1)))
            else:
                unreadable.append(self.uri(info.path))
        return ChunkScan(finished, unreadable)

    def manifest_files(self, backfill: str | None = None) -> list[str]:
        """Every manifest file, of one backfill or all of them."""
        base = f"{self._base}/manifests"
        if backfill is not None:
            base = f"{base}/backfill={check_name(backfill)}"
        return sorted(i.path for i in self._list(base, recursive=True) if _CHUNK_FILE.match(i.base_name))

    def dataset(self, files: list[str]) -> pads.Dataset:
        """Manifest files (from ``manifest_files``) as one Arrow dataset; an unreadable one is an error."""
        bad = [self.uri(f) for f in files if not self._readable(f)]
        if bad:
            raise ManifestError(
                f"{len(bad)} manifest file(s) cannot be read, e.g. {bad[0]}. Rerun the backfill: "
                "resume re-runs the chunks of unreadable manifests and replaces them."
            )
        return pads.dataset(files, schema=MANIFEST_SCHEMA, format="parquet", filesystem=self.fs)

    def _list(self, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def _remove_orphaned_temp_file(self, info: pafs.FileInfo) -> None:
        """A run killed mid-write leaves its temp file; remove it once its writer is gone."""
        match = _TEMP_FILE.match(info.base_name)
        if match and self.is_local and not _process_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(info.path)

    def _readable(self, path: str) -> bool:
        try:
            return pq.read_metadata(path, filesystem=self.fs).num_rows >= 0
        except (OSError, pa.ArrowInvalid):
            return False


def check_name(backfill: str) -> str:
    """Backfill names become folder names; refuse anything that would escape or confuse."""
    if not _NAME.match(backfill or ""):
        raise ManifestError(
            f"backfill name {backfill!r} cannot be used as a folder name. "
            "Use letters, digits, '_', '-' and '.', starting with a letter, digit or '_'."
        )
    return backfill


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _timestamps(seconds: pa.Array) -> pa.Array:
    micros = pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())
    return pc.cast(micros, pa.timestamp("us", tz="UTC"))


def _filesystem(root: str, s3_endpoint_url: str | None) -> tuple[pafs.FileSystem, str]:
    parsed = urlparse(root)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ManifestError(f"{root!r} names no bucket. Write it as s3://bucket/prefix.")
        endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=region) if endpoint else pafs.S3FileSystem(region=region)
        return fs, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if parsed.scheme not in ("", "file"):
        raise ManifestError(f"manifest root {root!r}: only local folders and s3:// URIs are supported.")
    local = os.path.abspath(parsed.path if parsed.scheme == "file" else root)
    return pafs.LocalFileSystem(), local.rstrip("/") or "/"
