"""What a worker learned, handed from one of its runs to the next.

A worker's run (``runner.PacedWorker.run``: the chunks one executor thread,
or one Burla call, takes one after another) builds its controllers afresh,
so without this every run would start again from the user's estimates:
re-learning a 2 s latency costs the first seconds of every run, and a worker
that had slowed down for a throttling service would open the next at full
speed. Within a run the controllers carry from chunk to chunk by themselves.

A ``WorkerMemory`` belongs to one worker: the runner's worker hands each run
a memory no run going on at the same time holds, and takes it back when the
run ends. On the local executor that is one memory per worker thread; on
Burla, where each node loads the worker once and runs calls one after
another, the memory travels inside the worker and stays on the node. So no
worker ever reads what another measured, and nothing is shared between
workers.

Two things are kept, by the two parts of the runner that learn them: the
worker loop's ``Learned`` (latency, tokens, pace) and the connect policy's
crowding level (how many refused logins its last connect met,
``pipeline.connection``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Learned:
    """The state a worker leaves for its next run (and, on each result, what it had learned by then)."""

    latency_s: float
    tokens_per_call: float | None = None
    pace_factor: float = 1.0


class WorkerMemory:
    """One worker's memory of one backfill run: what its runs learned and how crowded it found the database.

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
