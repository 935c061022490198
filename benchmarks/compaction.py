"""Manifests at scale: the ledger's questions before and after compaction, and compaction under kill -9.

Ten million items as two attempts of one backfill (the ``failed_query``
rows: 5 % fail first, half of the retried fail again), written as 1,000,
20,000 and 200,000 chunk files with their chunk plans, at the store's real
paths. For each: the questions a Dagster run asks (open the ledger,
``failed_items``, ``counts``) on the chunk files, then ``compact`` in a
child process (its time and peak memory), then the same questions on the
compacted files (median of several runs). The same at 20,000 chunk files on
moto's S3 server. Then kill -9 at random moments during compaction:
afterwards the ledger must equal the truth (no row missing or doubled) and
resume must find every chunk finished, before and after a second compaction.

    python -m benchmarks.compaction [--quick]
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
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

from benchmarks.common import PYTHON, Outcome, child_env, main, median, peak_rss_bytes, run_child, stopwatch
from benchmarks.failed_query import FAIL_FIRST, FAIL_RETRY, PERMANENT_FIRST, manifest_table, measure
from pipeline.compaction import compact, compact_attempt
from pipeline.ledger import Ledger
from pipeline.localservices.s3 import start_s3
from pipeline.manifests import ManifestStore
from pipeline.plan import make_plan

NAME = "compaction"
BACKFILL = "bench"
ITEMS = {False: 10_000_000, True: 50_000}
FILES = {False: (1_000, 20_000, 200_000), True: (100, 1_000)}
S3_ITEMS, S3_FILES = {False: 1_000_000, True: 10_000}, {False: 20_000, True: 100}
TRIAL_ITEMS, TRIAL_FILES, TRIAL_BLOCK_ROWS = (
    {False: 200_000, True: 10_000},
    {False: 4_000, True: 200},
    {False: 20_000, True: 1_000},
)  # ten blocks in attempt 0, so kills land between blocks as well as inside one
TRIALS = {False: 12, True: 2}
RUNS_AFTER = {False: 3, True: 2}
GOAL_QUESTIONS_S, GOAL_COMPACTION_S = 3.0, 60.0


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


def _child(root: str, block_rows: str = "0") -> None:
    """Compact in a fresh interpreter, so its peak memory is compaction's own; prints JSON."""
    print("ready", flush=True)
    with stopwatch() as elapsed:
        store = ManifestStore(root)
        if int(block_rows):
            results = [compact_attempt(store, BACKFILL, a, block_rows=int(block_rows)) for a in (0, 1)]
        else:
            results = compact(store)
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
            before = ask(store)
            _check(before, expected, f"{files:,} chunk files")
            compaction = _compact_in_child(tmp)
            after = [ask(store) for _ in range(RUNS_AFTER[quick])]
            for asked in after:
                _check(asked, expected, f"{files:,} files compacted")
        totals = [a["total_s"] for a in after]
        opened, failed, counts = (median([a[k] for a in after]) for k in ("open_s", "failed_s", "counts_s"))
        _row(
            outcome,
            f"{files:,} chunk files ({expected['rows']:,} rows)",
            f"before {before['total_s']:.2f} s (open {before['open_s']:.2f} + failed {before['failed_s']:.2f}"
            f" + counts {before['counts_s']:.2f}); compaction {compaction['seconds']:.1f} s, peak "
            f"{compaction['peak_rss_bytes'] / 1e6:,.0f} MB, {compaction['files_after']} files; after "
            f"{median(totals):.2f} s (open {opened:.2f} + failed {failed:.2f} + counts {counts:.2f}); "
            f"{before['total_s'] / median(totals):.0f}x faster (generated in {generating():.0f} s)",
        )
        outcome.metrics.update(
            {
                f"before_s_{files}": before["total_s"],
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
    outcome.goal(
        f"compaction of {largest:,} chunk files under {GOAL_COMPACTION_S:g} s",
        outcome.metrics[f"compaction_s_{largest}"] < GOAL_COMPACTION_S,
        f"{outcome.metrics[f'compaction_s_{largest}']:.1f} s",
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
    """Kill -9 a compaction at random moments; the ledger and resume must be whole every time."""
    rng = random.Random(20261130)
    held = 0
    states = []
    with tempfile.TemporaryDirectory(prefix="paceline-bench-kills-") as tmp:
        pristine = os.path.join(tmp, "pristine")
        expected = generate(ManifestStore(pristine), TRIAL_ITEMS[quick], TRIAL_FILES[quick])
        chunks = {
            a: len(
                pq.read_table(ManifestStore(pristine).plan_path(BACKFILL, a), columns=["chunk_id"])["chunk_id"].unique()
            )
            for a in (0, 1)
        }
        root = os.path.join(tmp, "trial")
        shutil.copytree(pristine, root)
        block_rows = TRIAL_BLOCK_ROWS[quick]
        full = _run_child_until(root, block_rows, None)
        for _ in range(TRIALS[quick]):
            shutil.rmtree(root)
            shutil.copytree(pristine, root)
            _run_child_until(root, block_rows, rng.uniform(0, full))
            store = ManifestStore(root)
            files = store.attempt_files(BACKFILL, 0)
            states.append(f"{len(files.compacted)}c/{len(files.covered)}h/{len(files.chunks)}")
            whole = _whole(store, expected, chunks)
            for attempt in chunks:
                compact_attempt(store, BACKFILL, attempt, block_rows=block_rows)
            held += whole and _whole(store, expected, chunks) and not store.attempt_files(BACKFILL, 0).chunks
    _row(
        outcome,
        "kill -9 during compaction",
        f"{held}/{TRIALS[quick]} trials whole before and after a second "
        f"compaction; attempt 0 at the kill (compacted files / chunk files they hold / chunk files "
        f"alone): {', '.join(states)}",
    )
    outcome.metrics.update(trials=TRIALS[quick], held=held)
    outcome.goal(
        "every kill -9 leaves the ledger equal to the truth and every chunk finished",
        held == TRIALS[quick],
        f"{held}/{TRIALS[quick]}",
    )


def _run_child_until(root: str, block_rows: int, kill_after: float | None) -> float:
    """Compact ``root`` in a child (small blocks); SIGKILL it ``kill_after`` s after it is ready."""
    child = subprocess.Popen(
        [PYTHON, "-m", "benchmarks.compaction", "--child", root, str(block_rows)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    child.stdout.readline()  # "ready": imports done
    started = time.perf_counter()
    if kill_after is None:
        child.communicate(timeout=600)
        return time.perf_counter() - started
    try:
        child.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.kill(child.pid, signal.SIGKILL)
    child.communicate()
    return kill_after


def _whole(store: ManifestStore, expected: dict, chunks: dict[int, int]) -> bool:
    """Counts equal the truth, every row once, and resume would skip every chunk."""
    with Ledger(store, 3, BACKFILL) as ledger:
        counts = ledger.counts(BACKFILL)
        rows = ledger.query("SELECT count(*) AS n, count(DISTINCT (attempt, item_id)) AS d FROM results").to_pylist()
    want = {k: expected[k] for k in ("items", "ok", "failed", "dead", "last_attempt")}
    finished = all(store.scan_chunks(BACKFILL, a).finished == set(range(n)) for a, n in chunks.items())
    return counts == want and rows == [{"n": expected["rows"], "d": expected["rows"]}] and finished


def run(quick: bool) -> Outcome:
    """Ledger questions before/after compaction at 1k-200k files, on S3, and kill -9 during compaction."""
    outcome = Outcome(NAME, "")
    at_scale(outcome, quick)
    on_s3(outcome, quick)
    kills(outcome, quick)
    largest = max(FILES[quick])
    outcome.headline = (
        f"{ITEMS[quick]:,} items in {largest:,} chunk files: failed items + counts "
        f"{outcome.metrics[f'before_s_{largest}']:.1f} s -> {outcome.metrics[f'after_s_{largest}']:.2f} s "
        f"after a {outcome.metrics[f'compaction_s_{largest}']:.0f} s compaction; "
        f"{outcome.metrics['held']}/{outcome.metrics['trials']} kills whole"
    )
    return outcome


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        raise SystemExit(main(NAME, run))
