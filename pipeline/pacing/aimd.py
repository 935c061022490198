"""Back off on throttling, probe back up: additive increase, multiplicative decrease.

The declared limit is often not the one the service enforces (a budget
shared with other teams, stale documentation, a site that slows down under
load). A worker that only waits out each Retry-After and then returns to its
planned pace keeps knocking on a closed door: 7% of calls refused and 0.61 of
the real capacity used, measured before this controller existed.

So each worker, on its own, moves a *factor* of its planned ceiling:

* a throttle (429/503) on a fresh item multiplies it by ``DECREASE``;
* each successful call adds ``INCREASE``, never above 1 (the ceiling).

Which throttles count is the throttle policy's question
(``pipeline.policies.throttle``): one about a single item never reaches here.

Independent workers converge on a shared limit like TCP flows do: whoever
is refused slows down, everyone creeps back up, and no worker needs to know
about the others — the same on Burla as locally. The factor only ever moves
a worker *below* its ceiling, so ``workers x ceiling <= limit x safety``
still holds by construction.

    aimd = Aimd()
    aimd.on_throttle()      # factor 1.0 -> 0.8
    aimd.on_success()       # factor 0.8 -> 0.801
"""

from __future__ import annotations

DECREASE = 0.8
"""Back off by 20% per throttle. TCP halves, but a throttle here refuses one call, not a window of
them, and every worker that was refused backs off at once: 0.8 reaches a limit at 40% of the
ceiling in four throttles while losing less goodput on each tooth of the sawtooth."""

INCREASE = 0.001
"""Per successful call, add 0.1% of the ceiling: back to full pace after 200 successes from 0.8.
Probing slowly keeps refusals rare at a real limit below the ceiling. On simulated time, driven by
the throttle policy (tests/test_policies.py), 3 to 10 workers at a real limit of 70% or 40% of their
ceiling use 0.93-0.95 of it with 0.6-2.0% of calls refused once converged; with 30 workers at 40% it
is 0.89 and 1.2%."""

MIN_FACTOR = 0.02
"""Never below 2% of the ceiling: a worker always keeps probing, so it notices when the service recovers."""


class Aimd:
    """A worker's pace as a fraction of its planned ceiling. Pure: no clock, no randomness."""

    __slots__ = ("factor",)

    def __init__(self, factor: float = 1.0):
        self.factor = _clamp(factor)

    def on_success(self) -> None:
        self.factor = _clamp(self.factor + INCREASE)

    def on_throttle(self) -> None:
        self.factor = _clamp(self.factor * DECREASE)

    def undo_throttle(self) -> None:
        """Take back one cut that proved wrong (the throttle was about an item, not the pace)."""
        self.factor = _clamp(self.factor / DECREASE)

    def __repr__(self) -> str:
        return f"<Aimd factor {self.factor:.3f}>"


def _clamp(factor: float) -> float:
    return min(1.0, max(MIN_FACTOR, factor))  # never above the ceiling the plan guarantees
