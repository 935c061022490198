"""Leases in the manifest store (``pipeline.leases``): the store, the holder and the watch, on simulated time.

The store is real (a temp folder, or moto's S3 server); only the clocks are
simulated. The last test runs whole backfills' holders and workers through
arrivals, departures, crashes, failed reads and skewed clocks, and checks
that the budget is never spent twice at any instant.
"""

import dataclasses
import random
import re

import cloudpickle
import pytest

from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.errors import ConfigError
from pipeline.executors import BurlaExecutor, LocalExecutor
from pipeline.items import Values
from pipeline.leases import (
    LeaseHolder,
    LeaseLost,
    LocalLeases,
    ShareTicket,
    ShareWatch,
    Watches,
    lease_store,
    new_lease,
)
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.manifests import ManifestStore
from pipeline.shares import LeaseTiming
from pipeline.work import FunctionWork
from tests.conftest import Killed, StopsAfter

TIMING = LeaseTiming()
BUDGET = {"requests_per_second": 100.0}


class Clock:
    """Simulated wall-clock time, optionally off by ``offset`` from the true time (a machine's skew)."""

    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def lease_for(backfill: str, weight: float = 1.0, min_share: float = 0.0):
    return new_lease("api", backfill, 0, "run", weight, min_share, BUDGET, workers=2)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalLeases(str(tmp_path))
    s3 = request.getfixturevalue("s3")
    bucket = f"leases-{request.node.name.replace('_', '-').replace('[', '-').replace(']', '')[:40]}"
    s3.client().create_bucket(Bucket=bucket)
    return lease_store(f"s3://{bucket}/root", s3.url)


# -- the store ------------------------------------------------------------------------------------------


def test_a_lease_written_is_read_back_whole(store):
    lease = dataclasses.replace(lease_for("nightly"), written_at=1.0, expires_at=11.0, active_from=1.0)
    store.write(lease, None)
    assert store.read("api") == [lease]
    assert store.read("another") == []


def test_a_lease_is_created_once(store):
    lease = lease_for("nightly")
    store.write(lease, None)
    with pytest.raises(LeaseLost, match="exists already|changed or vanished"):
        store.write(lease, None)


def test_a_renewal_needs_the_version_it_last_wrote(store):
    lease = lease_for("nightly")
    first = store.write(lease, None)
    second = store.write(dataclasses.replace(lease, expires_at=20.0), first)
    with pytest.raises(LeaseLost):
        store.write(dataclasses.replace(lease, expires_at=30.0), first)
    assert store.read("api")[0].expires_at == 20.0
    store.remove(lease)
    with pytest.raises(LeaseLost):  # a lease removed is not renewed back to life
        store.write(dataclasses.replace(lease, expires_at=40.0), second)
    assert store.read("api") == []
    store.remove(lease)  # removing twice is fine: a release after an expiry sweep


def test_files_that_are_not_leases_are_skipped(tmp_path):
    store = LocalLeases(str(tmp_path))
    store.write(lease_for("nightly"), None)
    folder = tmp_path / "leases" / "service=api"
    (folder / "broken.json").write_text("{half a lease")
    (folder / "x.json.1234.tmp").write_text("{}")
    assert [lease.backfill for lease in store.read("api")] == ["nightly"]


# -- the holder -------------------------------------------------------------------------------------------


def test_alone_a_lease_is_active_at_once(tmp_path):
    clock = Clock()
    holder = LeaseHolder(LocalLeases(str(tmp_path)), lease_for("nightly"), TIMING, clock)
    lease = holder.acquire()
    assert lease.written_at == clock.now and lease.expires_at == clock.now + TIMING.ttl_s
    assert lease.active_from + TIMING.skew_s == clock.now  # usable at once, on every worker's clock
    assert holder.share() == 1.0 and "the only backfill" in holder.describe()


def test_a_newcomer_among_live_leases_waits_for_every_view_to_have_it(tmp_path):
    clock, store = Clock(), LocalLeases(str(tmp_path))
    LeaseHolder(store, lease_for("nightly", 3), TIMING, clock).acquire()
    clock.now += 1
    newcomer = LeaseHolder(store, lease_for("adhoc"), TIMING, clock)
    lease = newcomer.acquire()
    assert lease.active_from == clock.now + TIMING.stale_s
    assert newcomer.share() == 0.25
    assert "shares api's budget with 1 running lease(s) (nightly): share 0.25" in newcomer.describe()


def test_a_renewal_on_time_keeps_the_lease_and_notes_share_changes(tmp_path):
    clock, store = Clock(), LocalLeases(str(tmp_path))
    holder = LeaseHolder(store, lease_for("nightly"), TIMING, clock)
    holder.acquire()
    clock.now += TIMING.renew_s
    other = LeaseHolder(store, lease_for("adhoc"), TIMING, clock)
    other.acquire()
    clock.now += TIMING.renew_s
    holder.step()
    assert holder.lease.expires_at == clock.now + TIMING.ttl_s
    assert holder.lease.active_from + TIMING.skew_s == holder.lease.written_at  # not a newcomer again
    other.release()
    clock.now += TIMING.renew_s
    holder.step()
    assert [(change.share, change.leases) for change in holder.changes] == [(1.0, 1), (0.5, 2), (1.0, 1)]


def test_a_late_renewal_comes_back_as_a_newcomer(tmp_path):
    clock, store = Clock(), LocalLeases(str(tmp_path))
    holder = LeaseHolder(store, lease_for("nightly"), TIMING, clock)
    holder.acquire()
    LeaseHolder(store, lease_for("adhoc"), TIMING, clock).acquire()
    clock.now += TIMING.ttl_s  # past expires_at - skew: the others may count it as dead by now
    holder.step()
    assert holder.lease.active_from == clock.now + TIMING.stale_s
    assert len(store.read("api")) == 2


def test_a_lease_removed_under_its_holder_comes_back_as_a_newcomer(tmp_path):
    clock, store = Clock(), LocalLeases(str(tmp_path))
    holder = LeaseHolder(store, lease_for("nightly"), TIMING, clock)
    holder.acquire()
    store.remove(holder.lease)
    clock.now += TIMING.renew_s
    holder.step()
    assert [lease.lease_id for lease in store.read("api")] == [holder.lease.lease_id]


def test_release_removes_and_abandon_leaves_the_lease_to_expire(tmp_path):
    store = LocalLeases(str(tmp_path))
    released = LeaseHolder(store, lease_for("a"), TIMING)
    released.acquire()
    released.release()
    abandoned = LeaseHolder(store, lease_for("b"), TIMING)
    abandoned.acquire()
    abandoned.abandon()
    assert [lease.backfill for lease in store.read("api")] == ["b"]


def test_the_holder_renews_on_its_own_thread(tmp_path):
    store = LocalLeases(str(tmp_path))
    timing = LeaseTiming(reread_s=0.05, stale_s=0.2, skew_s=0.05, ttl_s=1.0, renew_s=0.05)
    holder = LeaseHolder(store, lease_for("a"), timing)
    first = holder.acquire().expires_at
    holder.start()
    try:
        deadline = first + 5
        while store.read("api")[0].expires_at == first:
            assert holder.lease.expires_at < deadline
    finally:
        holder.release()
    assert store.read("api") == []


# -- the watch -------------------------------------------------------------------------------------------------


def test_a_worker_sees_its_share_change_at_its_next_read(tmp_path):
    clock, store = Clock(), LocalLeases(str(tmp_path))
    holder = LeaseHolder(store, lease_for("nightly"), TIMING, clock)
    lease = holder.acquire()
    watch = ShareWatch(ShareTicket(str(tmp_path), None, "api", lease.lease_id, BUDGET, TIMING), clock)
    watch.read_once()
    assert watch.fraction().value == 1.0
    LeaseHolder(store, lease_for("adhoc"), TIMING, clock).acquire()
    assert watch.fraction().value == 1.0  # not read yet
    watch.read_once()
    assert watch.fraction().value == 0.5
    clock.now += TIMING.stale_s + 0.1
    assert watch.fraction().value == 0.0  # a view too old to vouch for


# -- the protocol, end to end on simulated time -----------------------------------------------------------


@dataclasses.dataclass
class SimBackfill:
    """One backfill: a holder on its machine's clock, its workers each on their own clock and read phase."""

    name: str
    weight: float
    min_share: float
    start: float
    end: float
    crash: str  # "" (ends cleanly), "all" (process killed), "driver" (workers run on, unrenewed)
    holder: LeaseHolder | None = None
    watches: list = dataclasses.field(default_factory=list)
    next_renew: float = 0.0
    next_reads: list = dataclasses.field(default_factory=list)
    done: bool = False


def _simulate(tmp_path, seed: int, read_failures: float) -> tuple[list[float], list[bool]]:
    """Run random backfills; return the total fraction of the budget in use at each step, and whether the
    step was settled (no arrival, departure or crash for as long as a crashed lease takes to return)."""
    rng = random.Random(seed)
    settle_s = TIMING.regrow_after_crash_s + TIMING.reread_s
    last_event = 0.0
    store = LocalLeases(str(tmp_path / f"sim{seed}"))
    truth = Clock(0.0)

    def skewed() -> Clock:
        offset = rng.uniform(-TIMING.skew_s / 2, TIMING.skew_s / 2)
        return lambda: truth.now + offset  # type: ignore[return-value]

    backfills = [SimBackfill("b0", 1, 0, 0.0, 95.0, "")]  # one runs throughout, so the end is a settled stretch
    for index in range(1, rng.randint(2, 5)):
        start = rng.uniform(0, 40)
        backfills.append(
            SimBackfill(
                f"b{index}",
                rng.choice([1, 1, 2, 3]),
                rng.choice([0, 0, 0.2, 0.5]),
                start,
                start + rng.uniform(5, 40),
                rng.choice(["", "", "all", "driver"]),
            )
        )
    samples, settled = [], []
    step = 0.01
    while truth.now < 100:
        for backfill in backfills:
            if backfill.done or truth.now < backfill.start:
                continue
            if backfill.holder is None:  # arrival: the lease first, then the workers
                last_event = truth.now
                backfill.holder = LeaseHolder(
                    store, lease_for(backfill.name, backfill.weight, backfill.min_share), TIMING, skewed()
                )
                lease = backfill.holder.acquire()
                backfill.next_renew = truth.now + TIMING.renew_s
                for _ in range(2):
                    ticket = ShareTicket(str(store._root), None, "api", lease.lease_id, BUDGET, TIMING)
                    watch = ShareWatch(ticket, skewed())
                    watch.read_once()
                    backfill.watches.append(watch)
                    backfill.next_reads.append(truth.now + rng.uniform(0, TIMING.reread_s))
            if truth.now >= backfill.end:
                last_event = truth.now
                backfill.done = True
                if backfill.crash == "":
                    backfill.holder.release()  # after its workers' last call
                if backfill.crash == "driver":  # the driver died; its workers go on, unrenewed, for a while
                    backfill.done = False
                    backfill.end = truth.now + 1e9
                    backfill.crash = "orphaned"
                continue
            if backfill.crash != "orphaned" and truth.now >= backfill.next_renew:
                backfill.holder.step()
                backfill.next_renew = truth.now + TIMING.renew_s
            for index, watch in enumerate(backfill.watches):
                if truth.now >= backfill.next_reads[index]:
                    if rng.random() >= read_failures:  # a failed read leaves the view to age
                        watch.read_once()
                    backfill.next_reads[index] = truth.now + TIMING.reread_s
        in_use = sum(
            watch.fraction().value / len(backfill.watches)
            for backfill in backfills
            if backfill.holder is not None and not backfill.done
            for watch in backfill.watches
        )
        samples.append(in_use)
        running = any(b.holder is not None and not b.done and b.crash != "orphaned" for b in backfills)
        settled.append(running and truth.now - last_event >= settle_s)
        truth.now += step
    return samples, settled


@pytest.mark.parametrize("seed", range(12))
def test_the_budget_is_never_spent_twice(tmp_path, seed):
    """Arrivals, departures, crashes, orphaned workers, one read in ten failing, clocks apart by up to
    skew_s: at every instant the fractions in use add up to at most the whole budget."""
    samples, _ = _simulate(tmp_path, seed, read_failures=0.1)
    assert max(samples) <= 1.0 + 1e-9
    assert max(samples) > 0.5  # the simulation did run backfills (a check that cannot pass empty)


@pytest.mark.parametrize("seed", range(12))
def test_a_settled_budget_is_used_whole(tmp_path, seed):
    """Once nothing has arrived, left or crashed for ttl + skew + stale + one re-read, the backfills still
    running use the whole budget between them: shares freed by departures and crashes have come back."""
    samples, settled = _simulate(tmp_path, seed, read_failures=0.0)
    steady = [in_use for in_use, calm in zip(samples, settled) if calm]
    assert steady, "the simulation never settled: lengthen it"
    assert min(steady) >= 1.0 - 1e-9


# -- an attempt's lease ------------------------------------------------------------------------------------


def _backfill(name: str, count: int = 40, **fields) -> Backfill:
    limit = ServiceLimit("api", requests_per_second=100, safety=0.9)  # 10 workers may line up in one second
    work = FunctionWork(lambda: None, lambda client, item: {"n": item.id})
    return Backfill(name, Values.of(range(count)), work, limit, Estimates(seconds_per_call=0.1), **fields)


def test_a_run_holds_its_lease_while_it_runs_and_releases_it_after(tmp_path):
    store = ManifestStore(str(tmp_path))
    backfill = _backfill("nightly")
    plan_backfill(backfill, store)
    seen = []

    def look(progress):
        seen.extend((lease.backfill, lease.workers) for lease in LocalLeases(str(tmp_path)).read("api"))

    result = run_attempt(backfill, store, LocalExecutor(), on_progress=look)
    assert seen and set(seen) == {("nightly", result.execution.max_parallelism)}
    assert LocalLeases(str(tmp_path)).read("api") == []
    assert [(change.share, change.leases) for change in result.shares] == [(1.0, 1)]


def test_a_newcomer_runs_fewer_workers_when_the_others_hold_the_headroom(tmp_path):
    store = ManifestStore(str(tmp_path))
    running = LeaseHolder(LocalLeases(str(tmp_path)), lease_for("nightly"), TIMING)
    running.lease = dataclasses.replace(running.lease, workers=8)
    running.acquire()
    backfill = _backfill("adhoc")
    plan_backfill(backfill, store)
    assert backfill.execution_plan(40).max_parallelism == 9  # 90 req/s x 0.1 s
    result = run_attempt(backfill, store, LocalExecutor())
    running.release()
    assert result.execution.max_parallelism == 2
    assert any(
        "2 worker(s), not 9: the other backfills of api run 8 of the 10" in line
        for line in result.execution.explanation
    )
    assert result.counts["ok"] == 40


def test_a_run_that_dies_leaves_its_lease_to_expire(tmp_path):
    store = ManifestStore(str(tmp_path))
    backfill = _backfill("nightly", 200, overrides=Overrides(chunk_size=10))
    plan_backfill(backfill, store)
    with pytest.raises(Killed):
        run_attempt(backfill, store, StopsAfter(2))
    (lease,) = LocalLeases(str(tmp_path)).read("api")
    assert lease.backfill == "nightly"  # not removed: its workers might still be calling; it lapses instead


def test_burla_with_a_local_root_is_refused_before_any_call(tmp_path):
    store = ManifestStore(str(tmp_path))
    backfill = _backfill("nightly")
    plan_backfill(backfill, store)
    with pytest.raises(ConfigError, match="burla workers cannot read the leases in the local folder"):
        run_attempt(backfill, store, BurlaExecutor())
    assert LocalLeases(str(tmp_path)).read("api") == []


@pytest.mark.parametrize(
    ("fields", "named"),
    [({"share": 0}, "share must be a positive number"), ({"min_share": 1.0}, "min_share must be in [0, 1)")],
)
def test_a_share_that_cannot_be_used_is_refused_with_the_field(fields, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        _backfill("nightly", **fields)


def test_the_store_lists_the_services_that_have_leases(store):
    assert store.services() == []
    store.write(lease_for("nightly"), None)
    store.write(dataclasses.replace(lease_for("crawl"), service="site"), None)
    assert store.services() == ["api", "site"]


def connection_holders(tmp_path, running: tuple[int, int], newcomer: tuple[int, int]):
    """A running backfill of a database and a newcomer, each as (workers, connection cap), both leases written."""
    store = LocalLeases(str(tmp_path))
    holders = []
    for backfill, (workers, cap) in (("nightly", running), ("adhoc", newcomer)):
        lease = new_lease("db", backfill, 0, "run", 1.0, 0.0, {}, workers, connection_cap=cap)
        holders.append(LeaseHolder(store, lease, TIMING))
        holders[-1].acquire()
    return store, *holders


def test_a_newcomer_takes_the_connections_left_and_writes_what_it_took(tmp_path):
    store, _, newcomer = connection_holders(tmp_path, (1, 3), (3, 3))
    assert newcomer.wait_for_connections(3, 3, on_wait=lambda held, cap: None) == 2
    assert {lease.backfill: lease.connections for lease in store.read("db")} == {"nightly": 1, "adhoc": 2}


def test_a_newcomer_waits_for_a_connection_and_holds_none_meanwhile(tmp_path):
    store, running, newcomer = connection_holders(tmp_path, (2, 2), (2, 2))
    told, held_while_waiting = [], []

    def sleep(seconds: float) -> None:
        held_while_waiting.append(next(x.connections for x in store.read("db") if x.backfill == "adhoc"))
        running.release()

    got = newcomer.wait_for_connections(2, 2, on_wait=lambda held, cap: told.append((held, cap)), sleep=sleep)
    assert got == 2 and told == [(2, 2)] and held_while_waiting == [0]


def test_the_smallest_connection_cap_any_live_lease_declares_holds(tmp_path):
    _, _, newcomer = connection_holders(tmp_path, (1, 2), (4, 10))
    assert newcomer.wait_for_connections(4, 10, on_wait=lambda held, cap: None) == 1


def test_a_workers_watches_travel_empty_and_end_with_their_lease(tmp_path):
    """The worker goes to Burla pickled, watches and all: a running watch (a thread) must not go with it."""
    store = LocalLeases(str(tmp_path))
    timing = LeaseTiming(reread_s=0.05, stale_s=0.2, skew_s=0.05, ttl_s=1.0, renew_s=0.05)
    holder = LeaseHolder(store, lease_for("nightly"), timing)
    lease = holder.acquire()
    watches = Watches()
    watch = watches.of(ShareTicket(str(tmp_path), None, "api", lease.lease_id, BUDGET, timing))
    assert watches.of(ShareTicket(str(tmp_path), None, "api", lease.lease_id, BUDGET, timing)) is watch
    assert cloudpickle.loads(cloudpickle.dumps(watches))._by_lease == {}
    holder.release()
    watch._thread.join(timeout=5)
    assert not watch._thread.is_alive(), "the watch ends once its lease is gone"
