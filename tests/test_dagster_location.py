"""The code location as Dagster loads it: ``defs``, ``workspace.yaml``, ``dagster dev`` and its GraphQL API."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
from dagster import DagsterInstance, Definitions, job, op

from assets import EXECUTOR_KEY, STORE_KEY, BackfillKeys
from paceline.definitions import defs
from pipeline.backfill import OutOfCredit

PROJECT = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")
STARTUP_S = 90
RUN_S = 120

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
STATUS = "query Status($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } } }"
LOCATIONS = """
{ workspaceOrError { ... on Workspace { locationEntries {
    name locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
MATERIALIZATION = """
query Latest($path: [String!]!) {
  assetOrError(assetKey: {path: $path}) {
    ... on Asset { assetMaterializations(limit: 1) {
      runId
      metadataEntries { label ... on IntMetadataEntry { intValue } ... on MarkdownMetadataEntry { mdStr } }
    } }
  }
}"""


def test_defs_load_with_the_demo_backfill_its_jobs_sensor_and_resources():
    Definitions.validate_loadable(defs)
    keys = BackfillKeys.of("demo_ids")
    graph = defs.resolve_asset_graph()
    assert {graph.get(key).group_name for key in (keys.plan, keys.manifests, keys.retry, keys.failed)} == {"demo_ids"}
    assert defs.resolve_job_def("demo_ids_backfill") and defs.resolve_job_def("demo_ids_retry")
    assert defs.resolve_sensor_def("demo_ids_retry_sensor").job_name == "demo_ids_retry"
    assert {"demo_api", STORE_KEY, EXECUTOR_KEY} <= set(defs.resources)


@op
def spend() -> None:
    raise OutOfCredit("demo_api: your credit balance is too low")


@job
def out_of_credit() -> None:
    spend()


def test_the_instance_retries_a_crashed_run_and_not_a_failed_asset(tmp_path):
    """The project's dagster.yaml decides at failure time, in the ``dagster/will_retry`` tag the daemon acts on."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_config(str(home)) as instance:
        failed = out_of_credit.execute_in_process(instance=instance, raise_on_error=False)
        crashed = instance.create_run_for_job(out_of_credit, status="STARTED")
        # What the code server reports when a run's process dies without a word (kill -9).
        instance.report_run_failed(crashed, "Run execution process was terminated by signal 9 (SIGKILL).")
        will_retry = {
            name: instance.get_run_by_id(run_id).tags.get("dagster/will_retry")
            for name, run_id in (("failed asset", failed.run_id), ("crashed", crashed.run_id))
        }
    assert not failed.success
    assert will_retry == {"failed asset": "false", "crashed": "true"}


@pytest.fixture
def dagster_dev(tmp_path):
    """``dagster dev -w workspace.yaml`` with the project's instance config in a temporary DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    log = (tmp_path / "dagster-dev.log").open("wb")
    process = subprocess.Popen(
        [str(DAGSTER), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT,
        env={**os.environ, "DAGSTER_HOME": str(home)},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=30)
        _wait_until_serving(client, process, tmp_path / "dagster-dev.log")
        yield client, home
    finally:
        _stop_group(process)
        log.close()


def test_dagster_dev_loads_the_workspace_and_runs_a_launched_materialization(dagster_dev, tmp_path):
    client, home = dagster_dev
    entries = _graphql(client, LOCATIONS)["workspaceOrError"]["locationEntries"]
    loaded = [(entry["name"], entry["locationOrLoadError"]["__typename"]) for entry in entries]
    assert loaded == [("paceline", "RepositoryLocation")]

    root = tmp_path / "manifests"
    config = {
        "resources": {
            STORE_KEY: {"config": {"root": str(root)}},
            "demo_api": {"config": {"requests_per_second": 2000, "demo_faults": 0.0}},  # raised in run config only
        }
    }
    params = {
        "selector": {
            "repositoryLocationName": "paceline",
            "repositoryName": "__repository__",
            "jobName": "demo_ids_backfill",
        },
        "runConfigData": config,
    }
    launched = _graphql(client, LAUNCH, {"params": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]

    assert _wait_for_run(client, run_id) == "SUCCESS"
    failed = _latest_metadata(client, ["demo_ids", "failed_items"])
    assert failed["runId"] == run_id
    assert failed["entries"]["failed_count"]["intValue"] == 0
    assert failed["entries"]["ok_count"]["intValue"] == 3000
    manifests = _latest_metadata(client, ["demo_ids", "manifests"])
    assert "limit 2,000.0/s" in manifests["entries"]["rate_chart"]["mdStr"]
    assert (root / "plans" / "backfill=demo_ids" / "attempt=0.parquet").exists()
    instance = DagsterInstance.from_config(str(home))
    pools = {pool.name: pool.limit for pool in instance.event_log_storage.get_pool_limits()}
    assert pools.get("demo_api") == 4, "the default of dagster.yaml: leases, not the pool, split a rate"


def _graphql(client: httpx.Client, query: str, variables: dict | None = None) -> dict:
    response = client.post("/graphql", json={"query": query, "variables": variables or {}})
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


def _latest_metadata(client: httpx.Client, path: list[str]) -> dict:
    asset = _graphql(client, MATERIALIZATION, {"path": path})["assetOrError"]
    (latest,) = asset["assetMaterializations"]
    return {"runId": latest["runId"], "entries": {entry["label"]: entry for entry in latest["metadataEntries"]}}


def _wait_for_run(client: httpx.Client, run_id: str) -> str:
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline:
        status = _graphql(client, STATUS, {"id": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    return "TIMED OUT"


def _wait_until_serving(client: httpx.Client, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            if client.get("/server_info").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"dagster dev did not serve within {STARTUP_S} s:\n{log.read_text(errors='replace')}")


def _stop_group(process: subprocess.Popen) -> None:
    """Ctrl-C the process group we started, then kill whatever it left behind."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
