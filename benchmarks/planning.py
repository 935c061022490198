"""Planning ten million ids from a text file: seconds and peak memory.

Each run is a fresh subprocess that calls ``plan_backfill`` (TextLines ->
normalize -> derive the execution plan -> make_plan -> write the plan
Parquet) and reports its own peak resident memory (the kernel's high-water
mark, see ``common.peak_rss_bytes``), so the number is the planner's and
nothing else's. A child that only imports the same modules gives the
interpreter's own share, and one more child times the stages separately so a
slow stage can be found.

    python -m benchmarks.planning [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from benchmarks.common import Outcome, main, median, peak_rss_bytes, run_child, spread, stopwatch, write_ids
from pipeline.backfill import Backfill, plan_backfill
from pipeline.items import TextLines, normalize
from pipeline.limits import ServiceLimit
from pipeline.manifests import ManifestStore
from pipeline.plan import make_plan
from pipeline.work import FunctionWork

NAME = "planning"
SIZES = {False: 10_000_000, True: 200_000}
RUNS = {False: 3, True: 2}
GOAL_SECONDS, GOAL_BYTES = 10.0, 1.5e9
LIMIT = ServiceLimit("api", requests_per_second=1000)
STAGES = ("read", "normalize", "make_plan", "write")


def _backfill(ids_path: str) -> Backfill:
    return Backfill(NAME, TextLines(ids_path), FunctionWork(lambda: None, lambda client, item: None), LIMIT)


def child_plan(ids_path: str, root: str) -> dict[str, float]:
    """In the child: the real entry point, timed from the first byte read to the plan written."""
    with stopwatch() as elapsed:
        result = plan_backfill(_backfill(ids_path), ManifestStore(root))
    return {"seconds": elapsed(), "items": result.plan.num_rows, "chunks": result.chunks}


def child_stages(ids_path: str, root: str) -> dict[str, float]:
    """In the child: the stages plan_backfill runs, each with its time and the peak memory so far."""
    backfill, store = _backfill(ids_path), ManifestStore(root)
    result: dict[str, float] = {}

    def done(stage: str, started: float) -> None:
        result[stage] = time.perf_counter() - started
        result[f"{stage}_peak"] = peak_rss_bytes()

    started = time.perf_counter()
    table = backfill.source.read()
    done("read", started)
    started = time.perf_counter()
    items, _ = normalize(table)
    del table
    done("normalize", started)
    started = time.perf_counter()
    plan = make_plan(items, backfill.execution_plan(items.num_rows).chunk_size)
    done("make_plan", started)
    started = time.perf_counter()
    store.write_table(store.plan_path(NAME, 0), plan)
    done("write", started)
    return result


def _child(mode: str, ids_path: str, root: str) -> None:
    result = {"plan": child_plan, "stages": child_stages, "imports": lambda *_: {}}[mode](ids_path, root)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result), flush=True)


def _spawn(mode: str, ids_path: str, root: str) -> tuple[dict, float]:
    """Run one child; (its JSON result plus its wall time, its peak RSS in bytes)."""
    with stopwatch() as wall:
        result = run_child(["-m", "benchmarks.planning", "--child", mode, ids_path, root], timeout=600)
    result["wall_seconds"] = wall()
    return result, result["peak_rss_bytes"]


def run(quick: bool) -> Outcome:
    """Seconds and peak memory to plan ten million ids from a text file."""
    count, runs = SIZES[quick], RUNS[quick]
    with tempfile.TemporaryDirectory(prefix="paceline-bench-planning-") as tmp:
        ids_path = os.path.join(tmp, "ids.txt")
        write_ids(ids_path, count)
        file_bytes = os.path.getsize(ids_path)
        _, import_rss = _spawn("imports", ids_path, tmp)
        plans = [_spawn("plan", ids_path, os.path.join(tmp, f"store-{n}")) for n in range(runs)]
        stages, _ = _spawn("stages", ids_path, os.path.join(tmp, "stages"))
    seconds = [p["seconds"] for p, _ in plans]
    peaks = [rss for _, rss in plans]
    if any(p["items"] != count for p, _ in plans):
        raise RuntimeError(f"planning lost items: {[p['items'] for p, _ in plans]} of {count}")
    outcome = Outcome(NAME, f"{count:,} ids planned in {median(seconds):.2f} s, peak {median(peaks) / 1e9:.2f} GB")
    outcome.row("ids, file size", f"{count:,}, {file_bytes / 1e6:,.0f} MB")
    outcome.row("runs (fresh subprocess each)", str(runs))
    outcome.row("plan_backfill seconds", f"{median(seconds):.2f} ({spread(seconds)})")
    outcome.row("peak RSS of the child", f"{median(peaks) / 1e6:,.0f} MB ({spread([p / 1e6 for p in peaks])} MB)")
    outcome.row("  of which interpreter + imports", f"{import_rss / 1e6:,.0f} MB")
    outcome.row("stages read / normalize / make_plan / write (s)", " / ".join(f"{stages[s]:.2f}" for s in STAGES))
    outcome.row("  peak RSS after each stage (MB)", " / ".join(f"{stages[s + '_peak'] / 1e6:,.0f}" for s in STAGES))
    outcome.row("child wall time incl. start-up", f"{median([p['wall_seconds'] for p, _ in plans]):.2f} s")
    outcome.metrics.update(
        ids=count,
        seconds=median(seconds),
        peak_rss_bytes=median(peaks),
        import_rss_bytes=import_rss,
        chunks=plans[0][0]["chunks"],
        **{f"stage_{s}_s": stages[s] for s in STAGES},
    )
    outcome.goal(f"under {GOAL_SECONDS:g} s", median(seconds) < GOAL_SECONDS, f"{median(seconds):.2f} s")
    outcome.goal(f"under {GOAL_BYTES / 1e9:g} GB", max(peaks) < GOAL_BYTES, f"max {max(peaks) / 1e9:.2f} GB")
    return outcome


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        raise SystemExit(main(NAME, run))
