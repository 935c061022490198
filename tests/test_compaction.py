"""Compaction: fewer files, the same rows, whatever point a crash stops it at."""

import os
import signal
import subprocess
import sys
import textwrap

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.backfill import Backfill, plan_backfill, plan_retry, run_attempt
from pipeline.background_compaction import Background
from pipeline.cli import main
from pipeline.compaction import (
    CHUNK_REMOVED,
    COMMITTED,
    CRASH_POINTS,
    Block,
    CompactionError,
    State,
    compact,
    compact_attempt,
)
from pipeline.executors import LocalExecutor
from pipeline.items import Values
from pipeline.ledger import Ledger
from pipeline.limits import Overrides, ServiceLimit
from pipeline.manifests import ManifestError, ManifestStore, check_name
from pipeline.work import FunctionWork
from tests.conftest import Killed, StopsAfter, sevens_retry_nines_fail

NAME = "compacting"
ROWS = "SELECT attempt, chunk_id, item_id, ok, retryable, status FROM results ORDER BY attempt, item_id"
BLOCK_ROWS = 25  # five chunks of five items per compacted file: several blocks, so crashes land between them


BACKFILL = Backfill(
    NAME,
    Values.of(range(200)),
    FunctionWork(lambda: None, sevens_retry_nines_fail),
    ServiceLimit("svc", requests_per_second=50_000),
    overrides=Overrides(chunk_size=5),
)


def _uncompacted(store: ManifestStore) -> dict:
    """Two attempts written in full but never compacted (each run dies just before compaction)."""
    plan_backfill(BACKFILL, store)
    with pytest.raises(Killed):
        run_attempt(BACKFILL, store, StopsAfter(10**6), compaction=None)
    plan_retry(BACKFILL, store, 1)
    with pytest.raises(Killed):
        run_attempt(BACKFILL, store, StopsAfter(10**6), attempt=1, compaction=None)
    assert len(store.manifest_files()) == 40 + 4 and not store.attempt_files(NAME, 0).compacted
    return _truth(store)


def _truth(store: ManifestStore) -> dict:
    with Ledger(store) as ledger:
        return {
            "rows": ledger.query(ROWS).to_pylist(),
            "counts": ledger.counts(NAME),
            "failed": ledger.failed_items(NAME).to_pylist(),
        }


def _assert_whole(store: ManifestStore, truth: dict) -> None:
    """The ledger sees every row once, and resume would skip every chunk."""
    assert _truth(store) == truth
    assert store.scan_chunks(NAME, 0).finished == set(range(40))
    assert store.scan_chunks(NAME, 1).finished == set(range(4))


def test_compaction_keeps_every_row_in_fewer_files_with_failed_rows_apart(tmp_path):
    store = ManifestStore(str(tmp_path))
    truth = _uncompacted(store)
    results = compact(store)
    assert [(r.attempt, r.files_before, r.files_after, r.blocks_written) for r in results] == [
        (0, 40, 1, 1),
        (1, 4, 1, 1),
    ]
    assert not list(tmp_path.rglob("chunk-*.parquet"))
    _assert_whole(store, truth)
    [first, _] = store.manifest_files()
    groups = pq.ParquetFile(first).metadata
    kinds = [
        (groups.row_group(g).column(5).statistics.min, groups.row_group(g).column(5).statistics.max)
        for g in range(groups.num_row_groups)
    ]
    assert kinds[0] == (True, True) and (False, False) in kinds, "ok and failed rows sit in separate row groups"
    assert [r.blocks_written for r in compact(store)] == [0, 0], "compacting again changes nothing"
    _assert_whole(store, truth)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_at_any_named_point_loses_and_doubles_nothing(tmp_path, point):
    store = ManifestStore(str(tmp_path))
    truth = _uncompacted(store)
    seen = []

    def crash(at: str) -> None:
        seen.append(at)
        if at == point and seen.count(point) == 3:  # the third time: a few blocks done, some not
            raise Killed

    with pytest.raises(Killed):
        compact_attempt(store, NAME, 0, block_rows=BLOCK_ROWS, crash_hook=crash)
    _assert_whole(store, truth)
    assert not list(tmp_path.rglob("*.tmp"))
    finished = compact_attempt(store, NAME, 0, block_rows=BLOCK_ROWS)
    assert finished.files_after == 8 and not store.attempt_files(NAME, 0).chunks
    _assert_whole(store, truth)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline.compaction import compact_attempt
    from pipeline.manifests import ManifestStore

    root, point, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    seen = []

    def crash(at):
        seen.append(at)
        if at == point and seen.count(point) == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    compact_attempt(ManifestStore(root), "compacting", 0, block_rows=int(sys.argv[4]), crash_hook=crash)
    """
)


@pytest.mark.parametrize("point, nth", [("temp_written", 2), (COMMITTED, 4), (CHUNK_REMOVED, 7)])
def test_kill_minus_nine_at_named_points_then_compact_again(tmp_path, point, nth):
    store = ManifestStore(str(tmp_path / "store"))
    truth = _uncompacted(store)
    killed = subprocess.run([sys.executable, "-c", KILLER, store.root, point, str(nth), str(BLOCK_ROWS)])
    assert killed.returncode == -signal.SIGKILL
    temp_files = len(list((tmp_path / "store").rglob("*.tmp")))
    assert temp_files == (point == "temp_written"), "a kill while writing leaves only its temp file"
    _assert_whole(store, truth)
    assert not list((tmp_path / "store").rglob("*.tmp")), "resume's scan removes a dead writer's temp file"
    compact_attempt(store, NAME, 0, block_rows=BLOCK_ROWS)
    assert not store.attempt_files(NAME, 0).chunks and not store.attempt_files(NAME, 0).covered
    _assert_whole(store, truth)


def test_resume_skips_compacted_chunks_and_compacts_the_rest_later(tmp_path):
    store = ManifestStore(str(tmp_path))
    plan_backfill(BACKFILL, store)
    with pytest.raises(Killed):
        run_attempt(BACKFILL, store, StopsAfter(20))
    partial = compact_attempt(store, NAME, 0, block_rows=BLOCK_ROWS)
    finished = store.scan_chunks(NAME, 0).finished
    assert partial.blocks_waiting >= 1 and len(finished) == 20
    compacted = {c for ids in store.attempt_files(NAME, 0).compacted.values() for c in ids}
    assert compacted and compacted <= finished
    resumed = run_attempt(BACKFILL, store, LocalExecutor())
    assert resumed.skipped_chunks == 20 and resumed.report.rows == 100
    assert resumed.counts == {"items": 200, "ok": 160, "failed": 20, "dead": 20, "last_attempt": 0}
    again = run_attempt(BACKFILL, store, LocalExecutor())
    assert again.skipped_chunks == 40 and again.report.rows == 0


def test_a_late_chunk_file_for_a_compacted_chunk_is_ignored_then_removed(tmp_path):
    store = ManifestStore(str(tmp_path))
    truth = _uncompacted(store)
    compact(store)
    late = store.chunk_path(NAME, 0, 3)
    with open(late, "wb") as handle:  # a second run of the attempt writing chunk 3 again, after compaction
        handle.write(b"anything at all: no reader opens it")
    _assert_whole(store, truth)
    assert store.attempt_files(NAME, 0).covered == {3: late}
    assert compact(store)[0].chunk_files_removed == 1 and not os.path.exists(late)


def test_illegal_transitions_are_refused():
    block = Block(range(0, 5), "x/compacted-000000-000004.parquet")
    with pytest.raises(CompactionError, match="cannot go from chunks to clean"):
        block.advance(State.CLEAN)
    block.advance(State.WRITING)
    with pytest.raises(CompactionError, match="cannot go from writing to writing"):
        block.advance(State.WRITING)
    block.advance(State.COMMITTED)
    block.advance(State.CLEAN)
    assert repr(block) == "Block(chunks 0..4, clean)"


def test_two_compacted_files_holding_one_chunk_are_an_error_not_a_guess(tmp_path):
    store = ManifestStore(str(tmp_path))
    _uncompacted(store)
    compact(store)
    folder = tmp_path / "manifests" / f"backfill={NAME}" / "attempt=0"
    (folder / "compacted-000030-000049.parquet").write_bytes(b"copied in by hand")
    with pytest.raises(ManifestError, match="hold some of the same chunks"):
        Ledger(store)


def test_the_readme_duckdb_glob_reads_compacted_manifests(tmp_path):
    store = ManifestStore(str(tmp_path))
    truth = _uncompacted(store)
    compact(store)
    glob = f"read_parquet('{tmp_path}/manifests/**/*.parquet', hive_partitioning=true)"
    rows = duckdb.sql(
        f"SELECT attempt, chunk_id, item_id, ok, retryable, status FROM {glob} ORDER BY attempt, item_id"
    ).fetchall()
    assert [tuple(r.values()) for r in truth["rows"]] == rows
    backfills = duckdb.sql(f"SELECT DISTINCT backfill FROM {glob}").fetchall()
    assert backfills == [(NAME,)]


def test_compaction_on_s3_crashes_and_finishes_like_a_folder(s3):
    s3.client().create_bucket(Bucket="compaction")
    store = ManifestStore("s3://compaction/paceline", s3_endpoint_url=s3.url)
    truth = _uncompacted(store)

    def crash(at: str) -> None:
        if at == COMMITTED:
            raise Killed

    with pytest.raises(Killed):
        compact_attempt(store, NAME, 0, crash_hook=crash)
    assert len(store.attempt_files(NAME, 0).covered) == 40, "committed: every chunk object is still there..."
    _assert_whole(store, truth)  # ...and no reader counts it twice
    assert [r.chunk_files_removed for r in compact(store)] == [40, 4]
    assert len(store.manifest_files()) == 2
    _assert_whole(store, truth)


def test_compaction_needs_the_plan(tmp_path):
    with pytest.raises(CompactionError, match="no chunk plan"):
        compact_attempt(ManifestStore(str(tmp_path)), "never_planned", 0)


def test_a_name_too_long_for_a_file_is_refused_up_front(tmp_path):
    assert check_name("b" * 238) == "b" * 238
    with pytest.raises(ManifestError, match="backfill name is 300 characters.*at most 238 characters"):
        Backfill(
            "b" * 300, Values.of([1]), FunctionWork(lambda: None, sevens_retry_nines_fail), ServiceLimit("svc", 10)
        )


def test_compact_and_query_commands(tmp_path, capsys):
    store = ManifestStore(str(tmp_path))
    _uncompacted(store)
    assert main(["compact", "--root", str(tmp_path), "--backfill", NAME]) == 0
    out = capsys.readouterr().out
    assert f"backfill={NAME} attempt=0: 40 -> 1 manifest files" in out and "attempt=1: 4 -> 1" in out
    assert main(["compact", "--root", str(tmp_path / "empty")]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    assert main(["query", "--root", str(tmp_path / "empty"), "SELECT count(*) AS n FROM latest"]) == 0
    assert "no manifests under" in capsys.readouterr().err
    assert main(["query", "--root", str(tmp_path), "SELECT count(*) AS n FROM latest"]) == 0
    captured = capsys.readouterr()
    assert "200" in captured.out and captured.err == ""


RUN_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pipeline.backfill import run_attempt
    from pipeline.background_compaction import Background
    from pipeline.executors import LocalExecutor
    from pipeline.manifests import ManifestStore
    from tests.test_compaction import BACKFILL, BLOCK_ROWS

    point, nth = sys.argv[2], int(sys.argv[3])
    seen = []

    def crash(at):  # runs in the compaction process: kill the run and its compaction, as a crash would
        seen.append(at)
        if at == point and seen.count(point) == nth:
            os.killpg(0, signal.SIGKILL)

    run_attempt(BACKFILL, ManifestStore(sys.argv[1]), LocalExecutor(), compaction=Background(block_rows=BLOCK_ROWS, crash_hook=crash))
    """
)


@pytest.mark.parametrize("point, nth", [("temp_written", 2), (COMMITTED, 3), (CHUNK_REMOVED, 12)])
def test_kill_minus_nine_during_background_compaction_then_resume(tmp_path, point, nth):
    store = ManifestStore(str(tmp_path / "store"))
    plan_backfill(BACKFILL, store)
    killed = subprocess.run(
        [sys.executable, "-c", RUN_KILLER, store.root, point, str(nth)], cwd=os.getcwd(), start_new_session=True
    )
    assert killed.returncode == -signal.SIGKILL
    finished = store.scan_chunks(NAME, 0).finished
    assert store.attempt_files(NAME, 0).compacted, "killed while the run went, after a block was compacted"
    with Ledger(store) as ledger:
        rows = ledger.query("SELECT count(*) AS n, count(DISTINCT item_id) AS d FROM results").to_pylist()
    assert rows == [{"n": 5 * len(finished), "d": 5 * len(finished)}], "every finished chunk's rows, once"
    resumed = run_attempt(BACKFILL, store, LocalExecutor(), compaction=Background(block_rows=BLOCK_ROWS))
    assert resumed.skipped_chunks == len(finished) and resumed.report.rows == 200 - 5 * len(finished)
    assert resumed.counts == {"items": 200, "ok": 160, "failed": 20, "dead": 20, "last_attempt": 0}
    assert len(store.manifest_files()) == 8 and not store.attempt_files(NAME, 0).covered


def test_a_crash_in_background_compaction_is_raised_at_the_end_and_loses_nothing(tmp_path):
    store = ManifestStore(str(tmp_path))
    plan_backfill(BACKFILL, store)

    def crash(at: str) -> None:
        if at == COMMITTED:
            raise Killed

    with pytest.raises(Killed):
        run_attempt(BACKFILL, store, LocalExecutor(), compaction=Background(block_rows=BLOCK_ROWS, crash_hook=crash))
    assert store.scan_chunks(NAME, 0).finished == set(range(40))
    again = run_attempt(BACKFILL, store, LocalExecutor(), compaction=Background(block_rows=BLOCK_ROWS))
    assert again.skipped_chunks == 40 and again.counts["items"] == 200
    assert again.compaction.files_after == 8 and not store.attempt_files(NAME, 0).covered


def test_on_a_thread_the_run_compacts_its_blocks_as_it_goes(tmp_path):
    store = ManifestStore(str(tmp_path))
    plan_backfill(BACKFILL, store)
    done = run_attempt(BACKFILL, store, LocalExecutor(), compaction=Background(block_rows=BLOCK_ROWS, process=False))
    assert (done.compaction.blocks_written, done.compaction.chunk_files_removed) == (8, 40)
    assert done.compaction.files_after == 8 and done.counts["items"] == 200
