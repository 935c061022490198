"""A backfill's part of its service's budget: where a declaration meets the leases.

The lease protocol is in ``pipeline/leases.py`` and its arithmetic in
``pipeline/shares.py``. Here an attempt takes its lease (refusing what its
workers could not read), fits its workers beside the others', hands its
workers their ticket, and says in words what share it starts with.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Protocol

from pipeline.errors import ConfigError
from pipeline.leases import LeaseHolder, ShareTicket, lease_store, new_lease, preview_share
from pipeline.limits import Estimates, ExecutionPlan, Overrides, ServiceLimit, derive_plan, early_calls
from pipeline.manifests import ManifestStore
from pipeline.shares import LeaseTiming, room

log = logging.getLogger(__name__)


class Claimant(Protocol):
    """What the leases need of a backfill (``pipeline.backfill.Backfill`` is one)."""

    name: str
    limit: ServiceLimit
    estimates: Estimates
    overrides: Overrides
    share: float
    min_share: float
    lease_timing: LeaseTiming

    @property
    def service(self) -> str: ...


def take_lease(
    backfill: Claimant, store: ManifestStore, executor: str, execution: ExecutionPlan, attempt: int, run_id: str
) -> LeaseHolder | None:
    """Take this attempt's lease on its service's budget (none when its limit counts neither calls nor connections)."""
    budget = backfill.limit.budget()
    connection_cap = backfill.limit.in_flight_budget() or 0
    if not budget and not connection_cap:
        return None
    if budget and store.is_local and executor != "local":
        raise ConfigError(
            f"{backfill.name}: {executor} workers cannot read the leases in the local folder {store.root}, "
            f"so they could not make room for other backfills of {backfill.service}. Give the manifests an s3:// "
            "root (manifest_root), which every worker reads, or run with the local executor."
        )
    lease = new_lease(
        backfill.service,
        backfill.name,
        attempt,
        run_id,
        backfill.share,
        backfill.min_share,
        budget,
        execution.max_parallelism,
        connection_cap,
    )
    holder = LeaseHolder(lease_store(store.root, store.s3_endpoint_url), lease, backfill.lease_timing)
    holder.acquire()
    return holder


def make_room(backfill: Claimant, execution: ExecutionPlan, holder: LeaseHolder, items: int) -> ExecutionPlan:
    """Run with fewer workers where the backfills already running hold what all of them must fit in.

    Connections (or batches) in flight: the attempt claims one per worker
    and waits while the others hold them all. Early calls: one plan keeps its
    workers within ``limits.early_calls`` so that even workers whose phases
    line up cannot crowd the busiest second; backfills sharing a budget share
    that headroom, and a newcomer takes what the others leave (at least one
    worker; each keeps up to 64 calls in flight, so fewer workers still reach
    the rate). Either way the smaller count is written in the lease for the
    next newcomer (``shares.room`` says why two at once fit too).
    """
    wanted, why = execution.max_parallelism, []
    cap = backfill.limit.in_flight_budget()
    if cap is not None:
        workers = holder.wait_for_connections(wanted, cap, lambda held, of: _waiting(backfill, held, of))
        if workers < wanted:
            why.append(
                f"{workers} worker(s), not {wanted}: the other backfills of {backfill.service} hold the rest of its connections"
            )
    else:
        headroom = early_calls(backfill.limit, backfill.estimates)
        workers = wanted if headroom is None else max(1, room(wanted, headroom, holder.others, "workers"))
        if workers < wanted:
            taken = sum(lease.workers for lease in holder.others)
            why.append(
                f"{workers} worker(s), not {wanted}: the other backfills of {backfill.service} run "
                f"{taken} of the {headroom} workers whose calls may line up in one second without crowding it"
            )
    if workers == wanted:
        return execution
    holder.claim(workers=workers)
    pinned = dataclasses.replace(backfill.overrides, max_parallelism=workers)
    fewer = derive_plan(backfill.limit, backfill.estimates, pinned, max(items, 1))
    return dataclasses.replace(fewer, explanation=[*execution.explanation, *why])


def _waiting(backfill: Claimant, held: int, cap: int) -> None:
    log.warning(
        "%s: waiting for a connection to %s: the other backfills hold %d of the %d it allows; "
        "trying again every %.1f s or so",
        backfill.name,
        backfill.service,
        held,
        cap,
        backfill.lease_timing.reread_s,
    )


def share_preview(backfill: Claimant, store: ManifestStore) -> list[str]:
    """The share this backfill would start with among the leases live now (the run itself reads them again)."""
    budget = backfill.limit.budget()
    if not budget:
        return []
    lease = new_lease(backfill.service, backfill.name, 0, "", backfill.share, backfill.min_share, budget, 0)
    share, live = preview_share(
        lease_store(store.root, store.s3_endpoint_url), lease, backfill.lease_timing, time.time()
    )
    if not live:
        return [f"no other backfill holds a lease on {backfill.service} now: it starts with its whole budget"]
    return [
        f"{live} other backfill(s) hold a lease on {backfill.service} now: started now, it would get share "
        f"{share:.3g} of the budget (weight {backfill.share:g}, min_share {backfill.min_share:g})"
    ]


def ticket(holder: LeaseHolder | None, store: ManifestStore, backfill: Claimant) -> ShareTicket | None:
    """What the workers need to pace at their share: nothing where the lease splits connections only, not a pace."""
    if holder is None or not holder.lease.budget:
        return None
    return ShareTicket(
        store.root,
        store.s3_endpoint_url,
        backfill.service,
        holder.lease.lease_id,
        holder.lease.budget,
        backfill.lease_timing,
    )
