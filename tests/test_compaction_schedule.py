"""The background compactor's decisions, on simulated time: which blocks are ready, and when it may work."""

import pyarrow as pa
import pytest

from pipeline.background_compaction import Background, ReadyBlocks, Schedule
from pipeline.compaction import BLOCK_FILES, blocks_of


def test_a_block_is_ready_once_its_last_chunk_is_written_in_any_order():
    ready = ReadyBlocks([range(0, 3), range(3, 6), range(6, 7)])
    assert [ready.note(c) for c in (4, 0, 5, 2)] == [None, None, None, None]
    assert ready.note(3) == range(3, 6), "chunks 3, 4, 5 all written, the last one out of order"
    assert ready.note(1) == range(0, 3)
    assert ready.ready() == [range(0, 3), range(3, 6)] and ready.waiting == 1


def test_a_chunk_written_twice_or_outside_the_plan_counts_once():
    ready = ReadyBlocks([range(0, 2)], written={0})
    assert ready.note(0) is None and ready.note(99) is None and ready.note(-1) is None
    assert ready.note(1) == range(0, 2) and ready.note(1) is None


def test_blocks_written_before_the_run_are_ready_at_once():
    ready = ReadyBlocks([range(0, 2), range(2, 4)], written={0, 1, 2})
    assert ready.ready() == [range(0, 2)] and repr(ready) == "ReadyBlocks(1 of 2 blocks ready)"


def test_blocks_stop_at_a_thousand_chunk_files_whatever_the_rows():
    tiny = pa.array([i // 5 for i in range(5 * 2_500)], pa.int32())  # 2,500 chunks of 5 items
    assert [len(b) for b in blocks_of(tiny)] == [BLOCK_FILES, BLOCK_FILES, 500]
    big = pa.array([i // 10 for i in range(100)], pa.int32())  # 10 chunks of 10 rows, blocks of 30 rows
    assert blocks_of(big, block_rows=30) == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]


def test_the_schedule_rests_in_proportion_to_the_work_on_a_simulated_clock():
    schedule = Schedule(Background(duty=0.25), [range(0, 2), range(2, 4)])
    assert schedule.next(now=10.0) == range(0, 2)
    schedule.done(started=10.0, now=11.0)  # one second of work at a quarter duty: three of rest
    assert schedule.next(now=11.0) == pytest.approx(3.0)
    assert schedule.next(now=13.5) == pytest.approx(0.5)
    assert schedule.next(now=14.0) == range(2, 4)
    assert schedule.next(now=14.0) is None, "nothing ready: wait for a chunk"


def test_work_share_stays_within_the_duty_over_many_blocks():
    schedule, now, busy = Schedule(Background(duty=0.5)), 0.0, 0.0
    for block in range(20):
        schedule.add(range(block, block + 1))
    while (action := schedule.next(now)) is not None:
        if isinstance(action, float):
            now += action
            continue
        schedule.done(started=now, now=now + 0.8)
        now += 0.8
        busy += 0.8
    assert busy / now == pytest.approx(0.5, abs=0.03)


def test_after_the_last_chunk_the_schedule_stops_resting():
    schedule = Schedule(Background(duty=0.5), [range(0, 1), range(1, 2)])
    assert schedule.next(0.0) == range(0, 1)
    schedule.done(0.0, 2.0)
    assert schedule.next(2.0) == pytest.approx(2.0)
    schedule.hurry()
    assert schedule.next(2.0) == range(1, 2), "the end of the attempt waits for nobody's rest"


def test_a_full_duty_never_rests_and_a_duty_outside_0_1_is_refused():
    assert Background(duty=1.0).rest_after(5.0) == 0.0
    for duty in (0.0, 1.5):
        with pytest.raises(ValueError, match="share of wall time"):
            Background(duty=duty)
