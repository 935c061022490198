"""The local executor honours max_parallelism exactly, and streams results as chunks finish."""

import os
import time
import types

from pipeline.chunks import Chunk
from pipeline.executors import LocalExecutor
from pipeline.limits import Pacing


def _chunks(n: int) -> list[Chunk]:
    return [Chunk("local", 0, "run", c, [str(c)], [None], Pacing()) for c in range(n)]


def test_never_more_than_max_parallelism_chunks_run_at_once(tmp_path):
    live_dir = str(tmp_path)

    def note_concurrency(chunk):  # runs on a pickled copy: it reports through the filesystem
        mark = os.path.join(live_dir, str(chunk.chunk_id))
        open(mark, "w").close()
        live = len(os.listdir(live_dir))
        time.sleep(0.05)
        os.remove(mark)
        return types.SimpleNamespace(chunk_id=chunk.chunk_id, item_id=[], live=live)

    results = list(LocalExecutor().map(note_concurrency, _chunks(12), max_parallelism=3))
    assert sorted(r.chunk_id for r in results) == list(range(12))
    assert max(r.live for r in results) == 3


def test_results_stream_as_chunks_finish():
    def slow_first(chunk):
        time.sleep(0.3 if chunk.chunk_id == 0 else 0.0)
        return types.SimpleNamespace(chunk_id=chunk.chunk_id, item_id=[])

    order = [r.chunk_id for r in LocalExecutor().map(slow_first, _chunks(4), max_parallelism=2)]
    assert order[-1] == 0 and sorted(order) == [0, 1, 2, 3]
