"""Dagster assets, checks and the retry sensor, built from backfill declarations."""

from assets.backfill import (
    BackfillOptions,
    backfill_definitions,
    paceline_definitions,
    runtime_definitions,
    service_definitions,
)
from assets.keys import EXECUTOR_KEY, STORE_KEY, BackfillKeys

__all__ = [
    "EXECUTOR_KEY",
    "STORE_KEY",
    "BackfillKeys",
    "BackfillOptions",
    "backfill_definitions",
    "paceline_definitions",
    "runtime_definitions",
    "service_definitions",
]
