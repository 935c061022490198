"""The chunk's client or connection: opened when the service has room, replaced when it breaks.

A chunk holds one client for all its items. Two things can stand between a
chunk and its client, and neither is the items' fault:

* **No room** (``Meaning.CAPACITY``: PostgreSQL 53300 "too many connections
  for role", "too many clients already", 57P03 "starting up", a pool
  timeout). The limit is speaking: another application holds most of the
  role's connections, or this run declared more than is free. The worker
  waits and logs in again, with exponential backoff and full jitter
  (:class:`CapacityBackoff`), for at most ``CAPACITY_BUDGET_S`` in all; only
  then do the chunk's items fail, retryable, with status ``capacity``.
* **A broken client** mid-chunk (a reset, a server restart, a backend
  terminated by a failover, a closed httpx pool). Only the calls in flight at
  the break fail (they get their rows, retryable); the runner opens a new
  client and goes on. ``RECONNECT_WAITS_S`` are the waits before each
  reconnect in a row not followed by a successful call; when they are used up
  the service is down, not blipping, and the chunk's remaining items are
  recorded failed-retryable at once, for a retry round.

Fewer connections when refused, without a coordinator. A run that declared 8
connections where 3 are free cannot learn that from anyone but the server, and
workers (threads here, processes on Burla) share nothing. So each worker
learns it alone, as a 429 lowers a worker's pace: a refused login raises the
worker's *crowding level* by one (its next wait doubles), and the level is
kept in the worker's memory (``pacing.memory.WorkerMemory``, one per worker
and run) for its next chunk. A worker that found the database full resumes its backoff at that
level: refused again, its next wait is already long, so it does not climb
through the short waits (a login each) every time it opens a chunk. Each
connect that gets in without a refusal halves the level, so freed room is used
again within ``log2(CAPACITY_LEVEL_CEILING)``
chunks. The run's demand for connections therefore settles at what the
database has free: workers that hold a slot keep going, the others wait out
of the way and probe at most once per wait.

Bounds. The server enforces the limit, so the run never holds more
connections than the role allows; what this policy bounds is the refusals.
A waiting worker logs in at most once per wait, and its waits grow to
``CAPACITY_MAX_WAIT_S`` (mean half that, full jitter), so W waiting workers
cost about ``2 W / CAPACITY_MAX_WAIT_S`` refused logins a second once the
backoff is at its ceiling, and fewer than ``log2(CAPACITY_MAX_WAIT_S /
CAPACITY_FIRST_WAIT_S) + 1`` on the way up. A slot that frees is found by
some waiting worker within ``CAPACITY_MAX_WAIT_S``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PacelineError
from pipeline.outcomes import Failure, Permanent, classify
from pipeline.pacing.memory import WorkerMemory
from pipeline.refusals import Meaning
from pipeline.work import Work, WorkHooks

RECONNECT_WAITS_S = (0.0, 0.2, 0.5, 1.0, 2.0, 4.0)
"""The first reconnect is immediate (a failover usually has a new primary at once); then back off."""

CAPACITY_FIRST_WAIT_S = 0.05
"""Ceiling of the first wait after a refused login. PostgreSQL frees a closed connection's slot when its
backend exits, a few milliseconds after the close: a chunk starting as another ends is often refused for a
connection that is already gone, and a retry within 50 ms gets in."""
CAPACITY_MAX_WAIT_S = 4.0
"""Ceiling of one wait. With full jitter a waiting worker logs in every 2 s on average, so a slot another
client frees is found within seconds, and each waiting worker costs about one refused login per 2 s."""
CAPACITY_BUDGET_S = 300.0
"""Total wait for one connect. A database crowded for five minutes is not crowded but taken: the chunk's items
fail retryable (status ``capacity``) and a later round gets them, instead of the worker waiting forever."""
CAPACITY_LEVEL_CEILING = 8
"""The level at which waits reach their ceiling (0.05 s x 2**7 > 4 s); higher would only slow the recovery."""

BROKEN_STATUSES = frozenset({"connection"})
"""Failure statuses that mean the transport under the client broke (reset, refused, closed)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapacityBackoff:
    """How long a worker waits for a database with no room: exponential backoff with full jitter.

    The wait at crowding level ``n`` (n refusals in a row) is uniform in
    ``[0, min(max_wait_s, first_wait_s * 2**(n-1))]``: full jitter spreads
    the workers refused at the same instant, so they do not all knock again
    at the next.

        >>> backoff = CapacityBackoff()
        >>> 0 <= backoff.wait_s(3, random.Random(1)) <= 0.2
        True
    """

    first_wait_s: float = CAPACITY_FIRST_WAIT_S
    max_wait_s: float = CAPACITY_MAX_WAIT_S
    budget_s: float = CAPACITY_BUDGET_S
    level_ceiling: int = CAPACITY_LEVEL_CEILING

    def ceiling_s(self, level: int) -> float:
        """The longest wait at ``level`` (0 at level 0: a worker that was never refused does not wait)."""
        if level <= 0:
            return 0.0
        return min(self.max_wait_s, self.first_wait_s * 2 ** (min(level, self.level_ceiling) - 1))

    def wait_s(self, level: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling_s(level))

    def refused(self, level: int) -> int:
        """A refused login: the next wait doubles (up to the ceiling)."""
        return min(level + 1, self.level_ceiling)

    def got_in(self, level: int, refusals: int) -> int:
        """The level a worker keeps after a connect: halved when it got in at the first try."""
        return level if refusals else level // 2


DEFAULT_BACKOFF = CapacityBackoff()


class ConnectionLost(PacelineError):
    """The client could not be opened or replaced; ``failure`` says why (the status of the chunk's rows)."""

    def __init__(self, failure: Failure):
        super().__init__(failure.error)
        self.failure = failure


class ChunkClient:
    """Opens, checks and replaces the client of one worker (its chunks share it).

    ``memory`` is the worker's (``pacing.memory``): the crowding level is kept
    there between this worker's chunks (None: nothing is remembered).
    ``hooks`` are the work's, read once (``WorkHooks.of(work)`` when not
    given). ``sleep``, ``clock`` and ``rng`` are injected so the waits are
    tested on simulated time.
    """

    __slots__ = (
        "_work",
        "_broken",
        "_sleep",
        "_clock",
        "_rng",
        "_backoff",
        "_memory",
        "client",
        "reconnects",
        "refused",
        "_streak",
    )

    def __init__(
        self,
        work: Work,
        sleep: Callable[[float], None] = time.sleep,
        *,
        memory: WorkerMemory | None = None,
        hooks: WorkHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        backoff: CapacityBackoff = DEFAULT_BACKOFF,
    ):
        self._work = work
        self._broken = (hooks or WorkHooks.of(work)).broken
        self._sleep, self._clock, self._rng = sleep, clock, rng or random.Random()
        self._backoff, self._memory = backoff, memory
        self.client: Any = None
        self.reconnects = 0
        self.refused = 0  # logins refused for want of room (CAPACITY), over this chunk
        self._streak = 0

    def __repr__(self) -> str:
        level = self._memory.crowding if self._memory else 0
        return f"<ChunkClient reconnects={self.reconnects} refused={self.refused} crowding={level}>"

    def open(self) -> Any:
        """The first client, waiting out capacity refusals.

        ``ConnectionLost`` (status ``capacity``) when the database had no
        room for ``CAPACITY_BUDGET_S``; any other failure is raised as it is,
        the caller's to record (the chunk never started). A new client
        starts a fresh series of reconnects.
        """
        self._streak = 0
        self.client = self._connect()
        return self.client

    def broken(self, failure: Failure) -> bool:
        """Does this failure mean the client itself is gone (not just this call)?"""
        return failure.status in BROKEN_STATUSES or bool(self._broken(self.client))

    def on_success(self) -> None:
        """A call went through: the next break starts a fresh series of reconnects."""
        self._streak = 0

    def replace(self) -> Any:
        """Close the broken client and open a new one, with backoff; ``ConnectionLost`` when out of tries.

        A reconnect refused for want of room waits like a first connect and
        does not use up a reconnect: the service is up, only full.
        """
        close_quietly(self.client)
        self.client = None
        last: Failure | None = None
        while self._streak < len(RECONNECT_WAITS_S):
            self._sleep(RECONNECT_WAITS_S[self._streak])
            self._streak += 1
            try:
                self.client = self._connect()
            except ConnectionLost:
                raise
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

    def _connect(self) -> Any:
        """``work.connect()``, waiting (at the worker's crowding level) while the database has no room."""
        level = self._memory.crowding if self._memory else 0
        start, refusals = self._clock(), 0
        if level:  # crowded last time: give the slot this worker's last chunk held time to free (backend exit)
            self._sleep(self._backoff.wait_s(1, self._rng))
        while True:
            try:
                client = self._work.connect()
            except Exception as error:
                failure = classify(error)
                if not failure.capacity:
                    raise
                refusals += 1
                self.refused += 1
                level = self._backoff.refused(level)
                self._remember(level)
                self._wait_for_room(level, start, refusals, failure)
                continue
            self._remember(self._backoff.got_in(level, refusals))
            if refusals:
                log.info("connected after %d refused logins (%.1f s): %s", refusals, self._clock() - start, self)
            return client

    def _wait_for_room(self, level: int, start: float, refusals: int, failure: Failure) -> None:
        """Sleep before the next login, or ``ConnectionLost`` when the wait budget is spent."""
        left = self._backoff.budget_s - (self._clock() - start)
        if left <= 0:
            raise ConnectionLost(
                Failure(
                    "capacity",
                    True,
                    f"no room for a connection after {refusals} refused logins in {self._clock() - start:.0f} s "
                    f"(budget {self._backoff.budget_s:.0f} s); last: {failure.error}",
                    meaning=Meaning.CAPACITY,
                    convention=failure.convention,
                )
            )
        self._sleep(min(left, self._backoff.wait_s(level, self._rng)))

    def _remember(self, level: int) -> None:
        if self._memory is not None:
            self._memory.crowding = level


def close_quietly(client: Any) -> None:
    """Close a client; a failing close must not lose the chunk's rows."""
    close = getattr(client, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # noqa: BLE001 - the rows matter more than a clean close
            pass
