"""The chunk's client: which failures mean it is gone (per client kind), and how a full database is waited out."""

import random

import httpx
import psycopg
import pytest

from pipeline.connection import CAPACITY_MAX_WAIT_S, RECONNECT_WAITS_S, CapacityBackoff, ChunkClient, ConnectionLost
from pipeline.outcomes import Failure
from pipeline.pacing.memory import WorkerMemory
from pipeline.work import FunctionWork
from pipeline.workloads.scrape import ScrapeWork
from tests.simclock import FakeClock

A_CALL_FAILED = Failure("exception", False, "RuntimeError: Cannot send a request, as the client has been closed.")


def _opened(work) -> ChunkClient:
    connection = ChunkClient(work)
    connection.open()
    return connection


@pytest.mark.parametrize(
    "work",
    [
        FunctionWork(lambda: httpx.Client(), lambda client, item: None),
        ScrapeWork(selectors={"h": "h1"}),
    ],
    ids=["httpx client", "scrape session"],
)
def test_a_closed_client_is_broken_and_an_open_one_is_not(work):
    connection = _opened(work)
    assert not connection.broken(A_CALL_FAILED), "one failed call on a live client is that call's problem"
    connection.client.close()
    assert connection.broken(A_CALL_FAILED), "a closed client fails every later call: replace it"
    connection.close()


def test_a_transport_failure_always_replaces_the_client():
    connection = _opened(FunctionWork(lambda: object(), lambda client, item: None))
    assert connection.broken(Failure("connection", True, "ConnectError: [Errno 111] Connection refused"))


# -- capacity: a refused login is waited out on simulated time ------------------------------------


def _refusal() -> psycopg.OperationalError:
    """What psycopg raises at login when the role is full (no SQLSTATE at login: the server's words)."""
    return psycopg.OperationalError('connection failed: FATAL:  too many connections for role "loader"')


class _Crowded:
    """A connect that is refused ``refusals`` times, then gets in; it records when each login came."""

    def __init__(self, clock: FakeClock, refusals: int):
        self.clock, self.left, self.logins = clock, refusals, []

    def __call__(self) -> object:
        self.logins.append(self.clock.now)
        if self.left:
            self.left -= 1
            raise _refusal()
        return object()


def _client(connect, clock: FakeClock, memory: WorkerMemory | None = None, **backoff) -> ChunkClient:
    work = FunctionWork(connect, lambda client, item: None)
    return ChunkClient(
        work, clock.sleep, memory=memory, clock=clock, rng=random.Random(7), backoff=CapacityBackoff(**backoff)
    )


def test_a_refused_login_waits_and_gets_in():
    clock = FakeClock()
    connect = _Crowded(clock, refusals=5)
    connection = _client(connect, clock)
    assert connection.open() is not None
    assert connection.refused == 5
    gaps = [b - a for a, b in zip(connect.logins, connect.logins[1:])]
    ceilings = [CapacityBackoff().ceiling_s(level) for level in range(1, 6)]
    assert ceilings == [0.05, 0.1, 0.2, 0.4, 0.8], "each refusal doubles the longest wait"
    assert all(0 <= gap <= ceiling for gap, ceiling in zip(gaps, ceilings))


def test_waits_never_exceed_their_ceiling_and_jitter_comes_from_the_injected_rng():
    def logins(seed_clock: FakeClock) -> list[float]:
        connect = _Crowded(seed_clock, refusals=30)
        _client(connect, seed_clock).open()
        return connect.logins

    first, second = logins(FakeClock()), logins(FakeClock())
    assert first == second, "same seed, same waits: the test is on simulated time"
    gaps = [b - a for a, b in zip(first, first[1:])]
    assert max(gaps) <= CAPACITY_MAX_WAIT_S
    assert len(set(gaps)) == len(gaps), "full jitter: no two waits alike"


def test_a_database_full_for_the_whole_budget_fails_the_chunk_as_capacity():
    clock = FakeClock()
    connect = _Crowded(clock, refusals=10**9)
    connection = _client(connect, clock, budget_s=60.0)
    with pytest.raises(ConnectionLost) as lost:
        connection.open()
    failure = lost.value.failure
    assert (failure.status, failure.retryable, failure.capacity) == ("capacity", True, True)
    assert 60.0 <= clock.now <= 60.0 + 1e-9, "waits until the budget and not a moment longer"
    # Up to the ceiling: ~7 logins; then about one per CAPACITY_MAX_WAIT_S / 2 on average.
    assert connection.refused == len(connect.logins) <= 7 + 3 * 60 / CAPACITY_MAX_WAIT_S


def test_a_failure_that_is_not_about_room_is_raised_at_once():
    clock = FakeClock()

    def connect():
        raise ConnectionRefusedError("database is down")

    with pytest.raises(ConnectionRefusedError):
        _client(connect, clock).open()
    assert clock.now == 0.0


def test_a_crowded_worker_resumes_its_backoff_at_its_level_and_recovers_by_halving():
    clock, run = FakeClock(), WorkerMemory().of_run("crowd")
    connect = _Crowded(clock, refusals=6)
    _client(connect, clock, run).open()
    assert run.crowding == 6
    logins_before, waited_from = len(connect.logins), clock.now
    _client(connect, clock, run).open()
    assert len(connect.logins) == logins_before + 1, "it got in at the first login of its next chunk"
    assert 0 < clock.now - waited_from <= CapacityBackoff().ceiling_s(1), "after letting its last slot free up"
    assert run.crowding == 3, "a connect that got in at once halves the level"
    connect.left = 1
    before = clock.now
    _client(connect, clock, run).open()
    assert run.crowding == 4, "refused again: the backoff resumes at its level, plus one"
    assert clock.now - before <= CapacityBackoff().ceiling_s(1) + CapacityBackoff().ceiling_s(4)
    for _ in range(3):  # 4 -> 2 -> 1 -> 0
        _client(connect, clock, run).open()
    assert run.crowding == 0, "the database has room again: the worker connects at once"


def test_a_reconnect_refused_for_room_waits_without_using_up_the_reconnects():
    clock = FakeClock()
    connect = _Crowded(clock, refusals=0)
    connection = _client(connect, clock)
    connection.open()
    connect.left = 3 * len(RECONNECT_WAITS_S)
    assert connection.replace() is not None
    assert connection.reconnects == 1 and connection.refused == 3 * len(RECONNECT_WAITS_S)
