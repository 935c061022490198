"""Shared fixtures: real local servers (one per test session) and a way to drive a backfill.

The servers are the referees: limits are checked against what *they* saw.
A test that needs a server with particular limits (an rps cap, a token
budget) starts its own with ``start_http_api(...)`` / ``start_llm(...)``;
the shared ones here are unlimited and are reset before each test that uses them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import pytest

from pipeline.backfill import Backfill, RunResult, plan_backfill, plan_retry, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.ledger import Ledger
from pipeline.localservices import ServiceHandle, start_http_api, start_llm
from pipeline.localservices.postgres import ConnectionSampler, PostgresHandle, start_postgres
from pipeline.localservices.s3 import S3Handle, start_s3
from pipeline.manifests import ManifestStore
from pipeline.outcomes import Permanent, Retryable

# --------------------------------------------------------------------------
# Servers (session-scoped: started once, stopped at the end)
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def http_api_server() -> Iterator[ServiceHandle]:
    with start_http_api() as handle:
        yield handle


@pytest.fixture
def http_api(http_api_server: ServiceHandle) -> ServiceHandle:
    """The unlimited JSON API / website, reset so a test sees only its own arrivals."""
    http_api_server.reset()
    return http_api_server


@pytest.fixture(scope="session")
def llm_server() -> Iterator[ServiceHandle]:
    with start_llm(latency_ms=0) as handle:
        yield handle


@pytest.fixture
def llm(llm_server: ServiceHandle) -> ServiceHandle:
    """The unlimited OpenAI-compatible server, reset so a test sees only its own arrivals."""
    llm_server.reset()
    return llm_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresHandle]:
    """A real PostgreSQL; tests create their own tables and roles with unique names."""
    with start_postgres() as handle:
        yield handle


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Handle]:
    """moto's S3 server, with its dummy credentials in the environment for boto3."""
    with start_s3() as handle, pytest.MonkeyPatch.context() as env:
        for name, value in handle.env.items():
            env.setenv(name, value)
        yield handle


# --------------------------------------------------------------------------
# Driving backfills through the engine
# --------------------------------------------------------------------------


@dataclass
class BackfillRunner:
    """Plan and run attempts with the local executor into one manifest store."""

    store: ManifestStore

    def run(self, backfill: Backfill, attempt: int = 0) -> RunResult:
        if attempt == 0:
            plan_backfill(backfill, self.store)
        else:
            plan_retry(backfill, self.store, attempt)
        return run_attempt(backfill, self.store, LocalExecutor(), attempt)

    def latest(self, backfill: Backfill) -> dict[str, dict[str, Any]]:
        """The ledger's latest row of each item, keyed by item id."""
        with Ledger(self.store, backfill.max_attempts, backfill.name) as ledger:
            rows = ledger.con.sql("SELECT * FROM latest WHERE backfill = $name", params={"name": backfill.name})
            rows = rows.to_arrow_table()
        return {row["item_id"]: row for row in rows.to_pylist()}

    def chunks(self, backfill: Backfill, attempt: int = 0) -> int:
        plan = self.store.read_table(self.store.plan_path(backfill.name, attempt))
        return len(pc.unique(plan["chunk_id"]))


def sevens_retry_nines_fail(client: Any, item: Any) -> dict[str, int]:
    """A call whose ids ending in 7 fail retryably and ids ending in 9 for good; the rest succeed."""
    if item.id.endswith("7"):
        raise Retryable("flaky", "http_503")
    if item.id.endswith("9"):
        raise Permanent("gone", "http_404")
    return {"n": int(item.id)}


class Killed(Exception):
    """Stands for a run killed part way: raised by ``StopsAfter`` once some manifests are written."""


class StopsAfter(LocalExecutor):
    """The local executor, interrupted after ``chunks`` results: a run that dies before it compacts.

    With ``chunks`` at least the attempt's chunk count, every manifest is
    written and the run dies just before compaction.
    """

    def __init__(self, chunks: int):
        self.chunks = chunks

    def map(self, fn: Any, chunks: Any, max_parallelism: int) -> Iterator[Any]:
        for done, result in enumerate(super().map(fn, chunks, max_parallelism)):
            if done == self.chunks:
                raise Killed
            yield result
        raise Killed


@pytest.fixture
def runner(tmp_path: Any) -> BackfillRunner:
    return BackfillRunner(ManifestStore(str(tmp_path / "paceline")))


# --------------------------------------------------------------------------
# Server-side measurements
# --------------------------------------------------------------------------


@pytest.fixture
def pg_connections(postgres: PostgresHandle) -> Any:
    """``pg_connections(application_name)``: a ``ConnectionSampler`` on the shared server."""
    return lambda application_name: ConnectionSampler(postgres.url, application_name)
