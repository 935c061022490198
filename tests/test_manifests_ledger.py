"""Manifests as checkpoints, and the ledger's views over them."""

import dataclasses
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import duckdb
import pytest

from pipeline.backfill import Backfill, RunResult, plan_backfill, plan_retry, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import Values
from pipeline.ledger import Ledger
from pipeline.limits import Overrides, ServiceLimit
from pipeline.manifests import ManifestError, ManifestStore
from pipeline.outcomes import Permanent, Retryable
from pipeline.work import FunctionWork
from tests.conftest import Killed, StopsAfter


def _flaky_backfill(failing: set[str], permanent: set[str] = frozenset(), max_attempts: int = 3) -> Backfill:
    """Items in ``failing`` fail retryably; heal by removing them from the set."""

    def call(client, item):
        if item.id in permanent:
            raise Permanent("no such record", "http_404")
        if item.id in failing:
            raise Retryable("service unavailable", "http_503")
        return {"id": item.id}

    return Backfill(
        "ledger_test",
        Values.of(range(50)),
        FunctionWork(lambda: None, call),
        ServiceLimit("svc", requests_per_second=5000),
        max_attempts=max_attempts,
    )


def test_later_success_wins_and_views_partition_items(tmp_path):
    store = ManifestStore(str(tmp_path))
    failing = {"3", "7", "11"}
    backfill = _flaky_backfill(failing, permanent={"20"})
    plan_backfill(backfill, store)
    first = run_attempt(backfill, store, LocalExecutor())
    assert first.counts == {"items": 50, "ok": 46, "failed": 3, "dead": 1, "last_attempt": 0}

    failing.discard("3")
    failing.discard("7")
    retry = plan_retry(backfill, store, 1)
    assert sorted(retry.plan["item_id"].to_pylist()) == ["11", "3", "7"]
    second = run_attempt(backfill, store, LocalExecutor(), attempt=1)
    assert second.counts == {"items": 50, "ok": 48, "failed": 1, "dead": 1, "last_attempt": 1}

    plan_retry(backfill, store, 2)
    third = run_attempt(backfill, store, LocalExecutor(), attempt=2)
    assert third.counts == {"items": 50, "ok": 48, "failed": 0, "dead": 2, "last_attempt": 2}
    with Ledger(store) as ledger:
        dead = ledger.query("SELECT item_id, status, attempt FROM dead ORDER BY item_id").to_pylist()
        assert dead == [
            {"item_id": "11", "status": "http_503", "attempt": 2},  # attempts exhausted
            {"item_id": "20", "status": "http_404", "attempt": 0},  # permanent
        ]
        assert ledger.query("SELECT count(*) AS n FROM results")["n"][0].as_py() == 50 + 3 + 1
        # latest reads only what can be superseded; it must still be the latest row of every item
        ranked = ledger.query(
            "SELECT item_id, attempt, status FROM results QUALIFY row_number() OVER "
            "(PARTITION BY backfill, item_id ORDER BY attempt DESC, finished_at DESC) = 1 ORDER BY item_id"
        )
        assert ledger.query("SELECT item_id, attempt, status FROM latest ORDER BY item_id").equals(ranked)


def _logging_backfill(log, items: int = 40) -> Backfill:
    def call(client, item):
        with open(log, "a") as handle:  # the work runs on a pickled copy, so it reports through a file
            handle.write(item.id + "\n")
        return item.id

    return Backfill(
        "resume",
        Values.of(range(items)),
        FunctionWork(lambda: None, call),
        ServiceLimit("svc", requests_per_second=5000),
        overrides=Overrides(chunk_size=10),
    )


def _break_then_rerun(backfill: Backfill, store: ManifestStore, manifest: str, log) -> RunResult:
    """Overwrite a manifest with bytes that are not Parquet: the ledger refuses it, a rerun repairs it."""
    with open(manifest, "wb") as handle:
        handle.write(b"PAR1 this is not parquet")
    with pytest.raises(ManifestError, match="cannot be read"):
        Ledger(store)
    log.unlink()
    return run_attempt(backfill, store, LocalExecutor())


def test_rerun_skips_finished_chunks_and_reruns_unreadable_ones(tmp_path):
    store = ManifestStore(str(tmp_path / "store"))
    log = tmp_path / "calls.log"
    backfill = _logging_backfill(log)
    plan = plan_backfill(backfill, store).plan
    with pytest.raises(Killed):
        run_attempt(backfill, store, StopsAfter(3))
    finished = store.scan_chunks("resume", 0).finished
    assert len(finished) == 3 and not store.attempt_files("resume", 0).compacted
    broken_chunk = min(finished)
    broken = store.chunk_path("resume", 0, broken_chunk)
    result = _break_then_rerun(backfill, store, broken, log)
    assert result.unreadable_manifests == [broken]
    rerun = {broken_chunk} | (set(range(4)) - finished)
    chunk_ids = plan["chunk_id"].to_pylist()
    expected = [item for item, chunk in zip(plan["item_id"].to_pylist(), chunk_ids) if chunk in rerun]
    assert sorted(log.read_text().split()) == sorted(expected)
    assert result.skipped_chunks == 2
    assert result.counts["ok"] == 40
    assert result.compaction.blocks_written == 1 and len(store.manifest_files()) == 1


def test_an_unreadable_compacted_file_reruns_its_chunks_and_is_replaced(tmp_path):
    store = ManifestStore(str(tmp_path / "store"))
    log = tmp_path / "calls.log"
    backfill = _logging_backfill(log)
    plan_backfill(backfill, store)
    run_attempt(backfill, store, LocalExecutor())
    [compacted] = store.manifest_files()
    result = _break_then_rerun(backfill, store, compacted, log)
    assert result.unreadable_manifests == [compacted] and result.skipped_chunks == 0
    assert len(log.read_text().split()) == 40
    assert store.manifest_files() == [compacted] and result.counts["ok"] == 40


def test_no_temp_files_or_half_files_are_left(tmp_path):
    store = ManifestStore(str(tmp_path))
    backfill = _flaky_backfill(set())
    plan_backfill(backfill, store)
    run_attempt(backfill, store, LocalExecutor())
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert names and not [n for n in names if n.endswith(".tmp")]


def test_two_concurrent_runs_of_one_attempt_replace_rather_than_duplicate(tmp_path):
    store = ManifestStore(str(tmp_path))

    def slow_call(client, item):
        time.sleep(0.002)
        return item.id

    backfill = Backfill(
        "twice",
        Values.of(range(400)),
        FunctionWork(lambda: None, slow_call),
        ServiceLimit("svc", requests_per_second=5000),
        overrides=Overrides(chunk_size=20),
    )
    plan_backfill(backfill, store)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_attempt, backfill, store, LocalExecutor(), 0, run_id) for run_id in ("a", "b")]
        [run.result() for run in runs]
    with Ledger(store) as ledger:
        counts = ledger.query("SELECT count(*) AS n, count(DISTINCT item_id) AS d FROM results").to_pylist()
        assert counts == [{"n": 400, "d": 400}]
    assert [os.path.basename(f) for f in store.manifest_files()] == ["compacted-000000-000019.parquet"]
    assert not list(tmp_path.rglob("chunk-*.parquet")), "the second compaction removes the late chunk files"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT 1) TO '{root}/manifests/backfill=ledger_test/attempt=0/chunk-000000.parquet'",
        "INSERT INTO results SELECT * FROM results",
        "DELETE FROM results",
        "SET enable_external_access = true",
        "CREATE TABLE stolen AS SELECT * FROM read_parquet('{root}/manifests/*/*/*.parquet')",
    ],
)
def test_ad_hoc_sql_cannot_change_manifests(tmp_path, sql):
    store = ManifestStore(str(tmp_path))
    backfill = _flaky_backfill(set())
    plan_backfill(backfill, store)
    run_attempt(backfill, store, LocalExecutor())
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")}
    with Ledger(store) as ledger:
        with pytest.raises(duckdb.Error):
            ledger.query(sql.format(root=tmp_path))
        assert ledger.query("SELECT count(*) AS n FROM latest")["n"][0].as_py() == 50
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.parquet")} == before


def test_bad_backfill_names_and_roots_are_refused():
    with pytest.raises(ManifestError, match="cannot be used as a folder name"):
        ManifestStore("/tmp/x").chunk_path("../escape", 0, 0)
    with pytest.raises(ManifestError, match="names no bucket"):
        ManifestStore("s3://")
    with pytest.raises(ManifestError, match="only local folders and s3://"):
        ManifestStore("gs://bucket/x")


def test_counts_then_query_on_one_ledger(tmp_path):
    store = ManifestStore(str(tmp_path))
    backfill = _flaky_backfill({"1"})
    plan_backfill(backfill, store)
    run_attempt(backfill, store, LocalExecutor())
    with Ledger(store) as ledger:
        assert ledger.counts("ledger_test")["failed"] == 1
        assert ledger.query("SELECT count(*) AS n FROM failed")["n"][0].as_py() == 1


def test_replanning_different_items_over_manifests_is_refused(tmp_path):
    store = ManifestStore(str(tmp_path))
    backfill = _flaky_backfill(set())
    plan_backfill(backfill, store)
    run_attempt(backfill, store, LocalExecutor())
    plan_backfill(backfill, store)  # the same items again: fine, resume stays correct
    changed = dataclasses.replace(backfill, source=Values.of(range(10, 60)))
    with pytest.raises(ManifestError, match="the items or the chunk size changed"):
        plan_backfill(changed, store)


def test_resume_removes_temp_files_of_dead_writers_only(tmp_path):
    store = ManifestStore(str(tmp_path))
    folder = tmp_path / "manifests" / "backfill=b" / "attempt=0"
    folder.mkdir(parents=True)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = folder / f".{finished.stdout.strip()}-{'a' * 32}.tmp"
    alive = folder / f".{os.getpid()}-{'b' * 32}.tmp"
    dead.write_bytes(b"half a parquet file")
    alive.write_bytes(b"a file still being written")
    assert store.scan_chunks("b", 0).finished == set()
    assert not dead.exists() and alive.exists()


def test_each_backfill_is_read_with_the_max_attempts_stored_with_its_plan(tmp_path):
    """Two backfills in one store, declared with 2 and 5 attempts, and one planned before plans carried it."""
    store = ManifestStore(str(tmp_path))
    for name, max_attempts in (("two", 2), ("five", 5), ("older", 3)):
        backfill = dataclasses.replace(_flaky_backfill({"3"}), name=name, max_attempts=max_attempts)
        plan_backfill(backfill, store)
        run_attempt(backfill, store, LocalExecutor())
        plan_retry(backfill, store, 1)
        run_attempt(backfill, store, LocalExecutor(), attempt=1)
    old = store.plan_path("older", 1)
    store.write_table(old, store.read_table(old).replace_schema_metadata(None))  # as an older Paceline wrote it

    assert store.planned_max_attempts() == {"two": 2, "five": 5}
    with Ledger(store) as ledger:
        assert [ledger.max_attempts(name) for name in ("two", "five", "older")] == [2, 5, 3]
        assert ledger.counts("two")["dead"] == 1 and ledger.counts("two")["failed"] == 0
        assert ledger.counts("five")["failed"] == 1 and ledger.counts("five")["dead"] == 0
        assert ledger.counts("older")["failed"] == 1
        assert ledger.summary().select(["backfill", "max_attempts"]).to_pylist() == [
            {"backfill": "five", "max_attempts": 5},
            {"backfill": "older", "max_attempts": 3},
            {"backfill": "two", "max_attempts": 2},
        ]
    with Ledger(store, 2) as ledger:  # given, it applies to every backfill
        assert ledger.counts("five")["dead"] == 1 and ledger.max_attempts("five") == 2
