"""Compaction: an attempt's chunk manifests become a few large files, losing no row and counting none twice.

One Parquet file per finished chunk is the right checkpoint, but every
question the ledger answers then opens every file, and a big backfill writes
hundreds of thousands of them (on S3, one request each). Compaction merges
them once the chunks are written.

The protocol
------------
An attempt's chunk ids (``0..n-1`` in its plan) are cut into fixed blocks of
consecutive ids, sized from the plan so a block holds about ``BLOCK_ROWS``
rows. Every compactor computes the same blocks. A block moves through four
states, in this order only (``Block.advance`` refuses anything else)::

    CHUNKS ──▶ WRITING ──▶ COMMITTED ──▶ CLEAN

* ``CHUNKS``: only chunk files. Compaction starts only when every chunk of the
  block has one (so two compactors of one block always write the same name).
* ``WRITING``: the rows go to a temp file (local: ``.<pid>-<hex>.tmp`` in the
  attempt folder; S3: a file in the local temp folder, then one upload).
  Nothing reads it; a crash leaves the chunk files as they were. Locally the
  next resume removes a dead writer's temp file; on S3 an upload cut short
  leaves no object (the local temp file stays for the OS to clear).
* ``COMMITTED``: the file is published as ``compacted-<first>-<last>.parquet``
  (fsync, ``os.replace``, fsync of the folder; on S3 the object appears whole
  when its upload completes). The name is the commit record: from this
  instant every reader (``ManifestStore.manifest_files``, ``scan_chunks``)
  reads it and ignores the block's chunk files. It is fsynced before any
  chunk file is removed.
* ``CLEAN``: the block's chunk files are removed. A crash half way leaves
  some of them, which no reader reads; the next compaction finds the
  committed file and removes the rest.

So at every instant a reader sees each chunk's rows once, from its chunk file
or from the compacted file, never from both; resume counts a chunk as
finished in either form. A late chunk file for a compacted chunk (a second
run of the same attempt) is ignored and removed like the others.

Inside a compacted file, the rows of each chunk keep their order but ok rows
come first, then permanent failures, then retryable ones, each in their own
row groups: the Parquet statistics on ``ok`` and ``retryable`` then let a
reader fetch the failed rows without the rest.

Crash points are named (``CRASH_POINTS``); ``compact_attempt`` and
``compact_block`` call an injectable hook at each one, so tests stop a
compaction exactly there.

Keeping up with the run
-----------------------
A run compacts each block as soon as its chunks are written
(``pipeline/background_compaction.py``). Blocks are cut at ``BLOCK_FILES``
chunk files as well as at ``BLOCK_ROWS`` rows, because the cost of the last
block, the one an attempt's end waits for, is mostly per file.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PacelineError
from pipeline.limits import ExecutionPlan
from pipeline.manifests import MANIFEST_SCHEMA, AttemptFiles, ManifestError, ManifestStore, compacted_name

BLOCK_ROWS = 500_000  # rows per compacted file: 20 files for ten million rows, and the last block costs < 1 s
BLOCK_FILES = 1_000  # chunk files per block: reading a small file costs about 1 ms, so the last block about 1 s
ROW_GROUP_ROWS = 128 * 1024  # big enough for fast scans, small enough that failed rows sit in their own groups
READ_WINDOW = 512  # chunk files read ahead at once: bounds memory whatever the block size
READ_THREADS = 8  # on S3 each read or removal is a request worth overlapping

# Named points where a test's hook may stop a compaction (raise, or kill the process).
TEMP_WRITTEN = "temp_written"  # the compacted rows are in the temp file, not yet published
COMMITTED = "committed"  # the compacted file is published; no chunk file removed yet
CHUNK_REMOVED = "chunk_removed"  # after each chunk file removed
CRASH_POINTS = (TEMP_WRITTEN, COMMITTED, CHUNK_REMOVED)

CrashHook = Callable[[str], None]


class CompactionError(ManifestError):
    """A compaction that cannot proceed; the message says which block and why."""


class State(enum.Enum):
    CHUNKS = "chunks"
    WRITING = "writing"
    COMMITTED = "committed"
    CLEAN = "clean"


_NEXT = {
    State.CHUNKS: {State.WRITING, State.COMMITTED},  # COMMITTED directly: an earlier compaction published it
    State.WRITING: {State.COMMITTED},
    State.COMMITTED: {State.CLEAN},
    State.CLEAN: set(),
}


class Block:
    """One block of consecutive chunk ids and where it is in the protocol."""

    __slots__ = ("chunks", "path", "state")

    def __init__(self, chunks: range, path: str):
        self.chunks = chunks
        self.path = path
        self.state = State.CHUNKS

    def advance(self, to: State) -> None:
        """Move to the next state; anything out of order is a bug, refused before it can lose rows."""
        if to not in _NEXT[self.state]:
            raise CompactionError(f"{self!r}: cannot go from {self.state.value} to {to.value}.")
        self.state = to

    def __repr__(self) -> str:
        return f"Block(chunks {self.chunks.start}..{self.chunks.stop - 1}, {self.state.value})"


@dataclass
class CompactionResult:
    """What one compaction of one attempt did (and left for later)."""

    backfill: str
    attempt: int
    files_before: int = 0
    files_after: int = 0
    blocks_written: int = 0
    chunk_files_removed: int = 0
    blocks_waiting: int = 0  # blocks with unfinished chunks: compacted by a later run
    unreadable: list[str] = field(default_factory=list)

    def describe(self) -> str:
        waiting = f", {self.blocks_waiting} block(s) wait for unfinished chunks" if self.blocks_waiting else ""
        bad = f", {len(self.unreadable)} unreadable chunk file(s) left for resume" if self.unreadable else ""
        return (
            f"backfill={self.backfill} attempt={self.attempt}: {self.files_before:,} -> {self.files_after:,} "
            f"manifest files ({self.blocks_written} compacted file(s) written, "
            f"{self.chunk_files_removed:,} chunk files removed{waiting}{bad})"
        )


def blocks_of(plan_chunk_ids: pa.ChunkedArray | pa.Array, block_rows: int = BLOCK_ROWS) -> list[range]:
    """The attempt's blocks: consecutive chunk ids, at most ``block_rows`` rows and ``BLOCK_FILES`` files each.

    Computed from the plan alone, so every compactor of an attempt cuts the same blocks.
    """
    if len(plan_chunk_ids) == 0:
        return []
    counts = pc.value_counts(plan_chunk_ids)
    largest = int(pc.max(counts.field("counts")).as_py())
    chunks = int(pc.max(plan_chunk_ids).as_py()) + 1
    per_block = _chunks_per_block(largest, block_rows)
    return [range(start, min(start + per_block, chunks)) for start in range(0, chunks, per_block)]


def _chunks_per_block(chunk_rows: int, block_rows: int) -> int:
    return max(1, min(BLOCK_FILES, block_rows // max(1, chunk_rows)))


def compact_attempt(
    store: ManifestStore,
    backfill: str,
    attempt: int,
    block_rows: int = BLOCK_ROWS,
    crash_hook: CrashHook | None = None,
) -> CompactionResult:
    """Compact every block of one attempt whose chunks are all written; finish blocks a crash left.

    Safe to run at any time, again and again, and alongside a run of the
    same attempt: it only merges chunks that are finished, and a reader never
    sees a row twice (see the module docstring).
    """
    files = store.attempt_files(backfill, attempt)
    result = CompactionResult(backfill, attempt, files_before=count_files(files))
    folder = store.attempt_dir(backfill, attempt)
    for chunks in plan_blocks(store, backfill, attempt, block_rows):
        block = Block(chunks, f"{folder}/{compacted_name(chunks)}")
        _advance_block(store, block, files.compacted, files.chunk_files(chunks), result, crash_hook or no_crash)
    result.files_after = count_files(store.attempt_files(backfill, attempt))
    return result


def plan_blocks(store: ManifestStore, backfill: str, attempt: int, block_rows: int) -> list[range]:
    """The attempt's blocks, read from its chunk plan (refused without one)."""
    plan_path = store.plan_path(backfill, attempt)
    if not store.exists(plan_path):
        raise CompactionError(
            f"{backfill} attempt {attempt}: no chunk plan at {store.uri(plan_path)}, so which chunks make a "
            "complete block is unknown. Compact attempts that were planned by Paceline."
        )
    return blocks_of(pq.read_table(plan_path, columns=["chunk_id"], filesystem=store.fs)["chunk_id"], block_rows)


def count_files(files: AttemptFiles) -> int:
    """Manifest files in an attempt's folder, read or not (what a compaction's before/after counts)."""
    return len(files.files()) + len(files.covered)


def compact(
    store: ManifestStore, backfill: str | None = None, crash_hook: CrashHook | None = None
) -> list[CompactionResult]:
    """Compact every planned attempt of one backfill, or of every backfill in the store."""
    return [
        compact_attempt(store, name, attempt, crash_hook=crash_hook)
        for name, attempt in store.planned_attempts(backfill)
    ]


def no_crash(point: str) -> None:
    """The default hook: compaction runs through every point."""


def _advance_block(
    store: ManifestStore,
    block: Block,
    compacted: dict[str, range],
    chunk_files: list[str],
    result: CompactionResult,
    crash: CrashHook,
) -> None:
    """Take one block as far as it can go: CHUNKS -> WRITING -> COMMITTED -> CLEAN.

    ``compacted`` are the attempt's compacted files (path -> chunk ids) and
    ``chunk_files`` the block's chunk files, held by its compacted file or not.
    """
    if block.path not in compacted or not store.readable(block.path):  # one that does not read is rewritten
        if any(ids != block.chunks and _overlap(ids, block.chunks) for ids in compacted.values()):
            return  # compacted with other block bounds (an older setting): those files stay as they are
        if len(chunk_files) < len(block.chunks):
            result.blocks_waiting += 1
            return
        block.advance(State.WRITING)
        try:
            store.write_file(block.path, lambda temp: _write_block(store, chunk_files, temp, crash))
        except _UnreadableChunk as error:
            result.unreadable.append(store.uri(error.path))
            return
        result.blocks_written += 1
    block.advance(State.COMMITTED)
    crash(COMMITTED)
    with ThreadPoolExecutor(READ_THREADS) as pool:  # on S3 each removal is a request
        for _ in pool.map(store.remove, chunk_files):
            result.chunk_files_removed += 1
            crash(CHUNK_REMOVED)
    block.advance(State.CLEAN)


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


class _UnreadableChunk(PacelineError):
    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def _write_block(store: ManifestStore, chunk_files: list[str], temp: str, crash: CrashHook) -> None:
    """Stream the block's chunk files into one Parquet file: ok rows first, failed rows in their own groups."""
    permanent: list[pa.Table] = []
    retryable: list[pa.Table] = []
    with pq.ParquetWriter(temp, MANIFEST_SCHEMA) as writer:
        pending: list[pa.Table] = []
        pending_rows = 0
        for table in _read_chunks(store, chunk_files):
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                _split(pa.concat_tables(pending), writer, permanent, retryable)
                pending, pending_rows = [], 0
        if pending:
            _split(pa.concat_tables(pending), writer, permanent, retryable)
        for failed in (permanent, retryable):
            if failed:
                writer.write_table(pa.concat_tables(failed), row_group_size=ROW_GROUP_ROWS)
    crash(TEMP_WRITTEN)


def _split(rows: pa.Table, writer: pq.ParquetWriter, permanent: list[pa.Table], retryable: list[pa.Table]) -> None:
    """Write the ok rows now; keep the failed ones (a few percent) for the groups at the end."""
    rows = rows.combine_chunks()  # one chunk per column: the filters below then cost per column, not per file
    ok = rows["ok"]
    writer.write_table(rows.filter(ok), row_group_size=ROW_GROUP_ROWS)
    failed = rows.filter(pc.invert(ok))
    permanent.append(failed.filter(pc.invert(failed["retryable"])))
    retryable.append(failed.filter(failed["retryable"]))


def _read_chunks(store: ManifestStore, paths: list[str]) -> Iterator[pa.Table]:
    """Chunk files in order, a window at a time (small files cost per file, not per row).

    On S3 each read is a request, so a few threads overlap them; locally one
    thread is fastest, as decoding a small file holds the GIL for most of it.
    """
    with ThreadPoolExecutor(1 if store.is_local else READ_THREADS) as pool:
        for start in range(0, len(paths), READ_WINDOW):
            yield from pool.map(lambda path: _read_chunk(store, path), paths[start : start + READ_WINDOW])


def _read_chunk(store: ManifestStore, path: str) -> pa.Table:
    """One chunk file in the manifest schema (columns it predates are null); raises if it does not read.

    The whole file is read in one call, then decoded from memory: one read
    instead of one per column, which is most of the cost of a small file.
    """
    try:
        if store.is_local:
            with open(path, "rb") as handle:
                data = handle.read()
        else:
            with store.fs.open_input_stream(path) as handle:
                data = handle.read()
        table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    except (OSError, pa.ArrowInvalid):
        raise _UnreadableChunk(path) from None
    if table.schema.equals(MANIFEST_SCHEMA):
        return table
    columns = {
        f.name: table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in MANIFEST_SCHEMA
    }
    return pa.table(columns).cast(MANIFEST_SCHEMA)


def compact_block(
    store: ManifestStore, path: str, chunks: range, compacted: dict[str, range], paths: list[str], crash: CrashHook
) -> CompactionResult:
    """One block whose chunks are all written (``paths``), in this process; returns what it did.

    ``compacted`` are the attempt's compacted files as last listed; the
    block's own file is looked for again, as another run of the attempt may
    have published it since.
    """
    done = CompactionResult("", 0)
    if store.readable(path):  # another run of this attempt published it: only clean up
        compacted = {**compacted, path: chunks}
    _advance_block(store, Block(chunks, path), compacted, paths, done, crash)
    return done


def explain_files(execution: ExecutionPlan, chunks: int) -> ExecutionPlan:
    """The plan with one more line of explanation: how many files an attempt writes, and how many stay.

    Chunks are sized for the checkpoint (what a crash costs), not to keep the
    file count down: compaction takes care of the count.
    """
    blocks = math.ceil(chunks / _chunks_per_block(execution.chunk_size, BLOCK_ROWS))
    line = (
        f"an attempt writes {chunks:,} manifest file(s), one per chunk (the checkpoint); compaction merges "
        f"them, while the run goes, into {blocks:,} file(s) of up to {BLOCK_ROWS:,} rows or {BLOCK_FILES:,} chunks"
    )
    return dataclasses.replace(execution, explanation=[*execution.explanation, line])
