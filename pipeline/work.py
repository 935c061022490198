"""The shape of a backfill's work: ``connect`` once per chunk, ``call`` once per item.

One client or connection per chunk is the whole point: a connection per item
would multiply handshakes and break connection limits; one per process would
outlive chunks Burla moves between machines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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


@runtime_checkable
class Work(Protocol):
    """What a worker does. Implementations must pickle with cloudpickle."""

    def connect(self) -> Any:
        """Open the client or connection the chunk reuses (closed by the runner)."""

    def call(self, client: Any, item: Item) -> Any:
        """Do one item; return a JSON-serialisable payload or raise."""


@dataclass(frozen=True)
class FunctionWork:
    """Work made of plain functions, for backfills written in a few lines.

    ``cost`` estimates the tokens an item spends before the call; ``usage``
    reads what it really spent from the payload, so pacing can reconcile.
    ``secrets`` are values that must never be stored or logged.
    ``conventions`` are rows of the refusal table the service needs beyond the
    built-in ones; they are asked first.
    """

    connect_fn: Callable[[], Any]
    call_fn: Callable[[Any, Item], Any]
    cost_fn: Callable[[Item], float] | None = None
    usage_fn: Callable[[Any], float | None] | None = None
    secret_values: tuple[str, ...] = field(default=(), repr=False)
    conventions: tuple[Convention, ...] = ()  # the service's own ways of saying no (``pipeline.refusals``)

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


def work_secrets(work: Work) -> tuple[str, ...]:
    secrets = getattr(work, "secrets", None)
    return tuple(s for s in secrets() if s) if secrets else ()
