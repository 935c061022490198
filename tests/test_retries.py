"""The retry decision on its own; tests/test_dagster_backfill.py and tests/test_cli.py drive it through its callers."""

import pytest

from pipeline.retries import NextRound, Stop, next_round


def test_nothing_failed_means_no_round():
    assert next_round(failed=0, next_attempt=1, max_attempts=3) == Stop("nothing to retry.")


def test_attempts_used_up_means_the_failures_are_final():
    assert next_round(failed=2, next_attempt=3, max_attempts=3) == Stop(
        "3 attempts used; remaining failures are final."
    )


def test_a_failed_round_is_not_followed_by_another():
    decision = next_round(failed=2, next_attempt=2, max_attempts=3, last_round_failed="attempt-1")
    assert isinstance(decision, Stop)
    assert "the last retry run (attempt-1) failed" in decision.reason and "re-execute" in decision.reason


def test_nothing_failed_wins_over_a_failed_round():
    """A failed run whose items are all done since leaves nothing to say but that."""
    assert next_round(failed=0, next_attempt=2, max_attempts=3, last_round_failed="attempt-1") == Stop(
        "nothing to retry."
    )


def test_the_next_round_starts_now_without_a_wait():
    assert next_round(failed=2, next_attempt=1, max_attempts=3) == NextRound(attempt=1, wait_s=0.0)


@pytest.mark.parametrize(
    "retry_after_s, cooldown_s, waited_s, wait_s",
    [
        (2.0, 0.0, 0.0, 2.0),  # the service's Retry-After
        (2.0, 5.0, 0.0, 5.0),  # the longer cool-down
        (2.0, 5.0, 4.0, 1.0),  # less what has passed since the failures were counted
        (2.0, 5.0, 9.0, 0.0),  # never negative
    ],
)
def test_the_wait_is_the_longer_of_cooldown_and_retry_after_less_the_time_waited(
    retry_after_s, cooldown_s, waited_s, wait_s
):
    decision = next_round(2, 1, 3, retry_after_s=retry_after_s, cooldown_s=cooldown_s, waited_s=waited_s)
    assert decision == NextRound(attempt=1, wait_s=wait_s)
