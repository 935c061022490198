"""The Dagster assets, checks and retry sensor against the real rate-limited local API.

Every run goes through real Dagster execution (``execute_in_process`` on a
temporary persistent instance) and real HTTP calls; the sensor is evaluated
with ``build_sensor_context`` and the runs it requests are executed in-process,
which is what the daemon would do.
"""

import dataclasses
import time
from collections.abc import Callable

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterResourceFunctionError,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    build_resources,
    build_sensor_context,
    instance_for_test,
)

from assets import BackfillKeys, BackfillOptions, paceline_definitions
from pipeline.executors import BurlaExecutor, LocalExecutor
from pipeline.items import JsonlPrompts, Values
from pipeline.leases import LeaseHolder, lease_store, new_lease
from pipeline.limits import Estimates, Overrides
from pipeline.localservices import ServiceHandle, start_http_api, start_llm
from pipeline.manifests import ManifestStore
from pipeline.report import measure_against_limit
from pipeline.shares import LeaseTiming
from pipeline.spec import BackfillSpec
from pipeline.workloads.http_api import http_work
from pipeline.workloads.llm import llm_work
from resources import ExecutorResource, ManifestStoreResource, ServiceResource
from resources.service import LIMIT_FIELDS

SERVER_RPS = 100
PLAIN = [str(n) for n in range(1, 41)]
HEALING = ["heal1-a", "heal1-b", "heal1-c"]


@pytest.fixture(scope="module")
def api() -> ServiceHandle:
    with start_http_api(rps=SERVER_RPS) as handle:
        yield handle


@pytest.fixture
def fresh_api(api: ServiceHandle) -> ServiceHandle:
    api.reset()
    return api


@pytest.fixture
def instance() -> DagsterInstance:
    with instance_for_test() as test_instance:
        yield test_instance


def spec(name: str, items: list[str], max_attempts: int = 3, **overrides) -> BackfillSpec:
    return BackfillSpec(
        name=name,
        service="test_api",
        items=Values.of(items),
        work=http_work("{base}/items/{id}"),
        estimates=Estimates(seconds_per_call=0.005),
        overrides=Overrides(chunk_size=10, **overrides),
        max_attempts=max_attempts,
    )


def location(
    api: ServiceHandle,
    root: str,
    *specs: BackfillSpec,
    cooldown_s: float = 0.0,
    clock: Callable[[], float] = time.time,
    **limit,
) -> Definitions:
    service = ServiceResource(name="test_api", url=api.url, **(limit or {"requests_per_second": SERVER_RPS}))
    return paceline_definitions(
        backfills=specs,
        services=[service],
        store=ManifestStoreResource(root=root),
        options=BackfillOptions(cooldown_s=cooldown_s, clock=clock),
    )


def run(defs: Definitions, instance: DagsterInstance, job: str, **kwargs):
    return defs.resolve_job_def(job).execute_in_process(instance=instance, **kwargs)


def metadata(instance: DagsterInstance, key: AssetKey) -> dict:
    event = instance.get_latest_materialization_event(key)
    return {label: value.value for label, value in event.asset_materialization.metadata.items()}


def evaluate(defs: Definitions, instance: DagsterInstance, name: str):
    sensor = defs.resolve_sensor_def(f"{name}_retry_sensor")
    context = build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs)
    return sensor.evaluate_tick(context)


def launch(defs: Definitions, instance: DagsterInstance, name: str, tick) -> None:
    """Do what the daemon does with a tick: add the partitions, then run each requested run."""
    for request in tick.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
    for request in tick.run_requests:
        run(
            defs,
            instance,
            f"{name}_retry",
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
        )


def checks(result) -> dict[str, bool]:
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}


def test_plan_manifests_failed_items_then_retry_heals(fresh_api, instance, tmp_path):
    backfill = spec("e2e", PLAIN + HEALING + ["e404-gone"])
    defs = location(fresh_api, str(tmp_path / "data"), backfill)
    keys = BackfillKeys.of("e2e")

    first = run(defs, instance, "e2e_backfill")

    plan = metadata(instance, keys.plan)
    assert (plan["item_count"], plan["chunk_count"], plan["chunk_size"]) == (44, 5, 10)
    assert "req/s target" in plan["derivation"]
    assert (plan["dagster/row_count"], plan["dagster/uri"]) == (44, plan["plan_path"])
    done = metadata(instance, keys.manifests)
    assert (done["ok_count"], done["failed_count"], done["dead_count"]) == (40, 3, 1)
    assert done["dagster/row_count"] == 44
    assert done["dagster/uri"] == str(tmp_path / "data" / "manifests" / "backfill=e2e" / "attempt=0")
    assert {row.data["status"] for row in done["errors"].records} == {"http_500", "http_404"}
    assert done["busiest_1s"] <= SERVER_RPS and "limit 100.0/s" in done["rate_chart"]
    failed = metadata(instance, keys.failed)
    assert (failed["failed_count"], failed["dead_count"], failed["next_attempt"]) == (3, 1, 1)
    assert sorted(pq.read_table(failed["path"])["item_id"].to_pylist()) == HEALING
    assert (failed["dagster/row_count"], failed["dagster/uri"]) == (3, failed["path"])
    assert "heal1-a" in failed["preview"]
    assert checks(first) == {"no_item_lost": True, "limit_held": True, "failure_rate": False}  # 4/44 > 5%: a warning
    assert {e.check_name: e.severity.value for e in first.get_asset_check_evaluations()}["failure_rate"] == "WARN"
    stats = fresh_api.stats()
    assert stats["busiest_1s"] <= SERVER_RPS and stats["by_status"].get("429", 0) == 0

    instance.add_dynamic_partitions("e2e_retry_rounds", ["attempt-1"])
    retry = run(defs, instance, "e2e_retry", partition_key="attempt-1")

    retried = metadata(instance, keys.retry)
    assert retried["calls_this_run"] == len(HEALING) == retried["dagster/partition_row_count"]
    assert retried["dagster/uri"].endswith("backfill=e2e/attempt=1")
    after = metadata(instance, keys.failed)
    assert (after["failed_count"], after["dead_count"], after["ok_count"]) == (0, 1, 43)
    assert pq.read_table(after["path"]).num_rows == 0
    assert checks(retry)["no_item_lost"] and checks(retry)["limit_held"]


def test_assets_say_what_they_are_and_the_checks_belong_to_failed_items(api, tmp_path):
    keys = BackfillKeys.of("kinds")
    local = location(api, str(tmp_path), spec("kinds", PLAIN))
    service = ServiceResource(name="test_api", url=api.url, requests_per_second=SERVER_RPS)
    on_burla = paceline_definitions([spec("kinds", PLAIN)], [service], executor=ExecutorResource(kind="burla"))

    def kinds(defs: Definitions, key: AssetKey) -> set[str]:
        return set(defs.resolve_assets_def(key).get_asset_spec(key).kinds)

    assert kinds(local, keys.plan) == {"parquet"}
    assert kinds(local, keys.manifests) == kinds(local, keys.retry) == {"parquet", "python"}
    assert kinds(on_burla, keys.manifests) == kinds(on_burla, keys.retry) == {"parquet", "burla"}
    assert kinds(local, keys.failed) == {"duckdb", "parquet"}
    failed = local.resolve_assets_def(keys.failed)
    assert {spec.name for spec in failed.check_specs} == {"no_item_lost", "limit_held", "failure_rate"}


def test_one_ledger_per_round_and_per_refresh(fresh_api, instance, tmp_path, monkeypatch):
    """Each ledger lists the store and reads every footer: a round opens one before and one after, a refresh one."""
    listings = []
    list_files = ManifestStore.manifest_files
    monkeypatch.setattr(ManifestStore, "manifest_files", lambda store, *a: listings.append(a) or list_files(store, *a))
    defs = location(fresh_api, str(tmp_path / "data"), spec("counted", PLAIN[:10] + HEALING))

    run(defs, instance, "counted_backfill")
    assert len(listings) == 2, "attempt 0's own rows; failed_items and its three checks"

    listings.clear()
    instance.add_dynamic_partitions("counted_retry_rounds", ["attempt-1"])
    retry = run(defs, instance, "counted_retry", partition_key="attempt-1")
    assert len(listings) == 3, "the rounds before (what to retry, how fast); the round's rows; failed_items"
    assert checks(retry) == {"no_item_lost": True, "limit_held": True, "failure_rate": True}


def test_sensor_loop_converges_with_the_runs_own_config(fresh_api, instance, tmp_path):
    """The first run sets the store root in run config; the retry runs must use it too."""
    backfill = spec("loop", PLAIN[:20] + HEALING)
    defs = location(fresh_api, str(tmp_path / "not-here"), backfill)
    config = {"resources": {"manifest_store": {"config": {"root": str(tmp_path / "data")}}}}
    run(defs, instance, "loop_backfill", run_config=config)

    launched = 0
    for _ in range(4):
        tick = evaluate(defs, instance, "loop")
        if not tick.run_requests:
            break
        launch(defs, instance, "loop", tick)
        launched += 1

    assert launched == 1
    assert "nothing to retry" in tick.skip_message
    final = metadata(instance, BackfillKeys.of("loop").failed)
    assert (final["failed_count"], final["ok_count"]) == (0, 23)
    assert str(tmp_path / "data") in final["path"]
    assert not (tmp_path / "not-here").exists()


def test_sensor_requests_nothing_before_a_run_or_without_failures(fresh_api, instance, tmp_path):
    defs = location(fresh_api, str(tmp_path / "data"), spec("clean", PLAIN[:10]))
    assert "not been materialized" in evaluate(defs, instance, "clean").skip_message

    run(defs, instance, "clean_backfill")

    tick = evaluate(defs, instance, "clean")
    assert not tick.run_requests and "nothing to retry" in tick.skip_message


def test_sensor_requests_one_run_per_round_with_a_stable_run_key(fresh_api, instance, tmp_path):
    defs = location(fresh_api, str(tmp_path / "data"), spec("once", PLAIN[:10] + HEALING))
    run(defs, instance, "once_backfill")
    storage_id = instance.fetch_materializations(BackfillKeys.of("once").failed, limit=1).records[0].storage_id

    first, again = evaluate(defs, instance, "once"), evaluate(defs, instance, "once")

    assert [r.run_key for r in first.run_requests] == [f"once:attempt-1:{storage_id}"]
    assert [r.run_key for r in again.run_requests] == [f"once:attempt-1:{storage_id}"]  # the daemon dedupes
    assert first.run_requests[0].partition_key == "attempt-1"
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["attempt-1"]]


def test_sensor_never_requests_a_round_that_is_still_running(fresh_api, instance, tmp_path):
    """Even after failed_items is re-materialized (a new run key), a running round is not requested again."""
    defs = location(fresh_api, str(tmp_path / "data"), spec("queued", PLAIN[:10] + HEALING))
    run(defs, instance, "queued_backfill")
    instance.add_dynamic_partitions("queued_retry_rounds", ["attempt-1"])
    instance.add_run(
        DagsterRun(job_name="queued_retry", status=DagsterRunStatus.STARTED, tags={"dagster/partition": "attempt-1"})
    )
    run(defs, instance, "queued_backfill", asset_selection=[BackfillKeys.of("queued").failed])

    tick = evaluate(defs, instance, "queued")

    assert not tick.run_requests and "attempt-1 is queued or running" in tick.skip_message


def test_sensor_launches_nothing_after_a_failed_round(fresh_api, instance, tmp_path):
    """A round that failed (an account out of credit stops a run) is not followed by another into the same wall."""
    defs = location(fresh_api, str(tmp_path / "data"), spec("dry", PLAIN[:10] + HEALING))
    run(defs, instance, "dry_backfill")
    instance.add_run(
        DagsterRun(job_name="dry_retry", status=DagsterRunStatus.FAILURE, tags={"dagster/partition": "attempt-1"})
    )

    tick = evaluate(defs, instance, "dry")

    assert not tick.run_requests
    assert "the last retry run (attempt-1) failed" in tick.skip_message and "re-execute" in tick.skip_message


def test_sensor_waits_out_retry_after_and_stops_at_max_attempts(fresh_api, instance, tmp_path):
    """A 429 with Retry-After: 1 sets the cool-down; after the last attempt the item is dead."""
    backfill = spec("stubborn", PLAIN[:5] + ["throttle-x"], max_attempts=2, max_throttle_retries=0)
    later = [0.0]  # seconds the sensor's clock is ahead of the wall clock
    defs = location(fresh_api, str(tmp_path / "data"), backfill, clock=lambda: time.time() + later[0])
    run(defs, instance, "stubborn_backfill")
    assert metadata(instance, BackfillKeys.of("stubborn").failed)["max_retry_after"] == 1.0

    assert "cooling down" in evaluate(defs, instance, "stubborn").skip_message
    later[0] += 1.1
    tick = evaluate(defs, instance, "stubborn")
    assert [r.partition_key for r in tick.run_requests] == ["attempt-1"]
    launch(defs, instance, "stubborn", tick)

    final = metadata(instance, BackfillKeys.of("stubborn").failed)
    assert (final["failed_count"], final["dead_count"], final["attempts_left"]) == (0, 1, 0)
    arrivals = fresh_api.stats()["count"]
    later[0] += 1.1
    assert not evaluate(defs, instance, "stubborn").run_requests
    assert fresh_api.stats()["count"] == arrivals


def test_rematerializing_manifests_resumes_finished_chunks(fresh_api, instance, tmp_path):
    root = tmp_path / "data"
    defs = location(fresh_api, str(root), spec("resume", PLAIN))
    run(defs, instance, "resume_backfill")
    folder = root / "manifests" / "backfill=resume" / "attempt=0"
    [compacted] = folder.glob("compacted-*.parquet")
    rows = pq.read_table(compacted)
    for chunk in (0, 2, 3):  # as if the run had died before chunk 1 finished, and before compacting
        pq.write_table(rows.filter(pc.equal(rows["chunk_id"], chunk)), folder / f"chunk-{chunk:06d}.parquet")
    compacted.unlink()

    defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[BackfillKeys.of("resume").manifests]
    )

    resumed = metadata(instance, BackfillKeys.of("resume").manifests)
    assert (resumed["chunks_resumed"], resumed["calls_this_run"], resumed["ok_count"]) == (3, 10, 40)
    assert resumed["chunk_files_compacted"] == 4
    assert compacted.exists() and not list(folder.glob("chunk-*.parquet")), "the resumed attempt is compacted"


def test_a_bad_limit_fails_the_run_with_the_engine_message(fresh_api, instance, tmp_path):
    defs = location(fresh_api, str(tmp_path / "data"), spec("bad", PLAIN[:5]), requests_per_second=0)

    result = run(defs, instance, "bad_backfill", raise_on_error=False)

    assert not result.success
    messages = " ".join(str(e.event_specific_data.error) for e in result.all_events if e.is_failure)
    assert "requests_per_second must be a positive number" in messages
    assert fresh_api.stats()["count"] == 0


def test_an_account_out_of_credit_fails_the_run_with_the_services_words(instance, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"id": {n}, "prompt": "hello number {n}"}}\n' for n in range(30)))
    with start_llm(credit_tokens=200, latency_ms=0) as llm:
        backfill = BackfillSpec(
            name="dry",
            service="llm",
            items=JsonlPrompts(str(prompts)),
            work=llm_work("m", max_tokens=8),
            estimates=Estimates(seconds_per_call=0.005),
        )
        service = ServiceResource(name="llm", url=f"{llm.url}/v1", tokens_per_minute=60_000, requests_per_second=20)
        defs = paceline_definitions(
            backfills=[backfill], services=[service], store=ManifestStoreResource(root=str(tmp_path / "data"))
        )
        result = run(defs, instance, "dry_backfill", raise_on_error=False)

    assert not result.success
    messages = " ".join(str(e.event_specific_data.error) for e in result.all_events if e.is_failure)
    assert "out of credit or quota" in messages and "exceeded your current quota" in messages


def test_max_parallelism_pin_passes_the_admission_check_or_is_refused(fresh_api, instance, tmp_path):
    backfill = spec("pinned", PLAIN[:10])
    service = ServiceResource(name="test_api", url=fresh_api.url, requests_per_second=SERVER_RPS, safe_connections=4)

    def plan_with(pin: int):
        store = ManifestStoreResource(root=str(tmp_path / "data"))
        defs = paceline_definitions([backfill], [service], store, ExecutorResource(max_parallelism=pin))
        plan_only = [BackfillKeys.of("pinned").plan]
        return run(defs, instance, "pinned_backfill", raise_on_error=False, asset_selection=plan_only)

    assert plan_with(2).success and metadata(instance, BackfillKeys.of("pinned").plan)["max_parallelism"] == 2
    refused = plan_with(50)
    assert not refused.success
    assert "exceeds the 4 safe connections" in str(refused.all_events[-1].event_specific_data.error)


def test_a_run_records_the_share_of_the_services_budget_it_had(fresh_api, instance, tmp_path):
    """Beside a running backfill of weight 1, one of share 3 plans, runs and records three quarters."""
    root = str(tmp_path / "data")
    other = new_lease("test_api", "nightly", 0, "run-nightly", 1.0, 0.0, {"requests_per_second": SERVER_RPS / 2}, 2)
    nightly = LeaseHolder(lease_store(root), other, LeaseTiming())
    nightly.acquire()
    nightly.start()
    try:
        defs = location(fresh_api, root, dataclasses.replace(spec("weighted", PLAIN[:20]), share=3.0))
        assert run(defs, instance, "weighted_backfill").success
    finally:
        nightly.release()
    keys = BackfillKeys.of("weighted")
    plan, manifests = metadata(instance, keys.plan), metadata(instance, keys.manifests)
    assert "it would get share 0.75 of the budget (weight 3, min_share 0)" in plan["derivation"]
    assert (manifests["share_at_start"], manifests["share_at_end"]) == (0.75, 0.75)
    table = manifests["share_changes"].splitlines()
    assert table[0] == "| time (UTC) | share | live leases |" and table[2].endswith("| 0.75 | 2 |")
    assert len(table) == 3, "the share never changed: one row"


def test_service_backfills_share_the_services_pool(api, tmp_path):
    defs = location(api, str(tmp_path), spec("one", PLAIN), spec("two", PLAIN))
    for name in ("one", "two"):
        keys = BackfillKeys.of(name)
        for key in (keys.manifests, keys.retry):
            assert defs.resolve_assets_def(key).op.pool == "test_api"
        assert defs.resolve_assets_def(keys.plan).op.pool is None


def test_paceline_definitions_refuses_a_backfill_without_its_service(api, tmp_path):
    with pytest.raises(ValueError, match="no ServiceResource has name='test_api'"):
        paceline_definitions([spec("orphan", PLAIN)], [], ManifestStoreResource(root=str(tmp_path)))


def test_resources_carry_every_limit_field_and_build_engine_objects():
    assert set(LIMIT_FIELDS) <= set(ServiceResource.model_fields)
    service = ServiceResource(name="svc", requests_per_minute=600, safe_connections=8, safety=0.25)
    assert service.limit().global_rate() == 10 and service.limit().safety == 0.25
    assert isinstance(ExecutorResource().executor(), LocalExecutor)
    burla = ExecutorResource(kind="burla", func_cpu=2, func_ram=4, grow=True).executor()
    assert isinstance(burla, BurlaExecutor) and (burla.func_cpu, burla.func_ram, burla.grow) == (2, 4, True)
    with pytest.raises(ValueError, match="kind 'cloud' is not known"):
        ExecutorResource(kind="cloud").executor()
    pinned = ExecutorResource(max_parallelism=3).overrides(Overrides(chunk_size=5))
    assert pinned == Overrides(max_parallelism=3, chunk_size=5)


def test_embedded_service_runs_for_the_resource_lifetime_with_the_declared_limit():
    declared = ServiceResource(name="demo", requests_per_second=5, embedded="http_api")
    with build_resources({"demo": declared}) as resources:
        url = resources.demo.service().url
        with httpx.Client(base_url=url, trust_env=False) as client:
            codes = [client.get(f"/items/{n}").status_code for n in range(8)]
    assert codes.count(200) == 5 and codes.count(429) == 3
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/_stats", trust_env=False, timeout=2)


def test_embedded_llm_is_openai_compatible_under_the_declared_budget():
    declared = ServiceResource(name="llm", tokens_per_minute=6000, requests_per_minute=2, embedded="llm")
    with build_resources({"llm": declared}) as resources:
        url = resources.llm.service().url
        chat = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
        codes = [httpx.post(f"{url}/chat/completions", json=chat, trust_env=False).status_code for _ in range(3)]
    assert url.endswith("/v1") and codes == [200, 200, 429]


def test_a_service_with_neither_url_nor_embedded_is_refused_before_any_call():
    with pytest.raises(DagsterResourceFunctionError) as refused:
        with build_resources({"svc": ServiceResource(name="svc", requests_per_second=5)}):
            pass
    assert "url is empty and embedded is ''. Set url" in str(refused.value.__cause__)


def test_limit_measure_flags_a_busiest_window_over_the_declared_limit():
    times = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 2.0])
    tokens = np.full(len(times), 100.0)
    limit = ServiceResource(name="svc", requests_per_second=5, tokens_per_minute=600).limit()

    measured = measure_against_limit(times, tokens, limit)

    assert measured == {"busiest_1s": (6, 5), "busiest_tokens_60s": (700.0, 600)}
