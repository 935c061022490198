"""What a worker learned, handed from one of its chunks to the next.

Each chunk builds its controllers afresh, so without this every chunk would
start again from the user's estimates: re-learning a 2 s latency costs the
first seconds of every chunk, and a worker that had slowed down for a
throttling service would open the next chunk at full speed. A worker is one
thread of the local executor, or one process on Burla that runs chunks one
after another, so what it learned is kept per (run, thread): the same scope
in both places, and no worker ever reads what another measured.

Two things are kept, by the two parts of the runner that learn them: the
chunk loop's ``Learned`` (latency, tokens, pace) and the connect policy's
crowding level (how many refused logins its last connect met,
``pipeline.connection``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class Learned:
    """The state a chunk leaves for the next chunk of the same worker."""

    latency_s: float
    tokens_per_call: float | None = None
    pace_factor: float = 1.0


_Value = TypeVar("_Value")
_learned: dict[tuple[str, int], Learned] = {}
_crowding: dict[tuple[str, int], int] = {}


def recall(run_id: str) -> Learned | None:
    """What this worker's previous chunk of ``run_id`` learned, if any."""
    return _learned.get((run_id, threading.get_ident()))


def remember(run_id: str, learned: Learned) -> None:
    """Keep ``learned`` for this worker's next chunk (the latest run only: a worker's memory stays small)."""
    _keep(_learned, run_id, learned)


def recall_crowding(run_id: str) -> int:
    """How crowded this worker last found the database in ``run_id`` (0: it got in at once)."""
    return _crowding.get((run_id, threading.get_ident()), 0)


def remember_crowding(run_id: str, level: int) -> None:
    """Keep the crowding level for this worker's next connect (the latest run only)."""
    _keep(_crowding, run_id, level)


def _keep(store: dict[tuple[str, int], _Value], run_id: str, value: _Value) -> None:
    key = (run_id, threading.get_ident())
    for old in [k for k in list(store) if k[1] == key[1] and k[0] != run_id]:
        store.pop(old, None)
    store[key] = value
