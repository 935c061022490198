"""PostgreSQL plumbing shared by the database workloads (S3 -> Postgres, key ranges).

One connection per chunk, tagged with an ``application_name`` so the
connections a backfill holds can be counted on the server
(``pg_stat_activity``), and an optional ``statement_timeout`` so one stuck
query cannot hold a connection slot forever.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.outcomes import Retryable
from pipeline.workloads.common import check

DEFAULT_APPLICATION_NAME = "paceline"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def check_dsn(owner: str, dsn: str) -> None:
    """A connection string psycopg can parse (checked locally, no connection is opened)."""
    from psycopg.conninfo import conninfo_to_dict

    check(bool(dsn), owner, "dsn", "is empty", "Give a connection string, e.g. postgresql://user@host:5432/db.")
    try:
        conninfo_to_dict(dsn)
    except Exception as error:  # noqa: BLE001 - psycopg raises ProgrammingError; the user needs the text
        check(False, owner, "dsn", f"cannot be parsed ({error})", "Fix the connection string.")


def check_application_name(owner: str, name: str) -> None:
    check(
        0 < len(name) < 64 and name.isprintable(),
        owner,
        "application_name",
        f"{name!r} must be 1 to 63 printable characters",
        "It tags this backfill's connections in pg_stat_activity; use something like 'paceline-load'.",
    )


def identifier_parts(owner: str, field: str, name: str) -> tuple[str, ...]:
    """``schema.table`` -> ("schema", "table"), refusing anything that is not a plain identifier."""
    parts = tuple(name.split("."))
    check(
        0 < len(parts) <= 2 and all(_IDENTIFIER.match(p) for p in parts),
        owner,
        field,
        f"{name!r} is not a plain SQL identifier",
        "Use letters, digits and '_' (optionally schema.table); quote-worthy names are not supported.",
    )
    return parts


def connect(dsn: str, application_name: str, statement_timeout_s: float | None) -> Any:
    """An autocommit psycopg connection: callers open one explicit transaction per item."""
    import psycopg

    options = f"-c statement_timeout={int(statement_timeout_s * 1000)}" if statement_timeout_s else None
    kwargs = {"options": options} if options else {}
    return psycopg.connect(dsn, autocommit=True, application_name=application_name, **kwargs)


def timeouts_as_retryable(error: Exception) -> Exception:
    """A cancelled statement (statement_timeout) is a timeout a later round may get through."""
    import psycopg.errors

    if isinstance(error, psycopg.errors.QueryCanceled):
        return Retryable(f"statement timeout: {error}", status="statement_timeout")
    return error
