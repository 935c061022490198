"""The factory: one ``BackfillSpec`` becomes its Dagster assets, checks, jobs and retry sensor.

Per backfill, grouped under its name, keys prefixed by it::

    chunk_plan ─▶ manifests ─▶ failed_items ◀─ retry_manifests[attempt-n]
                      └──────────────────────────────▲

``retry_manifests`` reads the ledger (every manifest so far), so it depends on
``manifests``, not on ``failed_items``: that keeps the graph acyclic while the
data loops. The retry job materializes one retry round and then
``failed_items`` again, so the sensor always sees the state after the round.

``manifests`` and ``retry_manifests`` sit in the concurrency pool named after
the service. The pool does not keep a rate or a token budget: every attempt
holds a lease on its service's budget, and backfills running at once split
``limit x safety`` by their ``share`` (``pipeline.shares``); the pacing inside
each step keeps its part. The pool is still what bounds the rest: connections
and batches in flight, which leases do not split (``ServiceLimit.budget``), so
a service limited by those keeps its pool at 1 (set per pool in the UI or with
``dagster instance concurrency set``); and how many runs of one service start
at once (``default_limit: 4`` in ``dagster.yaml``). Two runs of one backfill
may then overlap too: that is safe (each chunk's manifest is replaced whole,
latest wins), though they may call the same chunks twice.

Each asset carries its ``kinds`` for the UI: ``parquet`` for what it writes,
``duckdb`` for what the ledger computes, and where chunks run (``python`` for
the local executor's threads, ``burla``).
"""

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetsDefinition,
    AssetSelection,
    DefaultSensorStatus,
    Definitions,
    DynamicPartitionsDefinition,
    MaterializeResult,
    asset,
    define_asset_job,
    in_process_executor,
)

from assets.checks import check_results, check_specs
from assets.keys import EXECUTOR_KEY, STORE_KEY, BackfillKeys, attempt_of
from assets.metadata import failed_metadata, plan_metadata, run_metadata
from assets.retry import retry_sensor
from pipeline.advice import advise
from pipeline.backfill import Backfill, Progress, open_ledger, plan_backfill, plan_retry, run_attempt
from pipeline.errors import ConfigError
from pipeline.ledger import Ledger
from pipeline.limits import ServiceLimit
from pipeline.manifests import ManifestError, ManifestStore
from pipeline.spec import BackfillSpec
from resources import ExecutorResource, ManifestStoreResource, ServiceResource, overridable

PROGRESS_EVERY_S = 5.0
RUNS_ON = {"local": "python", "burla": "burla"}  # executor kind -> the asset kind that shows where chunks run


@dataclass(frozen=True)
class BackfillOptions:
    """How the retry sensor and the failure-rate check behave; the defaults suit a first run.

    The sensor waits ``cooldown_s`` (or the longest Retry-After seen, if longer)
    after failed_items is refreshed before it requests the next round.
    """

    cooldown_s: float = 5.0
    sensor_interval_s: int = 10
    sensor_running: bool = True
    failure_rate_warn: float = 0.05
    clock: Callable[[], float] = time.time  # the sensor's cool-down clock; tests move it instead of sleeping


def backfill_definitions(
    spec: BackfillSpec, options: BackfillOptions = BackfillOptions(), executor: str = "local"
) -> Definitions:
    """The assets, checks, jobs and sensor of one backfill (resources are supplied separately).

    ``executor`` is the kind of executor the code location declares; it only
    labels the assets that run chunks (a launchpad override still decides).
    """
    keys = BackfillKeys.of(spec.name)
    rounds = DynamicPartitionsDefinition(name=f"{spec.name}_retry_rounds")
    needs = {spec.service, STORE_KEY, EXECUTOR_KEY}
    runs_on = RUNS_ON.get(executor, executor)
    assets = [
        _chunk_plan(spec, keys, needs),
        _manifests(spec, keys, needs, runs_on),
        _retry_manifests(spec, keys, needs, rounds, runs_on),
        _failed_items(spec, keys, options.failure_rate_warn),
    ]
    first_pass = define_asset_job(
        f"{spec.name}_backfill",
        selection=AssetSelection.assets(keys.plan, keys.manifests, keys.failed),
        description=f"{spec.name}: plan, run attempt 0, list what failed.",
    )
    retry = define_asset_job(
        f"{spec.name}_retry",
        selection=AssetSelection.assets(keys.retry, keys.failed),
        description=f"{spec.name}: one retry round, then the refreshed failed items.",
    )
    status = DefaultSensorStatus.RUNNING if options.sensor_running else DefaultSensorStatus.STOPPED
    sensor = retry_sensor(
        spec, keys, rounds, retry.name, options.cooldown_s, options.sensor_interval_s, status, options.clock
    )
    return Definitions(assets=assets, jobs=[first_pass, retry], sensors=[sensor])


def paceline_definitions(
    backfills: Sequence[BackfillSpec],
    services: Sequence[ServiceResource],
    store: ManifestStoreResource | None = None,
    executor: ExecutorResource | None = None,
    options: BackfillOptions = BackfillOptions(),
) -> Definitions:
    """A whole code location: backfills, their services (keyed by name), store and executor.

    The same three pieces the YAML components build one at a time
    (``paceline.Backfill``, ``paceline.Service``, ``paceline.Runtime``), so a
    backfill declared either way becomes the same definitions.
    """
    _check_services(backfills, {service.name for service in services})
    executor = executor or ExecutorResource()
    return Definitions.merge(
        *(backfill_definitions(spec, options, executor.kind) for spec in backfills),
        service_definitions(services),
        runtime_definitions(store or ManifestStoreResource(), executor),
    )


def service_definitions(services: Sequence[ServiceResource]) -> Definitions:
    """Each service as a resource keyed by its name, which is also its concurrency pool.

    Every value written in code is the default of its own field in the
    launchpad, so one limit can be raised without re-entering the rest.
    """
    return Definitions(resources={service.name: overridable(service) for service in services})


def runtime_definitions(store: ManifestStoreResource, executor: ExecutorResource) -> Definitions:
    """Where manifests go and where chunks run: one store and one executor per code location.

    Steps run in the run's own process (``in_process_executor``): chunks are
    I/O-bound threads or Burla jobs anyway, Burla needs the main thread, and an
    embedded demo service then lives once for the whole run.
    """
    return Definitions(
        resources={STORE_KEY: overridable(store), EXECUTOR_KEY: overridable(executor)},
        executor=in_process_executor,
    )


def _check_services(backfills: Sequence[BackfillSpec], resources: set[str]) -> None:
    for spec in backfills:
        if spec.service not in resources:
            raise ConfigError(
                f"backfill {spec.name!r} uses service {spec.service!r}, but no ServiceResource has "
                f"name={spec.service!r}. Add ServiceResource(name={spec.service!r}, ...) to services "
                f"(known: {', '.join(sorted(resources)) or 'none'})."
            )


def _chunk_plan(spec: BackfillSpec, keys: BackfillKeys, needs: set[str]) -> AssetsDefinition:
    @asset(
        key=keys.plan,
        group_name=spec.name,
        required_resource_keys=needs,
        kinds={"parquet"},
        description=f"The chunk plan of {spec.name}: every item and its chunk, written before any call.",
    )
    def chunk_plan(context: AssetExecutionContext) -> MaterializeResult:
        planned = plan_backfill(_backfill(spec, context.resources), _store(context.resources))
        return MaterializeResult(metadata=plan_metadata(planned))

    return chunk_plan


def _manifests(spec: BackfillSpec, keys: BackfillKeys, needs: set[str], runs_on: str) -> AssetsDefinition:
    @asset(
        key=keys.manifests,
        group_name=spec.name,
        deps=[keys.plan],
        pool=spec.service,
        required_resource_keys=needs,
        kinds={"parquet", runs_on},
        description=(
            f"Attempt 0 of {spec.name}: one Parquet manifest per finished chunk. "
            "Re-materializing resumes: chunks with a manifest are skipped."
        ),
    )
    def manifests(context: AssetExecutionContext) -> MaterializeResult:
        return _run(context, spec, attempt=0)

    return manifests


def _retry_manifests(
    spec: BackfillSpec, keys: BackfillKeys, needs: set[str], rounds: DynamicPartitionsDefinition, runs_on: str
) -> AssetsDefinition:
    @asset(
        key=keys.retry,
        group_name=spec.name,
        deps=[keys.manifests],
        pool=spec.service,
        partitions_def=rounds,
        required_resource_keys=needs,
        kinds={"parquet", runs_on},
        description=(
            f"Retry rounds of {spec.name}, one partition per round (attempt-1, attempt-2...): only the "
            "items whose latest row failed and can be retried. A later success wins in the ledger."
        ),
    )
    def retry_manifests(context: AssetExecutionContext) -> MaterializeResult:
        return _run(context, spec, attempt=attempt_of(context.partition_key, spec.max_attempts))

    return retry_manifests


def _failed_items(spec: BackfillSpec, keys: BackfillKeys, failure_rate_warn: float) -> AssetsDefinition:
    @asset(
        key=keys.failed,
        group_name=spec.name,
        deps=[keys.manifests, keys.retry],
        required_resource_keys={spec.service, STORE_KEY},
        kinds={"duckdb", "parquet"},
        check_specs=check_specs(keys, failure_rate_warn),
        description=(
            f"The items of {spec.name} whose latest row failed and may be retried (the ledger's "
            "`failed` view), as Parquet. The retry sensor reads failed_count from here; the checks "
            "judge the same ledger."
        ),
    )
    def failed_items(context: AssetExecutionContext) -> MaterializeResult:
        store = _store(context.resources)
        limit: ServiceLimit = getattr(context.resources, spec.service).limit()
        planned = store.read_table(store.plan_path(spec.name, 0)).select(["item_id"])
        with Ledger(store, spec.max_attempts, spec.name) as ledger:
            failed = ledger.failed_items(spec.name)
            retry_after = ledger.max_retry_after(spec.name)
            counts = ledger.counts(spec.name)
            # Every measured value, as `paceline advise` gives it; each run's own metadata compares with the limit.
            advice = advise(ledger.attempt_report(spec.name, counts["last_attempt"], None))
            checks = check_results(ledger, spec.name, planned, limit, failure_rate_warn)
        path = store.failed_path(spec.name)
        store.write_table(path, failed)
        return MaterializeResult(
            metadata=failed_metadata(failed, counts, spec.max_attempts, retry_after, store.uri(path), advice),
            check_results=checks,
        )

    return failed_items


def _run(context: AssetExecutionContext, spec: BackfillSpec, attempt: int) -> MaterializeResult:
    """Run (or resume) one attempt. A retry round is planned once; a rerun of it resumes that plan."""
    backfill = _backfill(spec, context.resources)
    store = _store(context.resources)
    plan = store.plan_path(spec.name, attempt)
    if attempt == 0 and not store.exists(plan):
        raise ManifestError(
            f"{spec.name}: there is no chunk plan at {store.uri(plan)}. Materialize {spec.name}/chunk_plan "
            f"first (the {spec.name}_backfill job runs both)."
        )
    executor = getattr(context.resources, EXECUTOR_KEY).executor()
    progress = ProgressLog(context, spec.name, attempt)
    # A retry round reads the rounds before it once: what to retry, and how fast (the round before's advice).
    with open_ledger(backfill, store) if attempt > 0 else contextlib.nullcontext() as before:
        if before is not None:
            plan_retry(backfill, store, attempt, before)  # planned once; a rerun of the round resumes that plan
        result = run_attempt(
            backfill, store, executor, attempt, run_id=context.run.run_id, on_progress=progress, ledger=before
        )
    if result.unreadable_manifests:
        context.log.warning(
            f"{len(result.unreadable_manifests)} unreadable manifest(s) were re-run and replaced, "
            f"e.g. {result.unreadable_manifests[0]}"
        )
    manifests = store.uri(store.attempt_dir(spec.name, attempt))
    return MaterializeResult(metadata=run_metadata(result, backfill.limit, manifests, partitioned=attempt > 0))


class ProgressLog:
    """Logs chunk progress at most every few seconds, and always at the last chunk."""

    def __init__(self, context: AssetExecutionContext, name: str, attempt: int, every_s: float = PROGRESS_EVERY_S):
        self._context = context
        self._label = f"{name} attempt {attempt}"
        self._every_s = every_s
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self._every_s and progress.chunks_done < progress.chunks_total:
            return
        self._last = now
        self._context.log.info(
            f"{self._label}: {progress.chunks_done}/{progress.chunks_total} chunks, "
            f"{progress.items_done:,}/{progress.items_total:,} items, {progress.ok:,} ok this run"
        )


def _backfill(spec: BackfillSpec, resources: Any) -> Backfill:
    service: ServiceResource = getattr(resources, spec.service)
    executor: ExecutorResource = getattr(resources, EXECUTOR_KEY)
    return spec.build(service.service(), executor.overrides(spec.overrides))


def _store(resources: Any) -> ManifestStore:
    return getattr(resources, STORE_KEY).store()
