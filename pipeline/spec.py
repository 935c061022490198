"""A backfill declaration that is completed at run time with a configured service.

In Dagster the limit, the URL and the secret of a service come from a
resource, configured in the launchpad or from the environment. So a
declaration names its service and says how to build its items and its work
*from* that service; ``build`` turns it into a runnable ``Backfill``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.backfill import Backfill
from pipeline.defaults import DEFAULT_MAX_ATTEMPTS
from pipeline.items import ItemSource
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.manifests import check_name
from pipeline.work import Work


@dataclass(frozen=True)
class Service:
    """A configured external service: its limit, where it is, and its secret.

    ``secret`` is resolved from the environment by the caller and is never
    printed: it is excluded from ``repr`` and redacted from every row.
    """

    limit: ServiceLimit
    url: str = ""
    secret: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return self.limit.name


@dataclass(frozen=True)
class BackfillSpec:
    """What a user writes to add a backfill: items, work, and the service they use."""

    name: str
    service: str
    items: ItemSource | Callable[[Service], ItemSource]
    work: Callable[[Service], Work]
    estimates: Estimates = Estimates()
    overrides: Overrides = Overrides()
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    description: str = ""

    def __post_init__(self) -> None:
        check_name(self.name)
        check_name(self.service)

    def build(self, service: Service, overrides: Overrides | None = None) -> Backfill:
        """A runnable backfill; bad work configuration fails here, before any call."""
        items = self.items if not callable(self.items) or hasattr(self.items, "read") else self.items(service)
        return Backfill(
            name=self.name,
            source=items,
            work=self.work(service),
            limit=service.limit,
            estimates=self.estimates,
            overrides=overrides or self.overrides,
            max_attempts=self.max_attempts,
        )
