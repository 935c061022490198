"""Executors map the chunk function over chunks: locally, or on Burla.

Both stream results as chunks finish, and both turn every chunk that could
not produce its own result (a worker exception, a lost node, a job-level
error) into rows of failed-retryable items — a chunk never vanishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import cloudpickle

from pipeline.chunks import Chunk, ChunkResult, failed_chunk_result
from pipeline.errors import PacelineError

ChunkFunction = Callable[[Chunk], ChunkResult]


class Executor(Protocol):
    name: str

    def map(self, fn: ChunkFunction, chunks: Iterable[Chunk], max_parallelism: int) -> Iterator[ChunkResult]:
        """Run ``fn`` over ``chunks`` with at most ``max_parallelism`` at once, yielding as they finish."""


class ExecutorError(PacelineError):
    """An executor that cannot start (wrong thread, Burla not signed in)."""


@dataclass
class LocalExecutor:
    """The embedded default: a thread per live worker, exactly ``max_parallelism`` of them.

    The function is pickled once and each chunk and result go through a
    cloudpickle round trip, as they do with Burla, so a backfill that runs
    here does not depend on sharing memory with the caller.
    """

    name: str = "local"

    def map(self, fn: ChunkFunction, chunks: Iterable[Chunk], max_parallelism: int) -> Iterator[ChunkResult]:
        if max_parallelism < 1:
            raise ExecutorError(f"max_parallelism must be at least 1, got {max_parallelism}.")
        remote_fn = cloudpickle.loads(cloudpickle.dumps(fn))
        pending: dict[Future, Chunk] = {}
        source = iter(chunks)
        with ThreadPoolExecutor(max_workers=max_parallelism, thread_name_prefix="paceline") as pool:
            try:
                while True:
                    # One chunk queued behind each running one, so a worker that finishes starts the
                    # next at once; the pool's threads still cap how many run.
                    while len(pending) < 2 * max_parallelism and (chunk := next(source, None)) is not None:
                        pending[pool.submit(_round_trip, remote_fn, cloudpickle.dumps(chunk))] = chunk
                    if not pending:
                        return
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield _result_or_failure(future, pending.pop(future))
            finally:
                for future in pending:
                    future.cancel()


def _round_trip(fn: ChunkFunction, chunk_bytes: bytes) -> bytes:
    return cloudpickle.dumps(fn(cloudpickle.loads(chunk_bytes)))


def _result_or_failure(future: Future, chunk: Chunk) -> ChunkResult:
    error = future.exception()
    if error is not None:
        return failed_chunk_result(chunk, "worker_error", f"{type(error).__name__}: {error}")
    return cloudpickle.loads(future.result())


@dataclass
class BurlaExecutor:
    """Chunks on a Burla cluster through ``remote_parallel_map``.

    ``raise_errors=False`` so one bad chunk does not end the job; results
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
    name: str = "burla"

    def map(self, fn: ChunkFunction, chunks: Iterable[Chunk], max_parallelism: int) -> Iterator[ChunkResult]:
        if threading.current_thread() is not threading.main_thread():
            raise ExecutorError(
                "Burla must be called from the main thread (it installs signal handlers). "
                "Run the backfill from the main thread, not from a thread pool or a notebook callback."
            )
        from burla import remote_parallel_map

        inputs = list(chunks)
        if not inputs:
            return
        waiting = {chunk.chunk_id: chunk for chunk in inputs}
        job_error: BaseException | None = None
        try:
            for result in remote_parallel_map(
                fn,
                inputs,
                func_cpu=self.func_cpu,
                func_ram=self.func_ram,
                grow=self.grow,
                image=self.image,
                max_parallelism=max_parallelism,
                generator=True,
                raise_errors=False,
                spinner=False,
            ):
                chunk_result = _from_burla(result, inputs)
                if chunk_result is not None and waiting.pop(chunk_result.chunk_id, None) is not None:
                    yield chunk_result
        except Exception as error:  # noqa: BLE001 - a lost job must not lose the chunks already returned
            job_error = error
        if job_error is not None and len(waiting) == len(inputs):
            raise ExecutorError(
                f"the Burla job did not start or returned nothing ({type(job_error).__name__}: {job_error}). "
                "Check `burla login` and the cluster dashboard; nothing was recorded, so a rerun does every chunk."
            ) from job_error
        reason = "the Burla job ended before this chunk returned"
        if job_error is not None:
            reason = f"{type(job_error).__name__}: {job_error}"
        for chunk in waiting.values():
            yield failed_chunk_result(chunk, "executor_error", reason)


def _from_burla(result: object, inputs: list[Chunk]) -> ChunkResult | None:
    """A Burla result, or the failed rows of the chunk whose exception it is."""
    if hasattr(result, "chunk_id") and hasattr(result, "item_id"):
        return result  # a ChunkResult (checked by shape: it may come back through pickling by value)
    if isinstance(result, BaseException):
        index = getattr(result, "burla_input_index", None)
        if index is None or not 0 <= index < len(inputs):
            return None
        return failed_chunk_result(inputs[index], "worker_error", f"{type(result).__name__}: {result}")
    return None
