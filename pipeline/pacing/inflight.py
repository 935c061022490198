"""How many calls one worker keeps in flight: Little's law on the latency it measures.

A worker that waits for each answer before the next call can never go faster
than one call per latency. So a 300 ms service planned as 50 ms ran at a
sixth of its target. The pacer already decides *when* a call may start; this
controller only makes sure a free slot is there when it may:

    calls in flight = pace (calls/s) x latency (s)

taken on a latency that rises fast and falls slowly (a service's latency
moves 10x with load, and a slot too few costs rate while a slot too many
costs only an idle thread), with ``HEADROOM`` for the spread of latencies.
It never changes the pace, so it cannot push a worker over its ceiling: more
slots than needed simply stay empty.

    limit = InFlightLimit(cap=64, latency_s=0.05)
    limit.on_sample(0.3)            # a call took 300 ms
    limit.limit(pace=20.0)          # -> 10 slots at 20 calls/s
"""

from __future__ import annotations

import math

HEADROOM = 1.5
"""Slots above the mean need: latencies spread, and a call that cannot start on time is rate lost."""

RISE = 0.5
"""Weight of a sample above the current latency: a slowdown is followed within a few calls."""

FALL = 0.05
"""Weight of a sample below it: one fast answer does not take away the slots a slow spell needs."""


class InFlightLimit:
    """Little's law on a latency that rises fast and falls slowly. Pure: no clock, no threads."""

    __slots__ = ("cap", "latency_s")

    def __init__(self, cap: int, latency_s: float):
        if cap < 1:
            raise ValueError(f"cap must be at least 1, got {cap}.")
        self.cap = cap
        self.latency_s = latency_s

    def on_sample(self, latency_s: float) -> None:
        """Fold one measured call latency into the estimate."""
        weight = RISE if latency_s > self.latency_s else FALL
        self.latency_s += weight * (latency_s - self.latency_s)

    def limit(self, pace: float | None, waiting_s: float = 0.0) -> int:
        """Slots needed at ``pace`` calls/s (1 when nothing paces the worker).

        ``waiting_s`` is how long the oldest call in flight has been out: the
        latency is at least that, which lets a worker open slots while its
        first answers from a slow service are still on their way.
        """
        if pace is None or self.cap == 1:
            return 1
        needed = math.ceil(pace * max(self.latency_s, waiting_s) * HEADROOM)
        return min(self.cap, max(1, needed))  # never more than the cap: the client's pool is finite

    def __repr__(self) -> str:
        return f"<InFlightLimit latency {self.latency_s * 1000:.1f} ms, cap {self.cap}>"
