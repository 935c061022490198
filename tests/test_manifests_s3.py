"""Manifests on S3 (moto's server) behave as they do on the local filesystem."""

import dataclasses

import pytest

from pipeline.backfill import Backfill, plan_backfill, plan_retry, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import ItemsError, S3Prefix, Values
from pipeline.ledger import Ledger
from pipeline.limits import Overrides, ServiceLimit
from pipeline.manifests import ManifestError, ManifestStore
from pipeline.work import FunctionWork
from tests.conftest import Killed, StopsAfter, sevens_retry_nines_fail

BACKFILL = Backfill(
    "parity",
    Values.of(range(60)),
    FunctionWork(lambda: None, sevens_retry_nines_fail),
    ServiceLimit("svc", requests_per_second=5000),
)
COMPARED = "SELECT item_id, attempt, ok, retryable, status, payload FROM latest ORDER BY item_id"


@pytest.fixture
def s3_store(s3, request):
    bucket = f"manifests-{request.node.name.replace('_', '-')[:40]}"
    s3.client().create_bucket(Bucket=bucket)
    return ManifestStore(f"s3://{bucket}/paceline", s3_endpoint_url=s3.url)


def _run_two_attempts(store: ManifestStore) -> list[dict]:
    plan_backfill(BACKFILL, store)
    run_attempt(BACKFILL, store, LocalExecutor())
    plan_retry(BACKFILL, store, 1)
    run_attempt(BACKFILL, store, LocalExecutor(), attempt=1)
    with Ledger(store) as ledger:
        return ledger.query(COMPARED).to_pylist()


def test_s3_and_local_give_the_same_ledger(s3_store, tmp_path):
    on_s3 = _run_two_attempts(s3_store)
    local = _run_two_attempts(ManifestStore(str(tmp_path)))
    assert on_s3 == local
    assert len(on_s3) == 60 and {r["attempt"] for r in on_s3 if r["status"] == "http_503"} == {1}
    assert all(f.startswith(s3_store._base) for f in s3_store.manifest_files())


def test_resume_and_unreadable_manifests_on_s3(s3, s3_store):
    backfill = dataclasses.replace(BACKFILL, overrides=Overrides(chunk_size=10))
    plan = plan_backfill(backfill, s3_store)
    with pytest.raises(Killed):
        run_attempt(backfill, s3_store, StopsAfter(3))
    finished = s3_store.scan_chunks("parity", 0).finished
    bucket, key = s3_store.chunk_path("parity", 0, min(finished)).split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"not parquet at all")
    with pytest.raises(ManifestError, match="cannot be read"):
        Ledger(s3_store)
    again = run_attempt(backfill, s3_store, LocalExecutor())
    assert again.unreadable_manifests == [f"s3://{bucket}/{key}"]
    assert again.skipped_chunks == len(finished) - 1 and plan.chunks == 6
    assert again.counts["items"] == 60
    assert again.compaction.blocks_written == 1 and again.compaction.chunk_files_removed == 6


def test_s3_prefix_lists_keys_as_items(s3):
    client = s3.client()
    client.create_bucket(Bucket="events")
    for name in ("2026/a.jsonl.gz", "2026/b.jsonl.gz", "2026/notes.txt", "2025/c.jsonl.gz"):
        client.put_object(Bucket="events", Key=name, Body=b"x")
    source = S3Prefix("events", "2026/", endpoint_url=s3.url, suffix=".jsonl.gz")
    assert source.read()["item_id"].to_pylist() == ["2026/a.jsonl.gz", "2026/b.jsonl.gz"]
    with pytest.raises(ItemsError, match="needs a bucket name"):
        S3Prefix("")
