"""The closed-loop controllers on simulated time: in flight, token cost, start-up stagger, throttled items."""

import itertools
import threading

import pyarrow as pa
import pytest

from pipeline import runner
from pipeline.chunks import Chunk, ChunkResult
from pipeline.outcomes import CallAgain, Throttled
from pipeline.pacing.cost import TokenCost
from pipeline.pacing.inflight import HEADROOM, InFlightLimit
from pipeline.pacing.memory import Learned, WorkerMemory
from pipeline.pacing.schedule import Pacer, Pacing
from pipeline.plan import iter_chunks
from pipeline.policies.throttle import ISOLATED_AFTER
from pipeline.runner import _WorkerLoop, make_chunk_function
from pipeline.work import FunctionWork, WorkHooks
from tests.simclock import FakeClock

# -- in flight: Little's law ------------------------------------------------------------------


def test_slots_follow_littles_law_on_the_measured_latency():
    limit = InFlightLimit(cap=64, latency_s=0.05)
    for _ in range(20):
        limit.on_sample(0.3)
    # 20 calls/s x 0.3 s = 6 calls in flight on average, plus headroom for the spread
    assert limit.limit(pace=20.0) == pytest.approx(20 * 0.3 * HEADROOM, abs=1)


def test_slots_rise_fast_and_fall_slowly():
    limit = InFlightLimit(cap=64, latency_s=0.05)
    limit.on_sample(2.0)
    limit.on_sample(2.0)
    risen = limit.limit(pace=10.0)
    assert risen >= 10, "two slow answers are enough to open most of the slots a 2 s service needs"
    limit.on_sample(0.01)
    assert limit.limit(pace=10.0) >= risen - 2, "one fast answer does not take them away"


def test_slots_stay_within_the_cap_and_one_without_a_pace():
    limit = InFlightLimit(cap=8, latency_s=5.0)
    assert limit.limit(pace=100.0) == 8
    assert limit.limit(pace=None) == 1
    assert InFlightLimit(cap=1, latency_s=5.0).limit(pace=100.0) == 1


# -- token cost ---------------------------------------------------------------------------------


def test_token_charge_moves_from_the_declaration_to_what_calls_cost():
    cost = TokenCost(declared=600)
    assert cost.charge(None) == 600
    for used in (280, 320, 300):
        cost.on_usage(used)
    assert cost.charge(None) == pytest.approx(300)
    assert cost.charge(900) == 900, "a work's own per-item estimate wins over the running mean"


def test_a_works_own_estimates_are_scaled_by_what_they_turned_out_to_cost():
    cost = TokenCost(declared=140)
    assert cost.charge(140) == 140, "nothing measured yet: the estimate as it is"
    for estimate, used in ((140, 70), (200, 100), (100, 50)):
        cost.on_usage(used, estimate)
    assert cost.charge(140) == pytest.approx(70), "estimates came out 2x high: charged half"
    assert cost.charge(300) == pytest.approx(150), "the estimate still says which items are bigger"
    assert cost.per_call == pytest.approx(220 / 3)


def test_token_pace_follows_the_charge_not_the_declaration():
    pacer = Pacer(Pacing(tokens_per_second=100.0, tokens_per_call=600))
    assert pacer.calls_per_second(None) == pytest.approx(100 / 600)
    assert pacer.calls_per_second(300) == pytest.approx(100 / 300)


# -- start-up stagger ---------------------------------------------------------------------------


def test_first_wave_of_chunks_is_spread_over_one_period():
    plan = pa.table(
        {
            "chunk_id": pa.array(range(8), pa.int32()),
            "item_id": [str(i) for i in range(8)],
            "payload": pa.array([None] * 8, pa.string()),
        }
    )
    pacing = Pacing(min_interval_s=0.4)
    chunks = list(iter_chunks(plan, backfill="b", attempt=0, run_id="r", pacing=pacing, first_wave=4))
    assert [c.start_delay_s for c in chunks] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0, 0, 0, 0])


def _starts(workers: int, period: float, stagger: bool) -> list[float]:
    starts = []
    for k in range(workers):
        clock = FakeClock()
        pacer = Pacer(Pacing(min_interval_s=period), clock, clock.sleep)
        pacer.start_after(k * period / workers if stagger else 0.0)
        for _ in range(5):
            pacer.before_call()
            starts.append(clock.now)
    return sorted(starts)


def _busiest(starts: list[float], window: float) -> int:
    return max(sum(t <= s < t + window for s in starts) for t in starts)


def test_staggered_workers_put_no_more_in_the_first_window_than_in_any_later_one():
    window = 0.099  # a window a tenth of one worker's period (a per-minute budget counted per second)
    assert _busiest(_starts(10, 1.0, stagger=False), window) == 10, "unstaggered, all ten call at once"
    assert _busiest(_starts(10, 1.0, stagger=True), window) == 1, "one call per short window from the start"


# -- worker memory ------------------------------------------------------------------------------


def test_a_worker_remembers_for_its_next_chunk_only():
    memory = WorkerMemory().of_run("run-a")
    memory.learned, memory.crowding = Learned(latency_s=1.5, tokens_per_call=300), 3
    assert memory.of_run("run-a").learned == Learned(1.5, 300) and memory.crowding == 3
    assert memory.of_run("run-b").learned is None and memory.crowding == 0, "a worker keeps the latest run only"


def test_workers_running_at_once_never_share_a_memory_and_the_next_resumes_from_one(monkeypatch):
    """The worker hands each live run its own worker memory, and a later run what one left."""
    both_running = threading.Barrier(2)
    memories: dict[int, WorkerMemory] = {}
    real_run_worker = runner.run_worker

    def spy(work, chunks, emit, memory, **options):
        chunk = next(chunks)
        memories[chunk.chunk_id] = memory
        if chunk.chunk_id < 2:
            both_running.wait(timeout=10)  # two workers running at once, on two threads
        return real_run_worker(work, itertools.chain([chunk], chunks), emit, memory, **options)

    monkeypatch.setattr(runner, "run_worker", spy)
    function = make_chunk_function(FunctionWork(lambda: None, lambda client, item: None))
    pacing = Pacing(seconds_per_call=0.25)
    threads = [
        threading.Thread(target=function, args=(Chunk("b", 0, "run", c, [f"{c}"], [None], pacing),)) for c in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert memories[0] is not memories[1], "no worker reads what another measured"
    later = function(Chunk("b", 0, "run", 2, ["later"], [None], Pacing(seconds_per_call=9.0)))
    assert memories[2] in (memories[0], memories[1]), "the next run takes the memory a finished one left"
    assert later.learned.latency_s == 0.25, "so it starts from what that worker learned, not from the estimate"


# -- throttled items do not hold the worker (the chunk loop on a simulated clock) ---------------


_RUNS = itertools.count()


class _Sim:
    """One worker loop on simulated time, and the results it emitted, in order."""

    def __init__(self, call, pacing: Pacing):
        self.clock = FakeClock()
        self.pacing = pacing
        self.run_id = f"sim-{next(_RUNS)}"  # a fresh run: nothing remembered from another test's chunks
        self.emitted: list[tuple[float, ChunkResult]] = []
        work = FunctionWork(lambda: object(), call)
        memory = WorkerMemory().of_run(self.run_id)
        self.loop = _WorkerLoop(work, WorkHooks.of(work), pacing, memory, self._emit, self.clock, self.clock.sleep)

    def _emit(self, result: ChunkResult) -> None:
        self.emitted.append((self.clock.now, result))

    def run(self, *chunk_items: list[str]) -> list[ChunkResult]:
        """Run one chunk per list of item ids; the results in the order they were emitted."""
        chunks = [
            Chunk("b", 0, self.run_id, n, items, [None] * len(items), self.pacing)
            for n, items in enumerate(chunk_items)
        ]
        self.loop.run(iter(chunks))
        return [result for _, result in self.emitted]


def test_an_always_throttled_item_does_not_hold_its_worker():
    pacing = Pacing(min_interval_s=0.1, max_in_flight=1, max_throttle_retries=3)
    calls: list[tuple[float, str]] = []
    clock_ref: list[FakeClock] = []

    def call(client, item):
        calls.append((clock_ref[0].now, item.id))
        if item.id == "hot":
            raise Throttled(retry_after=1.0)
        return {"id": item.id}

    items = [*[f"a{i}" for i in range(ISOLATED_AFTER)], "hot", *[f"x{i}" for i in range(60)]]
    sim = _Sim(call, pacing)
    clock_ref.append(sim.clock)
    (result,) = sim.run(items)
    loop, clock = sim.loop, sim.clock
    rows = {row[0]: row for row in result.rows}
    assert sorted(rows) == sorted(items), "exactly one row per item"
    assert rows["hot"][1:4] == (False, True, "http_429") and rows["hot"][6] == 4, "4 tries, then failed-retryable"
    hot_tries = [t for t, item in calls if item == "hot"]
    assert all(b - a >= 1.0 for a, b in zip(hot_tries, hot_tries[1:])), "each retry waits its Retry-After"
    gaps = [b[0] - a[0] for a, b in zip(calls, calls[1:])]
    assert max(gaps) == pytest.approx(0.1), "never held for a Retry-After, never slowed: calls around it went through"
    assert loop.throttle.factor == 1.0, "a throttle among successes is about its item: the pace stays"
    assert clock.now <= 1.1 * 0.1 * len(calls), "the throttled item cost little more than its own calls"


def test_two_throttles_in_a_row_make_the_worker_wait_the_retry_after():
    pacing = Pacing(min_interval_s=0.1, max_in_flight=1, max_throttle_retries=1)
    calls: list[float] = []
    clock_ref: list[FakeClock] = []

    def call(client, item):
        calls.append(clock_ref[0].now)
        if clock_ref[0].now < 0.15:  # the service is over its limit for the first two calls
            raise Throttled(retry_after=2.0)
        return {}

    sim = _Sim(call, pacing)
    clock_ref.append(sim.clock)
    (result,) = sim.run(["a", "b", "c"])
    assert calls[2] >= calls[1] + 2.0, "two 429s in a row are about the pace: the worker waited as asked"
    assert all(row[1] for row in result.rows), "and every item went through afterwards"


def test_a_prerequisite_call_takes_a_paced_slot_and_the_item_goes_next():
    pacing = Pacing(min_interval_s=0.5, max_in_flight=1)
    calls: list[tuple[float, str]] = []
    clock_ref: list[FakeClock] = []
    fetched: set[str] = set()

    def call(client, item):
        calls.append((clock_ref[0].now, item.id))
        if item.id not in fetched:  # e.g. robots.txt of the item's site, fetched once
            fetched.add(item.id)
            raise CallAgain()
        return {}

    sim = _Sim(call, pacing)
    clock_ref.append(sim.clock)
    (result,) = sim.run(["a", "b"])
    assert [item for _, item in calls] == ["a", "a", "b", "b"]
    assert [t for t, _ in calls] == pytest.approx([0.0, 0.5, 1.0, 1.5]), "every request went through the pacer"
    assert [(row[0], row[1], row[6]) for row in result.rows] == [("a", True, 1), ("b", True, 1)]


def test_call_again_after_a_delay_holds_the_pacer_that_long():
    pacing = Pacing(min_interval_s=0.5, max_in_flight=1)
    calls: list[float] = []
    clock_ref: list[FakeClock] = []

    def call(client, item):
        calls.append(clock_ref[0].now)
        if len(calls) == 1:  # e.g. robots.txt answered "Crawl-delay: 3": the next request waits 3 s
            raise CallAgain(after_s=3.0)
        return {}

    sim = _Sim(call, pacing)
    clock_ref.append(sim.clock)
    (result,) = sim.run(["a", "b"])
    assert calls == pytest.approx([0.0, 3.0, 3.5]), "held 3 s, not just the 0.5 s pace; then the usual pace"
    assert [(row[0], row[1], row[6]) for row in result.rows] == [("a", True, 1), ("b", True, 1)]


def test_at_the_end_of_a_chunk_a_throttled_item_is_left_to_the_retry_round():
    pacing = Pacing(min_interval_s=0.1, max_in_flight=1, max_throttle_retries=3)
    clock_ref: list[FakeClock] = []

    def call(client, item):
        if item.id == "hot":
            raise Throttled(retry_after=1.0)
        return {}

    # the hot item comes one Retry-After before the end of the chunk: its retry is the chunk's last call
    items = [f"x{i}" for i in range(20)] + ["hot"] + [f"y{i}" for i in range(10)]
    sim = _Sim(call, pacing)
    clock_ref.append(sim.clock)
    (result,) = sim.run(items)
    clock = sim.clock
    rows = {row[0]: row for row in result.rows}
    assert sorted(rows) == sorted(items)
    assert rows["hot"][1:4] == (False, True, "http_429") and rows["hot"][6] == 2, "its retry was the last call"
    assert clock.now < 32 * 0.1 + 0.5, "the chunk did not idle through two more Retry-Afters for it"


def test_slots_open_while_the_first_answers_are_still_out():
    limit = InFlightLimit(cap=64, latency_s=0.05)
    assert limit.limit(pace=20.0) == 2, "from the 50 ms estimate"
    assert limit.limit(pace=20.0, waiting_s=1.0) == 30, "a call out for 1 s means the latency is at least 1 s"
