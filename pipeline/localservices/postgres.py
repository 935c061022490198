"""A real, throw-away PostgreSQL server for demos and tests (the ``pgserver`` wheel).

    with start_postgres() as pg:
        dsn = pg.url                                # superuser, Unix socket
        loader = pg.create_role("loader", connection_limit=4)   # DSN of a capped role
        with pg.crowd(loader, 3) as other_app:      # another client holds 3 of its 4 connections
            ...                                     # other_app.release() frees them mid-run
        pg.refused_logins("loader")                 # logins the server refused for want of room

The server is the embedded binary shipped by ``pgserver`` (no system install,
no Docker), in a temporary data directory deleted on ``stop()``. It listens
on a Unix socket only. ``create_role`` gives a login role whose connection
limit is enforced by PostgreSQL itself: a client opening one connection too
many gets "too many connections for role" — the limit fails loudly on the
server, not in the client's bookkeeping, and the server's log
(``refused_logins``) is the count of the logins it refused.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_ROLE = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass
class PostgresHandle:
    """A running server: ``url`` is a superuser DSN; ``stop()`` shuts it down and deletes its data."""

    url: str
    _server: Any = field(repr=False)
    _data_dir: tempfile.TemporaryDirectory[str] = field(repr=False)

    def create_role(self, name: str, connection_limit: int = -1) -> str:
        """A login role (all privileges on the public schema) and its DSN; -1 means no limit."""
        import psycopg
        from psycopg import sql

        if not _ROLE.match(name):
            raise ValueError(f"role name {name!r}: use lower-case letters, digits and '_'.")
        with psycopg.connect(self.url, autocommit=True) as connection:
            role = sql.Identifier(name)
            connection.execute(
                sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT {}").format(role, sql.Literal(int(connection_limit)))
            )
            connection.execute(sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(role))
        return _with_user(self.url, name)

    def crowd(self, dsn: str, connections: int) -> Crowd:
        """Another application holding ``connections`` idle connections as ``dsn``'s role (a context manager)."""
        return Crowd(dsn, connections)

    def refused_logins(self, role: str) -> int:
        """Logins of ``role`` the server refused for want of room (53300, in the server's own log)."""
        return self.server_log().count(f'FATAL:  too many connections for role "{role}"')

    def server_log(self) -> str:
        """The server's log so far (pgserver writes it to ``pgdata/log``)."""
        path = Path(self._server.log)
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Stop the server and delete its data directory; safe to call twice."""
        self._server.cleanup()
        self._data_dir.cleanup()

    def __enter__(self) -> PostgresHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_postgres() -> PostgresHandle:
    """initdb + start a fresh server in a temporary directory (about a second)."""
    with warnings.catch_warnings():  # pgserver asks platformdirs for a runtime dir; /tmp is fine here
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver

    data_dir = tempfile.TemporaryDirectory(prefix="paceline-pg-")
    try:
        server = pgserver.get_server(f"{data_dir.name}/pgdata", cleanup_mode="delete")
    except BaseException:
        data_dir.cleanup()
        raise
    return PostgresHandle(server.get_uri(), server, data_dir)


def _with_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


class ConnectionSampler:
    """Counts, from a connection of its own, the server's connections of one client while a block runs.

    The server is the referee of a connection limit: ``pg_stat_activity`` is
    sampled every ``every_s`` for connections whose ``application_name`` (or,
    with ``by="usename"``, role) is ``value``. ``peak`` is the most seen at once.
    """

    def __init__(self, dsn: str, value: str, by: str = "application_name", every_s: float = 0.005):
        if by not in ("application_name", "usename"):
            raise ValueError(f"by must be 'application_name' or 'usename', got {by!r}.")
        self._dsn, self._value, self._every = dsn, value, every_s
        self._query = f"SELECT count(*) FROM pg_stat_activity WHERE {by} = %s"
        self.samples: list[tuple[float, int]] = []  # (monotonic time, connections)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak(self) -> int:
        return max((count for _, count in self.samples), default=0)

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psycopg

        with psycopg.connect(self._dsn, autocommit=True) as connection:
            while not self._stop.is_set():
                (count,) = connection.execute(self._query, [self._value]).fetchone()
                self.samples.append((time.monotonic(), int(count)))
                time.sleep(self._every)


CROWD_APPLICATION_NAME = "crowd"
"""``application_name`` of the crowding client's connections, so a sampler can tell them from a backfill's."""


class Crowd:
    """Another application holding a role's connections: opened on entry, idle, released on exit or on demand.

    ``release(n)`` closes ``n`` of them (all by default) from any thread, so a
    test can free capacity mid-run and watch the backfill take it up.
    """

    def __init__(self, dsn: str, connections: int):
        if connections < 0:
            raise ValueError(f"connections must be >= 0, got {connections}.")
        self._dsn, self._wanted = dsn, connections
        self._held: list[Any] = []
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def __enter__(self) -> Crowd:
        import psycopg

        try:
            for _ in range(self._wanted):
                connection = psycopg.connect(self._dsn, autocommit=True, application_name=CROWD_APPLICATION_NAME)
                with self._lock:
                    self._held.append(connection)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self, connections: int | None = None) -> None:
        """Close ``connections`` of the held connections (all of them when None)."""
        with self._lock:
            count = len(self._held) if connections is None else min(connections, len(self._held))
            freed, self._held = self._held[:count], self._held[count:]
        for connection in freed:
            connection.close()

    def __repr__(self) -> str:
        return f"<Crowd held={self.held} of {self._wanted}>"
