"""The local executor honours max_parallelism exactly, and streams results as chunks finish.

Chunks run on cloudpickled copies, so they signal each other through files,
and every wait is for an event with a generous deadline, never a guess at
how long a thread takes to be scheduled on a loaded machine.
"""

import os
import time
import types
from pathlib import Path

from pipeline.chunks import Chunk
from pipeline.executors import LocalExecutor
from pipeline.limits import Pacing

DEADLINE_S = 10.0  # only a broken executor waits this long: the test then fails, it does not hang


def _chunks(n: int) -> list[Chunk]:
    return [Chunk("local", 0, "run", c, [str(c)], [None], Pacing()) for c in range(n)]


def _wait_until(condition) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_never_more_than_max_parallelism_chunks_run_at_once(tmp_path):
    live_dir = str(tmp_path)

    def note_concurrency(chunk):
        mark = os.path.join(live_dir, str(chunk.chunk_id))
        open(mark, "w").close()
        if chunk.chunk_id < 3:  # the first three meet, so the cap is reached whatever the scheduling
            _wait_until(lambda: len(os.listdir(live_dir)) >= 3)
        live = len(os.listdir(live_dir))
        time.sleep(0.05)  # the rest overlap as they may: a fourth at once would be counted
        os.remove(mark)
        return types.SimpleNamespace(chunk_id=chunk.chunk_id, item_id=[], live=live)

    results = list(LocalExecutor().map(note_concurrency, _chunks(12), max_parallelism=3))
    assert sorted(r.chunk_id for r in results) == list(range(12))
    assert max(r.live for r in results) == 3


def test_results_stream_as_chunks_finish(tmp_path):
    """Chunk 0 finishes only once the caller has received the three after it."""
    released = tmp_path / "released"

    def slow_first(chunk):
        if chunk.chunk_id == 0:
            _wait_until(released.exists)
        return types.SimpleNamespace(chunk_id=chunk.chunk_id, item_id=[])

    order = []
    for result in LocalExecutor().map(slow_first, _chunks(4), max_parallelism=2):
        order.append(result.chunk_id)
        if len(order) == 3:
            Path(released).touch()
    assert order[-1] == 0 and sorted(order) == [0, 1, 2, 3], "the other three came while chunk 0 still ran"
