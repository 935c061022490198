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

Compaction (``pipeline/compaction.py``) later merges an attempt's chunk files
into a few ``compacted-<first>-<last>.parquet`` files in the same folder. The
name is the commit record: a compacted file holds exactly the chunks
``first..last``, so every reader here (``manifest_files``, ``scan_chunks``)
reads it and ignores any chunk file in that range. A reader therefore sees,
for every chunk, either its chunk file or the compacted file, never both.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.chunks import ChunkResult
from pipeline.errors import PacelineError
from pipeline.rows import MANIFEST_COLUMNS, MANIFEST_SCHEMA, ROW_FIELDS, ROW_TYPE, Source

_CHUNK_FILE = re.compile(r"^chunk-(\d+)\.parquet$")
_COMPACTED_FILE = re.compile(r"^compacted-(\d+)-(\d+)\.parquet$")
_PLAN_FILE = re.compile(r"^/plans/backfill=([^/]+)/attempt=(\d+)\.parquet$")
_TEMP_FILE = re.compile(r"^\.(\d+)-[0-9a-f]+\.tmp$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# Parquet schema metadata of a chunk plan: the max_attempts the backfill was declared with when planned.
_MAX_ATTEMPTS_KEY = b"paceline.max_attempts"
_UTC_MICROS = pa.timestamp("us", tz="UTC")
FOOTER_THREADS = 8  # footers are small reads; on S3 each is a request worth overlapping
# A name becomes the folder ``backfill=<name>`` and the file ``backfill=<name>.parquet`` (failed items);
# Linux, macOS and Windows stop a file name at 255 bytes. Dagster stores keys, run keys and partition
# names as text columns without a length limit, so the file name is the binding one.
MAX_NAME_CHARS = 255 - len("backfill=") - len(".parquet")


class ManifestError(PacelineError):
    """A manifest store that cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class ChunkScan:
    """What a resume found: chunks already finished, and files that did not read."""

    finished: set[int]
    unreadable: list[str]


@dataclass(frozen=True)
class AttemptFiles:
    """One attempt's folder as a reader must see it: a compacted file wins over the chunk files it holds.

    ``chunks`` are the chunk files no compacted file holds (the ones to read);
    ``covered`` are chunk files a compacted file already holds (a compaction
    stopped before removing them, or a late rerun of a compacted chunk): never
    read, removed by the next compaction.
    """

    compacted: dict[str, range] = field(default_factory=dict)
    chunks: dict[int, str] = field(default_factory=dict)
    covered: dict[int, str] = field(default_factory=dict)

    def files(self) -> list[str]:
        """What to read: every compacted file and every chunk file none of them holds."""
        return sorted(self.compacted) + [self.chunks[i] for i in sorted(self.chunks)]

    def chunk_files(self, ids: range) -> list[str]:
        """Every chunk file with an id in ``ids``, held by a compacted file or not."""
        return [files[i] for i in ids for files in (self.chunks, self.covered) if i in files]


def compacted_name(chunks: range) -> str:
    """The file name that commits ``chunks`` (consecutive ids) as one compacted file."""
    return f"compacted-{chunks.start:06d}-{chunks.stop - 1:06d}.parquet"


def result_table(result: ChunkResult) -> pa.Table:
    """A chunk's rows as an Arrow table in the manifest schema (``pipeline.rows``).

    The row tuples convert in one call (``ROW_TYPE``), the timestamps with
    numpy: this runs once per chunk on the thread that writes manifests, and
    every Arrow kernel call there gives the GIL to the workers and waits to
    get it back.
    """
    n = len(result.rows)
    values = dict(zip(ROW_FIELDS, pa.array(result.rows, ROW_TYPE).flatten()))
    started = values["started_at"].to_numpy(zero_copy_only=False)
    finished = values["finished_at"].to_numpy(zero_copy_only=False)
    built = {  # the columns that are not taken as they are
        "started_at": _timestamps(started),
        "finished_at": _timestamps(finished),
        "latency_ms": pa.array((finished - started) * 1000.0),
    }
    arrays = []
    for column in MANIFEST_COLUMNS:
        if column.name in built:
            arrays.append(built[column.name])
        elif column.source is Source.CHUNK:
            arrays.append(pa.repeat(pa.scalar(getattr(result, column.name), column.type), n))
        else:
            arrays.append(values[column.name])
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


class ManifestStore:
    """Where manifests, plans and failed-item tables live: a folder or an ``s3://`` URI."""

    def __init__(self, root: str, s3_endpoint_url: str | None = None):
        if not root:
            raise ManifestError("manifest root is empty. Give a folder (./data) or an s3://bucket/prefix URI.")
        self.root = root
        self.s3_endpoint_url = s3_endpoint_url
        self.fs, self._base = _filesystem(root, s3_endpoint_url)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    # --- paths -----------------------------------------------------------------
    def attempt_dir(self, backfill: str, attempt: int) -> str:
        return f"{self._base}/manifests/backfill={check_name(backfill)}/attempt={attempt}"

    def chunk_path(self, backfill: str, attempt: int, chunk_id: int) -> str:
        return f"{self.attempt_dir(backfill, attempt)}/chunk-{chunk_id:06d}.parquet"

    def plan_path(self, backfill: str, attempt: int) -> str:
        return f"{self._base}/plans/backfill={check_name(backfill)}/attempt={attempt}.parquet"

    def credit_path(self, backfill: str, attempt: int) -> str:
        """The chunks of an attempt an empty account stopped, until a rerun finishes them (outside manifests/)."""
        return f"{self._base}/out_of_credit/backfill={check_name(backfill)}/attempt={attempt}.parquet"

    def failed_path(self, backfill: str) -> str:
        return f"{self._base}/failed/backfill={check_name(backfill)}.parquet"

    def uri(self, path: str) -> str:
        """A path as the user would type it (s3:// for S3)."""
        return path if self.is_local else f"s3://{path}"

    # --- writing -----------------------------------------------------------------
    def write_table(self, path: str, table: pa.Table) -> None:
        """Write whole or not at all.

        Without dictionaries: item ids are unique, so a dictionary would be
        built and thrown away, and snappy compresses the repeated values as
        well (a chunk file comes out smaller and takes half the time).
        """
        self.write_file(path, lambda temp: pq.write_table(table, temp, use_dictionary=False))

    def write_file(self, path: str, write: Callable[[str], None]) -> None:
        """Publish what ``write(local_path)`` writes at ``path``, whole or not at all.

        Locally: a temp name in the target folder (never read: it does not end
        in ``.parquet``), fsync, ``os.replace``, fsync of the folder, so a crash
        leaves either no file or the whole file, also across a power cut. On
        S3 the file is written locally and then uploaded: an object appears
        only when its upload completes, and an upload cut short leaves none.
        """
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        folder = parent if self.is_local else tempfile.gettempdir()
        temp = f"{folder}/.{os.getpid()}-{uuid.uuid4().hex}.tmp"
        try:
            write(temp)
            if self.is_local:
                _fsync(temp)
                os.replace(temp, path)
                _fsync(parent)
            else:
                pafs.copy_files(temp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        finally:
            if os.path.exists(temp):
                os.remove(temp)

    def write_plan(self, backfill: str, attempt: int, plan: pa.Table, max_attempts: int) -> str:
        """Write an attempt's chunk plan with the backfill's ``max_attempts`` in its schema metadata.

        ``max_attempts`` decides which failed rows are dead, so a reader that
        only has the store (``paceline status``) needs it as much as the rows.
        """
        path = self.plan_path(backfill, attempt)
        metadata = {**(plan.schema.metadata or {}), _MAX_ATTEMPTS_KEY: str(max_attempts).encode()}
        self.write_table(path, plan.replace_schema_metadata(metadata))
        return path

    def planned_max_attempts(self, backfill: str | None = None) -> dict[str, int]:
        """Backfill -> the ``max_attempts`` its latest chunk plan was written with (one footer read each).

        The latest plan carries the latest declaration. A backfill whose plan
        predates the stored value is left out: its reader applies the default.
        """
        latest = dict(self.planned_attempts(backfill))  # sorted: the last attempt of each backfill wins
        found = {}
        for name, attempt in latest.items():
            path = self.plan_path(name, attempt)
            try:
                metadata = pq.read_schema(path, filesystem=self.fs).metadata or {}
            except (OSError, pa.ArrowInvalid) as error:
                raise ManifestError(f"cannot read {self.uri(path)}: {error}") from None
            if _MAX_ATTEMPTS_KEY in metadata:
                found[name] = int(metadata[_MAX_ATTEMPTS_KEY])
        return found

    def remove(self, path: str) -> None:
        """Delete a file; one already gone is fine (another compaction removed it)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(path)

    def read_table(self, path: str) -> pa.Table:
        try:
            return pq.read_table(path, filesystem=self.fs)
        except (OSError, pa.ArrowInvalid) as error:
            raise ManifestError(f"cannot read {self.uri(path)}: {error}") from None

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    # --- reading -----------------------------------------------------------------
    def scan_chunks(self, backfill: str, attempt: int) -> ChunkScan:
        """Chunks of this attempt that have a readable manifest, compacted or not (for resume).

        A compacted file that does not read finishes none of its chunks: they
        run again, and the compaction at the end of that run replaces it.
        """
        infos = self._list(self.attempt_dir(backfill, attempt))
        for info in infos:
            self._remove_orphaned_temp_file(info)
        files = attempt_files(infos)
        finished: set[int] = set()
        unreadable: list[str] = []
        candidates = list(files.compacted.items())
        candidates += [(path, range(i, i + 1)) for i, path in files.chunks.items()]
        for path, ids in candidates:
            if self.readable(path):
                finished.update(ids)
            else:
                unreadable.append(self.uri(path))
        return ChunkScan(finished, sorted(unreadable))

    def attempt_files(self, backfill: str, attempt: int) -> AttemptFiles:
        """One attempt's manifest files, compacted and not (one listing)."""
        return attempt_files(self._list(self.attempt_dir(backfill, attempt)))

    def manifest_files(self, backfill: str | None = None) -> list[str]:
        """Every manifest file to read, of one backfill or all of them: one listing, no file opened.

        Per attempt folder, compacted files and the chunk files none of them holds.
        """
        base = f"{self._base}/manifests"
        if backfill is not None:
            base = f"{base}/backfill={check_name(backfill)}"
        folders: dict[str, list[pafs.FileInfo]] = {}
        for info in self._list(base, recursive=True):
            folders.setdefault(info.path.rsplit("/", 1)[0], []).append(info)
        return sorted(path for infos in folders.values() for path in attempt_files(infos).files())

    def planned_attempts(self, backfill: str | None = None) -> list[tuple[str, int]]:
        """(backfill, attempt) of every chunk plan in the store, of one backfill or all, in order."""
        base = f"{self._base}/plans"
        if backfill is not None:
            base = f"{base}/backfill={check_name(backfill)}"
        found = []
        for info in self._list(base, recursive=True):
            match = _PLAN_FILE.match(info.path[len(self._base) :])
            if match:
                found.append((match.group(1), int(match.group(2))))
        return sorted(found)

    def dataset(self, files: list[str]) -> pads.Dataset:
        """Manifest files (from ``manifest_files``) as one Arrow dataset; an unreadable one is an error.

        The footers are read on a few threads (on S3 each is a request) and
        not kept: a parsed footer costs about 50 KB, which for 200,000 chunk
        files would be 10 GB. After compaction there are a few files to check.
        """
        with ThreadPoolExecutor(FOOTER_THREADS) as pool:
            readable = list(pool.map(self.readable, files))
        bad = [self.uri(f) for f, ok in zip(files, readable) if not ok]
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

    def readable(self, path: str) -> bool:
        """Whether a Parquet file's footer reads (one small read; a half or foreign file does not)."""
        try:
            return pq.read_metadata(path, filesystem=self.fs).num_rows >= 0
        except (OSError, pa.ArrowInvalid):
            return False


def check_name(backfill: str) -> str:
    """Backfill names become folder names; refuse anything that would escape, confuse or not fit."""
    if not _NAME.match(backfill or ""):
        raise ManifestError(
            f"backfill name {backfill!r} cannot be used as a folder name. "
            "Use letters, digits, '_', '-' and '.', starting with a letter, digit or '_'."
        )
    if len(backfill) > MAX_NAME_CHARS:
        raise ManifestError(
            f"backfill name is {len(backfill)} characters ({backfill[:20]}...); it becomes the folder "
            f"backfill=<name> and the file backfill=<name>.parquet, and file names stop at 255 bytes. "
            f"Use at most {MAX_NAME_CHARS} characters."
        )
    return backfill


def attempt_files(infos: list[pafs.FileInfo]) -> AttemptFiles:
    """Sort one attempt folder's listing into compacted files, chunk files to read and covered ones.

    Two compacted files that hold the same chunk would count its rows twice;
    compaction never makes them (it only compacts chunks no compacted file
    holds), so meeting them is an error rather than a guess.
    """
    files = AttemptFiles()
    for info in infos:
        match = _COMPACTED_FILE.match(info.base_name)
        if match:
            files.compacted[info.path] = range(int(match.group(1)), int(match.group(2)) + 1)
    ranges = sorted((ids.start, ids.stop, path) for path, ids in files.compacted.items())
    for (_, stop, path), (start, _, other) in zip(ranges, ranges[1:]):
        if start < stop:
            raise ManifestError(
                f"compacted manifests {path} and {other} hold some of the same chunks. Remove the one that "
                "was copied in by hand (compaction never writes two), or their rows count twice."
            )
    starts = [start for start, _, _ in ranges]
    for info in infos:
        match = _CHUNK_FILE.match(info.base_name)
        if not match:
            continue
        chunk_id = int(match.group(1))
        holder = bisect.bisect_right(starts, chunk_id) - 1
        if holder >= 0 and chunk_id < ranges[holder][1]:
            files.covered[chunk_id] = info.path
        else:
            files.chunks[chunk_id] = info.path
    return files


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to disk: a rename is durable only once its folder is."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _timestamps(seconds: np.ndarray) -> pa.Array:
    return pa.array(np.rint(seconds * 1e6).astype(np.int64), _UTC_MICROS)


def _filesystem(root: str, s3_endpoint_url: str | None) -> tuple[pafs.FileSystem, str]:
    parsed = urlparse(root)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ManifestError(f"{root!r} names no bucket. Write it as s3://bucket/prefix.")
        endpoint = s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        fs = (
            pafs.S3FileSystem(endpoint_override=endpoint, region=region)
            if endpoint
            else pafs.S3FileSystem(region=region)
        )
        return fs, f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if parsed.scheme not in ("", "file"):
        raise ManifestError(f"manifest root {root!r}: only local folders and s3:// URIs are supported.")
    local = os.path.abspath(parsed.path if parsed.scheme == "file" else root)
    return pafs.LocalFileSystem(), local.rstrip("/") or "/"
