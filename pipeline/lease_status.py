"""Who holds a lease on each service's budget now, and what share each gets: what ``paceline status`` shows.

A lease counts while ``now < expires_at + skew_s`` (``Lease.counted_until``): the
shares shown are ``allocate`` over those live leases only, the same numbers
the running workers act on. A lease past that was left by a process that
stopped without removing it (killed, or its machine lost); it is listed as
expired so nobody wonders whose file it is, and it counts for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.leases import lease_store
from pipeline.shares import Lease, LeaseTiming, allocate

_TIMING = LeaseTiming()  # a reader cannot know a holder's own timing; the default skew is what backfills use


@dataclass(frozen=True)
class LeaseState:
    """One lease as a reader sees it at ``now``: live or not, its share of the budget, seconds until it lapses."""

    lease: Lease
    live: bool
    share: float | None  # among the live leases; None for an expired lease, or one on connections only
    expires_in_s: float  # negative once expired


def lease_states(
    root: str, s3_endpoint_url: str | None, now: float, timing: LeaseTiming = _TIMING
) -> dict[str, list[LeaseState]]:
    """Every service with a lease folder under ``root``, and its leases: live first, by share, then expired."""
    store = lease_store(root, s3_endpoint_url)
    states = {}
    for service in store.services():
        leases = store.read(service)
        live = [lease for lease in leases if now < lease.counted_until(timing)]
        shares = allocate(live)
        found = [
            LeaseState(lease, lease in live, shares.get(lease.lease_id), lease.expires_at - now) for lease in leases
        ]
        states[service] = sorted(found, key=lambda s: (not s.live, -(s.share or 0.0), s.lease.backfill))
    return states
