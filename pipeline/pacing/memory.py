"""What a worker learned, handed from one of its chunks to the next.

Each chunk builds its controllers afresh, so without this every chunk would
start again from the user's estimates: re-learning a 2 s latency costs the
first seconds of every chunk, and a worker that had slowed down for a
throttling service would open the next chunk at full speed.

A ``WorkerMemory`` belongs to one worker: the chunk function
(``runner.make_chunk_function``) hands each chunk it runs a memory no chunk
running at the same time holds, and takes it back when the chunk ends. On
the local executor that is one memory per worker thread at a time; on Burla,
where each worker loads the chunk function once and runs chunks one after
another, the memory travels inside the function and stays in the worker. So
no worker ever reads what another measured, and nothing is shared between
workers.

Two things are kept, by the two parts of the runner that learn them: the
chunk loop's ``Learned`` (latency, tokens, pace) and the connect policy's
crowding level (how many refused logins its last connect met,
``pipeline.connection``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Learned:
    """The state a chunk leaves for the next chunk of the same worker."""

    latency_s: float
    tokens_per_call: float | None = None
    pace_factor: float = 1.0


class WorkerMemory:
    """One worker's memory of one run: what its chunks learned and how crowded it found the database.

    A worker keeps the latest run only, so its memory stays small and a new
    run starts from the estimates:

        >>> memory = WorkerMemory().of_run("run-a")
        >>> memory.learned = Learned(latency_s=1.5)
        >>> memory.of_run("run-b").learned is None
        True
    """

    __slots__ = ("run_id", "learned", "crowding")

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.learned: Learned | None = None
        self.crowding = 0  # refused logins in a row at this worker's last connect, halved by each clean one

    def of_run(self, run_id: str) -> WorkerMemory:
        """This memory for ``run_id``, emptied first if it holds another run's."""
        if run_id != self.run_id:
            self.run_id, self.learned, self.crowding = run_id, None, 0
        return self

    def __repr__(self) -> str:
        return f"<WorkerMemory run {self.run_id!r}: {self.learned}, crowding {self.crowding}>"
