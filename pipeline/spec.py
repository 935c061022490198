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
from pipeline.defaults import DEFAULT_MAX_ATTEMPTS, DEFAULT_SHARE
from pipeline.items import ItemSource
from pipeline.limits import DESCRIPTION, Estimates, Overrides, ServiceLimit
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
    """What a user writes to add a backfill: items, work, and the service they use.

    ``share`` and ``min_share`` carry their descriptions (``described``), so
    the YAML component and the CLI show the same words; the engine's
    ``Backfill`` checks their values when ``build`` makes one.
    """

    name: str
    service: str
    items: ItemSource | Callable[[Service], ItemSource]
    work: Callable[[Service], Work]
    estimates: Estimates = Estimates()
    overrides: Overrides = Overrides()
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    share: float = field(
        default=DEFAULT_SHARE,
        metadata={
            DESCRIPTION: "This backfill's weight when other backfills of its service run at the same time: "
            "the service's budget is split by weight (share 3 beside share 1: three quarters). Alone, it "
            "has the whole budget whatever its weight."
        },
    )
    min_share: float = field(
        default=0.0,
        metadata={
            DESCRIPTION: "The fraction of its service's budget this backfill keeps however many others run, "
            "in [0, 1) (0.2: a fifth); 0 for none."
        },
    )
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
            share=self.share,
            min_share=self.min_share,
        )


def described(name: str) -> str:
    """The description of ``BackfillSpec``'s field ``name``, for a layer that shows it (YAML schema, ``--help``)."""
    return BackfillSpec.__dataclass_fields__[name].metadata[DESCRIPTION]
