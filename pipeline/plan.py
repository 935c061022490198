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

from pipeline.chunks import Chunk
from pipeline.leases import ShareTicket
from pipeline.pacing.schedule import Pacing

PLAN_SCHEMA = pa.schema(
    [("chunk_id", pa.int32()), ("item_id", pa.string()), ("payload", pa.string()), ("group", pa.string())]
)


def make_plan(items: pa.Table, chunk_size: int, max_chunks_per_group: int | None = None) -> pa.Table:
    """Assign consecutive items to chunks of ``chunk_size``.

    Items with a ``group`` column (a website's domain, set by ``ByDomain``) are
    chunked group by group, so a chunk never spans two groups, and a group gets
    at most ``max_chunks_per_group`` chunks (made larger if need be). A chunk
    is run by one worker at a time, so that caps the workers on any one group
    — on Burla as much as locally, because it is a property of the plan.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}.")
    if "group" not in items.column_names:
        chunk_ids = np.arange(items.num_rows, dtype=np.int64) // chunk_size
        groups = pa.nulls(items.num_rows, pa.string())
    else:
        items = items.take(pc.sort_indices(items, sort_keys=[("group", "ascending")]))
        groups = pc.fill_null(items["group"], "")
        chunk_ids = _grouped_chunk_ids(groups, chunk_size, max_chunks_per_group)
    return pa.table(
        {
            "chunk_id": pa.array(chunk_ids, pa.int32()),
            "item_id": items["item_id"],
            "payload": items["payload"],
            "group": groups,
        },
        schema=PLAN_SCHEMA,
    )


def _grouped_chunk_ids(groups: pa.ChunkedArray, chunk_size: int, max_chunks: int | None) -> np.ndarray:
    """Chunk ids for items sorted by group: each group split evenly into its own chunks."""
    codes = pc.dictionary_encode(groups).combine_chunks().indices.to_numpy(zero_copy_only=False)
    n = len(codes)
    starts = np.flatnonzero(np.diff(codes, prepend=-1)) if n else np.array([], dtype=np.int64)
    sizes = np.diff(np.append(starts, n))
    chunks = -(-sizes // chunk_size)
    if max_chunks is not None:
        chunks = np.minimum(chunks, max_chunks)
    per_chunk = -(-sizes // np.maximum(chunks, 1))
    chunks = -(-sizes // per_chunk)  # evened out, a group may need fewer chunks: keep the ids contiguous
    first_chunk = np.concatenate(([0], np.cumsum(chunks)[:-1])) if n else chunks
    group_of_row = np.repeat(np.arange(len(starts)), sizes)
    position = np.arange(n) - starts[group_of_row]
    return first_chunk[group_of_row] + position // per_chunk[group_of_row]


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
    first_wave: int = 0,
    share: ShareTicket | None = None,
) -> Iterator[Chunk]:
    """Yield the plan's chunks lazily, skipping finished ones.

    Only one chunk's items are turned into Python objects at a time. The
    first ``first_wave`` chunks (the ones the workers start with) get start
    delays spread evenly over one period of the pacing: N workers that all
    called at once would put N calls in the first instant, and a provider that
    counts a per-minute budget per second would refuse them.
    """
    stagger = pacing.period() / first_wave if first_wave else 0.0
    started = 0
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
            start_delay_s=started * stagger if started < first_wave else 0.0,
            share=share,
        )
        started += 1
