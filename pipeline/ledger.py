"""The ledger: DuckDB views over every manifest, the source of truth for retries.

=========  ===============================================================
view       rows
=========  ===============================================================
results    every row of every manifest (all attempts)
latest     the latest row per (backfill, item): a later attempt wins
failed     latest row failed, retryable, and attempts left: the retry source
dead       latest row failed for good: permanent, or attempts exhausted
summary    counts and max_attempts per backfill
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
from pipeline.errors import ConfigError
from pipeline.manifests import MANIFEST_SCHEMA, ManifestStore
from pipeline.outcomes import OUT_OF_CREDIT
from pipeline.report import AttemptReport, busiest_sum, busiest_window, calls_per_second

VIEWS = ("results", "latest", "failed", "dead", "summary")


class Ledger:
    """Read-only SQL over the manifests of one store (optionally one backfill).

    Building one lists the store and reads every manifest footer, so open it
    once for a set of questions about the same state (a round, a refresh)
    and pass it to whatever asks them.

    ``max_attempts`` decides which failed rows are dead. Without it, each
    backfill's own is read from its latest chunk plan
    (``ManifestStore.planned_max_attempts``), and ``DEFAULT_MAX_ATTEMPTS``
    applies to a backfill planned before plans carried it.
    """

    def __init__(self, store: ManifestStore, max_attempts: int | None = None, backfill: str | None = None):
        if max_attempts is not None and max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}.")
        self.store = store
        self._max_attempts = {} if max_attempts is not None else store.planned_max_attempts(backfill)
        self._default_max_attempts = max_attempts or DEFAULT_MAX_ATTEMPTS
        self.con = duckdb.connect(":memory:")
        self.files = store.manifest_files(backfill)
        rows = store.dataset(self.files) if self.files else MANIFEST_SCHEMA.empty_table()
        self.con.register("manifest_rows", rows)
        self._create_views()
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def max_attempts(self, backfill: str) -> int:
        """The attempts the views allow this backfill: given, stored with its plan, or the default."""
        return self._max_attempts.get(backfill, self._default_max_attempts)

    def _create_views(self) -> None:
        # An item an empty account stopped spent no attempt: it is never dead, whatever its attempt.
        left = f"(attempt + 1 < {self._max_attempts_sql()} OR status = '{OUT_OF_CREDIT}')"
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
                max(attempt) AS last_attempt,
                any_value({self._max_attempts_sql()}) AS max_attempts
            FROM latest GROUP BY backfill ORDER BY backfill"""
        )

    def _max_attempts_sql(self) -> str:
        """Each row's backfill's max_attempts, as an SQL expression (a literal when all backfills agree)."""
        default = int(self._default_max_attempts)
        cases = " ".join(
            f"WHEN {_sql_text(name)} THEN {int(n)}" for name, n in sorted(self._max_attempts.items()) if n != default
        )
        return f"(CASE backfill {cases} ELSE {default} END)" if cases else str(default)

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

    def summary(self) -> pa.Table:
        """The ``summary`` view: counts and max_attempts per backfill."""
        return self.query("SELECT * FROM summary")

    def attempts(self) -> list[tuple[str, int]]:
        """(backfill, attempt) of every attempt with a manifest row, in order."""
        return self.con.execute("SELECT DISTINCT backfill, attempt FROM results ORDER BY ALL").fetchall()

    def attempt_rows(self, backfill: str, attempt: int) -> int:
        """Rows in one attempt's manifests, all its runs together: the size of the table that attempt wrote."""
        rows = self.con.execute(
            "SELECT count(*) FROM results WHERE backfill = ? AND attempt = ?", [backfill, attempt]
        ).fetchall()
        return int(rows[0][0])

    def why_not_ok(self) -> pa.Table:
        """Items whose latest row is not ok, counted per backfill and status (the ten largest)."""
        return self.query(
            "SELECT backfill, status, count(*) AS items FROM latest WHERE NOT ok "
            "GROUP BY ALL ORDER BY items DESC LIMIT 10"
        )

    def measured_by_attempt(self) -> pa.Table:
        """Per backfill and attempt, what the service did: latency, tokens per item, calls in flight per worker."""
        return self.query(
            "SELECT backfill, attempt, count(*) AS calls, round(quantile_cont(latency_ms, 0.5), 1) AS p50_ms, "
            "round(quantile_cont(latency_ms, 0.95), 1) AS p95_ms, "
            "round(avg(tokens) FILTER (WHERE ok), 1) AS tokens_per_item, "
            "round((SELECT avg(in_flight) FROM (" + _IN_FLIGHT_PER_CHUNK + " AS c WHERE c.backfill = r.backfill "
            "AND c.attempt = r.attempt AND c.tries > 0 GROUP BY c.run_id, c.chunk_id)), 1) AS in_flight_per_worker "
            "FROM results AS r WHERE tries > 0 GROUP BY backfill, attempt ORDER BY backfill, attempt"
        )

    def attempt_report(self, backfill: str, attempt: int, run_id: str | None) -> AttemptReport:
        """Numbers for the rows one run wrote (a resumed run reports only its own calls); all runs without ``run_id``."""
        where = "backfill = ? AND attempt = ?" + (" AND run_id = ?" if run_id else "")
        args = [backfill, attempt, *([run_id] if run_id else [])]
        rows, ok, p50, p95, retry_after = self.con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE ok), quantile_cont(latency_ms, 0.5), "
            f"quantile_cont(latency_ms, 0.95), coalesce(max(retry_after_s), 0) FROM results "
            f"WHERE {where} AND tries > 0",
            args,
        ).fetchall()[0]
        errors = self.con.execute(
            f"SELECT status, count(*) AS n, any_value(error) FROM results WHERE {where} AND NOT ok "
            "GROUP BY status ORDER BY n DESC LIMIT 10",
            args,
        ).fetchall()
        in_flight, tokens_per_item = self.con.execute(
            f"SELECT avg(in_flight), (SELECT avg(tokens) FROM results WHERE {where} AND ok) FROM ("
            f"{_IN_FLIGHT_PER_CHUNK} WHERE {where} AND tries > 0 GROUP BY chunk_id)",
            args + args,
        ).fetchall()[0]
        throttled, sustainable = self.con.execute(_THROTTLING.format(where=where), args).fetchall()[0]
        times, tokens = self.call_times(backfill, attempt, run_id)
        seconds = float(times[-1] - times[0]) if len(times) > 1 else 0.0
        return AttemptReport(
            backfill=backfill,
            attempt=attempt,
            run_id=run_id,
            rows=int(rows),
            ok=int(ok),
            failed=int(rows - ok),
            seconds=seconds,
            achieved_rate=(len(times) - 1) / seconds if seconds > 0 else 0.0,
            busiest_1s=busiest_window(times, 1.0),
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            errors=[(s, int(n), e or "") for s, n, e in errors],
            per_second=calls_per_second(times),
            max_tokens_per_minute=busiest_sum(times, tokens, 60.0) if tokens.any() else None,
            max_retry_after_s=float(retry_after),
            in_flight_per_worker=float(in_flight or 0.0),
            tokens_per_item=None if tokens_per_item is None else float(tokens_per_item),
            throttled_calls=int(throttled or 0),
            sustainable_rate=None if sustainable is None else float(sustainable),
        )

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

_THROTTLING = (
    # Only throttles are retried inside a chunk, so an ok row's tries - 1 are calls the service throttled
    # and then let through: evidence about the pace. Items that never went through are left out, since a
    # hot key is throttled whatever the pace. In the seconds where the service throttled, the calls it let
    # through are what it sustains: the rate at which throttling began.
    "WITH s AS (SELECT floor(epoch(started_at)) AS second, count(*) FILTER (WHERE ok) AS ok, "
    "sum(tries - 1) FILTER (WHERE ok) AS throttled "
    "FROM results WHERE {where} AND tries > 0 GROUP BY second) "
    "SELECT sum(throttled), quantile_cont(ok, 0.5) FILTER (WHERE throttled > 0) FROM s"
)
_IN_FLIGHT_PER_CHUNK = (
    # Little's law on a chunk's rows: time spent in calls / time the chunk ran = calls in flight on average.
    "SELECT sum(latency_ms) / 1000 / greatest(epoch(max(finished_at)) - epoch(min(started_at)), 1e-3) AS in_flight "
    "FROM results"
)


def _sql_text(text: str) -> str:
    """A string literal for SQL that no view parameter can carry (a view keeps its text, not bound values)."""
    return "'" + text.replace("'", "''") + "'"
