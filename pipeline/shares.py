"""Shares of one service's budget among the backfills that hold a lease on it: the arithmetic, no I/O.

Each running attempt holds a lease (``pipeline/leases.py`` writes and reads
them). A worker turns the leases it last read into the fraction of its own
planned ceiling it may use now (``ShareView.fraction``); the pacer multiplies
its ceiling by that fraction. Nothing else is shared: no coordinator, no lock.

Why the sum over backfills stays under ``limit x safety`` at every instant:

* **Shares only shrink when a lease is added.** ``allocate`` is monotone:
  with one more lease in the set, no other lease gets more. So a worker whose
  view holds *more* leases than are really sending uses *less* than its share.
* **A newcomer waits until everyone has seen it.** A worker may use a view
  only while it is younger than ``stale_s`` (older: it pauses). A newcomer
  that found other live leases starts ``stale_s`` after its lease was written
  (``active_from``), so any worker sending from then on uses a view read
  after the newcomer's lease existed, which counts it.
* **A leaver stops before it lets go**: its lease is removed once its last
  call has returned, and the others grow on their next read.
* **A crashed holder stops by itself**: its workers pause once their clock
  passes its ``expires_at - skew_s``; the others count the lease until their
  clock passes ``expires_at + skew_s``. With clocks within ``skew_s`` of each
  other, the two never overlap.

Times in a lease are wall-clock seconds (``time.time``) of the machine that
wrote it: leases cross machines (Burla), so no monotonic clock would do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from pipeline.errors import ConfigError

DEFAULT_REREAD_S = 0.5
"""A worker re-reads the leases twice a second: a share freed reaches it within about that much. On S3 that
is one LIST and one GET per lease per worker each time: cents a day for a few backfills of twenty workers."""

DEFAULT_STALE_S = 1.5
"""A view older than this is not used (the worker pauses): three re-reads, so one slow listing costs nothing.

It is also most of how long a newcomer waits before it sends, when others hold leases."""

DEFAULT_SKEW_S = 0.5
"""How far apart the clocks of the machines sharing a budget may be. NTP keeps them within milliseconds;
half a second is a wide margin. Raise it if yours may drift further: it is the fence between a crashed
holder's last call and the others' growth, and part of a newcomer's wait."""

DEFAULT_TTL_S = 10.0
"""A lease not renewed for this long is dead: a killed backfill's share returns after ttl + skew + re-read."""

DEFAULT_RENEW_S = 2.0
"""The holder renews its lease this often: five chances before it would lapse."""


@dataclass(frozen=True)
class LeaseTiming:
    """The clocks of the lease protocol, in seconds. The bounds they give are in the README ("Shared budgets")."""

    reread_s: float = DEFAULT_REREAD_S
    stale_s: float = DEFAULT_STALE_S
    skew_s: float = DEFAULT_SKEW_S
    ttl_s: float = DEFAULT_TTL_S
    renew_s: float = DEFAULT_RENEW_S

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"lease timing: {name} must be a positive number of seconds, got {value!r}.")
        if self.stale_s < self.reread_s:
            raise ConfigError(
                f"lease timing: stale_s ({self.stale_s:g}) must be at least reread_s ({self.reread_s:g}), "
                "or every worker would pause between two reads."
            )
        if self.renew_s + self.skew_s * 2 >= self.ttl_s:
            raise ConfigError(
                f"lease timing: ttl_s ({self.ttl_s:g}) must exceed renew_s + 2 x skew_s "
                f"({self.renew_s + 2 * self.skew_s:g}), or a healthy holder's workers would pause between renewals."
            )

    @property
    def newcomer_wait_s(self) -> float:
        """From a newcomer's lease written to its first call, when others hold leases: every view has it by then."""
        return self.stale_s + self.skew_s

    @property
    def regrow_after_crash_s(self) -> float:
        """Longest time from a holder's last renewal to the others using its share: expiry, skew, one re-read."""
        return self.ttl_s + self.skew_s + self.stale_s


@dataclass(frozen=True)
class Lease:
    """One running attempt's claim on a service's budget.

    ``weight`` is its share relative to the others (``share=`` on the
    backfill); ``min_share`` a fraction of the whole budget it keeps however
    many others arrive. ``budget`` is what its declaration allows in total
    (``limit x safety``, per unit: requests/s, tokens/min): backfills that
    declare different limits for one service are all held to the smallest.
    """

    lease_id: str
    service: str
    backfill: str
    attempt: int
    run_id: str
    weight: float
    min_share: float
    budget: dict[str, float]
    written_at: float
    expires_at: float
    active_from: float
    host: str = ""
    pid: int = 0
    workers: int = 0
    connections: int = 0  # connections (or batches) in flight it holds: its workers, where the limit counts them
    connection_cap: int = 0  # the connections its declaration allows in total (0: its limit counts none)

    def lapses_at(self, timing: LeaseTiming) -> float:
        """When its own workers stop trusting it (by their clock): before anyone else could count it dead."""
        return self.expires_at - timing.skew_s

    def counted_until(self, timing: LeaseTiming) -> float:
        """Until when the others count it (by their clock), renewed or not."""
        return self.expires_at + timing.skew_s

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Lease:
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**known)


def allocate(leases: list[Lease]) -> dict[str, float]:
    """Each lease's fraction of the budget: by weight, with every ``min_share`` honoured first.

    Water-filling: a lease whose weighted share is below its floor gets the
    floor; the rest is shared by weight among the others, and again until
    no floor is above its share. Floors that add up to more than the whole
    budget are scaled down together (they cannot all be kept). The result
    is monotone: a lease added never gives another lease more, which is what
    lets workers act on views that disagree (module docstring). A lease that
    declares no budget (its limit counts connections only) spends none and
    takes no part.
    """
    leases = [lease for lease in leases if lease.budget]
    if not leases:
        return {}
    floor_total = sum(lease.min_share for lease in leases)
    scale = 1.0 / floor_total if floor_total > 1.0 else 1.0
    floors = {lease.lease_id: lease.min_share * scale for lease in leases}
    shares: dict[str, float] = {}
    free = list(leases)
    while True:
        left = 1.0 - sum(shares.values())
        weight = sum(lease.weight for lease in free)
        pinned = [lease for lease in free if floors[lease.lease_id] > left * lease.weight / weight]
        if not pinned:
            break
        for lease in pinned:
            shares[lease.lease_id] = floors[lease.lease_id]
        free = [lease for lease in free if lease.lease_id not in shares]
        if not free:
            return shares
    for lease in free:
        shares[lease.lease_id] = max(0.0, left) * lease.weight / weight
    return shares


@dataclass(frozen=True)
class ShareView:
    """The leases one read found, and when that read started (the holder's wall clock)."""

    leases: tuple[Lease, ...]
    read_at: float
    shares: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shares", allocate(list(self.leases)))


@dataclass(frozen=True)
class Fraction:
    """What a worker may use now: ``value`` of its planned ceiling, and why (for logs and ``paceline status``)."""

    value: float
    why: str
    until: float = math.inf  # when the value may change without a new read (a lease expiring, a newcomer's start)


def fraction(
    view: ShareView | None, lease_id: str, budget: dict[str, float], now: float, timing: LeaseTiming
) -> Fraction:
    """The fraction of its own planned ceiling a worker of lease ``lease_id`` may use at ``now``.

    Zero when the worker cannot vouch for its view (none yet, or older than
    ``stale_s``), when its own lease is missing or about to lapse by its
    clock, and before its lease's ``active_from``. Otherwise its share of
    the smallest budget any live lease declares, over its own budget.
    """
    if view is None:
        return Fraction(0.0, "no lease read yet")
    if now - view.read_at > timing.stale_s:
        return Fraction(0.0, f"leases last read {now - view.read_at:.1f} s ago (more than {timing.stale_s:g} s)")
    own = next((lease for lease in view.leases if lease.lease_id == lease_id), None)
    if own is None:
        return Fraction(0.0, "own lease not found")
    lapse = own.lapses_at(timing)
    if now >= lapse:
        return Fraction(0.0, "own lease lapsed")
    stale = view.read_at + timing.stale_s
    start = own.active_from + timing.skew_s
    if now < start:
        return Fraction(0.0, "waiting until every worker has seen this lease", min(start, stale))
    live = [own, *live_others(list(view.leases), lease_id, now, timing)]
    shares = view.shares if len(live) == len(view.leases) else allocate(live)
    ratio = min((_smallest(live, unit) / own_budget for unit, own_budget in budget.items()), default=1.0)
    value = min(1.0, shares.get(lease_id, 0.0) * ratio)
    expiries = [lease.counted_until(timing) for lease in live if lease is not own]
    return Fraction(
        value, f"share {shares.get(lease_id, 0.0):.3f} of {len(live)} lease(s)", min([lapse, stale, *expiries])
    )


def live_others(leases: list[Lease], lease_id: str, now: float, timing: LeaseTiming) -> list[Lease]:
    """The leases other than ``lease_id`` that count at ``now``: every reader counts with this one rule."""
    return [lease for lease in leases if lease.lease_id != lease_id and now < lease.counted_until(timing)]


def _smallest(leases: list[Lease], unit: str) -> float:
    """The smallest budget any lease declares for ``unit`` (leases that do not count it do not lower it)."""
    return min(lease.budget[unit] for lease in leases if unit in lease.budget)


def room(wanted: int, headroom: int, others: list[Lease], counted: str) -> int:
    """How many of ``wanted`` workers fit in ``headroom`` beside what the live ``others`` hold of it.

    ``counted`` names the lease field that says what a lease holds (``workers``
    or ``connections``). Every lease writes what it wants before it reads the
    others, and only ever lowers it after, so two newcomers at once each count
    the other's first want, never less than what it ends with: together they fit.
    """
    return min(wanted, headroom - sum(getattr(lease, counted) for lease in others))
