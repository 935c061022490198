"""Process a table in key ranges: one bounded query per range, one connection per chunk.

Items come from ``pipeline.items.KeyRanges`` (payload ``{"lo": .., "hi": ..}``).
``query`` is run once per range with ``%(lo)s`` and ``%(hi)s`` bound as
parameters, inside its own transaction: an aggregate
(``SELECT count(*), sum(amount) FROM orders WHERE id >= %(lo)s AND id < %(hi)s``)
stores its rows as the payload; an update
(``UPDATE orders SET total = ... WHERE id >= %(lo)s AND id < %(hi)s``) stores
its row count. A range either commits whole or not at all, so a retried
range repeats cleanly as long as the statement is idempotent (an UPDATE that
sets values, not one that increments them).

The connections held are ``max_parallelism``, derived from the declared
``safe_connections``; ``statement_timeout_s`` stops one slow range from
holding its connection forever (it becomes a retryable ``statement_timeout``).
Ranges should be small enough to use an index scan on the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.outcomes import Permanent
from pipeline.spec import Service
from pipeline.work import Item
from pipeline.workloads.common import check, item_record, translated
from pipeline.workloads.database import PostgresConfig, database_fields, statement_timeout_as_retryable


@dataclass(frozen=True, kw_only=True)
class KeyRangeWork(PostgresConfig):
    """Run ``query`` for each key range item; store at most ``max_rows`` result rows, or the row count."""

    query: str
    max_rows: int = 100

    def __post_init__(self) -> None:
        owner = "KeyRangeWork"
        self._check_database()
        check(
            "%(lo)s" in self.query and "%(hi)s" in self.query,
            owner,
            "query",
            "must bound the keys with both %(lo)s and %(hi)s",
            "Write it as ... WHERE id >= %(lo)s AND id < %(hi)s, so each call touches one range only.",
        )
        check(
            isinstance(self.max_rows, int) and self.max_rows >= 1,
            owner,
            "max_rows",
            f"must be a whole number >= 1, got {self.max_rows!r}",
            "Aggregate per range; 100 is plenty.",
        )

    def call(self, client: Any, item: Item) -> Any:
        bounds = _bounds(item)
        with translated(statement_timeout_as_retryable), client.transaction(), client.cursor() as cursor:
            cursor.execute(self.query, bounds)
            if cursor.description is None:
                return {**bounds, "rowcount": cursor.rowcount}
            names = [column.name for column in cursor.description]
            rows = cursor.fetchmany(self.max_rows + 1)
        if len(rows) > self.max_rows:
            raise Permanent(
                f"the query returned more than {self.max_rows} rows for range {item.id}; aggregate per "
                "range (count, sum, ...) or raise max_rows — payloads are stored in the manifests",
                status="too_many_rows",
            )
        return {**bounds, "rows": [dict(zip(names, row)) for row in rows]}


def key_range_work(query: str, **options: Any) -> Callable[[Service], KeyRangeWork]:
    """``BackfillSpec.work`` running ``query`` per range on the service's database."""

    def build(service: Service) -> KeyRangeWork:
        return KeyRangeWork(query=query, **database_fields(service, "KeyRangeWork"), **options)

    return build


def _bounds(item: Item) -> dict[str, int]:
    data = item_record(item)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), int) for k in ("lo", "hi")):
        raise Permanent(
            f"item {item.id} carries no integer 'lo' and 'hi'; build the items with KeyRanges(lo, hi, step)",
            status="bad_item",
        )
    return {"lo": data["lo"], "hi": data["hi"]}
