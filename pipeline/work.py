"""The shape of a backfill's work: ``connect`` once per worker, ``call`` once per item.

One client or connection per worker, kept across the chunks it runs back to
back, is the whole point: a connection per item would multiply handshakes and
break connection limits, and the worker count is what the plan sized against
the limit. The runner opens it again when it breaks, and when a worker's
sequence of chunks ends (on Burla, with its call).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.refusals import Convention


class Item:
    """One unit the service sees. ``payload`` is JSON text when the item carries data.

    A small slotted class, not a dataclass: one is built per call, so it must be cheap.
    """

    __slots__ = ("id", "payload", "_data")

    def __init__(self, id: str, payload: str | None = None):  # noqa: A002 - "id" is the natural name here
        self.id = id
        self.payload = payload

    @property
    def data(self) -> Any:
        """The decoded payload (a prompt record, a key range), or the id itself."""
        try:
            return self._data
        except AttributeError:
            self._data = self.id if self.payload is None else json.loads(self.payload)
            return self._data

    def __repr__(self) -> str:
        return f"Item(id={self.id!r}, payload={self.payload!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Item) and (self.id, self.payload) == (other.id, other.payload)

    __hash__ = None  # type: ignore[assignment]


class Work(Protocol):
    """What a worker does: ``connect`` and ``call`` are required, every other member is an optional hook.

    Implementations must pickle with cloudpickle. A class that subclasses
    ``Work`` inherits the defaults below; one that only has the two methods
    works too, and the runner reads it through ``WorkHooks.of``, which fills
    in the same defaults.
    """

    one_call_at_a_time: bool = False
    """The client runs one call at a time: a DB-API connection interleaves transactions if two threads share it."""
    max_in_flight: int | None = None
    """At most this many calls in flight on one client (None: as many as the pacing needs, up to its cap)."""
    conventions: tuple[Convention, ...] = ()
    """The service's own ways of saying no (``pipeline.refusals``), asked before the built-in ones."""
    cost: Callable[[Item], float] | None = None
    """Tokens an item will spend, estimated before its call (None: the runner skips the estimate entirely)."""
    usage: Callable[[Any], float | None] | None = None
    """Tokens a payload says its call spent, to reconcile the estimate (None: not token-priced)."""

    def connect(self) -> Any:
        """Open the client or connection the chunk reuses (closed by the runner)."""

    def call(self, client: Any, item: Item) -> Any:
        """Do one item; return a JSON-serialisable payload or raise."""

    def secrets(self) -> tuple[str, ...]:
        """Values that must never be stored or logged (empty ones are ignored)."""
        return ()

    def broken(self, client: Any) -> bool:
        """Is ``client`` itself gone after a failed call (not just that call)? Then the runner replaces it."""
        return client_closed(client)


_CLOSED_FLAGS = ("is_closed", "closed", "broken")
"""Attributes that clients set when they are done for: httpx ``is_closed``, psycopg ``closed``/``broken``."""


def client_closed(client: Any) -> bool:
    """The default of ``Work.broken``: the client says it is closed."""
    return any(getattr(client, flag, False) is True for flag in _CLOSED_FLAGS)


@dataclass(frozen=True)
class WorkHooks:
    """A work's optional hooks, read once per chunk, with ``Work``'s defaults where it has none."""

    one_call_at_a_time: bool
    max_in_flight: int | None
    conventions: tuple[Convention, ...]
    cost: Callable[[Item], float] | None
    usage: Callable[[Any], float | None] | None
    secrets: tuple[str, ...]
    broken: Callable[[Any], bool]

    @classmethod
    def of(cls, work: Work) -> WorkHooks:
        secrets = getattr(work, "secrets", None)
        return cls(
            one_call_at_a_time=bool(getattr(work, "one_call_at_a_time", Work.one_call_at_a_time)),
            max_in_flight=getattr(work, "max_in_flight", Work.max_in_flight),
            conventions=tuple(getattr(work, "conventions", Work.conventions)),
            cost=getattr(work, "cost", Work.cost),
            usage=getattr(work, "usage", Work.usage),
            secrets=tuple(s for s in secrets() if s) if secrets else (),
            broken=getattr(work, "broken", client_closed),
        )


@dataclass(frozen=True)
class FunctionWork(Work):
    """Work made of plain functions, for backfills written in a few lines.

    ``cost`` estimates the tokens an item spends before the call; ``usage``
    reads what it really spent from the payload, so pacing can reconcile.
    ``secrets`` are values that must never be stored or logged.
    ``conventions`` are rows of the refusal table the service needs beyond the
    built-in ones; they are asked first. ``one_call_at_a_time`` is for a
    client two threads must not share (a database connection).
    """

    connect_fn: Callable[[], Any]
    call_fn: Callable[[Any, Item], Any]
    cost_fn: Callable[[Item], float] | None = None
    usage_fn: Callable[[Any], float | None] | None = None
    secret_values: tuple[str, ...] = field(default=(), repr=False)
    conventions: tuple[Convention, ...] = ()  # the service's own ways of saying no (``pipeline.refusals``)
    one_call_at_a_time: bool = False

    def connect(self) -> Any:
        return self.connect_fn()

    def call(self, client: Any, item: Item) -> Any:
        return self.call_fn(client, item)

    @property
    def cost(self) -> Callable[[Item], float] | None:
        """Estimated tokens of an item, or None: the runner then skips the estimate entirely."""
        return self.cost_fn

    @property
    def usage(self) -> Callable[[Any], float | None] | None:
        """Tokens a payload reports it spent, or None when the work is not token-priced."""
        return self.usage_fn

    def secrets(self) -> tuple[str, ...]:
        return self.secret_values
