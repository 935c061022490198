"""The shape of a backfill's work: ``connect`` once per chunk, ``call`` once per item.

One client or connection per chunk is the whole point: a connection per item
would multiply handshakes and break connection limits; one per process would
outlive chunks Burla moves between machines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Item:
    """One unit the service sees. ``payload`` is JSON text when the item carries data."""

    id: str
    payload: str | None = None

    @cached_property
    def data(self) -> Any:
        """The decoded payload (a prompt record, a key range), or the id itself."""
        return self.id if self.payload is None else json.loads(self.payload)


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
    """

    connect_fn: Callable[[], Any]
    call_fn: Callable[[Any, Item], Any]
    cost_fn: Callable[[Item], float] | None = None
    usage_fn: Callable[[Any], float | None] | None = None
    secret_values: tuple[str, ...] = field(default=(), repr=False)

    def connect(self) -> Any:
        return self.connect_fn()

    def call(self, client: Any, item: Item) -> Any:
        return self.call_fn(client, item)

    def cost(self, item: Item) -> float:
        return self.cost_fn(item) if self.cost_fn else 0.0

    def usage(self, payload: Any) -> float | None:
        return self.usage_fn(payload) if self.usage_fn else None

    def secrets(self) -> tuple[str, ...]:
        return self.secret_values


def item_cost(work: Work, item: Item) -> float:
    """Estimated tokens for an item; zero for work that is not token-priced."""
    cost = getattr(work, "cost", None)
    return float(cost(item)) if cost else 0.0


def reported_usage(work: Work, payload: Any) -> float | None:
    usage = getattr(work, "usage", None)
    return usage(payload) if usage else None


def work_secrets(work: Work) -> tuple[str, ...]:
    secrets = getattr(work, "secrets", None)
    return tuple(s for s in secrets() if s) if secrets else ()
