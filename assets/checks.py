"""Asset checks that judge a backfill's whole ledger after every round.

They sit on ``failed_items``, the asset refreshed after attempt 0 and after
every retry round, so each round is judged with everything written so far:

* ``no_item_lost`` — every item of the chunk plan has a latest row;
* ``limit_held`` — the busiest 1-s window of call start times (and the
  busiest minute, and tokens per minute, where those limits are declared)
  stayed within the *declared* limit. A manifest row keeps its item's last
  try only, so this is the client's account; the service's own count (the
  local services' ``/_stats``) is the referee in tests;
* ``failure_rate`` — warns when more than a threshold of items ended failed or dead.
"""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    MetadataValue,
    asset_check,
)

from assets.keys import FAILED_COUNT, STORE_KEY, BackfillKeys
from assets.metadata import markdown_preview
from pipeline.ledger import Ledger
from pipeline.limits import ServiceLimit
from pipeline.report import measure_against_limit
from pipeline.spec import BackfillSpec


def backfill_checks(spec: BackfillSpec, keys: BackfillKeys, failure_rate_warn: float) -> list[AssetChecksDefinition]:
    """The three checks of one backfill."""
    return [_no_item_lost(spec, keys), _limit_held(spec, keys), _failure_rate(spec, keys, failure_rate_warn)]


def _no_item_lost(spec: BackfillSpec, keys: BackfillKeys) -> AssetChecksDefinition:
    @asset_check(
        asset=keys.failed,
        name="no_item_lost",
        required_resource_keys={STORE_KEY},
        description="Every item of the chunk plan has a latest row in the ledger.",
    )
    def no_item_lost(context: AssetCheckExecutionContext) -> AssetCheckResult:
        store = getattr(context.resources, STORE_KEY).store()
        planned = store.read_table(store.plan_path(spec.name, 0)).select(["item_id"])
        with Ledger(store, spec.max_attempts, spec.name) as ledger:
            missing = ledger.missing_items(spec.name, planned)
        return AssetCheckResult(
            passed=missing.num_rows == 0,
            metadata={
                "planned": MetadataValue.int(planned.num_rows),
                "missing": MetadataValue.int(missing.num_rows),
                "missing_preview": MetadataValue.md(markdown_preview(missing)),
            },
        )

    return no_item_lost


def _limit_held(spec: BackfillSpec, keys: BackfillKeys) -> AssetChecksDefinition:
    @asset_check(
        asset=keys.failed,
        name="limit_held",
        required_resource_keys={spec.service, STORE_KEY},
        description="The busiest windows of call start times stayed within the declared limit.",
    )
    def limit_held(context: AssetCheckExecutionContext) -> AssetCheckResult:
        limit: ServiceLimit = getattr(context.resources, spec.service).limit()
        store = getattr(context.resources, STORE_KEY).store()
        with Ledger(store, spec.max_attempts, spec.name) as ledger:
            times, tokens = ledger.call_times(spec.name)
        measured = measure_against_limit(times, tokens, limit)
        metadata = {
            name: MetadataValue.text(f"{seen:,.0f} (limit {allowed:,.0f})")
            for name, (seen, allowed) in measured.items()
        }
        return AssetCheckResult(
            passed=all(seen <= allowed for seen, allowed in measured.values()),
            metadata=metadata or {"note": MetadataValue.text("no rate or token limit declared: nothing to measure")},
        )

    return limit_held


def _failure_rate(spec: BackfillSpec, keys: BackfillKeys, warn_above: float) -> AssetChecksDefinition:
    @asset_check(
        asset=keys.failed,
        name="failure_rate",
        required_resource_keys={STORE_KEY},
        description=f"Warns when more than {warn_above:.0%} of the items ended failed or dead.",
    )
    def failure_rate(context: AssetCheckExecutionContext) -> AssetCheckResult:
        store = getattr(context.resources, STORE_KEY).store()
        with Ledger(store, spec.max_attempts, spec.name) as ledger:
            counts = ledger.counts(spec.name)
        rate = (counts["failed"] + counts["dead"]) / counts["items"] if counts["items"] else 0.0
        return AssetCheckResult(
            passed=rate <= warn_above,
            severity=AssetCheckSeverity.WARN,
            metadata={
                "failure_rate": MetadataValue.float(round(rate, 4)),
                "threshold": MetadataValue.float(warn_above),
                FAILED_COUNT: MetadataValue.int(counts["failed"]),
                "dead_count": MetadataValue.int(counts["dead"]),
            },
        )

    return failure_rate
