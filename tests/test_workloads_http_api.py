"""HTTP API workloads against the real local API: rows, limits measured by the server, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.backfill import AuthenticationFailed, plan_backfill
from pipeline.items import Values
from pipeline.limits import Estimates, LimitError, Overrides, ServiceLimit
from pipeline.localservices import ServiceHandle, start_http_api
from pipeline.localservices.http_api import item_value
from pipeline.spec import BackfillSpec, Service
from pipeline.work import Item
from pipeline.workloads import (
    Batches,
    HttpWork,
    MissingSecretError,
    WorkloadConfigError,
    http_batch_work,
    http_work,
    token_from_env,
)

TOKEN = "tok-3f9c2a7e51"


def spec(name: str, items: Values | Batches, work: object, **kwargs: object) -> BackfillSpec:
    return BackfillSpec(name=name, service="api", items=items, work=work, **kwargs)  # type: ignore[arg-type]


def test_rows_stored_rate_held_one_connection_per_chunk_and_token_never_stored(
    runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACELINE_TEST_TOKEN", TOKEN)
    ids = [f"user-{n}" for n in range(60)]
    limit = ServiceLimit(name="api", requests_per_second=40)  # safety 0.5: aim at 20 req/s
    with start_http_api(rps=40, token=TOKEN) as api:
        backfill = spec("http_ok", Values.of(ids), http_work(), estimates=Estimates(seconds_per_call=0.2)).build(
            Service(limit, api.url, token_from_env("PACELINE_TEST_TOKEN"))
        )
        result = runner.run(backfill)
        stats = api.stats()

    rows = runner.latest(backfill)
    assert result.counts["ok"] == len(ids) == len(rows)
    assert all(json.loads(rows[i]["payload"]) == {"id": i, "value": item_value(i)} for i in ids)
    assert stats["by_status"] == {"200": len(ids)}, "no 429 and no 401: the engine kept under the limit"
    assert stats["busiest_1s"] <= 40
    assert result.report.achieved_rate >= 0.6 * 20, "the budget is used, not wasted"
    assert stats["peers"] == runner.chunks(backfill), "one client, one keep-alive connection, per chunk"
    manifests = b"".join(p.read_bytes() for p in Path(runner.store.root).rglob("*.parquet"))
    assert TOKEN.encode() not in manifests


def test_faults_become_the_right_rows(runner, http_api: ServiceHandle) -> None:
    faults = ["e500-a", "e503-a", "e404-a", "e400-a", "throttle-a", "badjson-a", "reset-a", "slow-a"]
    plain = [f"ok-{n}" for n in range(6)]
    backfill = spec(
        "http_faults",
        Values.of(faults + plain),
        http_work(timeout_s=1.0),
        overrides=Overrides(chunk_size=1),
    ).build(Service(ServiceLimit(name="api", requests_per_second=200), http_api.url))
    result = runner.run(backfill)
    rows = runner.latest(backfill)

    def outcome(item_id: str) -> tuple[str, bool, bool]:
        row = rows[item_id]
        return row["status"], row["ok"], row["retryable"]

    assert outcome("e500-a") == ("http_500", False, True)
    assert outcome("e503-a") == ("http_503", False, True)
    assert outcome("throttle-a") == ("http_429", False, True)
    assert rows["throttle-a"]["tries"] == 4, (
        "alone in its chunk, every call throttled: the service paces it, so it waits"
    )
    assert outcome("e404-a") == ("http_404", False, False)
    assert outcome("e400-a") == ("http_400", False, False)
    assert outcome("badjson-a") == ("bad_payload", False, False)
    assert outcome("reset-a") == ("connection", False, True)
    assert outcome("slow-a") == ("timeout", False, True)
    assert all(rows[i]["ok"] for i in plain)
    assert result.counts == {"items": 14, "ok": 6, "failed": 5, "dead": 3, "last_attempt": 0}


def test_unreachable_service_fails_every_item_retryably(runner) -> None:
    backfill = spec("http_down", Values.of(["a", "b", "c"]), http_work(timeout_s=1.0)).build(
        Service(ServiceLimit(name="api", requests_per_second=100), "http://127.0.0.1:9")
    )
    result = runner.run(backfill)
    assert {row["status"] for row in runner.latest(backfill).values()} == {"connection"}
    assert result.counts["failed"] == 3


def test_wrong_token_stops_the_backfill_after_the_first_calls(runner) -> None:
    with start_http_api(token=TOKEN) as api:
        backfill = spec("http_auth", Values.of(range(40)), http_work(), overrides=Overrides(chunk_size=40)).build(
            Service(ServiceLimit(name="api", requests_per_second=500), api.url, "not-the-token")
        )
        with pytest.raises(AuthenticationFailed, match="credentials"):
            runner.run(backfill)
        assert api.stats()["by_status"] == {"401": 5}, "fail fast: 5 refused calls, not 40"


@pytest.mark.parametrize(
    ("factory", "url", "message"),
    [
        (http_work(""), "URL", "HttpWork.url_template: is empty"),
        (http_work(), "", "HttpWork.base: is empty but the template uses {base}"),
        (http_work("{base}/items"), "URL", "uses no item field"),
        (http_work("{base}/items/{id.upper}"), "URL", "is not a plain name"),
        (http_work("{base}/items/{id"), "URL", "is not a valid template"),
        (http_work("/items/{id}"), "URL", "is not an absolute http(s) URL"),
        (http_work(method="FETCH"), "URL", "HttpWork.method: 'FETCH' is not supported"),
        (http_work(timeout_s=0), "URL", "HttpWork.timeout_s: must be greater than 0"),
        (http_work(headers={"X-A": "b\r\nEvil: 1"}), "URL", "without line breaks"),
        (http_batch_work(), "URL", "needs concurrent_batches declared"),
    ],
)
def test_bad_declarations_are_refused_before_any_call(
    runner, http_api: ServiceHandle, factory: object, url: str, message: str
) -> None:
    service = Service(ServiceLimit(name="api", requests_per_second=10), http_api.url if url else "")
    with pytest.raises(WorkloadConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec("http_bad", Values.of(["1"]), factory).build(service)
    assert http_api.stats()["count"] == 0


def test_missing_token_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PACELINE_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(MissingSecretError, match="PACELINE_NO_SUCH_TOKEN is not set"):
        token_from_env("PACELINE_NO_SUCH_TOKEN")


def test_post_with_body_template_fills_item_fields(http_api: ServiceHandle) -> None:
    work = HttpWork(url_template="{base}/batch", base=http_api.url, method="POST", json_body_template=["{id}", 1])
    with work.connect() as client:
        assert work.call(client, Item("x/y")) == {"upserted": 2}


def test_batches_hold_the_concurrent_batch_limit_and_every_record_once(runner) -> None:
    records = [f"vec-{n}" for n in range(300)]
    items = Batches(Values.of(records + records[:10]), batch_size=10)  # repeats are dropped, not sent twice
    limit = ServiceLimit(name="api", concurrent_batches=3, safety=1.0)
    with start_http_api(max_concurrent_batches=3, latency_ms=100) as api:
        service = Service(limit, api.url)
        too_many = spec("batch_over", items, http_batch_work(), overrides=Overrides(max_parallelism=4))
        with pytest.raises(LimitError, match="exceeds the 3 safe connections/batches"):
            plan_backfill(too_many.build(service), runner.store)
        assert api.stats()["count"] == 0

        backfill = spec("batches", items, http_batch_work(), estimates=Estimates(seconds_per_call=0.1)).build(service)
        result = runner.run(backfill)
        stats = api.stats()

    assert result.execution.max_parallelism == 3
    assert result.counts["ok"] == 30
    assert stats["by_status"] == {"200": 30}
    assert 2 <= stats["peak_concurrent_batches"] <= 3
    plan = runner.store.read_table(runner.store.plan_path("batches", 0)).to_pylist()
    sent = [r for row in plan for r in json.loads(row["payload"])["records"]]
    assert sorted(sent) == sorted(records)
    assert sum(json.loads(row["payload"])["count"] for row in runner.latest(backfill).values()) == 300
