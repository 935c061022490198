"""Backfills in separate processes share one service's budget by lease, judged by the real server.

Two backfill processes, one manifest root, the bundled API enforcing the
declared limit. What is asserted holds however slow the machine is (CI runs
these on 2 cores beside other tests): the server never saw more than the
limit in any second, nothing is lost, and a newcomer sends nothing before
every running worker could have seen its lease. Rates are the benchmark's
business (``benchmarks/shared_budget.py``, BENCHMARKS.md).

The safety (0.9) makes any backfill that ignored the other's lease visible:
one at its whole target beside the other at its half would send 135 calls a
second to a service that allows 100.
"""

import time

from benchmarks.shared_budget import CellSpec, Launch, Proc, spec_for, split_arrivals, start_backfill
from pipeline.localservices import ServiceHandle, start_http_api
from pipeline.localservices._common import busiest_window
from pipeline.shares import LeaseTiming

LIMIT = 100.0
SHORT = LeaseTiming(reread_s=0.25, stale_s=0.75, skew_s=0.25, ttl_s=3.0, renew_s=1.0)  # a crash costs 4 s


def wait_for_calls(api: ServiceHandle, name: str, count: int, timeout_s: float = 30.0) -> None:
    """Until the server has seen ``count`` calls of backfill ``name`` (a process start is slow under load)."""
    deadline = time.monotonic() + timeout_s
    while sum(a["item"].startswith(f"{name}-") for a in api.arrivals() if a.get("item")) < count:
        assert time.monotonic() < deadline, f"{name} sent fewer than {count} calls in {timeout_s:g} s"
        time.sleep(0.1)


def assert_whole(proc: Proc) -> None:
    assert proc.error is None and proc.result is not None, proc.error
    assert proc.result["lost"] == 0 and proc.result["not_ok"] == 0, proc.result


def test_two_processes_hold_the_limit_and_the_newcomer_waits_for_everyone_to_see_it(tmp_path):
    cell = CellSpec("pair", "", (Launch("a", 1, 600, 0.0), Launch("b", 1, 225, 0.0)), limit=LIMIT)
    a_spec, b_spec = (spec_for(launch, "", str(tmp_path), None, cell) for launch in cell.launches)
    with start_http_api(rps=LIMIT, latency_ms=20) as api:
        a = start_backfill({**a_spec, "url": api.url})
        wait_for_calls(api, "a", 20)
        b = start_backfill({**b_spec, "url": api.url})
        for proc in (a, b):
            proc.finish(timeout_s=60)
        arrivals = [x for x in api.settled_arrivals() if x.get("item")]
    seen_a, seen_b = split_arrivals(arrivals, [a, b])
    assert busiest_window([x["t"] for x in arrivals], 1.0) <= LIMIT
    assert not [x for x in arrivals if x["status"] == 429]
    assert_whole(a)
    assert_whole(b)
    assert seen_a.times[-1] > b.lease_at, "a had finished before b took its lease: nothing was shared"
    assert seen_b.times[0] >= b.lease_at + cell.timing.newcomer_wait_s
    assert [share for _, share, _ in b.result["shares"]][:1] == [0.5]


def test_a_killed_backfill_gives_its_share_back_and_its_rerun_loses_nothing(tmp_path):
    cell = CellSpec("kill", "", (Launch("a", 1, 900, 0.0), Launch("b", 1, 300, 0.0)), timing=SHORT, limit=LIMIT)
    a_spec, b_spec = (spec_for(launch, "", str(tmp_path), None, cell) for launch in cell.launches)
    with start_http_api(rps=LIMIT, latency_ms=20) as api:
        a = start_backfill({**a_spec, "url": api.url})
        wait_for_calls(api, "a", 20)
        b = start_backfill({**b_spec, "url": api.url})
        wait_for_calls(api, "b", 30)
        b.kill()
        a.finish(timeout_s=60)
        b.finish(timeout_s=10)
        rerun = start_backfill({**b_spec, "url": api.url, "step": "rerun"})
        rerun.finish(timeout_s=60)
        arrivals = [x for x in api.settled_arrivals() if x.get("item")]
    seen_a, seen_b, _ = split_arrivals(arrivals, [a, b, rerun])
    assert busiest_window([x["t"] for x in arrivals], 1.0) <= LIMIT
    assert not [x for x in arrivals if x["status"] == 429]
    assert_whole(a)
    assert b.result is None and len(seen_b.times) >= 30  # killed mid-run, after it had sent calls
    assert_whole(rerun)  # every one of b's items: one latest row, ok
    regrown = seen_a.times[seen_a.times >= b.killed_at + SHORT.regrow_after_crash_s]
    assert len(regrown) and seen_a.times[-1] - regrown[0] >= 1.0, "a ended before its share could come back"
    assert busiest_window(regrown, 1.0) > 0.6 * cell.target, "a never grew past its half of the target"
