"""Names shared by the assets, checks and sensor of a backfill."""

from __future__ import annotations

from dataclasses import dataclass

from dagster import AssetKey

from pipeline.errors import ConfigError

STORE_KEY = "manifest_store"
EXECUTOR_KEY = "paceline_executor"
ROUND_PREFIX = "attempt-"

# Metadata labels the retry sensor reads back: written and read through these names only, so a
# renamed label fails loudly instead of reading as 0 ("nothing to retry").
FAILED_COUNT = "failed_count"
NEXT_ATTEMPT = "next_attempt"
MAX_RETRY_AFTER = "max_retry_after"


@dataclass(frozen=True)
class BackfillKeys:
    """Asset keys of one backfill, prefixed by its name so backfills never collide."""

    plan: AssetKey
    manifests: AssetKey
    retry: AssetKey
    failed: AssetKey

    @classmethod
    def of(cls, name: str) -> BackfillKeys:
        assets = ("chunk_plan", "manifests", "retry_manifests", "failed_items")
        return cls(*(AssetKey([name, asset]) for asset in assets))


def round_key(attempt: int) -> str:
    """The retry partition of an attempt: ``attempt-1``, ``attempt-2``..."""
    return f"{ROUND_PREFIX}{attempt}"


def attempt_of(partition_key: str, max_attempts: int) -> int:
    """The attempt a retry partition names, refused unless it is a retry the backfill allows."""
    number = partition_key.removeprefix(ROUND_PREFIX)
    if not partition_key.startswith(ROUND_PREFIX) or not number.isdigit() or not 1 <= int(number) < max_attempts:
        raise ConfigError(
            f"retry partition {partition_key!r} is not a retry round of this backfill: use "
            f"{round_key(1)} to {round_key(max_attempts - 1)} (max_attempts is {max_attempts})."
        )
    return int(number)
