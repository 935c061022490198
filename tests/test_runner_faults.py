"""Every fault ends as exactly one row per item, classified right (real HTTP server)."""

import dataclasses
import json
import socket

import httpx
import pyarrow.compute as pc
import pytest

from pipeline.backfill import AuthenticationFailed, Backfill, plan_backfill, plan_retry, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices import start_http_api
from pipeline.manifests import ManifestStore
from pipeline.outcomes import Permanent, classify
from pipeline.work import FunctionWork

EXPECTED = {
    "1": ("ok", True, False),
    "e500-a": ("http_500", False, True),
    "e503-a": ("http_503", False, True),
    "e404-a": ("http_404", False, False),
    "e400-a": ("http_400", False, False),
    "throttle-a": ("http_429", False, True),
    "throttlenoretry-a": ("http_429", False, True),
    "slow-a": ("timeout", False, True),
    "badjson-a": ("bad_payload", False, False),
    "reset-a": ("connection", False, True),
    "raise-a": ("exception", False, False),
}


@pytest.fixture(scope="module")
def api():
    with start_http_api(rps=500) as service:
        yield service


def _http_work(base_url: str, token: str = "") -> FunctionWork:
    def connect():
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=base_url, timeout=1.0, headers=headers)

    def call(client, item):
        if item.id.startswith("raise-"):
            raise KeyError(item.id)
        response = client.get(f"/items/{item.id}")
        response.raise_for_status()
        return response.json()

    return FunctionWork(connect, call, secret_values=(token,) if token else ())


def _backfill(items, work, **limit) -> Backfill:
    return Backfill(
        "faults",
        Values.of(items),
        work,
        ServiceLimit("api", **(limit or {"requests_per_second": 200})),
        Estimates(seconds_per_call=0.01),
        Overrides(max_throttle_retries=1, max_retry_after_s=0.2),
    )


def _run(backfill, tmp_path):
    store = ManifestStore(str(tmp_path))
    plan_backfill(backfill, store)
    return store, run_attempt(backfill, store, LocalExecutor())


def _rows(store):
    with Ledger(store) as ledger:
        return {r["item_id"]: r for r in ledger.query("SELECT * FROM results").to_pylist()}


def test_each_fault_gets_one_row_classified(api, tmp_path):
    store, result = _run(_backfill(list(EXPECTED), _http_work(api.url)), tmp_path)
    rows = _rows(store)
    assert sorted(rows) == sorted(EXPECTED)  # exactly one row per item, none lost
    for item_id, (status, ok, retryable) in EXPECTED.items():
        row = rows[item_id]
        assert (row["status"], row["ok"], row["retryable"]) == (status, ok, retryable), item_id
    assert rows["throttle-a"]["tries"] == 2  # one in-chunk retry after Retry-After, then recorded
    assert rows["throttle-a"]["retry_after_s"] == 1.0  # kept for the sensor's cool-down
    assert result.max_retry_after == 1.0
    assert json.loads(rows["1"]["payload"])["id"] == "1"
    assert result.counts["items"] == len(EXPECTED)


def test_failing_connect_fails_every_item_retryably(tmp_path):
    def connect():
        raise ConnectionRefusedError("database is down")

    work = FunctionWork(connect, lambda client, item: None)
    store, result = _run(_backfill([str(i) for i in range(25)], work), tmp_path)
    rows = _rows(store)
    assert len(rows) == 25
    assert {(r["status"], r["ok"], r["retryable"]) for r in rows.values()} == {("connect_failed", False, True)}
    assert result.counts["failed"] == 25


def test_a_worker_exception_becomes_rows_not_a_lost_chunk(tmp_path):
    calls = []

    def call(client, item):
        calls.append(item.id)
        return {"ok": True}

    backfill = _backfill([str(i) for i in range(10)], FunctionWork(lambda: None, call))
    store = ManifestStore(str(tmp_path))
    plan_backfill(backfill, store)

    class ExplodingExecutor(LocalExecutor):
        def map(self, fn, chunks, max_parallelism):
            def explode_on_chunk_zero(chunk):
                if chunk.chunk_id == 0:
                    raise MemoryError("worker ran out of memory")
                return fn(chunk)

            return super().map(explode_on_chunk_zero, chunks, max_parallelism)

    result = run_attempt(backfill, store, ExplodingExecutor())
    rows = _rows(store)
    assert len(rows) == 10 and result.counts["items"] == 10
    lost = [r for r in rows.values() if r["status"] == "worker_error"]
    assert lost and all(r["retryable"] and "out of memory" in r["error"] for r in lost)


def test_bad_credentials_stop_the_run_and_record_nothing(tmp_path):
    with start_http_api(token="right-token") as api:
        backfill = _backfill([str(i) for i in range(400)], _http_work(api.url, token="wrong-token"))
        with pytest.raises(AuthenticationFailed, match="HTTP 401"):
            _run(backfill, tmp_path)
        arrivals = api.stats()["count"]
    store = ManifestStore(str(tmp_path))
    assert store.manifest_files() == []  # a rerun with fixed credentials does every chunk
    assert arrivals < 100, "fail-fast should stop long before all 400 items are tried"


def test_secrets_are_redacted_from_errors_and_payloads(api, tmp_path):
    secret = "sk-live-SECRET-123"

    def call(client, item):
        if item.id == "echo":
            return {"echo": f"token was {secret}"}
        raise RuntimeError(f"failed calling https://x/?api_key={secret}")

    work = FunctionWork(lambda: None, call, secret_values=(secret,))
    store, _ = _run(_backfill(["echo", "boom"], work), tmp_path)
    table = Ledger(store).query("SELECT * FROM results")
    text = " ".join(str(v) for row in table.to_pylist() for v in row.values())
    assert secret not in text
    assert "***" in text
    assert pc.sum(table["ok"]).as_py() == 1


def test_connection_refused_is_retryable(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store, result = _run(_backfill(["1", "2"], _http_work(f"http://127.0.0.1:{port}")), tmp_path)
    rows = _rows(store)
    assert {(r["status"], r["retryable"]) for r in rows.values()} == {("connection", True)}
    assert result.counts["failed"] == 2


def test_retry_round_heals_what_healed_on_the_server(api, tmp_path):
    items = ["1", "heal1-a", "heal2-b", "e404-c"]
    backfill = _backfill(items, _http_work(api.url))
    store, first = _run(backfill, tmp_path)
    assert (first.counts["ok"], first.counts["failed"], first.counts["dead"]) == (1, 2, 1)
    plan_retry(backfill, store, 1)
    second = run_attempt(backfill, store, LocalExecutor(), attempt=1)
    assert (second.counts["ok"], second.counts["failed"]) == (2, 1)  # heal2 needs one more round
    plan_retry(backfill, store, 2)
    third = run_attempt(backfill, store, LocalExecutor(), attempt=2)
    assert (third.counts["ok"], third.counts["failed"], third.counts["dead"]) == (3, 0, 1)
    with Ledger(store) as ledger:
        assert ledger.query("SELECT count(*) AS n FROM latest")["n"][0].as_py() == 4


def test_a_connect_that_says_permanent_is_not_retried(tmp_path):
    def connect():
        raise Permanent("table has no unique key", status="no_unique_key")

    store, result = _run(_backfill(["1", "2"], FunctionWork(connect, lambda client, item: None)), tmp_path)
    assert {(r["status"], r["retryable"]) for r in _rows(store).values()} == {("connect_failed", False)}
    assert result.counts["dead"] == 2


def test_bad_credentials_stop_the_run_even_when_chunks_are_tiny(tmp_path):
    with start_http_api(token="right-token") as api:
        backfill = dataclasses.replace(
            _backfill([str(i) for i in range(200)], _http_work(api.url, token="wrong-token")),
            overrides=Overrides(chunk_size=2, max_throttle_retries=1, max_retry_after_s=0.2),
        )
        with pytest.raises(AuthenticationFailed, match="HTTP 401"):
            _run(backfill, tmp_path)
        arrivals = api.stats()["count"]
    assert ManifestStore(str(tmp_path)).manifest_files() == []
    assert arrivals < 60


def test_a_failing_estimate_or_usage_stays_with_its_item(tmp_path):
    def cost(item):
        if item.id == "unpriceable":
            raise ValueError("no prompt to count")
        return 10.0

    def usage(payload):
        raise KeyError("usage")  # the response had no usage block: fall back to the estimate

    work = FunctionWork(lambda: None, lambda client, item: {"id": item.id}, cost_fn=cost, usage_fn=usage)
    store, result = _run(_backfill(["a", "unpriceable", "b"], work), tmp_path)
    rows = _rows(store)
    assert (rows["a"]["status"], rows["a"]["tokens"], rows["a"]["tries"]) == ("ok", 10.0, 1)
    assert (rows["unpriceable"]["status"], rows["unpriceable"]["retryable"]) == ("exception", False)
    assert rows["b"]["status"] == "ok" and result.counts["ok"] == 2


def test_retry_after_ms_is_preferred_when_a_service_sends_it():
    response = httpx.Response(
        429, headers={"retry-after-ms": "250", "retry-after": "1"}, request=httpx.Request("GET", "http://x/")
    )
    failure = classify(httpx.HTTPStatusError("429", request=response.request, response=response))
    assert (failure.status, failure.retryable, failure.retry_after) == ("http_429", True, 0.25)
