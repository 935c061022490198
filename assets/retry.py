"""The retry sensor: one retry round at a time, until nothing retryable is left.

It reads ``failed_count`` from the latest ``failed_items`` materialization.
When there are retryable failures and attempts left, it adds the next round's
partition (``attempt-n``) and requests one run of the retry job, whose
``run_key`` names the backfill, the round and that materialization's storage
id. The retry job refreshes ``failed_items``, so the next evaluation sees the
state after the round, and the loop converges: every round either heals items
or moves them one attempt closer to ``dead`` at ``max_attempts``.

A round is requested once per failed_items materialization (the run key),
never while a run of that round is still queued or running, and never after
a round failed (an account out of credit stops a run; launching the next
round into it would only repeat the refusal); a crashed
round is resumed by re-running its partition (its chunk plan is reused). The
sensor waits a cool-down of at least the longest Retry-After the service sent.
Whether and when to run the next round is ``pipeline.retries.next_round``,
the decision ``paceline demo`` makes too; the sensor adds what only Dagster
knows (a run of the round still in flight).
The retry run reuses the resource config (store root, limit, executor) of the
run that produced the failures, so a launchpad override carries over.
"""

import time
from collections.abc import Callable, Mapping
from typing import Any

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.keys import (
    EXECUTOR_KEY,
    FAILED_COUNT,
    MAX_RETRY_AFTER,
    NEXT_ATTEMPT,
    STORE_KEY,
    BackfillKeys,
    round_key,
)
from pipeline.retries import Stop, next_round
from pipeline.spec import BackfillSpec

PARTITION_TAG = "dagster/partition"  # set by Dagster on every partitioned run
UNFINISHED = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def retry_sensor(
    spec: BackfillSpec,
    keys: BackfillKeys,
    rounds: DynamicPartitionsDefinition,
    job_name: str,
    cooldown_s: float,
    interval_s: int,
    status: DefaultSensorStatus,
    clock: Callable[[], float] = time.time,
) -> SensorDefinition:
    """The sensor that drives the retry rounds of one backfill (``clock`` lets tests skip the cool-down)."""

    @sensor(
        name=f"{spec.name}_retry_sensor",
        job_name=job_name,
        minimum_interval_seconds=interval_s,
        default_status=status,
        description=f"Requests the next retry round of {spec.name} while items are retryable "
        f"(at most {spec.max_attempts - 1} rounds).",
    )
    def retry_failed(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        records = context.instance.fetch_materializations(keys.failed, limit=1).records
        if not records:
            return SkipReason(f"{spec.name}: failed_items has not been materialized yet.")
        record = records[0]
        metadata = record.asset_materialization.metadata
        missing = [label for label in (FAILED_COUNT, NEXT_ATTEMPT) if label not in metadata]
        if missing:
            return SkipReason(
                f"{spec.name}: the latest failed_items materialization has no {' or '.join(missing)}. "
                f"Materialize {spec.name}/failed_items again with this version of Paceline."
            )
        decision = next_round(
            failed=int(_value(metadata, FAILED_COUNT)),
            next_attempt=int(_value(metadata, NEXT_ATTEMPT)),
            max_attempts=spec.max_attempts,
            last_round_failed=_last_run_failed(context.instance, job_name),
            retry_after_s=_value(metadata, MAX_RETRY_AFTER),
            cooldown_s=cooldown_s,
            waited_s=clock() - record.timestamp,
        )
        if isinstance(decision, Stop):
            return SkipReason(f"{spec.name}: {decision.reason}")
        attempt, partition = decision.attempt, round_key(decision.attempt)
        if _round_in_flight(context.instance, job_name, partition):
            return SkipReason(f"{spec.name}: a run of {partition} is queued or running.")
        if decision.wait_s > 0:
            return SkipReason(f"{spec.name}: cooling down {decision.wait_s:.0f} s more before {partition}.")
        request = RunRequest(
            run_key=f"{spec.name}:{partition}:{record.storage_id}",
            partition_key=partition,
            run_config=_resource_config(context.instance, record.run_id, {spec.service, STORE_KEY, EXECUTOR_KEY}),
            tags={"paceline/backfill": spec.name, "paceline/attempt": str(attempt)},
        )
        return SensorResult(run_requests=[request], dynamic_partitions_requests=[rounds.build_add_request([partition])])

    return retry_failed


def _round_in_flight(instance: DagsterInstance, job_name: str, partition: str) -> bool:
    unfinished = RunsFilter(job_name=job_name, tags={PARTITION_TAG: partition}, statuses=UNFINISHED)
    return instance.get_runs_count(unfinished) > 0


def _last_run_failed(instance: DagsterInstance, job_name: str) -> str | None:
    """The partition of the latest run of the retry job if that run failed, else None."""
    runs = instance.get_runs(RunsFilter(job_name=job_name), limit=1)
    if not runs or runs[0].status != DagsterRunStatus.FAILURE:
        return None
    return runs[0].tags.get(PARTITION_TAG, runs[0].run_id)


def _value(metadata: Mapping[str, Any], label: str) -> float:
    entry = metadata.get(label)
    return 0.0 if entry is None or entry.value is None else float(entry.value)


def _resource_config(instance: DagsterInstance, run_id: str, keys: set[str]) -> dict[str, Any]:
    """The resource config the failures were produced with, for the resources a retry uses."""
    run = instance.get_run_by_id(run_id)
    resources = (run.run_config or {}).get("resources", {}) if run else {}
    chosen = {key: config for key, config in resources.items() if key in keys}
    return {"resources": chosen} if chosen else {}
