"""Leases in the manifest store: who is spending a service's budget right now.

A lease is one small JSON file per running attempt, next to the manifests::

    <root>/leases/service=<name>/<lease id>.json

Locally it is written to a temp name and renamed into place (a reader sees
the old file or the new one, never half); on S3 it is created with
``If-None-Match: *`` and renewed with ``If-Match: <etag>``, so a renewal
never resurrects a lease the others already counted as dead. There is
nothing else to run: the folder or the bucket is the whole protocol.

``LeaseHolder`` is the attempt's side (write, renew, release);
``ShareWatch`` is a worker's side (re-read, then ``pipeline.shares``
decides what fraction of its ceiling it may use). Both carry a
``ShareTicket``, which travels inside each chunk to the worker, Burla's too.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import urlparse

from pipeline.errors import PacelineError
from pipeline.shares import Fraction, Lease, LeaseTiming, ShareView, allocate, fraction, live_others, room


class LeaseLost(PacelineError):
    """A renewal found the lease gone or changed: the holder comes back as a newcomer."""


@dataclass(frozen=True)
class ShareTicket:
    """What a worker needs to find its backfill's share: picklable, so it rides in the chunk to Burla."""

    root: str
    s3_endpoint_url: str | None
    service: str
    lease_id: str
    budget: dict[str, float]
    timing: LeaseTiming = field(default_factory=LeaseTiming)

    def store(self) -> LeaseStore:
        return lease_store(self.root, self.s3_endpoint_url)


class LeaseStore(Protocol):
    """Where leases live. ``write`` returns a version token; ``expected`` makes it conditional."""

    def read(self, service: str) -> list[Lease]: ...

    def services(self) -> list[str]: ...

    def write(self, lease: Lease, expected: str | None) -> str: ...

    def remove(self, lease: Lease) -> None: ...


def lease_store(root: str, s3_endpoint_url: str | None = None) -> LeaseStore:
    """The lease store of a manifest root: a folder, or a bucket prefix."""
    parsed = urlparse(root)
    if parsed.scheme == "s3":
        return S3Leases(parsed.netloc, parsed.path.strip("/"), s3_endpoint_url)
    return LocalLeases(os.path.abspath(parsed.path if parsed.scheme == "file" else root))


_SERVICE = "service="


def _key(service: str) -> str:
    return f"leases/{_SERVICE}{service}"


def _services(folders: list[str]) -> list[str]:
    return sorted(name[len(_SERVICE) :] for name in folders if name.startswith(_SERVICE))


class LocalLeases:
    """Leases as files: written whole by rename; the version is the file's content (cheap to compare)."""

    def __init__(self, root: str):
        self._root = root

    def read(self, service: str) -> list[Lease]:
        folder = os.path.join(self._root, _key(service))
        try:
            names = [name for name in os.listdir(folder) if name.endswith(".json")]
        except FileNotFoundError:
            return []
        leases = []
        for name in names:
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    leases.append(Lease.from_json(json.load(handle)))
            except (FileNotFoundError, ValueError, TypeError, KeyError):
                continue  # released between the listing and the read, or not a lease
        return leases

    def services(self) -> list[str]:
        """The services with a lease folder: one listing."""
        folder = os.path.join(self._root, "leases")
        return _services(os.listdir(folder) if os.path.isdir(folder) else [])

    def write(self, lease: Lease, expected: str | None) -> str:
        path = self._path(lease)
        body = json.dumps(lease.to_json(), sort_keys=True)
        if expected is not None and self._current(path) != expected:
            raise LeaseLost(f"lease {lease.lease_id} of {lease.service} changed or vanished since it was written")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(body)
        if expected is None:
            try:
                os.link(temp, path)  # create only: fails if the name exists
            except FileExistsError as error:
                raise LeaseLost(f"lease {lease.lease_id} of {lease.service} exists already") from error
            finally:
                os.remove(temp)
        else:
            os.replace(temp, path)
        return body

    def remove(self, lease: Lease) -> None:
        try:
            os.remove(self._path(lease))
        except FileNotFoundError:
            pass

    def _path(self, lease: Lease) -> str:
        return os.path.join(self._root, _key(lease.service), f"{lease.lease_id}.json")

    @staticmethod
    def _current(path: str) -> str | None:
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None


class S3Leases:
    """Leases as S3 objects: created with If-None-Match, renewed with If-Match on the ETag."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None):
        import boto3  # third-party, and only where the store is S3

        self._bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self._s3 = boto3.client("s3", endpoint_url=endpoint)

    def read(self, service: str) -> list[Lease]:
        listed = self._s3.list_objects_v2(Bucket=self._bucket, Prefix=f"{self._prefix}{_key(service)}/")
        leases = []
        for entry in listed.get("Contents", []):
            try:
                body = self._s3.get_object(Bucket=self._bucket, Key=entry["Key"])["Body"].read()
                leases.append(Lease.from_json(json.loads(body)))
            except self._s3.exceptions.NoSuchKey:
                continue  # released between the listing and the read
            except (ValueError, TypeError, KeyError):
                continue
        return leases

    def services(self) -> list[str]:
        """The services with a lease folder: one listing, folders only."""
        prefix = f"{self._prefix}leases/"
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix, Delimiter="/")
        return _services(
            [entry["Prefix"][len(prefix) :].rstrip("/") for page in pages for entry in page.get("CommonPrefixes", [])]
        )

    def write(self, lease: Lease, expected: str | None) -> str:
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            answer = self._s3.put_object(
                Bucket=self._bucket,
                Key=self._key(lease),
                Body=json.dumps(lease.to_json(), sort_keys=True).encode(),
                ContentType="application/json",
                **condition,
            )
        except self._s3.exceptions.ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
                raise LeaseLost(f"lease {lease.lease_id} of {lease.service} changed or vanished ({code})") from error
            raise
        return answer["ETag"]

    def remove(self, lease: Lease) -> None:
        self._s3.delete_object(Bucket=self._bucket, Key=self._key(lease))

    def _key(self, lease: Lease) -> str:
        return f"{self._prefix}{_key(lease.service)}/{lease.lease_id}.json"


@dataclass(frozen=True)
class ShareChange:
    """The holder's share changed: when (wall clock), to what, among how many leases."""

    at: float
    share: float
    leases: int


class LeaseHolder:
    """An attempt's lease: written before the first chunk, renewed in the background, removed after the last call.

    ``step(now)`` is one renewal, driven by the thread in production and by a
    simulated clock in tests. A renewal that comes too late (the others may
    already count the lease as dead) or finds the lease changed comes back as
    a newcomer: a new ``active_from``, so its workers wait again.
    """

    def __init__(self, store: LeaseStore, lease: Lease, timing: LeaseTiming, clock: Callable[[], float] = time.time):
        self._store, self._timing, self._clock = store, timing, clock
        self.lease = lease
        self._version: str | None = None
        self.changes: list[ShareChange] = []
        self.others: list[Lease] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Lease:
        """Write the lease; a newcomer among live leases starts only once every worker could have read it."""
        now = self._clock()
        alone = now - self._timing.skew_s  # nobody else to wait for: active at once on every worker's clock
        self.lease = replace(self.lease, written_at=now, expires_at=now + self._timing.ttl_s, active_from=alone)
        self._version = self._store.write(self.lease, None)
        self._note(self._store.read(self.lease.service), now)
        if self.others:
            self.lease = replace(self.lease, active_from=now + self._timing.stale_s)
            self._version = self._store.write(self.lease, self._version)
        return self.lease

    def step(self) -> None:
        """Renew the lease (on time: same ``active_from``; late or lost: as a newcomer) and note the share."""
        now = self._clock()
        renewed = replace(self.lease, expires_at=now + self._timing.ttl_s)
        late = now >= self.lease.lapses_at(self._timing)
        try:
            if late:
                raise LeaseLost(f"lease {self.lease.lease_id} renewed late")
            self._version = self._store.write(renewed, self._version)
            self.lease = renewed
        except LeaseLost:
            self._store.remove(self.lease)
            self.lease = replace(renewed, written_at=now)
            self.acquire()
            return
        self._note(self._store.read(self.lease.service), now)

    def claim(self, **holds: int) -> list[Lease]:
        """Write what the attempt holds (``workers=``, ``connections=``) and return the others live after the write.

        Claim first, then look: a newcomer that sees room after its own
        claim is visible knows every later newcomer will count it.
        """
        now = self._clock()
        self.lease = replace(self.lease, expires_at=now + self._timing.ttl_s, **holds)
        self._version = self._store.write(self.lease, self._version)
        self._note(self._store.read(self.lease.service), now)
        return self.others

    def wait_for_connections(
        self, wanted: int, cap: int, on_wait: Callable[[int, int], None], sleep: Callable[[float], None] = time.sleep
    ) -> int:
        """Claim up to ``wanted`` connections of ``cap`` beside the others' claims, waiting while none is free.

        With no room, the claim is withdrawn and tried again after a random
        pause (two newcomers that saw each other both withdraw; the pauses
        part them), so a waiting attempt never holds what it does not use.
        ``on_wait(held by others, cap)`` is told once per wait, for the log.
        """
        rng = random.Random()
        while True:
            others = self.claim(connections=wanted)
            ceiling = min([cap, *(lease.connection_cap for lease in others if lease.connection_cap)])
            fits = room(wanted, ceiling, others, "connections")
            if fits >= 1:
                if fits < wanted:
                    self.claim(connections=fits)
                return fits
            self.claim(connections=0)
            on_wait(sum(lease.connections for lease in others), ceiling)
            sleep(self._timing.reread_s * (1 + rng.random()))

    def start(self) -> None:
        """Renew every ``renew_s`` on a daemon thread until ``release``."""
        self._thread = threading.Thread(target=self._renew_until_released, name="paceline-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease: call it only once the attempt's last call has returned."""
        self.abandon()
        self._store.remove(self.lease)

    def abandon(self) -> None:
        """Stop renewing and leave the lease to expire: for an attempt whose workers may still be calling.

        They stop when their own lease lapses, before the others count it as
        dead, so the budget is never spent twice, at the price of the share
        coming back only after ``ttl_s``.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def describe(self) -> str:
        """The share this lease starts with, in words for the plan's explanation."""
        service, share = self.lease.service, self.share()
        if not self.lease.budget:  # a lease on connections only: no pace to share
            held = sum(lease.connections for lease in self.others)
            return (
                f"holds {self.lease.connections} of {service}'s {self.lease.connection_cap} connections; "
                f"{len(self.others)} other running lease(s) hold {held}"
            )
        if not self.others:
            return f"the only backfill leasing {service}'s budget now: share 1 (others that start will take part of it)"
        wait = max(0.0, self.lease.active_from + self._timing.skew_s - self.lease.written_at)
        names = ", ".join(sorted({lease.backfill for lease in self.others}))
        return (
            f"shares {service}'s budget with {len(self.others)} running lease(s) ({names}): share {share:.3g} "
            f"(weight {self.lease.weight:g}), after {wait:.1f} s for their workers to see this lease"
        )

    def share(self) -> float:
        """The share of the budget this lease had at its last reading (1.0 alone)."""
        return self.changes[-1].share if self.changes else 1.0

    def _renew_until_released(self) -> None:
        while not self._stop.wait(self._timing.renew_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the store is unreachable: workers pause on stale views; try again
                continue

    def _note(self, leases: list[Lease], now: float) -> None:
        """What a read found: the others live now, and this lease's share among them, kept when it changed."""
        self.others = live_others(leases, self.lease.lease_id, now, self._timing)
        live = [self.lease, *self.others]
        share = round(allocate(live).get(self.lease.lease_id, 0.0), 4)
        if not self.changes or self.changes[-1].share != share or self.changes[-1].leases != len(live):
            self.changes.append(ShareChange(now, share, len(live)))


def new_lease(
    service: str,
    backfill: str,
    attempt: int,
    run_id: str,
    weight: float,
    min_share: float,
    budget: dict[str, float],
    workers: int,
    connection_cap: int = 0,
) -> Lease:
    """A lease not yet written (``LeaseHolder.acquire`` stamps its times)."""
    return Lease(
        lease_id=f"{backfill}-{attempt}-{uuid.uuid4().hex[:12]}",
        service=service,
        backfill=backfill,
        attempt=attempt,
        run_id=run_id,
        weight=weight,
        min_share=min_share,
        budget=budget,
        written_at=0.0,
        expires_at=0.0,
        active_from=0.0,
        host=socket.gethostname(),
        pid=os.getpid(),
        workers=workers,
        connections=workers if connection_cap else 0,
        connection_cap=connection_cap,
    )


def preview_share(store: LeaseStore, lease: Lease, timing: LeaseTiming, now: float) -> tuple[float, int]:
    """The share ``lease`` would start with if it were written now, and how many live leases it would join."""
    live = live_others(store.read(lease.service), lease.lease_id, now, timing)
    return allocate([*live, lease]).get(lease.lease_id, 0.0), len(live)


class ShareWatch:
    """A worker's view of the leases, re-read every ``reread_s`` on a daemon thread, as long as its lease lives.

    The worker asks ``fraction()`` before each call; the answer needs no I/O.
    A read that fails leaves the last view in place, and a view too old to
    vouch for makes the fraction 0 (``pipeline.shares.fraction``). The
    thread ends by itself once its lease is gone (released, or lapsed), so
    nobody has to close it; a worker that still asks after that (a lease
    written again after a late renewal) starts it again.
    """

    def __init__(self, ticket: ShareTicket, clock: Callable[[], float] = time.time):
        self._ticket, self._clock = ticket, clock
        self._store = ticket.store()
        self._view: ShareView | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ShareWatch:
        self.read_once()
        self._thread = threading.Thread(target=self._reread, name="paceline-shares", daemon=True)
        self._thread.start()
        return self

    def read_once(self) -> None:
        """One read: the view's age counts from when the read started, not when it returned."""
        started = self._clock()
        self._view = ShareView(tuple(self._store.read(self._ticket.service)), started)

    def fraction(self) -> Fraction:
        if self._thread is not None and not self._thread.is_alive():
            self.start()
        return fraction(self._view, self._ticket.lease_id, self._ticket.budget, self._clock(), self._ticket.timing)

    def _reread(self) -> None:
        while self._lease_lives():
            time.sleep(self._ticket.timing.reread_s)
            try:
                self.read_once()
            except Exception:  # noqa: BLE001 - the store blinked: the view ages, and pauses the worker if it must
                continue

    def _lease_lives(self) -> bool:
        view, lease_id = self._view, self._ticket.lease_id
        own = next((lease for lease in view.leases if lease.lease_id == lease_id), None) if view else None
        return own is not None and self._clock() < own.counted_until(self._ticket.timing)


class Watches:
    """The watches of one process's workers, one per lease: hundreds of local workers read the store once.

    It travels inside the worker to Burla, so it holds no lock (locks do not
    pickle) and pickles empty: two workers that start at once may each start
    a watch, which costs one extra reader for as long as the lease lives.
    """

    def __init__(self) -> None:
        self._by_lease: dict[tuple[str, str, str], ShareWatch] = {}

    def of(self, ticket: ShareTicket) -> ShareWatch:
        key = (ticket.root, ticket.service, ticket.lease_id)
        watch = self._by_lease.get(key)
        if watch is None:
            watch = self._by_lease[key] = ShareWatch(ticket).start()
        return watch

    def __getstate__(self) -> dict:
        return {"_by_lease": {}}
