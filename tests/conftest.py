"""Shared fixtures: real local servers (one per test session) and a way to drive a backfill.

The servers are the referees: limits are checked against what *they* saw.
A test that needs a server with particular limits (an rps cap, a token
budget) starts its own with ``start_http_api(...)`` / ``start_llm(...)``;
the shared ones here are unlimited and are reset before each test that uses them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow.compute as pc
import pytest

from pipeline.backfill import Backfill, RunResult, plan_backfill, plan_retry, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.ledger import Ledger
from pipeline.localservices import ServiceHandle, start_http_api, start_llm
from pipeline.localservices.postgres import PostgresHandle, start_postgres
from pipeline.localservices.s3 import S3Handle, start_s3
from pipeline.manifests import ManifestStore

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


@pytest.fixture
def runner(tmp_path: Any) -> BackfillRunner:
    return BackfillRunner(ManifestStore(str(tmp_path / "paceline")))


# --------------------------------------------------------------------------
# Server-side measurements
# --------------------------------------------------------------------------


@dataclass
class ConnectionSampler:
    """Counts, from a separate connection, the server's connections tagged ``application_name``.

    Samples ``pg_stat_activity`` every ``interval_s`` in a thread while the
    ``with`` block runs; ``peak`` is the most seen at once.
    """

    dsn: str
    application_name: str
    interval_s: float = 0.005
    samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def __enter__(self) -> ConnectionSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as connection:
            while not self._stop.is_set():
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [self.application_name]
                ).fetchone()
                self.samples.append(int(row[0]))
                time.sleep(self.interval_s)


@pytest.fixture
def pg_connections(postgres: PostgresHandle) -> Any:
    """``pg_connections(application_name)``: a ``ConnectionSampler`` on the shared server."""
    return lambda application_name: ConnectionSampler(postgres.url, application_name)
