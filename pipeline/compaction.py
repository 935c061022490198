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

Crash points are named (``CRASH_POINTS``); ``compact_attempt`` and the
background compactor call an injectable hook at each one, so tests stop a
compaction exactly there.

Keeping up with the run
-----------------------
A run does not wait for its end to compact: ``Compactor`` compacts a block
as soon as its last chunk is written (chunks finish out of order, so
``ReadyBlocks`` counts each block's written chunks), on one background
thread, so the end of an attempt pays for its last block or two only. Its
CPU budget (``Background``): one block at a time, and after a block that
took ``t`` seconds of wall time it rests ``t x (1 - duty) / duty`` (half the
wall time at the default duty of 0.5), so while the run goes compaction
takes at most about half a core and yields more when the process is busy
(wall time includes waiting for the GIL). Once the last chunk is written it
stops resting. Blocks are cut at ``BLOCK_FILES`` chunk files as well as at
``BLOCK_ROWS`` rows, because the last block's cost is mostly per file.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PacelineError
from pipeline.limits import ExecutionPlan
from pipeline.manifests import MANIFEST_SCHEMA, AttemptFiles, ManifestError, ManifestStore, compacted_name

BLOCK_ROWS = 500_000  # rows per compacted file: 20 files for ten million rows, and the last block costs < 1 s
BLOCK_FILES = 1_000  # chunk files per block: reading a small file costs about 1 ms, so the last block about 1 s
DEFAULT_DUTY = 0.5  # the share of wall time background compaction may work while the run goes: half a core
DEFAULT_PROCESS = True  # compact in a child process: a thread would take the GIL from the run (BENCHMARKS.md)
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
    result = CompactionResult(backfill, attempt, files_before=_count(files))
    folder = store.attempt_dir(backfill, attempt)
    for chunks in _plan_blocks(store, backfill, attempt, block_rows):
        block = Block(chunks, f"{folder}/{compacted_name(chunks)}")
        _advance_block(store, block, files.compacted, files.chunk_files(chunks), result, crash_hook or _no_crash)
    result.files_after = _count(store.attempt_files(backfill, attempt))
    return result


def _plan_blocks(store: ManifestStore, backfill: str, attempt: int, block_rows: int) -> list[range]:
    plan_path = store.plan_path(backfill, attempt)
    if not store.exists(plan_path):
        raise CompactionError(
            f"{backfill} attempt {attempt}: no chunk plan at {store.uri(plan_path)}, so which chunks make a "
            "complete block is unknown. Compact attempts that were planned by Paceline."
        )
    return blocks_of(pq.read_table(plan_path, columns=["chunk_id"], filesystem=store.fs)["chunk_id"], block_rows)


def _count(files: AttemptFiles) -> int:
    return len(files.files()) + len(files.covered)


def compact(
    store: ManifestStore, backfill: str | None = None, crash_hook: CrashHook | None = None
) -> list[CompactionResult]:
    """Compact every planned attempt of one backfill, or of every backfill in the store."""
    return [
        compact_attempt(store, name, attempt, crash_hook=crash_hook)
        for name, attempt in store.planned_attempts(backfill)
    ]


def _no_crash(point: str) -> None:
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


@dataclass(frozen=True)
class Background:
    """How a run compacts its blocks while it goes: the CPU budget (see the module docstring).

    ``crash_hook`` is for tests and benchmarks that stop a compaction at a
    named point (``CRASH_POINTS``).
    """

    duty: float = DEFAULT_DUTY
    block_rows: int = BLOCK_ROWS
    process: bool = DEFAULT_PROCESS
    crash_hook: CrashHook | None = None

    def __post_init__(self) -> None:
        if not 0 < self.duty <= 1:
            raise ValueError(f"duty is the share of wall time compaction may work, in (0, 1]; got {self.duty}.")

    def rest_after(self, busy_s: float) -> float:
        """Seconds to rest after ``busy_s`` of work, so work stays at ``duty`` of the wall time."""
        return busy_s * (1 - self.duty) / self.duty


DEFAULT_BACKGROUND = Background()


class ReadyBlocks:
    """An attempt's blocks and which of their chunks are written: a block is ready once all of them are.

    Chunks finish out of order and a chunk may be reported twice (written
    at the start, then again by this run); each counts once.

    >>> ready = ReadyBlocks([range(0, 2), range(2, 4)], written={3})
    >>> ready.note(0), ready.note(2), ready.note(1)
    (None, range(2, 4), range(0, 2))
    """

    __slots__ = ("_blocks", "_left", "_written", "_block_of")

    def __init__(self, blocks: list[range], written: Iterable[int] = ()):
        self._blocks = blocks
        self._left = [len(block) for block in blocks]
        chunks = blocks[-1].stop if blocks else 0
        self._written = bytearray(chunks)
        self._block_of = [i for i, block in enumerate(blocks) for _ in block]
        for chunk_id in written:
            self.note(chunk_id)

    def note(self, chunk_id: int) -> range | None:
        """Record one chunk as written; the block it completes, if it completes one."""
        if not 0 <= chunk_id < len(self._written) or self._written[chunk_id]:
            return None
        self._written[chunk_id] = 1
        index = self._block_of[chunk_id]
        self._left[index] -= 1
        return self._blocks[index] if self._left[index] == 0 else None

    def ready(self) -> list[range]:
        """Every block whose chunks are all written."""
        return [block for block, left in zip(self._blocks, self._left) if left == 0]

    @property
    def waiting(self) -> int:
        """Blocks with a chunk not written yet."""
        return sum(1 for left in self._left if left)

    def __repr__(self) -> str:
        return f"ReadyBlocks({len(self._blocks) - self.waiting} of {len(self._blocks)} blocks ready)"


class Schedule:
    """What the background compactor does next, on the clock it is handed: pure, so tests run it on simulated time.

    ``next(now)`` is a block to compact now, seconds to rest first, or None
    when no block is ready. Blocks are taken in the order they became ready.
    """

    __slots__ = ("_budget", "_queue", "_rest_until", "_hurried")

    def __init__(self, budget: Background, ready: Iterable[range] = ()):
        self._budget = budget
        self._queue: deque[range] = deque(ready)
        self._rest_until = float("-inf")
        self._hurried = False

    def add(self, block: range) -> None:
        self._queue.append(block)

    def hurry(self) -> None:
        """The run has written its last chunk: no more rests, what is left is what the end waits for."""
        self._hurried = True

    def next(self, now: float) -> range | float | None:
        if not self._queue:
            return None
        if not self._hurried and now < self._rest_until:
            return self._rest_until - now
        return self._queue.popleft()

    def done(self, started: float, now: float) -> None:
        """A block took ``now - started``: rest in proportion before the next."""
        self._rest_until = now + self._budget.rest_after(now - started)

    def __len__(self) -> int:
        return len(self._queue)

    def __repr__(self) -> str:
        return f"Schedule({len(self._queue)} block(s) queued, {'hurried' if self._hurried else 'paced'})"


class Compactor:
    """Compacts an attempt's blocks on one background thread as their chunks are written.

    ``written(chunk_id)`` after each chunk's manifest is durable; ``finish()``
    once the last is written: it compacts what is left at full speed and
    returns what was done; ``stop()`` if the run fails: the block being
    compacted is finished (a stop at any point is safe), the queued ones are
    left for the next run. ``finished`` are the chunks written before this
    run (``scan_chunks``): their complete blocks are compacted first, which
    also finishes a block an earlier compaction left half cleaned.
    """

    def __init__(
        self,
        store: ManifestStore,
        backfill: str,
        attempt: int,
        finished: Iterable[int],
        budget: Background = DEFAULT_BACKGROUND,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._store = store
        self._folder = store.attempt_dir(backfill, attempt)
        self._crash: CrashHook | bytes = budget.crash_hook or _no_crash
        self._pool: ProcessPoolExecutor | None = None
        if budget.process:
            self._crash = cloudpickle.dumps(self._crash)
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self._pool.submit(int)  # start it now: its imports overlap the run, not the last block
        self._clock = clock
        self._blocks = ReadyBlocks(_plan_blocks(store, backfill, attempt, budget.block_rows), finished)
        files = store.attempt_files(backfill, attempt)
        self._compacted = files.compacted
        self._backfill, self._attempt = backfill, attempt
        self.result = CompactionResult(backfill, attempt, files_before=_count(files))
        self._schedule = Schedule(budget, self._blocks.ready())
        self._wake = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="paceline-compaction", daemon=True)
        self._thread.start()

    def written(self, chunk_id: int) -> None:
        block = self._blocks.note(chunk_id)
        if block is not None:
            with self._wake:
                self._schedule.add(block)
                self._wake.notify()

    def finish(self) -> CompactionResult:
        """Compact the blocks still queued without resting, wait for them, and say what was done."""
        with self._wake:
            self._schedule.hurry()
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._close_pool()
        if self._error is not None:
            raise self._error
        self.result.blocks_waiting = self._blocks.waiting
        self.result.files_after = _count(self._store.attempt_files(self._backfill, self._attempt))
        return self.result

    def stop(self) -> None:
        """Leave the queued blocks for the next run; wait for the block in progress."""
        with self._wake:
            self._schedule = Schedule(DEFAULT_BACKGROUND)
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._close_pool()

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _work(self) -> None:
        try:
            while (block := self._next()) is not None:
                started = self._clock()
                self._compact(block)
                with self._wake:
                    self._schedule.done(started, self._clock())
        except BaseException as error:  # noqa: BLE001 - raised again by finish(), in the run's thread
            self._error = error

    def _next(self) -> range | None:
        with self._wake:
            while True:
                action = self._schedule.next(self._clock())
                if isinstance(action, range):
                    return action
                if action is None and self._closing:
                    return None
                self._wake.wait(action)

    def _compact(self, chunks: range) -> None:
        path = f"{self._folder}/{compacted_name(chunks)}"
        paths = [self._store.chunk_path(self._backfill, self._attempt, i) for i in chunks]
        if self._pool is None:
            done = _compact_block(self._store, path, chunks, self._compacted, paths, self._crash)
        else:  # this thread waits on a pipe, without the GIL
            done = self._pool.submit(_compact_pickled, self._store, path, chunks, self._compacted, paths, self._crash)
            done = done.result()
        self.result.blocks_written += done.blocks_written
        self.result.chunk_files_removed += done.chunk_files_removed
        self.result.unreadable += done.unreadable

    def __repr__(self) -> str:
        return f"Compactor({self._backfill} attempt {self._attempt}: {self._blocks!r}, {self._schedule!r})"


def _compact_block(
    store: ManifestStore, path: str, chunks: range, compacted: dict[str, range], paths: list[str], crash: CrashHook
) -> CompactionResult:
    """One complete block, in this process; returns what it did."""
    done = CompactionResult("", 0)
    if store.readable(path):  # another run of this attempt published it: only clean up
        compacted = {**compacted, path: chunks}
    _advance_block(store, Block(chunks, path), compacted, paths, done, crash)
    return done


def _compact_pickled(
    store: ManifestStore, path: str, chunks: range, compacted: dict[str, range], paths: list[str], crash: bytes
) -> CompactionResult:
    """``_compact_block`` in the compaction process: the crash hook travels cloudpickled (it may be a closure)."""
    return _compact_block(store, path, chunks, compacted, paths, _unpickled_hook(crash))


@functools.lru_cache(maxsize=4)
def _unpickled_hook(crash: bytes) -> CrashHook:
    """One hook per compaction process, not one per block: a hook that counts the points it saw keeps counting."""
    return cloudpickle.loads(crash)


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
