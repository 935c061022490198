"""A chunk, its result, and what runs chunks: what the planner makes, executors carry and the store writes.

They live apart from the runner so that the planner, the executors and the
store depend on these types, not on the code a worker runs.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pipeline.leases import ShareTicket
from pipeline.outcomes import Failure
from pipeline.pacing.memory import Learned
from pipeline.pacing.schedule import Pacing
from pipeline.rows import ROW_FIELDS
from pipeline.work import Item


@dataclass
class Chunk:
    """A list of items for one worker. Not a tuple: Burla would unpack it."""

    backfill: str
    attempt: int
    run_id: str
    chunk_id: int
    item_ids: list[str]
    payloads: list[str | None]
    pacing: Pacing = field(default_factory=Pacing)
    start_delay_s: float = 0.0  # staggered start-up: the first wave of chunks does not call all at once
    share: ShareTicket | None = None  # where the backfill's lease is, when it shares its service's budget

    def items(self) -> list[Item]:
        return [Item(i, p) for i, p in zip(self.item_ids, self.payloads)]


def _column(name: str) -> property:
    index = ROW_FIELDS.index(name)
    return property(lambda self: [row[index] for row in self.rows], doc=f"the {name} of every row")


@dataclass
class ChunkResult:
    """One row per item of a chunk.

    Rows are plain tuples in ``ROW_FIELDS`` order (``pipeline.rows``): the
    cheapest thing to build per item and to pickle back from a worker; only
    ``add_ok`` and ``add_failure`` build them. The result names its own
    chunk, because Burla returns results in no particular order and without
    their input index.
    """

    backfill: str
    attempt: int
    run_id: str
    chunk_id: int
    rows: list[tuple] = field(default_factory=list)
    auth_aborted: bool = False
    credential_refusals: int = 0  # rows refused for their credentials (``pipeline.refusals``), not just 401/403
    out_of_credit: str | None = None  # what the service said when the account ran dry: the run stops
    learned: Learned | None = None  # the worker's closed loops when the chunk ended (latency, tokens, pace)

    item_id = _column("item_id")
    ok = _column("ok")
    retryable = _column("retryable")
    status = _column("status")
    http_status = _column("http_status")
    error = _column("error")

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self) -> dict[str, list]:
        """All rows as columns, in one pass (for the manifest writer)."""
        if not self.rows:
            return {name: [] for name in ROW_FIELDS}
        return dict(zip(ROW_FIELDS, map(list, zip(*self.rows))))

    def add_ok(
        self, item_id: str, started: float, finished: float, tries: int, payload: str | None, tokens: float | None
    ) -> None:
        self.rows.append((item_id, True, False, "ok", None, None, tries, started, finished, tokens, None, payload))

    def add_failure(
        self,
        item_id: str,
        started: float,
        finished: float,
        tries: int,
        failure: Failure,
        retry_after: float | None = None,
    ) -> None:
        self.rows.append((
            item_id, False, failure.retryable, failure.status, failure.http_status, failure.error, tries,
            started, finished, None, retry_after, None,
        ))  # fmt: skip


def failed_chunk_result(chunk: Chunk, status: str, error: str, done: set[str] | None = None) -> ChunkResult:
    """Every item (not already done) failed and retryable: used when a chunk could not run."""
    result = ChunkResult(chunk.backfill, chunk.attempt, chunk.run_id, chunk.chunk_id)
    fill_failed(result, chunk, Failure(status, True, error), done or set())
    return result


def fill_failed(result: ChunkResult, chunk: Chunk, failure: Failure, done: set[str]) -> None:
    """Give ``failure`` to every item of the chunk not in ``done`` (none of them was tried)."""
    now = time.time()
    for item_id in chunk.item_ids:
        if item_id not in done:
            result.add_failure(item_id, now, now, 0, failure)


class ChunkWorker(abc.ABC):
    """One worker: runs the chunks it takes one after another, and hands over each result as it completes.

    ``run`` takes chunks from ``chunks`` (an iterator other workers may share)
    and calls ``emit`` once per chunk taken, with its result, the moment every
    item of it has a row; results may come out of the order taken. The
    runner's worker (``runner.PacedWorker``) takes its next chunk as soon as
    it has sent its current one's last call, so it does not idle while those
    calls are out. Called with one chunk, a worker runs just that chunk.
    """

    @abc.abstractmethod
    def run(self, chunks: Iterator[Chunk], emit: Callable[[ChunkResult], None]) -> None:
        """Run chunks from ``chunks`` until it is empty (or the worker must stop), emitting each result."""

    def __call__(self, chunk: Chunk) -> ChunkResult:
        results: list[ChunkResult] = []
        self.run(iter((chunk,)), results.append)
        return results[0]


class EachChunk(ChunkWorker):
    """A plain chunk function as a worker: one chunk at a time, each result when its function returns."""

    def __init__(self, function: Callable[[Chunk], ChunkResult]):
        self.function = function

    def run(self, chunks: Iterator[Chunk], emit: Callable[[ChunkResult], None]) -> None:
        for chunk in chunks:
            emit(self.function(chunk))
