"""PostgreSQL plumbing shared by the database workloads (S3 -> Postgres, key ranges).

One connection per chunk, tagged with an ``application_name`` so the
connections a backfill holds can be counted on the server
(``pg_stat_activity``), and an optional ``statement_timeout`` so one stuck
query cannot hold a connection slot forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.outcomes import Retryable
from pipeline.spec import Service
from pipeline.work import Work
from pipeline.workloads.common import WorkloadConfigError, check, check_positive, require_limit

DEFAULT_APPLICATION_NAME = "paceline"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


@dataclass(frozen=True, kw_only=True)
class PostgresConfig(Work):
    """Where the database is and how this backfill's connections are tagged and bounded.

    ``password`` is the service's secret (kept out of the DSN, ``repr`` and rows).
    A connection runs one call at a time: calls open one transaction each, and
    two threads sharing the connection would interleave them.
    """

    one_call_at_a_time: ClassVar[bool] = True

    dsn: str = field(repr=False)
    password: str = field(default="", repr=False)
    application_name: str = DEFAULT_APPLICATION_NAME
    statement_timeout_s: float | None = 300.0

    def _check_database(self) -> None:
        owner = type(self).__name__
        _check_dsn(owner, self.dsn)
        check(
            0 < len(self.application_name) < 64 and self.application_name.isprintable(),
            owner,
            "application_name",
            f"{self.application_name!r} must be 1 to 63 printable characters",
            "It tags this backfill's connections in pg_stat_activity; use something like 'paceline-load'.",
        )
        if self.statement_timeout_s is not None:
            check_positive(owner, "statement_timeout_s", self.statement_timeout_s)

    def connect(self) -> Any:
        """The chunk's autocommit connection: calls open one explicit transaction per item.

        A login refused for want of room (too many connections for the role,
        the server full or starting up) is waited out by the runner's connect
        policy (``pipeline.connection``), not here.
        """
        import psycopg

        kwargs: dict[str, Any] = {"application_name": self.application_name}
        if self.password:
            kwargs["password"] = self.password
        if self.statement_timeout_s:
            kwargs["options"] = f"-c statement_timeout={int(self.statement_timeout_s * 1000)}"
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    def secrets(self) -> tuple[str, ...]:
        from psycopg.conninfo import conninfo_to_dict

        return (self.password, str(conninfo_to_dict(self.dsn).get("password") or ""))


def database_fields(service: Service, workload: str) -> dict[str, str]:
    """DSN and password from a configured service, which must declare its safe connections.

    Each worker holds one connection for its chunk, so ``max_parallelism``,
    derived from ``safe_connections``, is the number of connections held.
    """
    require_limit(service, "safe_connections", workload, "20")
    return {"dsn": service.url, "password": service.secret}


def _check_dsn(owner: str, dsn: str) -> None:
    """A connection string psycopg can parse (checked locally, no connection is opened)."""
    from psycopg.conninfo import conninfo_to_dict

    check(bool(dsn), owner, "dsn", "is empty", "Give a connection string, e.g. postgresql://user@host:5432/db.")
    try:
        conninfo_to_dict(dsn)
    except Exception as error:  # noqa: BLE001 - psycopg raises ProgrammingError; the user needs its text
        raise WorkloadConfigError(
            f"{owner}.dsn: cannot be parsed ({str(error).strip()}). "
            "Write it as postgresql://user@host:5432/db or host=... dbname=..."
        ) from None


def identifier_parts(owner: str, field_name: str, name: str) -> tuple[str, ...]:
    """``schema.table`` -> ("schema", "table"), refusing anything that is not a plain identifier."""
    parts = tuple(name.split("."))
    check(
        0 < len(parts) <= 2 and all(_IDENTIFIER.match(p) for p in parts),
        owner,
        field_name,
        f"{name!r} is not a plain SQL identifier",
        "Use letters, digits and '_' (optionally schema.table); names that need quoting are not supported.",
    )
    return parts


def statement_timeout_as_retryable(error: Exception) -> Exception:
    """A cancelled statement (statement_timeout) is a timeout that a later round may get through."""
    import psycopg.errors

    if isinstance(error, psycopg.errors.QueryCanceled):
        return Retryable(f"statement timeout: {error}", status="statement_timeout")
    return error
