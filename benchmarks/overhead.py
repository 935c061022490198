"""Engine overhead: a no-op ``call`` over a million items, Paceline end to end vs a raw thread pool.

Paceline side: ``plan_backfill`` from a text file, ``run_attempt`` on the
LocalExecutor (one Parquet manifest per chunk), then the failed items from the
ledger. Baseline side, written the way the Burla docs write a batch job: read
the ids, chunk them in Python lists, a ThreadPoolExecutor over the chunks, each
chunk returning its rows as dicts (per-item try/except), the main thread
writing JSON lines and collecting the failed ids. Same process, same number of
workers, same chunk size, same work function; the order of the two
alternates between runs, and the ratio is taken per run (paired), then the
median.

The limit declares connections only (no rate), and the latency estimate is a
microsecond: the engine uses the latency estimate as the minimum spacing of a
worker's calls when no rate is declared, so a realistic estimate (50 ms) would
measure pacing, not overhead.

It also prints the CPU cost per item of each piece, timed single-threaded
(with the GIL, threads add no CPU, so these costs add up): the chunk runner,
the pickle round trip the LocalExecutor does per chunk, building and writing
a manifest; and the baseline's chunk function and JSON line. For a
line-level profile: ``py-spy record --gil -f raw -o profile.txt -- python -m
benchmarks.overhead`` (py-spy is not a project dependency).

    python -m benchmarks.overhead [--quick]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import cloudpickle
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import Outcome, main, median, spread, stopwatch, write_ids
from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.chunks import Chunk
from pipeline.compaction import compact_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import TextLines
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, ServiceLimit, derive_plan
from pipeline.manifests import ManifestStore, compacted_name, result_table
from pipeline.plan import make_plan
from pipeline.runner import run_chunk
from pipeline.work import FunctionWork

NAME = "overhead"
SIZES = {False: 1_000_000, True: 50_000}
RUNS = {False: 3, True: 3}
WARM_UP_ITEMS = 1_000
LIMIT = ServiceLimit("noop", safe_connections=8, safety=0.5)  # 4 workers, no rate: pacing is (almost) zero
ESTIMATES = Estimates(seconds_per_call=1e-6)
COMPACTED_CHUNKS = 20  # chunk files in the block whose compaction is timed


def noop_call(client: Any, item: Any) -> None:
    """The work itself costs nothing, so whatever time is spent is the harness's."""
    return None


def paceline(ids_path: str, root: str) -> dict[str, float]:
    """Plan, execute, failed items; seconds per stage."""
    backfill = Backfill(NAME, TextLines(ids_path), FunctionWork(lambda: None, noop_call), LIMIT, ESTIMATES)
    store = ManifestStore(root)
    with stopwatch() as plan:
        planned = plan_backfill(backfill, store)
    with stopwatch() as execute:
        result = run_attempt(backfill, store, LocalExecutor())
    with stopwatch() as failed:
        with Ledger(store, backfill.max_attempts, backfill.name) as ledger:
            failed_rows = ledger.failed_items(backfill.name).num_rows
    items = planned.plan.num_rows
    if result.counts["ok"] != items or failed_rows != 0:
        raise RuntimeError(f"paceline run lost items: {result.counts}, {failed_rows} failed")
    return {"plan": plan(), "execute": execute(), "failed": failed(), "items": items}


def baseline(ids_path: str, out_path: str, workers: int, chunk_size: int) -> dict[str, float]:
    """The raw thread pool over chunks writing JSON lines; seconds per stage."""
    with stopwatch() as plan:
        with open(ids_path) as lines:
            ids = [line.strip() for line in lines if line.strip()]
        chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    with stopwatch() as execute:
        failed: list[str] = []
        written = 0
        with ThreadPoolExecutor(max_workers=workers) as pool, open(out_path, "w") as out:
            for future in as_completed([pool.submit(_baseline_chunk, chunk) for chunk in chunks]):
                for row in future.result():
                    out.write(json.dumps(row) + "\n")
                    written += 1
                    if not row["ok"]:
                        failed.append(row["id"])
    if written != len(ids) or failed:
        raise RuntimeError(f"baseline lost items: {written} written of {len(ids)}, {len(failed)} failed")
    return {"plan": plan(), "execute": execute(), "failed": 0.0, "items": len(ids)}


def _baseline_chunk(chunk: list[str]) -> list[dict[str, Any]]:
    rows = []
    for item_id in chunk:
        try:
            rows.append({"id": item_id, "ok": True, "result": noop_call(None, item_id), "error": None})
        except Exception as error:  # noqa: BLE001 - the raw pattern: every item gets a row
            rows.append({"id": item_id, "ok": False, "result": None, "error": repr(error)})
    return rows


def cpu_per_item(chunk_size: int, root: str) -> dict[str, float]:
    """Microseconds per item of each piece, single-threaded, best of five over one chunk.

    The manifest is split in its three steps (building the Arrow table,
    encoding Parquet, making the file durable: temp file, fsync, rename,
    fsync of the folder); compaction is one block of ``COMPACTED_CHUNKS``
    such chunk files, per item.
    """
    ids = [f"user-{i:09d}" for i in range(chunk_size)]
    chunk = Chunk(NAME, 0, "profile", 0, ids, [None] * chunk_size, derive_plan(LIMIT, ESTIMATES).pacing)
    work = FunctionWork(lambda: None, noop_call)
    result = run_chunk(work, chunk)
    table = result_table(result)
    rows = _baseline_chunk(ids)
    store = ManifestStore(root)
    encoded = pa.BufferOutputStream()
    pq.write_table(table, encoded, use_dictionary=False)
    data = encoded.getvalue()
    planned = [f"user-{i:09d}" for i in range(chunk_size * COMPACTED_CHUNKS)]
    items = pa.table({"item_id": planned, "payload": pa.nulls(len(planned), pa.string())})
    store.write_table(store.plan_path(NAME, 0), make_plan(items, chunk_size))

    def durable_write() -> None:
        store.write_file(store.chunk_path(NAME, 0, 0), lambda temp: pa.OSFile(temp, "wb").write(data))

    def compaction() -> None:
        for chunk_id in range(COMPACTED_CHUNKS):
            path = store.chunk_path(NAME, 0, chunk_id)
            with open(path, "wb") as out:  # generated: not what is timed
                out.write(data.to_pybytes())
        started = time.perf_counter()
        compact_attempt(store, NAME, 0)
        elapsed.append((time.perf_counter() - started) / COMPACTED_CHUNKS)
        store.remove(f"{store.attempt_dir(NAME, 0)}/{compacted_name(range(COMPACTED_CHUNKS))}")

    elapsed: list[float] = []
    pieces: dict[str, Callable[[], object]] = {
        "runner (run_chunk)": lambda: run_chunk(work, chunk),
        "pickle round trip (chunk + result)": lambda: (
            cloudpickle.loads(cloudpickle.dumps(chunk)) and cloudpickle.loads(cloudpickle.dumps(result))
        ),
        "manifest: result_table": lambda: result_table(result),
        "manifest: Parquet encoding": lambda: pq.write_table(table, pa.BufferOutputStream(), use_dictionary=False),
        "manifest: durable file (temp, fsync, rename, fsync folder)": durable_write,
        "baseline chunk function": lambda: _baseline_chunk(ids),
        "baseline JSON lines": lambda: [json.dumps(row) for row in rows],
    }
    found = {name: _best_of(piece, 5) / chunk_size * 1e6 for name, piece in pieces.items()}
    for _ in range(3):
        compaction()
    found["compaction (one block, per item)"] = min(elapsed) / chunk_size * 1e6
    return found


def _best_of(piece: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        piece()
        times.append(time.perf_counter() - started)
    return min(times)


def run(quick: bool) -> Outcome:
    """Paceline end to end vs a raw thread pool, no-op work: items/s and the ratio."""
    count, runs = SIZES[quick], RUNS[quick]
    execution = derive_plan(LIMIT, ESTIMATES, item_count=count)  # what run_attempt will derive
    workers, chunk_size = execution.max_parallelism, execution.chunk_size
    pace: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="paceline-bench-overhead-") as tmp:
        ids_path, warm_up = os.path.join(tmp, "ids.txt"), os.path.join(tmp, "warm-up.txt")
        write_ids(ids_path, count)
        write_ids(warm_up, WARM_UP_ITEMS)
        paceline(warm_up, os.path.join(tmp, "warm-up"))  # first-use costs (DuckDB, Arrow kernels) stay out of run 1
        baseline(warm_up, os.path.join(tmp, "warm-up.jsonl"), workers, chunk_size)
        for number in range(runs):
            order = ("paceline", "baseline") if number % 2 == 0 else ("baseline", "paceline")
            for side in order:
                if side == "paceline":
                    pace.append(paceline(ids_path, os.path.join(tmp, f"store-{number}")))
                else:
                    base.append(baseline(ids_path, os.path.join(tmp, f"rows-{number}.jsonl"), workers, chunk_size))
        cpu = cpu_per_item(chunk_size, os.path.join(tmp, "profile"))
    outcome = _outcome(count, runs, workers, chunk_size, pace, base)
    for piece, micros in cpu.items():
        outcome.row(f"CPU per item, single thread: {piece}", f"{micros:.2f} us")
    outcome.metrics.update({f"cpu_us_{piece.split(' (')[0].replace(' ', '_')}": us for piece, us in cpu.items()})
    return outcome


def _total(stages: dict[str, float]) -> float:
    return stages["plan"] + stages["execute"] + stages["failed"]


def _outcome(
    count: int, runs: int, workers: int, chunk_size: int, pace: list[dict[str, float]], base: list[dict[str, float]]
) -> Outcome:
    pace_rates = [count / _total(p) for p in pace]
    base_rates = [count / _total(b) for b in base]
    ratios = [p / b for p, b in zip(pace_rates, base_rates)]
    ratio = median(ratios)
    outcome = Outcome(
        NAME, f"Paceline {median(pace_rates):,.0f} items/s vs raw {median(base_rates):,.0f} items/s (ratio {ratio:.2f})"
    )
    outcome.row("items, workers, chunk size", f"{count:,}, {workers}, {chunk_size:,}")
    outcome.row("runs", f"{runs} (median; min..max in brackets)")
    outcome.row("Paceline items/s", f"{median(pace_rates):,.0f} ({spread(pace_rates)})")
    outcome.row("raw baseline items/s", f"{median(base_rates):,.0f} ({spread(base_rates)})")
    outcome.row("ratio Paceline / baseline", f"{ratio:.2f} ({spread(ratios)}, paired per run)")
    for label, runs_ in (("Paceline", pace), ("baseline", base)):
        outcome.row(
            f"{label} seconds plan / execute / failed",
            " / ".join(f"{median([r[stage] for r in runs_]):.2f}" for stage in ("plan", "execute", "failed")),
        )
    outcome.metrics.update(
        items=count,
        workers=workers,
        chunk_size=chunk_size,
        paceline_items_per_s=median(pace_rates),
        baseline_items_per_s=median(base_rates),
        ratio=ratio,
        **{f"paceline_{s}_s": median([p[s] for p in pace]) for s in ("plan", "execute", "failed")},
        **{f"baseline_{s}_s": median([b[s] for b in base]) for s in ("plan", "execute")},
    )
    outcome.goal("Paceline at least as fast as the raw baseline", ratio >= 1.0, f"ratio {ratio:.2f}")
    return outcome


if __name__ == "__main__":
    raise SystemExit(main(NAME, run))
