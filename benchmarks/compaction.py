"""Manifests at scale: compaction that keeps up with the run, the ledger's questions, kill -9 during compaction.

Keeping up: a real ``run_attempt`` of no-op work in chunks of 10 items,
20,000 and 200,000 chunk files, unpaced (chunk files come as fast as the
engine writes them: the hardest case for a compactor to keep up with), once
with background compaction (the default) and once compacting at the end
only (``compaction=None``, the code before), in the same process: the run's
seconds and the tail, from the last chunk written (the last progress
callback) to ``run_attempt`` returning, which includes the ledger's report.

At scale: ten million items as two attempts of one backfill (the
``failed_query`` rows: 5 % fail first, half of the retried fail again),
written as 1,000, 20,000 and 200,000 chunk files with their chunk plans, at
the store's real paths. For each: the questions a Dagster run asks (open the
ledger, ``failed_items``, ``counts``) on the chunk files, then ``compact`` in
a child process (its time and peak memory), then the same questions on the
compacted files (median of several runs). The same at 20,000 chunk files on
moto's S3 server.

Kill -9: a run (200,000 items in 4,000 chunks, blocks of 20,000 rows) is
killed with SIGKILL in a child at a named point of its background
compaction (seeded: which point, and which occurrence of it). Afterwards the
ledger must hold every finished chunk's rows exactly once, and a resumed
run must finish the attempt with the counts equal to the truth, calling
only the unfinished chunks, and compact it whole.

    python -m benchmarks.compaction [--quick] [--only keep,scale,s3,kills]
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import (
    PYTHON,
    Outcome,
    child_env,
    main,
    median,
    peak_rss_bytes,
    run_child,
    stopwatch,
    write_ids,
)
from benchmarks.failed_query import FAIL_FIRST, FAIL_RETRY, PERMANENT_FIRST, manifest_table, measure
from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.background_compaction import Background
from pipeline.compaction import CRASH_POINTS, compact
from pipeline.executors import LocalExecutor
from pipeline.items import TextLines
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices.s3 import start_s3
from pipeline.manifests import ManifestStore
from pipeline.outcomes import Permanent, Retryable
from pipeline.plan import make_plan
from pipeline.work import FunctionWork

NAME = "compaction"
BACKFILL = "bench"
ITEMS = {False: 10_000_000, True: 50_000}
FILES = {False: (1_000, 20_000, 200_000), True: (100, 1_000)}
S3_ITEMS, S3_FILES = {False: 1_000_000, True: 10_000}, {False: 20_000, True: 100}
KEEP_CHUNKS, KEEP_CHUNK_ITEMS = {False: (20_000, 200_000), True: (500,)}, 10
BEFORE_UP_TO = 20_000  # the questions on 200,000 chunk files take 7 minutes and do not depend on compaction
THREAD_UP_TO = 20_000  # also run compaction on a thread, for the comparison (at 200,000 it adds 7 minutes)
TRIAL_ITEMS, TRIAL_CHUNK_ITEMS, TRIAL_BLOCK_ROWS = (
    {False: 200_000, True: 10_000},
    50,
    {False: 20_000, True: 1_000},
)  # ten blocks, so kills land in early blocks (the run still going) and in the last ones
TRIALS = {False: 12, True: 2}
RUNS_AFTER = {False: 3, True: 2}
GOAL_QUESTIONS_S, GOAL_TAIL_S = 3.0, 5.0


def sevens_retry_nines_fail(client: object, item: object) -> None:
    """No-op work with known failures: ids ending in 7 fail retryably, in 9 for good."""
    if item.id.endswith("7"):
        raise Retryable("flaky", "http_503")
    if item.id.endswith("9"):
        raise Permanent("gone", "http_404")


def _noop_backfill(ids_path: str, chunk_items: int) -> Backfill:
    return Backfill(
        BACKFILL,
        TextLines(ids_path),
        FunctionWork(lambda: None, sevens_retry_nines_fail),
        ServiceLimit("noop", safe_connections=8, safety=0.5),  # 4 workers, unpaced
        Estimates(seconds_per_call=1e-6),
        overrides=Overrides(chunk_size=chunk_items),
    )


def _timed_run(root: str, ids_path: str, background: Background | None) -> dict[str, float]:
    """One attempt: the run's seconds, and the tail from the last chunk written to run_attempt's return."""
    store = ManifestStore(root)
    backfill = _noop_backfill(ids_path, KEEP_CHUNK_ITEMS)
    plan_backfill(backfill, store)
    last_written = [0.0]
    with stopwatch() as running:
        result = run_attempt(
            backfill,
            store,
            LocalExecutor(),
            on_progress=lambda _: last_written.__setitem__(0, time.perf_counter()),
            compaction=background,
        )
        ended = time.perf_counter()
    if result.counts["items"] != result.attempt_rows or result.compaction.blocks_waiting:
        raise RuntimeError(f"{root}: {result.counts}, {result.compaction.describe()}")
    return {
        "run_s": running(),
        "tail_s": ended - last_written[0],
        "files_after": result.compaction.files_after,
        "load": os.getloadavg()[0],
    }


def keeping_up(outcome: Outcome, quick: bool) -> None:
    """The tail of a run with background compaction against compaction at the end, same process."""
    for chunks in KEEP_CHUNKS[quick]:
        with tempfile.TemporaryDirectory(prefix="paceline-bench-keep-") as tmp:
            ids_path = os.path.join(tmp, "ids.txt")
            write_ids(ids_path, chunks * KEEP_CHUNK_ITEMS)
            background = _timed_run(os.path.join(tmp, "background"), ids_path, Background())
            at_end = _timed_run(os.path.join(tmp, "at-end"), ids_path, None)
            thread = None
            if chunks <= THREAD_UP_TO:
                thread = _timed_run(os.path.join(tmp, "thread"), ids_path, Background(process=False))
        in_thread = ""
        if thread is not None:
            in_thread = (
                f"; on a thread instead of a process: tail {thread['tail_s']:.2f} s, run {thread['run_s']:.1f} s "
                f"(load {thread['load']:.1f})"
            )
        _row(
            outcome,
            f"{chunks:,} chunk files of {KEEP_CHUNK_ITEMS} items, unpaced no-op run",
            f"background: tail {background['tail_s']:.2f} s, run {background['run_s']:.1f} s, "
            f"{background['files_after']} files (load {background['load']:.1f}); at the end (before): "
            f"tail {at_end['tail_s']:.2f} s, run {at_end['run_s']:.1f} s (load {at_end['load']:.1f}){in_thread}",
        )
        outcome.metrics.update(
            {
                f"tail_s_{chunks}": background["tail_s"],
                f"run_s_{chunks}": background["run_s"],
                f"tail_at_end_s_{chunks}": at_end["tail_s"],
                f"run_at_end_s_{chunks}": at_end["run_s"],
            }
        )
        outcome.goal(
            f"last chunk written to the attempt's end under {GOAL_TAIL_S:g} s, {chunks:,} chunk files",
            background["tail_s"] < GOAL_TAIL_S,
            f"{background['tail_s']:.2f} s (compacting at the end: {at_end['tail_s']:.2f} s)",
        )


def generate(store: ManifestStore, items: int, chunk_files: int) -> dict[str, int]:
    """Plans and chunk files of two attempts; returns the counts the ledger must find."""
    rng = np.random.default_rng(5)
    numbers = np.arange(items)
    failed = rng.random(items) < FAIL_FIRST
    permanent = failed & (rng.random(items) < PERMANENT_FIRST / FAIL_FIRST)
    chunk_rows = -(-items // chunk_files)
    files = _write_attempt(store, 0, numbers, failed, permanent, chunk_rows)
    retried = numbers[failed & ~permanent]
    failed_again = rng.random(len(retried)) < FAIL_RETRY
    files += _write_attempt(store, 1, retried, failed_again, np.zeros(len(retried), bool), chunk_rows)
    return {
        "items": items,
        "ok": items - int(failed.sum()) + len(retried) - int(failed_again.sum()),
        "failed": int(failed_again.sum()),
        "dead": int(permanent.sum()),
        "last_attempt": 1,
        "rows": items + len(retried),
        "files": files,
    }


def _write_attempt(
    store: ManifestStore, attempt: int, numbers: np.ndarray, failed: np.ndarray, permanent: np.ndarray, chunk_rows: int
) -> int:
    """One attempt's plan (make_plan, as the engine writes it) and one manifest file per chunk."""
    rows = manifest_table(attempt, 0, numbers, failed, permanent)
    plan = make_plan(pa.table({"item_id": rows["item_id"], "payload": pa.nulls(len(rows), pa.string())}), chunk_rows)
    store.write_table(store.plan_path(BACKFILL, attempt), plan)
    rows = rows.set_column(rows.schema.get_field_index("chunk_id"), "chunk_id", plan["chunk_id"])
    chunks = range(0, len(rows), chunk_rows)
    folder = store.attempt_dir(BACKFILL, attempt)
    store.fs.create_dir(folder, recursive=True)

    def write(start: int) -> None:  # generated data: written directly, without the runner's temp + fsync
        chunk = start // chunk_rows
        pq.write_table(rows.slice(start, chunk_rows), store.chunk_path(BACKFILL, attempt, chunk), filesystem=store.fs)

    with ThreadPoolExecutor(8 if not store.is_local else 2) as pool:
        list(pool.map(write, chunks))
    return len(chunks)


def ask(store: ManifestStore) -> dict[str, float | int | dict]:
    """What one Dagster round asks: open the ledger, failed_items, counts (each timed)."""
    found = measure(store)
    return {
        "open_s": found["ledger"],
        "failed_s": found["failed_items"],
        "counts_s": found["counts"],
        "total_s": found["ledger"] + found["failed_items"] + found["counts"],
        "failed_rows": found["failed_rows"],
        "counts": found["counted"],
    }


def _check(asked: dict, expected: dict, where: str) -> None:
    want = {k: expected[k] for k in ("items", "ok", "failed", "dead", "last_attempt")}
    if asked["counts"] != want or asked["failed_rows"] != expected["failed"]:
        raise RuntimeError(
            f"{where}: the ledger found {asked['counts']} and {asked['failed_rows']} failed items, expected {want}"
        )


def _compact_in_child(root: str) -> dict:
    return run_child(["-m", "benchmarks.compaction", "--child", root], timeout=1800)


def _child(root: str) -> None:
    """Compact in a fresh interpreter, so its peak memory is compaction's own; prints JSON."""
    with stopwatch() as elapsed:
        results = compact(ManifestStore(root))
    print(
        json.dumps(
            {
                "seconds": elapsed(),
                "peak_rss_bytes": peak_rss_bytes(),
                "files_after": sum(r.files_after for r in results),
            }
        ),
        flush=True,
    )


def at_scale(outcome: Outcome, quick: bool) -> None:
    """Before/after compaction at each file count, locally."""
    for files in FILES[quick]:
        with tempfile.TemporaryDirectory(prefix="paceline-bench-compaction-") as tmp:
            store = ManifestStore(tmp)
            with stopwatch() as generating:
                expected = generate(store, ITEMS[quick], files)
            before = None
            if files <= BEFORE_UP_TO:
                before = ask(store)
                _check(before, expected, f"{files:,} chunk files")
            compaction = _compact_in_child(tmp)
            after = [ask(store) for _ in range(RUNS_AFTER[quick])]
            for asked in after:
                _check(asked, expected, f"{files:,} files compacted")
        totals = [a["total_s"] for a in after]
        opened, failed, counts = (median([a[k] for a in after]) for k in ("open_s", "failed_s", "counts_s"))
        asked_before = "before not asked (minutes: see BENCHMARKS.md)"
        if before is not None:
            asked_before = (
                f"before {before['total_s']:.2f} s (open {before['open_s']:.2f} + failed {before['failed_s']:.2f}"
                f" + counts {before['counts_s']:.2f}, {before['total_s'] / median(totals):.0f}x the after)"
            )
            outcome.metrics[f"before_s_{files}"] = before["total_s"]
        _row(
            outcome,
            f"{files:,} chunk files ({expected['rows']:,} rows)",
            f"{asked_before}; compaction {compaction['seconds']:.1f} s, peak "
            f"{compaction['peak_rss_bytes'] / 1e6:,.0f} MB, {compaction['files_after']} files; after "
            f"{median(totals):.2f} s (open {opened:.2f} + failed {failed:.2f} + counts {counts:.2f}) "
            f"(generated in {generating():.0f} s, load {os.getloadavg()[0]:.1f})",
        )
        outcome.metrics.update(
            {
                f"after_s_{files}": median(totals),
                f"compaction_s_{files}": compaction["seconds"],
                f"compaction_peak_bytes_{files}": compaction["peak_rss_bytes"],
            }
        )
    largest = max(FILES[quick])
    outcome.goal(
        f"failed items + counts under {GOAL_QUESTIONS_S:g} s after compaction, {largest:,} files",
        outcome.metrics[f"after_s_{largest}"] < GOAL_QUESTIONS_S,
        f"{outcome.metrics[f'after_s_{largest}']:.2f} s",
    )


def on_s3(outcome: Outcome, quick: bool) -> None:
    """The same questions on moto's S3 server, before and after compaction."""
    with start_s3() as s3, _environment(s3.env):
        s3.client().create_bucket(Bucket="bench")
        store = ManifestStore("s3://bench/paceline", s3_endpoint_url=s3.url)
        with stopwatch() as generating:
            expected = generate(store, S3_ITEMS[quick], S3_FILES[quick])
        before = ask(store)
        _check(before, expected, "S3 before")
        with stopwatch() as compacting:
            compact(store)
        after = [ask(store) for _ in range(RUNS_AFTER[quick])]
        for asked in after:
            _check(asked, expected, "S3 after")
    total = median([a["total_s"] for a in after])
    _row(
        outcome,
        f"moto S3, {S3_FILES[quick]:,} chunk files ({expected['rows']:,} rows)",
        f"before {before['total_s']:.2f} s (open {before['open_s']:.2f}); compaction {compacting():.1f} s; "
        f"after {total:.2f} s; {before['total_s'] / total:.0f}x faster (uploaded in {generating():.0f} s)",
    )
    outcome.metrics.update(s3_before_s=before["total_s"], s3_after_s=total, s3_compaction_s=compacting())


def _row(outcome: Outcome, label: str, value: str) -> None:
    """Record a row and print it at once: the full run takes many minutes, and each part stands alone."""
    outcome.row(label, value)
    print(f"  {label}: {value}", flush=True)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """moto's dummy credentials for the length of the S3 measurement, then the environment as it was."""
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def kills(outcome: Outcome, quick: bool) -> None:
    """Kill -9 a run at a named point of its background compaction; the ledger and the resume must be whole."""
    rng = random.Random(20261206)
    held, states = 0, []
    items, block_rows = TRIAL_ITEMS[quick], TRIAL_BLOCK_ROWS[quick]
    chunks = items // TRIAL_CHUNK_ITEMS
    blocks = chunks * TRIAL_CHUNK_ITEMS // block_rows
    with tempfile.TemporaryDirectory(prefix="paceline-bench-kills-") as tmp:
        ids_path = os.path.join(tmp, "ids.txt")
        write_ids(ids_path, items)
        truth = _truth(items)
        for trial in range(TRIALS[quick]):
            point = CRASH_POINTS[trial % len(CRASH_POINTS)]
            last = blocks if point != "chunk_removed" else chunks
            nth = rng.randint(1, last - 1)
            root = os.path.join(tmp, f"trial-{trial}")
            backfill = _noop_backfill(ids_path, TRIAL_CHUNK_ITEMS)
            store = ManifestStore(root)
            plan_backfill(backfill, store)
            killed = subprocess.run(
                [
                    PYTHON,
                    "-m",
                    "benchmarks.compaction",
                    "--run-child",
                    root,
                    ids_path,
                    point,
                    str(nth),
                    str(block_rows),
                ],
                env=child_env(),
                start_new_session=True,  # the run and its compaction process: killed together
            )
            finished = store.scan_chunks(BACKFILL, 0).finished
            files = store.attempt_files(BACKFILL, 0)
            states.append(f"{point}#{nth}: {len(files.compacted)}c/{len(files.covered)}h/{len(files.chunks)}")
            whole = killed.returncode == -signal.SIGKILL and _rows_once(store, len(finished) * TRIAL_CHUNK_ITEMS)
            resumed = run_attempt(backfill, store, LocalExecutor(), compaction=Background(block_rows=block_rows))
            after = store.attempt_files(BACKFILL, 0)
            held += (
                whole
                and resumed.skipped_chunks == len(finished)
                and resumed.counts == truth
                and _rows_once(store, items)
                and not after.chunks
                and not after.covered
            )
    _row(
        outcome,
        "kill -9 during background compaction",
        f"{held}/{TRIALS[quick]} trials whole at the kill and after resume; {chunks:,} chunks in {blocks} blocks; "
        f"point#occurrence: compacted files / chunk files they hold / chunk files alone at the kill: "
        f"{', '.join(states)}",
    )
    outcome.metrics.update(trials=TRIALS[quick], held=held)
    outcome.goal(
        "every kill -9 leaves each finished chunk's rows once, and the resume finishes the attempt exactly",
        held == TRIALS[quick],
        f"{held}/{TRIALS[quick]}",
    )


def _truth(items: int) -> dict[str, int]:
    """The counts of one attempt of ``sevens_retry_nines_fail`` over ``user-000000000`` ..."""
    sevens = sum(1 for i in range(items) if i % 10 == 7)
    nines = sum(1 for i in range(items) if i % 10 == 9)
    return {"items": items, "ok": items - sevens - nines, "failed": sevens, "dead": nines, "last_attempt": 0}


def _rows_once(store: ManifestStore, rows: int) -> bool:
    """The ledger holds ``rows`` rows, every item once."""
    with Ledger(store, 3, BACKFILL) as ledger:
        found = ledger.query("SELECT count(*) AS n, count(DISTINCT item_id) AS d FROM results").to_pylist()
    return found == [{"n": rows, "d": rows}]


def _run_child(root: str, ids_path: str, point: str, nth: str, block_rows: str) -> None:
    """Run the attempt; SIGKILL this process at the ``nth`` time its background compaction reaches ``point``."""
    seen: list[str] = []

    def crash(at: str) -> None:
        seen.append(at)
        if at == point and seen.count(point) == int(nth):  # in the compaction process: kill the run with it
            os.killpg(0, signal.SIGKILL)

    background = Background(block_rows=int(block_rows), crash_hook=crash)
    run_attempt(
        _noop_backfill(ids_path, TRIAL_CHUNK_ITEMS), ManifestStore(root), LocalExecutor(), compaction=background
    )


PARTS = {"keep": keeping_up, "scale": at_scale, "s3": on_s3, "kills": kills}


def run(quick: bool, parts: tuple[str, ...] = tuple(PARTS)) -> Outcome:
    """Compaction keeping up with a run, ledger questions before/after at 1k-200k files and on S3, kill -9."""
    outcome = Outcome(NAME, "")
    for part in parts:
        PARTS[part](outcome, quick)
    found = outcome.metrics
    headline = []
    if "keep" in parts:
        largest = max(KEEP_CHUNKS[quick])
        headline.append(
            f"{largest:,} chunk files: the attempt ends {found[f'tail_s_{largest}']:.2f} s after its last chunk "
            f"(compacting at the end: {found[f'tail_at_end_s_{largest}']:.1f} s)"
        )
    if "scale" in parts:
        largest = max(FILES[quick])
        headline.append(f"failed items + counts {found[f'after_s_{largest}']:.2f} s after compacting {largest:,} files")
    if "kills" in parts:
        headline.append(f"{found['held']}/{found['trials']} kills whole")
    outcome.headline = "; ".join(headline)
    return outcome


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2])
    elif sys.argv[1:2] == ["--run-child"]:
        _run_child(*sys.argv[2:])
    else:
        argv = sys.argv[1:]
        chosen = tuple(PARTS)
        if "--only" in argv:
            at = argv.index("--only")
            chosen, argv = tuple(argv[at + 1].split(",")), argv[:at] + argv[at + 2 :]
        raise SystemExit(main(NAME, lambda quick: run(quick, chosen), argv))
