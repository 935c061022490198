"""Executors run workers over chunks: locally, or on Burla.

A worker (``chunks.ChunkWorker``) takes chunks one after another and hands
each result over as soon as it is whole; the runner's worker takes its next
chunk while the last calls of the one before are still out. Both executors
stream results as chunks finish, and both turn every chunk that could not
produce its own result (a worker exception, a lost node, a job-level error)
into rows of failed-retryable items — a chunk never vanishes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import cloudpickle

from pipeline.chunks import Chunk, ChunkResult, ChunkWorker, EachChunk, failed_chunk_result
from pipeline.errors import PacelineError

ChunkFunction = Callable[[Chunk], ChunkResult]

DEFAULT_CHUNKS_PER_CALL = 4
"""Chunks in one Burla call. A call returns its results only when it ends, so this is what a lost node can take
with it per call it was running; and a worker drains its calls once per call instead of once per chunk."""


class Executor(Protocol):
    name: str

    def map(
        self, fn: ChunkWorker | ChunkFunction, chunks: Iterable[Chunk], max_parallelism: int
    ) -> Iterator[ChunkResult]:
        """Run ``max_parallelism`` workers of ``fn`` over ``chunks``, yielding each result as its chunk finishes.

        ``fn`` is a worker, or a plain chunk function run one chunk at a time.
        """


class ExecutorError(PacelineError):
    """An executor that cannot start (wrong thread, Burla not signed in)."""


def as_worker(fn: ChunkWorker | ChunkFunction) -> ChunkWorker:
    return fn if isinstance(fn, ChunkWorker) else EachChunk(fn)


def drive(worker: ChunkWorker, chunks: Iterator[Chunk], emit: Callable[[ChunkResult], None]) -> None:
    """Run ``worker`` until ``chunks`` is empty; every chunk it took gets a result, its own or failed rows.

    A worker that raised loses only the chunks it held and had not emitted:
    they get failed-retryable rows (``worker_error``), and a new run of the
    worker goes on with the rest. So does a worker that stopped early (out of
    credit, bad credentials): its next chunk tells again, with one call.
    """
    held: dict[int, Chunk] = {}
    source = _Taking(chunks, held)

    def emitted(result: ChunkResult) -> None:
        held.pop(result.chunk_id, None)
        emit(result)

    while not source.exhausted:
        taken = source.count
        reason = "the worker returned without a result for this chunk"
        try:
            worker.run(source, emitted)
        except BaseException as error:  # the worker died: its chunks do not
            reason = f"{type(error).__name__}: {error}"
            if not isinstance(error, Exception):
                _fail_held(held, reason, emit)
                raise
        _fail_held(held, reason, emit)
        if source.count == taken:
            return  # it took nothing: another run would not either


def _fail_held(held: dict[int, Chunk], reason: str, emit: Callable[[ChunkResult], None]) -> None:
    for chunk in held.values():
        emit(failed_chunk_result(chunk, "worker_error", reason))
    held.clear()


class _Taking:
    """The chunks a worker takes, noted as taken until the worker emits their result."""

    __slots__ = ("_chunks", "_held", "count", "exhausted")

    def __init__(self, chunks: Iterator[Chunk], held: dict[int, Chunk]):
        self._chunks, self._held = chunks, held
        self.count = 0
        self.exhausted = False

    def __iter__(self) -> _Taking:
        return self

    def __next__(self) -> Chunk:
        chunk = next(self._chunks, None)
        if chunk is None:
            self.exhausted = True
            raise StopIteration
        self._held[chunk.chunk_id] = chunk
        self.count += 1
        return chunk


@dataclass
class LocalExecutor:
    """The embedded default: exactly ``max_parallelism`` worker threads, each taking chunks from one shared source.

    The worker is pickled once, and each chunk and result go through a
    cloudpickle round trip, as they do with Burla, so a backfill that runs
    here does not depend on sharing memory with the caller. Chunks are taken
    in order as workers are ready for them, so a run that stops handing them
    out (out of credit) stops within one chunk per worker.
    """

    name: str = "local"

    def map(
        self, fn: ChunkWorker | ChunkFunction, chunks: Iterable[Chunk], max_parallelism: int
    ) -> Iterator[ChunkResult]:
        if max_parallelism < 1:
            raise ExecutorError(f"max_parallelism must be at least 1, got {max_parallelism}.")
        worker = cloudpickle.loads(cloudpickle.dumps(as_worker(fn)))
        source = _SharedSource(chunks)
        results: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

        def emit(result: ChunkResult) -> None:
            results.put(cloudpickle.dumps(result))

        def run_worker() -> None:
            try:
                drive(worker, source, emit)
            finally:
                results.put(None)

        threads = [threading.Thread(target=run_worker, name=f"paceline-{n}") for n in range(max_parallelism)]
        for thread in threads:
            thread.start()
        try:
            live = len(threads)
            while live:
                out = results.get()
                if out is None:
                    live -= 1
                    continue
                yield cloudpickle.loads(out)
            if source.error is not None:
                raise source.error
        finally:
            source.close()  # a caller that stopped reading stops the workers at their next chunk
            for thread in threads:
                thread.join()


class _SharedSource:
    """The chunks every local worker takes from, in order; a source that raises ends it, for the caller to see."""

    def __init__(self, chunks: Iterable[Chunk]):
        self._chunks = iter(chunks)
        self._lock = threading.Lock()
        self._closed = False
        self.error: Exception | None = None

    def __iter__(self) -> _SharedSource:
        return self

    def __next__(self) -> Chunk:
        with self._lock:
            if self._closed:
                raise StopIteration
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._closed = True
                raise
            except Exception as error:  # noqa: BLE001 - raised on the caller's thread by ``map``
                self._closed, self.error = True, error
                raise StopIteration from None
        return cloudpickle.loads(cloudpickle.dumps(chunk))

    def close(self) -> None:
        with self._lock:
            self._closed = True


@dataclass
class ChunkSequence:
    """The input of one Burla call: chunks its worker runs one after another. Not a tuple: Burla would unpack it."""

    chunks: list[Chunk]


def deal(chunks: list[Chunk], workers: int, per_call: int) -> list[ChunkSequence]:
    """Chunks into sequences of at most ``per_call``, dealt in rounds of ``workers x per_call`` like cards.

    Sequence k of a round holds chunks k, k + workers, k + 2 workers, ...:
    the first sequence of each worker starts with a chunk of the first wave,
    which carries its staggered start (``plan.iter_chunks``), and a short
    last round still spreads over every worker.
    """
    sequences = []
    for start in range(0, len(chunks), workers * per_call):
        block = chunks[start : start + workers * per_call]
        sequences.extend(ChunkSequence(block[k::workers]) for k in range(min(workers, len(block))))
    return sequences


def _sequence_function(worker: ChunkWorker) -> Callable[[ChunkSequence], list[ChunkResult]]:
    def run_paceline_chunks(sequence: ChunkSequence) -> list[ChunkResult]:
        results: list[ChunkResult] = []
        drive(worker, iter(sequence.chunks), results.append)
        return results

    return run_paceline_chunks


@dataclass
class BurlaExecutor:
    """Chunks on a Burla cluster through ``remote_parallel_map``, a short sequence of chunks per call.

    A Burla call takes one input and returns one result when it ends, and
    nothing comes back before (a generator function's results cannot leave
    the worker, and ``generator=True`` only streams whole calls' results to
    the client). So each call runs ``chunks_per_call`` chunks as one worker
    (``ChunkSequence``, dealt by ``deal``): inside the call the worker
    overlaps each chunk's last calls with the next chunk's first, and only
    the end of the call drains. A lost node loses only the chunks of the
    calls it was running, none of them written: they are recorded
    failed-retryable for the retry round, at most ``chunks_per_call`` per
    call. ``chunks_per_call=1`` is a checkpoint per chunk, with a drain per
    chunk.

    ``raise_errors=False`` so one bad call does not end the job; results
    carry their own chunk id because Burla returns them unordered and
    unindexed; exceptions map back through ``burla_input_index``. If the job
    itself fails (``NodeDisconnected``), the chunks already returned are
    kept and the rest are recorded as failed-retryable; if it fails before
    returning anything (not signed in, no cluster), that is an error and
    nothing is recorded.
    """

    func_cpu: int | str = 1
    func_ram: int | str = 2
    grow: bool = False
    image: str | None = None
    chunks_per_call: int = DEFAULT_CHUNKS_PER_CALL
    name: str = "burla"

    def map(
        self, fn: ChunkWorker | ChunkFunction, chunks: Iterable[Chunk], max_parallelism: int
    ) -> Iterator[ChunkResult]:
        if threading.current_thread() is not threading.main_thread():
            raise ExecutorError(
                "Burla must be called from the main thread (it installs signal handlers). "
                "Run the backfill from the main thread, not from a thread pool or a notebook callback."
            )
        if self.chunks_per_call < 1:
            raise ExecutorError(f"chunks_per_call must be at least 1, got {self.chunks_per_call}.")
        from burla import remote_parallel_map

        sequences = deal(list(chunks), max_parallelism, self.chunks_per_call)
        if not sequences:
            return
        waiting = {chunk.chunk_id: chunk for sequence in sequences for chunk in sequence.chunks}
        total = len(waiting)
        job_error: BaseException | None = None
        try:
            for result in remote_parallel_map(
                _sequence_function(as_worker(fn)),
                sequences,
                func_cpu=self.func_cpu,
                func_ram=self.func_ram,
                grow=self.grow,
                image=self.image,
                max_parallelism=max_parallelism,
                generator=True,
                raise_errors=False,
                spinner=False,
            ):
                for chunk_result in _from_burla(result, sequences):
                    if waiting.pop(chunk_result.chunk_id, None) is not None:
                        yield chunk_result
        except Exception as error:  # noqa: BLE001 - a lost job must not lose the chunks already returned
            job_error = error
        if job_error is not None and len(waiting) == total:
            raise ExecutorError(
                f"the Burla job did not start or returned nothing ({type(job_error).__name__}: {job_error}). "
                "Check `burla login` and the cluster dashboard; nothing was recorded, so a rerun does every chunk."
            ) from job_error
        reason = "the Burla job ended before this chunk returned"
        if job_error is not None:
            reason = f"{type(job_error).__name__}: {job_error}"
        for chunk in waiting.values():
            yield failed_chunk_result(chunk, "executor_error", reason)


def _from_burla(result: object, sequences: list[ChunkSequence]) -> list[ChunkResult]:
    """The chunk results of one Burla call, or the failed rows of every chunk of the call whose exception it is."""
    if isinstance(result, list):
        # ChunkResults, checked by shape: they may come back through pickling by value
        return [r for r in result if hasattr(r, "chunk_id") and hasattr(r, "item_id")]
    if isinstance(result, BaseException):
        index = getattr(result, "burla_input_index", None)
        if index is None or not 0 <= index < len(sequences):
            return []
        error = f"{type(result).__name__}: {result}"
        return [failed_chunk_result(chunk, "worker_error", error) for chunk in sequences[index].chunks]
    return []
