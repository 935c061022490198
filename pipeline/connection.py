"""The chunk's client or connection, replaced when it breaks instead of failing the chunk.

A chunk holds one client for all its items. When that client dies mid-chunk
(a reset, a server restart, a Postgres backend terminated by a failover, a
closed httpx pool), every later call on it would fail too: before this, a
failover cost every remaining item of the chunk. Now only the calls in flight
at the break fail (they get their rows, retryable); the runner opens a new
client and goes on.

Reconnecting is bounded: ``RECONNECT_WAITS_S`` are the waits before each
reconnect in a row that is not followed by a successful call. When they are
used up the service is down, not blipping, and the chunk's remaining items are
recorded failed-retryable at once, so a retry round gets them later instead
of this chunk spending a timeout on each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipeline.outcomes import Failure, Permanent, classify
from pipeline.work import Work

RECONNECT_WAITS_S = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)
"""The first reconnect is immediate (a failover usually has a new primary at once); then back off."""

BROKEN_STATUSES = frozenset({"connection"})
"""Failure statuses that mean the transport under the client broke (reset, refused, closed)."""

_CLOSED_FLAGS = ("is_closed", "closed", "broken")
"""Attributes that clients set when they are done for: httpx ``is_closed``, psycopg ``closed``/``broken``."""


class ConnectionLost(Exception):
    """The client broke and could not be replaced; ``failure`` says why."""

    def __init__(self, failure: Failure):
        super().__init__(failure.error)
        self.failure = failure


class ChunkClient:
    """Opens, checks and replaces the client of one chunk."""

    __slots__ = ("_work", "_sleep", "client", "reconnects", "_streak")

    def __init__(self, work: Work, sleep: Callable[[float], None] = time.sleep):
        self._work = work
        self._sleep = sleep
        self.client: Any = None
        self.reconnects = 0
        self._streak = 0

    def open(self) -> Any:
        """The first client; a failure here is the caller's to record (the chunk never started)."""
        self.client = self._work.connect()
        return self.client

    def broken(self, failure: Failure) -> bool:
        """Does this failure mean the client itself is gone (not just this call)?"""
        if failure.status in BROKEN_STATUSES:
            return True
        check = getattr(self._work, "broken", None)
        if callable(check):
            return bool(check(self.client))
        return any(getattr(self.client, flag, False) is True for flag in _CLOSED_FLAGS)

    def on_success(self) -> None:
        """A call went through: the next break starts a fresh series of reconnects."""
        self._streak = 0

    def replace(self) -> Any:
        """Close the broken client and open a new one, with backoff; ``ConnectionLost`` when out of tries."""
        close_quietly(self.client)
        self.client = None
        last: Failure | None = None
        while self._streak < len(RECONNECT_WAITS_S):
            self._sleep(RECONNECT_WAITS_S[self._streak])
            self._streak += 1
            try:
                self.client = self._work.connect()
            except Exception as error:  # noqa: BLE001 - every failure to reconnect is counted, then reported
                last = classify(error)
                if isinstance(error, Permanent):
                    break
                continue
            self.reconnects += 1
            return self.client
        tries = len(RECONNECT_WAITS_S)
        reason = f"; last: {last.error}" if last else ""
        raise ConnectionLost(
            Failure("connection_lost", True, f"the connection broke {tries} times in a row without a success{reason}")
        )

    def close(self) -> None:
        close_quietly(self.client)


def close_quietly(client: Any) -> None:
    """Close a client; a failing close must not lose the chunk's rows."""
    close = getattr(client, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - the rows matter more than a clean close
            pass
