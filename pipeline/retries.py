"""Whether to run another retry round, and when: the one decision both retry drivers make.

The Dagster retry sensor and ``paceline demo`` each drive rounds in their own
way (a run request, a loop), but they ask the same question of the same facts,
so they cannot disagree on when a backfill is finished:

    decision = next_round(failed=3, next_attempt=1, max_attempts=3, retry_after_s=2.0)
    # NextRound(attempt=1, wait_s=2.0)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NextRound:
    """Run retry round ``attempt`` once ``wait_s`` more seconds have passed (0: now)."""

    attempt: int
    wait_s: float


@dataclass(frozen=True)
class Stop:
    """No more rounds: ``reason`` says why, in a sentence for a log line or a sensor's skip reason."""

    reason: str


def next_round(
    failed: int,
    next_attempt: int,
    max_attempts: int,
    last_round_failed: str | None = None,
    retry_after_s: float = 0.0,
    cooldown_s: float = 0.0,
    waited_s: float = 0.0,
) -> NextRound | Stop:
    """The next retry round after the last one ended, or why there is none.

    ``failed`` items are failed and retryable now; ``next_attempt`` is one past
    the latest attempt with a row. ``last_round_failed`` names a round whose
    run failed (an account out of credit stops a run): another round would
    only meet the same wall. The wait is the longer of ``cooldown_s`` and the
    longest Retry-After the service sent, less the ``waited_s`` already passed
    since the failures were counted.
    """
    if failed == 0:
        return Stop("nothing to retry.")
    if next_attempt >= max_attempts:
        return Stop(f"{max_attempts} attempts used; remaining failures are final.")
    if last_round_failed is not None:
        return Stop(
            f"the last retry run ({last_round_failed}) failed, for example because the service's account ran "
            "out of credit. Rounds are not launched into a failing service: fix the cause, then re-execute that "
            "run; rounds resume once one succeeds."
        )
    return NextRound(next_attempt, max(0.0, max(cooldown_s, retry_after_s) - waited_s))
