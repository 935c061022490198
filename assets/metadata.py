"""Engine results turned into small Dagster metadata: counts, previews, paths, one chart.

Item lists stay in Parquet; metadata carries what a person needs to judge a
run at a glance and what the retry sensor needs to decide (``failed_count``,
``next_attempt``, ``max_retry_after``). Each table an asset writes also gets
Dagster's own ``dagster/row_count`` (``dagster/partition_row_count`` for a
retry round) and ``dagster/uri``, where it lives (a local path or ``s3://``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from assets.keys import FAILED_COUNT, MAX_RETRY_AFTER, NEXT_ATTEMPT
from pipeline.advice import Advice
from pipeline.backfill import PlanResult, RunResult
from pipeline.chart import rate_chart
from pipeline.limits import ServiceLimit

# Dagster's own labels (its TableMetadataSet and UriMetadataSet): the UI shows them as the table's size and place.
ROW_COUNT = "dagster/row_count"
PARTITION_ROW_COUNT = "dagster/partition_row_count"
URI = "dagster/uri"
PREVIEW_ROWS = 10
_PREVIEW_CHARS = 80
_ERROR_SCHEMA = TableSchema(
    columns=[
        TableColumn("status", "string"),
        TableColumn("count", "int"),
        TableColumn("example", "string"),
    ]
)


def plan_metadata(planned: PlanResult) -> dict[str, Any]:
    execution = planned.execution
    return {
        "item_count": MetadataValue.int(planned.plan.num_rows),
        "items_read": MetadataValue.int(planned.normalized.read),
        "blanks_dropped": MetadataValue.int(planned.normalized.blanks_dropped),
        "duplicates_dropped": MetadataValue.int(planned.normalized.duplicates_dropped),
        "chunk_count": MetadataValue.int(planned.chunks),
        "chunk_size": MetadataValue.int(execution.chunk_size),
        "max_parallelism": MetadataValue.int(execution.max_parallelism),
        "target_rate_per_s": _float(execution.target_rate),
        "derivation": MetadataValue.md("\n".join(f"- {line}" for line in execution.explanation)),
        "plan_path": MetadataValue.path(planned.path),
        **_table(planned.plan.num_rows, planned.path),
    }


def run_metadata(result: RunResult, limit: ServiceLimit, uri: str, partitioned: bool) -> dict[str, Any]:
    """What one run did: counts, rate against target and limit, latency, errors, the chart.

    ``uri`` is the attempt's manifest folder; ``partitioned`` says the attempt
    is one partition (a retry round) of its asset, so its rows count as the partition's.
    """
    report = result.report
    target = result.execution.target_rate
    declared = limit.global_rate()
    metadata = {
        "ok_count": MetadataValue.int(result.counts["ok"]),
        FAILED_COUNT: MetadataValue.int(result.counts["failed"]),
        "dead_count": MetadataValue.int(result.counts["dead"]),
        "calls_this_run": MetadataValue.int(report.rows),
        "chunks_resumed": MetadataValue.int(result.skipped_chunks),
        "unreadable_manifests": MetadataValue.int(len(result.unreadable_manifests)),
        "chunk_files_compacted": MetadataValue.int(result.compaction.chunk_files_removed),
        "max_parallelism": MetadataValue.int(result.execution.max_parallelism),
        "achieved_rate_per_s": MetadataValue.float(round(report.achieved_rate, 2)),
        "target_rate_per_s": _float(target),
        "limit_rate_per_s": _float(declared),
        "achieved_vs_target": _ratio(report.achieved_rate, target),
        "achieved_vs_limit": _ratio(report.achieved_rate, declared),
        "busiest_1s": MetadataValue.int(report.busiest_1s),
        "latency_p50_ms": _float(report.latency_p50_ms),
        "latency_p95_ms": _float(report.latency_p95_ms),
        "in_flight_per_worker": MetadataValue.float(round(report.in_flight_per_worker, 2)),
        "tokens_per_item": _float(report.tokens_per_item),
        "advice": advice_markdown(result.advice),
        MAX_RETRY_AFTER: MetadataValue.float(result.max_retry_after),
        "errors": MetadataValue.table(
            [TableRecord({"status": s, "count": n, "example": _short(e)}) for s, n, e in report.errors],
            schema=_ERROR_SCHEMA,
        ),
        "rate_chart": MetadataValue.md(f"```\n{rate_chart(report.per_second, declared, target)}\n```"),
    }
    if report.max_tokens_per_minute is not None:
        metadata["busiest_tokens_per_minute"] = MetadataValue.float(round(report.max_tokens_per_minute, 1))
    metadata.update(share_metadata(result, limit))
    return {**metadata, **_table(result.attempt_rows, uri, PARTITION_ROW_COUNT if partitioned else ROW_COUNT)}


def share_metadata(result: RunResult, limit: ServiceLimit) -> dict[str, MetadataValue]:
    """The part of the service's budget the run had: at its start, at its end, and when it changed.

    A share is a fraction of ``limit x safety`` split by weight among the
    backfills holding a lease on the service (``pipeline.shares``).
    Connections and batches in flight are claimed, not shared by weight: for
    a service limited only by them, the metadata says how many the run held.
    """
    shares = result.shares
    if not limit.budget():
        held = result.execution.max_parallelism
        return {
            "share_changes": MetadataValue.md(
                f"{limit.name} counts connections in flight, which backfills claim first come, first served: "
                f"this run held {held} of the {limit.in_flight_budget()} its limit allows."
            )
        }
    if not shares:
        return {}
    rows = [
        f"| {datetime.fromtimestamp(change.at, UTC):%Y-%m-%d %H:%M:%S} | {change.share:.3g} | {change.leases} |"
        for change in shares
    ]
    if len(rows) > PREVIEW_ROWS:  # the first changes and the last: enough to see a run's story, never a log
        rows = [*rows[: PREVIEW_ROWS - 1], f"| …{len(rows) - PREVIEW_ROWS:,} more… | | |", rows[-1]]
    lines = ["| time (UTC) | share | live leases |", "|---|---|---|", *rows]
    return {
        "share_at_start": MetadataValue.float(shares[0].share),
        "share_at_end": MetadataValue.float(shares[-1].share),
        "share_changes": MetadataValue.md("\n".join(lines)),
    }


def advice_markdown(advice: list[Advice]) -> MetadataValue:
    """What to declare next time, one line each with its evidence (see ``pipeline.advice``)."""
    lines = "\n".join(f"- `{a.field}={a.value:g}`: {a.evidence}" for a in advice)
    return MetadataValue.md(lines or "What was measured matched what was declared.")


def failed_metadata(
    failed: pa.Table,
    counts: dict[str, int],
    max_attempts: int,
    max_retry_after: float,
    path: str,
    advice: list[Advice],
) -> dict[str, Any]:
    next_attempt = counts["last_attempt"] + 1
    return {
        "advice": advice_markdown(advice),
        FAILED_COUNT: MetadataValue.int(counts["failed"]),
        "dead_count": MetadataValue.int(counts["dead"]),
        "ok_count": MetadataValue.int(counts["ok"]),
        NEXT_ATTEMPT: MetadataValue.int(next_attempt),
        "attempts_left": MetadataValue.int(max(0, max_attempts - next_attempt)),
        MAX_RETRY_AFTER: MetadataValue.float(max_retry_after),
        "preview": MetadataValue.md(markdown_preview(failed)),
        "path": MetadataValue.path(path),
        **_table(failed.num_rows, path),
    }


def markdown_preview(table: pa.Table, rows: int = PREVIEW_ROWS) -> str:
    """The first rows as a Markdown table, each cell shortened and pipe-safe."""
    if table.num_rows == 0:
        return "(none)"
    head = table.slice(0, rows).to_pylist()
    lines = [
        "| " + " | ".join(table.column_names) + " |",
        "|" + "---|" * len(table.column_names),
        *("| " + " | ".join(_short(row[c]) for c in table.column_names) + " |" for row in head),
    ]
    if table.num_rows > rows:
        lines.append(f"\n…and {table.num_rows - rows:,} more in the Parquet file.")
    return "\n".join(lines)


def _table(rows: int, uri: str, row_label: str = ROW_COUNT) -> dict[str, MetadataValue]:
    """How many rows a written table holds and where it lives (a local path or an s3:// URI)."""
    return {row_label: MetadataValue.int(rows), URI: MetadataValue.text(uri)}


def _short(value: object) -> str:
    text = "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 1] + "…"


def _float(value: float | None) -> MetadataValue:
    return MetadataValue.null() if value is None else MetadataValue.float(round(float(value), 2))


def _ratio(achieved: float, reference: float | None) -> MetadataValue:
    return MetadataValue.null() if not reference else MetadataValue.float(round(achieved / reference, 3))
