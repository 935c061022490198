"""The ledger: DuckDB views over every manifest, the source of truth for retries.

=========  ===============================================================
view       rows
=========  ===============================================================
results    every row of every manifest (all attempts)
latest     the latest row per (backfill, item): a later attempt wins
failed     latest row failed, retryable, and attempts left: the retry source
dead       latest row failed for good: permanent, or attempts exhausted
summary    counts per backfill
=========  ===============================================================

Reading the least. Two facts hold for every manifest Paceline writes: an
item has at most one row per attempt (one chunk per item in a plan, one file
per chunk, and a compacted file replaces its chunk files for readers); and a
retry attempt holds only items whose latest row was failed and retryable
(``plan_retry`` reads them from ``failed``). So the only rows a later attempt
can supersede are failed-retryable ones, and ``latest`` needs no window over
every row: it is every ok or permanent row, plus the failed-retryable rows
with no row in a later attempt. That asks for the failed rows (their own row
groups in a compacted file, skipped by Parquet statistics otherwise) and for
the item ids of the retry attempts (a few percent), never for a ranking of
all rows; counts read ``backfill``, ``ok``, ``retryable`` and ``attempt``
only. The failed items of round n+1 are so read from round n's failures.
Filters are written ``ok = false`` rather than ``NOT ok``: DuckDB hands
comparisons down to the Arrow scan, which then skips row groups.

DuckDB runs in memory and reads the manifests through Arrow, so the same
views work on local folders and on S3, and the database holds no file lock
(Dagster's DuckDBResource would lock a file). External access is switched off
and the configuration locked once the views exist: ad-hoc SQL can read the
manifests but cannot write, copy over or delete them.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.defaults import DEFAULT_MAX_ATTEMPTS
from pipeline.manifests import MANIFEST_SCHEMA, ManifestStore
from pipeline.outcomes import OUT_OF_CREDIT

VIEWS = ("results", "latest", "failed", "dead", "summary")


class Ledger:
    """Read-only SQL over the manifests of one store (optionally one backfill)."""

    def __init__(self, store: ManifestStore, max_attempts: int = DEFAULT_MAX_ATTEMPTS, backfill: str | None = None):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}.")
        self.store = store
        self.max_attempts = max_attempts
        self.con = duckdb.connect(":memory:")
        self.files = store.manifest_files(backfill)
        rows = store.dataset(self.files) if self.files else MANIFEST_SCHEMA.empty_table()
        self.con.register("manifest_rows", rows)
        self._create_views()
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def _create_views(self) -> None:
        # An item an empty account stopped spent no attempt: it is never dead, whatever its attempt.
        left = f"(attempt + 1 < {int(self.max_attempts)} OR status = '{OUT_OF_CREDIT}')"
        self.con.execute("CREATE VIEW results AS SELECT * FROM manifest_rows")
        self.con.execute(f"CREATE VIEW latest AS SELECT * FROM results WHERE {_FINAL} UNION ALL {_OPEN_RETRIES}")
        self.con.execute(f"CREATE VIEW failed AS SELECT * FROM ({_OPEN_RETRIES}) WHERE {left}")
        self.con.execute(
            "CREATE VIEW dead AS SELECT * FROM results WHERE ok = false AND retryable = false "
            f"UNION ALL SELECT * FROM ({_OPEN_RETRIES}) WHERE NOT ({left})"
        )
        self.con.execute(
            f"""CREATE VIEW summary AS SELECT backfill,
                count(*) AS items,
                count(*) FILTER (WHERE ok) AS ok,
                count(*) FILTER (WHERE NOT ok AND retryable AND {left}) AS failed,
                count(*) FILTER (WHERE NOT ok AND NOT (retryable AND {left})) AS dead,
                max(attempt) AS last_attempt
            FROM latest GROUP BY backfill ORDER BY backfill"""
        )

    def query(self, sql: str) -> pa.Table:
        """Run any read-only SQL against the views; returns an Arrow table."""
        return self.con.sql(sql).to_arrow_table()

    def failed_items(self, backfill: str) -> pa.Table:
        """The retry source: the latest failed-retryable row of each item, without result payloads."""
        return self.con.sql(
            "SELECT item_id, attempt, status, http_status, error, finished_at FROM failed "
            "WHERE backfill = ? ORDER BY item_id",
            params=[backfill],
        ).to_arrow_table()

    def call_times(
        self, backfill: str, attempt: int | None = None, run_id: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sorted start times (epoch seconds) and tokens of the rows that made a call.

        This is the client's account of its rate: a row keeps its item's last try only.
        """
        where, args = ["backfill = ?", "tries > 0"], [backfill]
        for column, value in (("attempt", attempt), ("run_id", run_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        found = self.con.execute(
            f"SELECT epoch(started_at) AS t, coalesce(tokens, 0) AS tokens FROM results "
            f"WHERE {' AND '.join(where)} ORDER BY t",
            args,
        ).fetchnumpy()
        return np.asarray(found["t"], dtype=np.float64), np.asarray(found["tokens"], dtype=np.float64)

    def missing_items(self, backfill: str, planned: pa.Table) -> pa.Table:
        """Planned items (``item_id`` column) that have no latest row: what "nothing lost" forbids."""
        seen = self.con.execute("SELECT item_id FROM latest WHERE backfill = ?", [backfill]).fetchnumpy()
        return planned.filter(pc.invert(pc.is_in(planned["item_id"], pa.array(seen["item_id"], pa.string()))))

    def max_retry_after(self, backfill: str) -> float:
        """The longest Retry-After among the items to retry: the next round should wait at least that."""
        rows = self.con.execute(
            "SELECT coalesce(max(retry_after_s), 0) FROM failed WHERE backfill = ?", [backfill]
        ).fetchall()
        return float(rows[0][0])

    def counts(self, backfill: str) -> dict[str, int]:
        """items / ok / failed / dead / last_attempt for one backfill (zeros if it never ran)."""
        rows = self.con.execute(
            "SELECT items, ok, failed, dead, last_attempt FROM summary WHERE backfill = ?", [backfill]
        ).fetchall()  # fetch everything: a half-read result keeps the connection busy
        return dict(zip(("items", "ok", "failed", "dead", "last_attempt"), rows[0] if rows else (0, 0, 0, 0, -1)))

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Rows no later attempt can supersede: ok, or failed for good.
_FINAL = "ok = true OR retryable = false"
# Failed-retryable rows whose item has no row in a later attempt: the latest ones.
_OPEN_RETRIES = (
    "SELECT r.* FROM results r LEFT JOIN "
    "(SELECT backfill, item_id, max(attempt) AS last_attempt FROM results WHERE attempt > 0 GROUP BY ALL) later "
    "USING (backfill, item_id) "
    "WHERE r.ok = false AND r.retryable = true AND (later.last_attempt IS NULL OR later.last_attempt <= r.attempt)"
)
