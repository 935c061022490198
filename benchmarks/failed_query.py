"""The failed-items query over ten million manifest rows in a thousand files: seconds.

The manifests are generated directly with pyarrow, in the real manifest
schema and at the real paths (``ManifestStore.chunk_path`` /
``write_table``), as two attempts of one backfill: attempt 0 over every item
(5 % fail: 4 % retryable, 1 % permanent), attempt 1 over the retryable ones
(half of them fail again). So about 2 % of the items are in ``failed``, and
4 % have rows in two attempts, which is what makes ``latest`` work for its
living. Timed separately, median of several runs: building the Ledger (listing
and checking every file), ``Ledger.failed_items`` and ``SELECT count(*) FROM
failed``.

    python -m benchmarks.failed_query [--quick]
"""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.common import Outcome, main, median, spread, stopwatch
from pipeline.ledger import Ledger
from pipeline.manifests import MANIFEST_SCHEMA, ManifestStore

NAME = "failed_query"
SIZES = {False: 10_000_000, True: 200_000}
FILE_ROWS = {False: 10_000, True: 2_000}
RUNS = {False: 5, True: 3}
GOAL_SECONDS = 2.0
FAIL_FIRST, PERMANENT_FIRST, FAIL_RETRY = 0.05, 0.01, 0.5
BACKFILL = "bench"
EPOCH = 1_767_225_600.0  # 2026-01-01 UTC: any fixed start keeps the files identical run to run


def manifest_table(
    attempt: int, chunk_id: int, numbers: np.ndarray, failed: np.ndarray, permanent: np.ndarray
) -> pa.Table:
    """One chunk's rows in MANIFEST_SCHEMA: ok rows carry a small JSON payload, failures an error."""
    n = len(numbers)
    ids = pc.binary_join_element_wise("user-", pc.utf8_lpad(pa.array(numbers.astype(str)), 9, "0"), "")
    ok = ~failed
    status = np.where(ok, "ok", np.where(permanent, "http_404", "http_503"))
    http_status = pa.array(np.where(permanent, 404, 503).astype(np.int32), mask=ok)
    error = pa.array(
        np.where(permanent, "HTTPStatusError: 404 Not Found", "HTTPStatusError: 503 Service Unavailable"), mask=ok
    )
    payload = pc.binary_join_element_wise('{"id": "', ids, '", "value": 7}', "")
    started = EPOCH + attempt * 86_400 + numbers * 0.01
    latency = np.full(n, 12.5)
    columns = {
        "backfill": pa.repeat(pa.scalar(BACKFILL), n),
        "attempt": pa.repeat(pa.scalar(attempt, pa.int32()), n),
        "run_id": pa.repeat(pa.scalar(f"run{attempt}"), n),
        "chunk_id": pa.repeat(pa.scalar(chunk_id, pa.int32()), n),
        "item_id": ids,
        "ok": pa.array(ok),
        "retryable": pa.array(failed & ~permanent),
        "status": pa.array(status),
        "http_status": http_status,
        "error": error,
        "tries": pa.repeat(pa.scalar(1, pa.int32()), n),
        "started_at": _timestamps(started),
        "finished_at": _timestamps(started + latency / 1000),
        "latency_ms": pa.array(latency),
        "tokens": pa.nulls(n, pa.float64()),
        "payload": pc.if_else(pa.array(ok), payload, pa.scalar(None, pa.string())),
    }
    # Columns the engine added after this benchmark was written are left null.
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)


def _timestamps(seconds: np.ndarray) -> pa.Array:
    return pa.array((seconds * 1e6).astype(np.int64), pa.int64()).cast(pa.timestamp("us", tz="UTC"))


def generate(store: ManifestStore, total_rows: int, file_rows: int) -> dict[str, int]:
    """Write two attempts' manifests totalling about ``total_rows``; return what the ledger must find."""
    rng = np.random.default_rng(5)
    first_items = round(total_rows / (1 + FAIL_FIRST - PERMANENT_FIRST))
    numbers = np.arange(first_items)
    failed = rng.random(first_items) < FAIL_FIRST
    permanent = failed & (rng.random(first_items) < PERMANENT_FIRST / FAIL_FIRST)
    files = _write_attempt(store, 0, numbers, failed, permanent, file_rows)
    retried = numbers[failed & ~permanent]
    failed_again = rng.random(len(retried)) < FAIL_RETRY
    files += _write_attempt(store, 1, retried, failed_again, np.zeros(len(retried), bool), file_rows)
    return {
        "rows": first_items + len(retried),
        "files": files,
        "items": first_items,
        "failed": int(failed_again.sum()),
        "in_two_attempts": len(retried),
    }


def _write_attempt(
    store: ManifestStore, attempt: int, numbers: np.ndarray, failed: np.ndarray, permanent: np.ndarray, file_rows: int
) -> int:
    chunks = range(0, len(numbers), file_rows)
    for chunk_id, start in enumerate(chunks):
        part = slice(start, start + file_rows)
        table = manifest_table(attempt, chunk_id, numbers[part], failed[part], permanent[part])
        store.write_table(store.chunk_path(BACKFILL, attempt, chunk_id), table)
    return len(chunks)


def measure(store: ManifestStore) -> dict[str, float | int | dict]:
    """One run: Ledger construction, failed_items, count(*) over failed, the counts."""
    with stopwatch() as construct:
        ledger = Ledger(store, 3, BACKFILL)
    with ledger:
        with stopwatch() as failed_items:
            rows = ledger.failed_items(BACKFILL).num_rows
        with stopwatch() as count_query:
            count = ledger.query("SELECT count(*) AS n FROM failed")["n"][0].as_py()
        with stopwatch() as counting:
            counts = ledger.counts(BACKFILL)
    return {
        "ledger": construct(),
        "failed_items": failed_items(),
        "count": count_query(),
        "counts": counting(),
        "failed_rows": rows,
        "failed_count": count,
        "counted": counts,
    }


def run(quick: bool) -> Outcome:
    """Seconds for the DuckDB failed-items query over ten million manifest rows."""
    runs = RUNS[quick]
    with tempfile.TemporaryDirectory(prefix="paceline-bench-failed-") as tmp:
        store = ManifestStore(tmp)
        with stopwatch() as generating:
            expected = generate(store, SIZES[quick], FILE_ROWS[quick])
        results = [measure(store) for _ in range(runs)]
    if any(r["failed_rows"] != expected["failed"] or r["failed_count"] != expected["failed"] for r in results):
        raise RuntimeError(f"the ledger found {results[0]['failed_rows']} failed items, expected {expected['failed']}")
    ledger, failed, count = ([r[k] for r in results] for k in ("ledger", "failed_items", "count"))
    total = [r["ledger"] + r["failed_items"] for r in results]
    outcome = Outcome(
        NAME,
        f"failed_items over {expected['rows']:,} rows in {expected['files']:,} files: "
        f"{median(failed):.2f} s (+ {median(ledger):.2f} s to open the ledger)",
    )
    outcome.row(
        "manifest rows, files", f"{expected['rows']:,}, {expected['files']:,} (generated in {generating():.0f} s)"
    )
    outcome.row(
        "items, in two attempts, failed",
        f"{expected['items']:,}, {expected['in_two_attempts']:,}, {expected['failed']:,}",
    )
    outcome.row("runs", f"{runs} (median; min..max in brackets)")
    outcome.row("Ledger(store) construction", f"{median(ledger):.3f} s ({spread(ledger)})")
    outcome.row("ledger.failed_items(name)", f"{median(failed):.3f} s ({spread(failed)})")
    outcome.row("SELECT count(*) FROM failed", f"{median(count):.3f} s ({spread(count)})")
    outcome.row("construction + failed_items", f"{median(total):.3f} s ({spread(total)})")
    outcome.metrics.update(
        rows=expected["rows"],
        files=expected["files"],
        failed=expected["failed"],
        ledger_s=median(ledger),
        failed_items_s=median(failed),
        count_s=median(count),
        total_s=median(total),
    )
    outcome.goal(f"failed_items under {GOAL_SECONDS:g} s", median(failed) < GOAL_SECONDS, f"{median(failed):.2f} s")
    outcome.goal(
        f"ledger construction + failed_items under {GOAL_SECONDS:g} s",
        median(total) < GOAL_SECONDS,
        f"{median(total):.2f} s",
    )
    return outcome


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
