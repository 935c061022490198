"""The chunk plan: which item goes to which chunk, written before anything runs.

The plan is deterministic — the same items in the same order and the same
chunk size give the same chunk ids — which is what lets a rerun recognise
the chunks it already finished. It is built with Arrow arithmetic, so
planning ten million items costs columns, not ten million Python objects.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.limits import Pacing
from pipeline.runner import Chunk

PLAN_SCHEMA = pa.schema([("chunk_id", pa.int32()), ("item_id", pa.string()), ("payload", pa.string())])


def make_plan(items: pa.Table, chunk_size: int) -> pa.Table:
    """Assign consecutive items to chunks of ``chunk_size``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    chunk_ids = pa.array(np.arange(items.num_rows, dtype=np.int64) // chunk_size, pa.int32())
    return pa.table(
        {"chunk_id": chunk_ids, "item_id": items["item_id"], "payload": items["payload"]},
        schema=PLAN_SCHEMA,
    )


def chunk_count(plan: pa.Table) -> int:
    return 0 if plan.num_rows == 0 else int(pc.max(plan["chunk_id"]).as_py()) + 1


def iter_chunks(
    plan: pa.Table,
    *,
    backfill: str,
    attempt: int,
    run_id: str,
    pacing: Pacing,
    skip: set[int] = frozenset(),  # type: ignore[assignment]
) -> Iterator[Chunk]:
    """Yield the plan's chunks lazily, skipping finished ones.

    Only one chunk's items are turned into Python objects at a time.
    """
    ids = plan["chunk_id"].to_numpy()
    boundaries = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate(([0], boundaries)) if len(ids) else np.array([], dtype=np.int64)
    ends = np.concatenate((boundaries, [len(ids)])) if len(ids) else np.array([], dtype=np.int64)
    for start, end in zip(starts.tolist(), ends.tolist()):
        chunk_id = int(ids[start])
        if chunk_id in skip:
            continue
        rows = plan.slice(start, end - start)
        yield Chunk(
            backfill=backfill,
            attempt=attempt,
            run_id=run_id,
            chunk_id=chunk_id,
            item_ids=rows["item_id"].to_pylist(),
            payloads=rows["payload"].to_pylist(),
            pacing=pacing,
        )
