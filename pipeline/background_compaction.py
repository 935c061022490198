"""Compaction that keeps up with the run: each block compacted as soon as its chunks are written.

Chunks finish out of order, so ``ReadyBlocks`` counts each block's written
chunks; a block whose last chunk is written goes to ``Schedule``, and
``Compactor`` compacts it in the background, so the end of an attempt waits
for its last block only, not for every block.

The CPU budget (``Background``):

* one block at a time, in one child process. Not a thread: on a thread the
  compaction's Python work takes the GIL from the run (at 200,000 chunk
  files of no-op work it made the run 127 s longer to save a 66 s tail;
  BENCHMARKS.md). The thread here only schedules and waits on a pipe.
* a duty cycle: after a block that took ``t`` seconds of wall time the
  compactor rests ``t x (1 - duty) / duty`` before the next (``t`` at the
  default duty of 0.5), so while the run goes compaction takes at most half
  a core, and less when the machine is busy (a slow block rests longer).
* once the last chunk is written (``finish``) it stops resting: what is left
  is what the end of the attempt waits for.

A chunk counts once its manifest is durable (the run calls ``written`` after
the fsyncs). The compaction protocol, and so crash safety, is
``pipeline.compaction``'s: a kill at any instant, of the run or of the
compaction process, leaves every chunk's rows readable exactly once.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import cloudpickle

from pipeline.compaction import (
    BLOCK_ROWS,
    CompactionError,
    CompactionResult,
    CrashHook,
    compact_block,
    compacted_name,
    count_files,
    no_crash,
    plan_blocks,
)
from pipeline.errors import ConfigError
from pipeline.manifests import ManifestStore

DEFAULT_DUTY = 0.5  # the share of wall time compaction may work while the run goes: half a core
DEFAULT_PROCESS = True  # in a child process: a thread takes the GIL from the run (see the module docstring)


@dataclass(frozen=True)
class Background:
    """How a run compacts its blocks while it goes: the CPU budget (see the module docstring).

    ``crash_hook`` is for tests and benchmarks that stop a compaction at a
    named point (``pipeline.compaction.CRASH_POINTS``); with ``process`` it
    runs in the compaction process (cloudpickled once, so it may count).
    """

    duty: float = DEFAULT_DUTY
    block_rows: int = BLOCK_ROWS
    process: bool = DEFAULT_PROCESS
    crash_hook: CrashHook | None = None

    def __post_init__(self) -> None:
        if not 0 < self.duty <= 1:
            raise ConfigError(f"duty is the share of wall time compaction may work, in (0, 1]; got {self.duty}.")

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
    """Compacts an attempt's blocks as their chunks are written: scheduled on a thread, done in a child process.

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
        self._crash = budget.crash_hook or no_crash
        self._clock = clock
        self._blocks = ReadyBlocks(plan_blocks(store, backfill, attempt, budget.block_rows), finished)
        files = store.attempt_files(backfill, attempt)
        # Started now, so its imports overlap the run rather than the last block.
        self._process = _CompactionProcess(store, self._crash) if budget.process else None
        self._compacted = files.compacted
        self._backfill, self._attempt = backfill, attempt
        self.result = CompactionResult(backfill, attempt, files_before=count_files(files))
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
        self._close_process()
        if self._error is not None:
            raise self._error
        self.result.blocks_waiting = self._blocks.waiting
        self.result.files_after = count_files(self._store.attempt_files(self._backfill, self._attempt))
        return self.result

    def stop(self) -> None:
        """Leave the queued blocks for the next run; wait for the block in progress."""
        with self._wake:
            self._schedule = Schedule(DEFAULT_BACKGROUND)
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._close_process()

    def _close_process(self) -> None:
        if self._process is not None:
            self._process.close()

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
        if self._process is None:
            done = compact_block(self._store, path, chunks, self._compacted, paths, self._crash)
        else:  # this thread waits on a pipe, without the GIL
            done = self._process.compact(path, chunks, self._compacted, paths)
        self.result.blocks_written += done.blocks_written
        self.result.chunk_files_removed += done.chunk_files_removed
        self.result.unreadable += done.unreadable

    def __repr__(self) -> str:
        return f"Compactor({self._backfill} attempt {self._attempt}: {self._blocks!r}, {self._schedule!r})"


class _CompactionProcess:
    """A child interpreter that compacts the blocks it is sent, one at a time, over its stdin and stdout.

    A plain ``python -c`` child rather than ``multiprocessing``: spawn would
    import the caller's main script again, and a script without a
    ``__main__`` guard would start its backfill a second time. Each message
    is a length-prefixed cloudpickle. If the run dies the child reads the
    end of its stdin and exits after its block; if the child dies the run's
    next ``compact`` raises.
    """

    def __init__(self, store: ManifestStore, crash: CrashHook):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self._child = subprocess.Popen(
            [sys.executable, "-c", "from pipeline.background_compaction import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        _send(self._child.stdin, (store, crash))

    def compact(self, path: str, chunks: range, compacted: dict[str, range], paths: list[str]) -> CompactionResult:
        _send(self._child.stdin, (path, chunks, compacted, paths))
        reply = _receive(self._child.stdout)
        if reply is None:
            raise CompactionError(
                f"the compaction process ended (exit status {self._child.wait()}) while compacting {path}; "
                "the block is compacted by the next run or `paceline compact`."
            )
        ok, value = reply
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """End the child after the block it is on (a stop at any point of a block is safe)."""
        self._child.stdin.close()
        self._child.wait()
        self._child.stdout.close()


def serve() -> None:
    """The compaction process: compact each block it is sent until its stdin ends."""
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not break the replies
    setup = _receive(requests)
    if setup is None:
        return
    store, crash = setup
    while (request := _receive(requests)) is not None:
        try:
            reply: tuple[bool, Any] = (True, compact_block(store, *request, crash))
        except Exception as error:  # noqa: BLE001 - sent to the run, which raises it at its end
            reply = (False, error)
        _send(replies, reply)


_LENGTH = struct.Struct("!Q")


def _send(pipe: IO[bytes], message: object) -> None:
    data = cloudpickle.dumps(message)
    pipe.write(_LENGTH.pack(len(data)) + data)
    pipe.flush()


def _receive(pipe: IO[bytes]) -> Any:
    """The next message, or None once the other side has closed the pipe."""
    head = pipe.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    return cloudpickle.loads(pipe.read(_LENGTH.unpack(head)[0]))
