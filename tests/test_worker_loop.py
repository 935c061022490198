"""The worker loop over several chunks: it takes the next chunk while the last calls are out, emits each whole.

The loop runs on a simulated clock (the pacer never really sleeps); the
calls that must overlap run on its call threads and hand-shake through
events, so what is proved is the order of things, not a timing.
"""

import itertools
import threading

import httpx
import pytest

from pipeline.chunks import Chunk, ChunkResult, ChunkWorker
from pipeline.executors import drive
from pipeline.outcomes import OUT_OF_CREDIT, Retryable
from pipeline.pacing.memory import WorkerMemory
from pipeline.pacing.schedule import Pacing
from pipeline.runner import _WorkerLoop, run_chunk
from pipeline.work import FunctionWork, WorkHooks
from tests.simclock import FakeClock

_RUNS = itertools.count()
WAIT_S = 5.0  # a hand-shake that takes longer than this did not happen: the test fails instead of hanging
# Paced at 10 calls/s with a 1 s latency estimate: Little's law wants 15 calls in flight, up to the cap of 8.
OVERLAPPING = Pacing(min_interval_s=0.1, seconds_per_call=1.0, max_in_flight=8)


def _chunks(pacing: Pacing, run_id: str, *items: list[str]) -> list[Chunk]:
    return [Chunk("b", 0, run_id, n, ids, [None] * len(ids), pacing) for n, ids in enumerate(items)]


def _run(work: FunctionWork, pacing: Pacing, *items: list[str]) -> list[ChunkResult]:
    """One worker loop over one chunk per list of ids, on a simulated clock; the results as emitted."""
    clock, run_id, emitted = FakeClock(), f"loop-{next(_RUNS)}", []
    memory = WorkerMemory().of_run(run_id)
    loop = _WorkerLoop(work, WorkHooks.of(work), pacing, memory, emitted.append, clock, clock.sleep)
    loop.run(iter(_chunks(pacing, run_id, *items)))
    return emitted


def _rows(results: list[ChunkResult]) -> dict[str, tuple]:
    rows = [row for result in results for row in result.rows]
    assert len(rows) == len({row[0] for row in rows}), "one row per item, never two"
    return {row[0]: row for row in rows}


def test_the_next_chunk_starts_while_the_last_calls_of_the_one_before_are_out():
    next_chunk_sent = threading.Event()
    first_emitted = threading.Event()
    emitted: list[int] = []

    def call(client, item):
        if item.id.startswith("a"):  # chunk 0: its calls come back only once chunk 1 has been sent
            assert next_chunk_sent.wait(WAIT_S), "the worker waited for chunk 0's last calls before chunk 1"
        else:
            next_chunk_sent.set()
            assert first_emitted.wait(WAIT_S), "chunk 0 was not handed over while chunk 1's calls were out"
        return {"id": item.id}

    work = FunctionWork(lambda: object(), call)
    clock, run_id = FakeClock(), f"loop-{next(_RUNS)}"

    def emit(result: ChunkResult) -> None:
        emitted.append(result.chunk_id)
        if result.chunk_id == 0:
            first_emitted.set()

    loop = _WorkerLoop(work, WorkHooks.of(work), OVERLAPPING, WorkerMemory().of_run(run_id), emit, clock, clock.sleep)
    loop.run(iter(_chunks(OVERLAPPING, run_id, ["a1", "a2"], ["b1", "b2"])))
    assert emitted == [0, 1], "each chunk handed over once, the first as soon as its last item had a row"


def test_a_worker_keeps_one_client_across_its_chunks():
    opened: list[object] = []

    def connect():
        opened.append(object())
        return opened[-1]

    results = _run(FunctionWork(connect, lambda client, item: {"ok": 1}), Pacing(), ["a"], ["b", "c"], ["d"])
    assert len(opened) == 1, "one connection per worker, not one per chunk"
    assert [r.chunk_id for r in results] == [0, 1, 2] and all(all(r.ok) for r in results)


def test_a_failed_connect_fails_its_chunk_and_the_next_chunk_connects_again():
    tries = itertools.count()

    def connect():
        if next(tries) == 0:
            raise Retryable("database restarting")
        return object()

    results = _run(FunctionWork(connect, lambda client, item: {}), Pacing(), ["a", "b"], ["c"])
    rows = _rows(results)
    assert [rows[i][3] for i in ("a", "b")] == ["connect_failed"] * 2 and rows["a"][2], "failed, retryable"
    assert rows["c"][1], "the next chunk opened a new client and went through"


def test_an_empty_chunk_is_handed_over_at_once():
    result = run_chunk(FunctionWork(lambda: object(), lambda client, item: {}), Chunk("b", 0, "r", 7, [], []))
    assert result.chunk_id == 7 and len(result) == 0


def _http_error(status: int, body: dict | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://api.example.com/v1/chat/completions")
    response = httpx.Response(status, json=body or {}, request=request)
    return httpx.HTTPStatusError(f"HTTP {status}", request=request, response=response)


# OpenAI's own words for an empty account (https://platform.openai.com/docs/guides/error-codes/api-errors)
DRY = {
    "error": {"message": "You exceeded your current quota.", "type": "insufficient_quota", "code": "insufficient_quota"}
}


def test_out_of_credit_with_two_chunks_held_gives_every_item_of_both_one_row():
    second_sent = threading.Event()

    def call(client, item):
        if item.id == "b1":
            second_sent.set()
            raise _http_error(429, DRY)
        if item.id.startswith("a"):
            second_sent.wait(WAIT_S)  # chunk 0's calls are still out when the account runs dry
        return {}

    work = FunctionWork(lambda: object(), call)
    results = _run(work, OVERLAPPING, ["a1", "a2"], ["b1", "b2", "b3"], ["c1"])
    rows = _rows(results)
    assert {"a1", "a2", "b1", "b2", "b3"} <= set(rows), "every item of every chunk it held"
    assert sorted(r.chunk_id for r in results) == sorted({r.chunk_id for r in results}), "each handed over once"
    assert all(len(r) == len(r.rows) and len(r) == {0: 2, 1: 3, 2: 1}[r.chunk_id] for r in results), "each whole"
    assert all(r.out_of_credit for r in results if any(s == OUT_OF_CREDIT for s in r.status))
    assert rows["b1"][3] == OUT_OF_CREDIT and rows["b1"][2], "retryable, for the rerun after a top-up"


def test_bad_credentials_with_two_chunks_held_abort_both():
    def call(client, item):
        raise _http_error(401, {"error": {"message": "Incorrect API key provided."}})

    pacing = Pacing(min_interval_s=0.1, seconds_per_call=1.0, max_in_flight=8, auth_fail_fast=3)
    results = _run(FunctionWork(lambda: object(), call), pacing, ["a1", "a2"], ["b1", "b2"], ["c1", "c2"])
    rows = _rows(results)
    assert set(rows) <= {"a1", "a2", "b1", "b2", "c1", "c2"}
    assert any(r.auth_aborted for r in results), "the chunks held at the stop are marked, so the run stops"
    assert all(r.auth_aborted or r.credential_refusals == len(r) for r in results), (
        "a chunk handed over before the stop was all refused: the run holds it back (backfill._CredentialCheck)"
    )
    assert all(len(r) == 2 for r in results), "each chunk emitted whole"


class _Boom(BaseException):
    """Something that is not an Exception escapes: the runner records, then lets it go."""


def _dies_at_b2(client, item):
    if item.id == "b2":
        raise _Boom()
    return {}


def test_a_runner_that_dies_gives_every_chunk_it_held_its_rows_then_lets_the_error_go():
    emitted: list[ChunkResult] = []
    clock, run_id = FakeClock(), f"loop-{next(_RUNS)}"
    work = FunctionWork(lambda: object(), _dies_at_b2)
    loop = _WorkerLoop(work, WorkHooks.of(work), Pacing(), WorkerMemory().of_run(run_id), emitted.append, clock)
    with pytest.raises(_Boom):
        loop.run(iter(_chunks(Pacing(), run_id, ["a1"], ["b1", "b2", "b3"], ["c1"])))
    rows = _rows(emitted)
    assert sorted(rows) == ["a1", "b1", "b2", "b3"] and [rows[i][3] for i in ("b2", "b3")] == ["runner_error"] * 2


def test_a_call_thread_that_dies_takes_the_worker_with_it_instead_of_leaving_it_waiting():
    emitted: list[ChunkResult] = []
    raised: list[BaseException] = []
    clock, run_id = FakeClock(), f"loop-{next(_RUNS)}"
    work = FunctionWork(lambda: object(), _dies_at_b2)
    memory = WorkerMemory().of_run(run_id)
    loop = _WorkerLoop(work, WorkHooks.of(work), OVERLAPPING, memory, emitted.append, clock, clock.sleep)

    def run() -> None:
        try:
            loop.run(iter(_chunks(OVERLAPPING, run_id, ["a1"], ["b1", "b2", "b3"])))
        except _Boom as error:
            raised.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(WAIT_S)
    assert not worker.is_alive(), "the worker waited for an outcome the dead call thread never sent"
    assert raised, "the error reached the worker"
    rows = _rows(emitted)
    assert sorted(rows) == ["a1", "b1", "b2", "b3"] and rows["b2"][3] == "runner_error"


class _DiesAfterOne(ChunkWorker):
    """A worker that emits one chunk, takes another and raises: the executor's ``drive`` keeps both."""

    def __init__(self) -> None:
        self.runs = 0

    def run(self, chunks, emit):
        self.runs += 1
        first = next(chunks)
        emit(ChunkResult(first.backfill, first.attempt, first.run_id, first.chunk_id))
        next(chunks, None)
        raise MemoryError("the worker ran out of memory")


def test_drive_fails_the_chunks_a_dead_worker_held_and_runs_a_new_one_on_the_rest():
    chunks = _chunks(Pacing(), "r", ["a"], ["b"], ["c"], ["d"], ["e"])
    results: list[ChunkResult] = []
    worker = _DiesAfterOne()
    drive(worker, iter(chunks), results.append)
    by_chunk = {r.chunk_id: r for r in results}
    assert sorted(by_chunk) == [0, 1, 2, 3, 4], "every chunk has a result"
    assert by_chunk[1].status == ["worker_error"] and "out of memory" in by_chunk[1].error[0]
    assert worker.runs == 3, "after each death a new run of the worker takes the rest"
