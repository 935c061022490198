"""What a worker learned, handed from one of its chunks to the next.

Each chunk builds its controllers afresh, so without this every chunk would
start again from the user's estimates: re-learning a 2 s latency costs the
first seconds of every chunk, and a worker that had slowed down for a
throttling service would open the next chunk at full speed. A worker is one
thread of the local executor, or one process on Burla that runs chunks one
after another, so what it learned is kept per (run, thread): the same scope
in both places, and no worker ever reads what another measured.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Learned:
    """The state a chunk leaves for the next chunk of the same worker."""

    latency_s: float
    tokens_per_call: float | None = None
    pace_factor: float = 1.0


_learned: dict[tuple[str, int], Learned] = {}


def recall(run_id: str) -> Learned | None:
    """What this worker's previous chunk of ``run_id`` learned, if any."""
    return _learned.get((run_id, threading.get_ident()))


def remember(run_id: str, learned: Learned) -> None:
    """Keep ``learned`` for this worker's next chunk (the latest run only: a worker's memory stays small)."""
    key = (run_id, threading.get_ident())
    for old in [k for k in list(_learned) if k[1] == key[1] and k[0] != run_id]:
        _learned.pop(old, None)
    _learned[key] = learned
