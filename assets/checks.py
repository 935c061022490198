"""Asset checks that judge a backfill's whole ledger after every round.

They belong to ``failed_items`` (its ``check_specs``), the asset refreshed
after attempt 0 and after every retry round, so each round is judged with
everything written so far, from the same ledger the asset reads:

* ``no_item_lost`` — every item of the chunk plan has a latest row;
* ``limit_held`` — the busiest 1-s window of call start times (and the
  busiest minute, and tokens per minute, where those limits are declared)
  stayed within the *declared* limit. A manifest row keeps its item's last
  try only, so this is the client's account; the service's own count (the
  local services' ``/_stats``) is the referee in tests;
* ``failure_rate`` — warns when more than a threshold of items ended failed or dead.
"""

import pyarrow as pa
from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from assets.keys import FAILED_COUNT, BackfillKeys
from assets.metadata import markdown_preview
from pipeline.ledger import Ledger
from pipeline.limits import ServiceLimit
from pipeline.report import measure_against_limit

NO_ITEM_LOST = "no_item_lost"
LIMIT_HELD = "limit_held"
FAILURE_RATE = "failure_rate"


def check_specs(keys: BackfillKeys, failure_rate_warn: float) -> list[AssetCheckSpec]:
    """The three checks of one backfill, declared on its ``failed_items`` asset."""
    return [
        AssetCheckSpec(
            NO_ITEM_LOST, asset=keys.failed, description="Every item of the chunk plan has a latest row in the ledger."
        ),
        AssetCheckSpec(
            LIMIT_HELD,
            asset=keys.failed,
            description="The busiest windows of call start times stayed within the declared limit.",
        ),
        AssetCheckSpec(
            FAILURE_RATE,
            asset=keys.failed,
            description=f"Warns when more than {failure_rate_warn:.0%} of the items ended failed or dead.",
        ),
    ]


def check_results(
    ledger: Ledger, backfill: str, planned: pa.Table, limit: ServiceLimit, failure_rate_warn: float
) -> list[AssetCheckResult]:
    """The three checks judged on one ledger; ``planned`` is the chunk plan's ``item_id`` column."""
    return [
        _no_item_lost(ledger, backfill, planned),
        _limit_held(ledger, backfill, limit),
        _failure_rate(ledger.counts(backfill), failure_rate_warn),
    ]


def _no_item_lost(ledger: Ledger, backfill: str, planned: pa.Table) -> AssetCheckResult:
    missing = ledger.missing_items(backfill, planned)
    return AssetCheckResult(
        check_name=NO_ITEM_LOST,
        passed=missing.num_rows == 0,
        metadata={
            "planned": MetadataValue.int(planned.num_rows),
            "missing": MetadataValue.int(missing.num_rows),
            "missing_preview": MetadataValue.md(markdown_preview(missing)),
        },
    )


def _limit_held(ledger: Ledger, backfill: str, limit: ServiceLimit) -> AssetCheckResult:
    times, tokens = ledger.call_times(backfill)
    measured = measure_against_limit(times, tokens, limit)
    metadata = {
        name: MetadataValue.text(f"{seen:,.0f} (limit {allowed:,.0f})") for name, (seen, allowed) in measured.items()
    }
    return AssetCheckResult(
        check_name=LIMIT_HELD,
        passed=all(seen <= allowed for seen, allowed in measured.values()),
        metadata=metadata or {"note": MetadataValue.text("no rate or token limit declared: nothing to measure")},
    )


def _failure_rate(counts: dict[str, int], warn_above: float) -> AssetCheckResult:
    rate = (counts["failed"] + counts["dead"]) / counts["items"] if counts["items"] else 0.0
    return AssetCheckResult(
        check_name=FAILURE_RATE,
        passed=rate <= warn_above,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "failure_rate": MetadataValue.float(round(rate, 4)),
            "threshold": MetadataValue.float(warn_above),
            FAILED_COUNT: MetadataValue.int(counts["failed"]),
            "dead_count": MetadataValue.int(counts["dead"]),
        },
    )
