"""Backfills declared in YAML (``paceline.Service`` / ``paceline.Backfill`` / ``paceline.Runtime``).

The README's defs.yaml is run verbatim against the real local API and
compared with the same backfill declared in Python; the YAML demo of the code
location runs end to end and its sensor heals it; every bad-YAML case fails
``dg check`` (run as the user runs it, in a subprocess) with its message.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import Definitions, EnvVar, instance_for_test, load_from_defs_folder, serialize_value

from assets import STORE_KEY, BackfillKeys, paceline_definitions
from paceline import Service
from paceline.components import Backfill as BackfillComponent
from paceline.components import EstimatesOptions, ExecutorOptions, OverridesOptions
from paceline.definitions import defs as location
from pipeline.items import TextLines
from pipeline.leases import LeaseHolder, lease_store, new_lease
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices import start_http_api
from pipeline.shares import LeaseTiming
from pipeline.spec import BackfillSpec
from pipeline.workloads.http_api import http_work
from resources import ExecutorResource, ManifestStoreResource, ServiceResource
from tests.test_dagster_backfill import evaluate, launch, metadata

PROJECT = Path(__file__).resolve().parents[1]
README = (PROJECT / "README.md").read_text()
SECTION = README.split("## Declare it in YAML", 1)[1].split("\n## ", 1)[0]
README_YAML = SECTION.split("```yaml\n", 1)[1].split("```", 1)[0]
DG = Path(sys.executable).with_name("dg")
TOKEN = "tok-yaml-8c1e5f0b3a"
INLINE_SECRET = "sk-live-000111"
USERS = [f"user-{n}" for n in range(40)]


def dg_project(root: Path, package: str, yaml_text: str, items: list[str] = USERS) -> Path:
    """A dg project as ``create-dagster`` lays it out, with one component folder holding ``yaml_text``."""
    folder = root / package / "defs" / "users"
    folder.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "{package}"\nversion = "0.0.0"\n\n[tool.dg]\ndirectory_type = "project"\n\n'
        f'[tool.dg.project]\nroot_module = "{package}"\n'
    )
    (root / package / "__init__.py").write_text("")
    (root / package / "defs" / "__init__.py").write_text("")
    (root / package / "definitions.py").write_text(
        "from pathlib import Path\n\nimport dagster as dg\n\n\n@dg.definitions\ndef defs():\n"
        "    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)\n"
    )
    (folder / "defs.yaml").write_text(yaml_text)
    (folder / "user_ids.txt").write_text("\n".join(items) + "\n")
    return folder


def dg(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parents[1]), "NO_COLOR": "1"}
    return subprocess.run([str(DG), *command.split()], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def readme_project(tmp_path, monkeypatch):
    """The README's defs.yaml, verbatim, in a fresh project; run from its folder (manifest_root: data)."""
    package = f"readme_{tmp_path.name.replace('-', '_')}"
    folder = dg_project(tmp_path, package, README_YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path, folder


def test_the_readme_yaml_runs_as_written_and_keeps_its_secret(readme_project, monkeypatch, capfd):
    root, _ = readme_project
    with start_http_api(rps=200, token=TOKEN) as api, instance_for_test() as instance:
        monkeypatch.setenv("USERS_API_URL", api.url)
        monkeypatch.setenv("USERS_API_TOKEN", TOKEN)
        defs = load_from_defs_folder(path_within_project=root)
        Definitions.validate_loadable(defs)
        result = defs.resolve_job_def("users_backfill").execute_in_process(instance=instance)
        failed = metadata(instance, BackfillKeys.of("users").failed)
        events = "\n".join(serialize_value(entry) for entry in instance.all_logs(result.run_id))
        run = instance.get_run_by_id(result.run_id)
        run_record = serialize_value(run) + serialize_value(instance.get_job_snapshot(run.job_snapshot_id))
        stats = api.stats()

    assert result.success
    assert (failed["ok_count"], failed["failed_count"]) == (len(USERS), 0)
    assert stats["by_status"] == {"200": len(USERS)}  # the token from {{ env.USERS_API_TOKEN }} was accepted
    assert (root / "data" / "manifests" / "backfill=users").is_dir()
    parquet = "\n".join(str(pq.read_table(f).to_pylist()) for f in (root / "data").rglob("*.parquet"))
    printed = capfd.readouterr()
    for where, text in {
        "parquet": parquet,
        "events": events,
        "run and job snapshot": run_record,
        "stdout": printed.out,
        "stderr": printed.err,
    }.items():
        assert TOKEN not in text, f"the secret leaked into {where}"
    assert "USERS_API_TOKEN" in run_record  # Dagster keeps the variable's name


def test_a_yaml_backfill_and_the_same_backfill_in_python_are_the_same_definitions(readme_project):
    root, folder = readme_project
    from_yaml = load_from_defs_folder(path_within_project=root)
    users = BackfillSpec(
        name="users",
        service="users_api",
        items=TextLines(str(folder / "user_ids.txt")),
        work=http_work("{base}/items/{id}", timeout_s=10),
        estimates=Estimates(seconds_per_call=0.05),
        max_attempts=3,
    )
    service = ServiceResource(
        name="users_api", requests_per_second=200, url=EnvVar("USERS_API_URL"), secret=EnvVar("USERS_API_TOKEN")
    )
    from_python = paceline_definitions(
        [users], [service], ManifestStoreResource(root="data"), ExecutorResource(kind="local")
    )
    assert _shape(from_yaml) == _shape(from_python)
    assert _shape(from_yaml)["resources"]["users_api"]["secret"] == {"env": "USERS_API_TOKEN"}


def test_a_yaml_share_reaches_the_plan_beside_a_running_backfill(tmp_path, monkeypatch):
    """share: 3 and min_share: 0.2 in YAML: the plan's explanation says the part of the budget it would get."""
    package = f"shares_{tmp_path.name.replace('-', '_')}"
    dg_project(tmp_path, package, README_YAML.replace("  max_attempts: 3\n", "  share: 3\n  min_share: 0.2\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("USERS_API_URL", "http://127.0.0.1:9")  # the plan makes no call
    monkeypatch.setenv("USERS_API_TOKEN", TOKEN)
    budget = {"requests_per_second": 100.0}
    nightly = LeaseHolder(
        lease_store("data"), new_lease("users_api", "nightly", 0, "r", 1, 0, budget, 2), LeaseTiming()
    )
    nightly.acquire()
    try:
        defs = load_from_defs_folder(path_within_project=tmp_path)
        keys = BackfillKeys.of("users")
        with instance_for_test() as instance:
            job = defs.resolve_implicit_global_asset_job_def()
            assert job.execute_in_process(instance=instance, asset_selection=[keys.plan]).success
            derivation = metadata(instance, keys.plan)["derivation"]
    finally:
        nightly.release()
    assert "1 other backfill(s) hold a lease on users_api now" in derivation
    assert "it would get share 0.75 of the budget (weight 3, min_share 0.2)" in derivation


def test_the_share_fields_are_the_specs_own():
    for name in ("share", "min_share"):
        declared, shown = BackfillSpec.__dataclass_fields__[name], BackfillComponent.model_fields[name]
        assert (shown.default, shown.description) == (declared.default, declared.metadata["description"]), name


def _shape(defs: Definitions) -> dict:
    """What a backfill declaration decides: asset keys, groups, pools, checks, jobs, sensor, resource config."""
    graph = defs.resolve_asset_graph()
    assets = {
        key.to_user_string(): (graph.get(key).group_name, graph.get(key).pools, graph.get(key).description)
        for key in graph.get_all_asset_keys()
    }
    jobs = {
        job.name: sorted(key.to_user_string() for key in job.asset_layer.selected_asset_keys)
        for job in defs.resolve_all_job_defs()
        if not job.name.startswith("__")
    }
    sensors = {s.name: (s.job_name, s.minimum_interval_seconds, s.default_status) for s in defs.sensors}
    resources = {
        key: resource.get_resource_definition().config_schema.as_field().default_value
        for key, resource in defs.resources.items()
    }
    return {
        "assets": assets,
        "checks": sorted(key.to_user_string() for key in graph.asset_check_keys),
        "jobs": jobs,
        "sensors": sensors,
        "resources": resources,
        "executor": defs.executor.name,
    }


def test_the_yaml_demo_materializes_and_its_sensor_heals_it(tmp_path):
    keys = BackfillKeys.of("demo_yaml")
    config = {
        "resources": {
            STORE_KEY: {"config": {"root": str(tmp_path / "data")}},
            "yaml_demo_api": {"config": {"embedded_state_file": str(tmp_path / "faults.json")}},
        }
    }
    with instance_for_test() as instance:
        first = location.resolve_job_def("demo_yaml_backfill").execute_in_process(instance=instance, run_config=config)
        before = metadata(instance, keys.failed)
        tick = evaluate(location, instance, "demo_yaml")
        deadline = time.monotonic() + 30
        while not tick.run_requests and time.monotonic() < deadline:  # the sensor's cool-down
            time.sleep(1)
            tick = evaluate(location, instance, "demo_yaml")
        launch(location, instance, "demo_yaml", tick)
        after = metadata(instance, keys.failed)

    assert first.success
    assert before["failed_count"] > 0  # the demo API fails a few ids once...
    assert before["ok_count"] + before["failed_count"] + before["dead_count"] == 300
    assert [request.partition_key for request in tick.run_requests] == ["attempt-1"]
    assert after["failed_count"] == 0  # ...and the sensor's retry round healed every one of them
    assert after["ok_count"] == before["ok_count"] + before["failed_count"]
    assert after["dead_count"] == before["dead_count"]


BAD_YAML = {
    "unknown_key": (
        "check yaml",
        README_YAML.replace("url_template:", "url_templat:"),
        ["defs.yaml:17", "attributes.work.http.url_templat", "'url_templat' was unexpected"],
    ),
    "admission_refused": (
        "check defs",
        README_YAML.replace(
            "  max_attempts: 3\n", "  overrides:\n    max_parallelism: 800\n    per_worker_requests_per_second: 2\n"
        ),
        [
            "defs.yaml:21 (attributes.overrides)",
            "over the declared limit of 200 req/s",
            "Lower max_parallelism to 100",
            "paceline.Service 'users_api' is declared at",
        ],
    ),
    "workload_needs_an_undeclared_limit": (
        "check defs",
        README_YAML.replace(
            '    http:\n      url_template: "{base}/items/{id}"\n      timeout_s: 10\n',
            "    http_batch:\n      path: /upsert\n",
        ).replace("lines: user_ids.txt", "lines: user_ids.txt\n    batch_size: 10"),
        [
            "(attributes.work.http_batch)",
            "needs concurrent_batches declared",
            "paceline.Service 'users_api' is declared at",
        ],
    ),
    "secret_written_inline": (
        "check defs",
        README_YAML.replace('"{{ env.USERS_API_TOKEN }}"', f'"{INLINE_SECRET}"'),
        [
            "defs.yaml:7 (attributes.secret)",
            "secret must name the environment variable that holds it",
            "write secret: '{{ env.API_TOKEN }}'",
        ],
    ),
    "items_file_missing": (
        "check defs",
        README_YAML.replace("lines: user_ids.txt", "lines: missing_ids.txt"),
        [
            "users/defs.yaml:14 (attributes.items.lines)",
            "the items file 'missing_ids.txt' does not exist",
            "users/missing_ids.txt",
        ],
    ),
    "share_not_a_weight": (
        "check defs",
        README_YAML.replace("  max_attempts: 3\n", "  max_attempts: 3\n  share: 0\n"),
        [
            "users/defs.yaml:22 (attributes.share)",
            "users: share must be a positive number, got 0.0",
            "a backfill with share=3 gets three times the part of one with share=1",
        ],
    ),
    "min_share_not_a_fraction": (
        "check defs",
        README_YAML.replace("  max_attempts: 3\n", "  max_attempts: 3\n  min_share: 1.5\n"),
        ["users/defs.yaml:22 (attributes.min_share)", "users: min_share must be in [0, 1), got 1.5", "0.2: a fifth"],
    ),
    "column_file_missing": (
        "check defs",
        README_YAML.replace("lines: user_ids.txt", "column:\n      path: ../ids.parquet\n      column: id"),
        ["users/defs.yaml:15 (attributes.items.column.path)", "the items file '../ids.parquet' does not exist"],
    ),
}


@pytest.mark.parametrize("case", BAD_YAML, ids=str)
def test_bad_yaml_fails_dg_check_with_the_file_line_and_fix(case, tmp_path):
    """A user's mistake reads as one message: where, what and the fix; no Python traceback, no secret."""
    command, text, expected = BAD_YAML[case]
    dg_project(tmp_path, f"bad_{case}", text)
    checked = dg(command, tmp_path)
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    for phrase in expected:
        assert phrase in output, f"{phrase!r} not in:\n{output}"
    assert "Traceback" not in output, output
    assert INLINE_SECRET not in output, "dg check printed the secret written inline"


def test_dg_lists_the_component_types_and_checks_the_project():
    listed = dg("list components --json", PROJECT)
    assert {"paceline.Service", "paceline.Backfill", "paceline.Runtime"} <= {
        entry["key"] for entry in json.loads(listed.stdout)["items"]
    }, listed.stderr
    for command in ("check yaml", "check defs"):
        checked = dg(command, PROJECT)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    defs = dg("list defs", PROJECT).stdout
    assert "demo_yaml/manifests" in defs and "demo_yaml_retry_sensor" in defs and "demo_ids/manifests" in defs


@pytest.mark.parametrize("component", ["Service", "Backfill", "Runtime"])
def test_the_readme_schema_reference_is_what_dg_prints(component):
    printed = dg(f"utils inspect-component paceline.{component} --defs-yaml-schema", PROJECT)
    assert printed.returncode == 0, printed.stderr
    assert f"`paceline.{component}`:\n\n```yaml\n{printed.stdout}```" in SECTION


def test_a_yaml_service_declares_every_field_of_the_python_one():
    assert set(Service.model_fields) == set(ServiceResource.model_fields)


@pytest.mark.parametrize(
    ("declaration", "derived"),
    [
        (ServiceLimit, ServiceResource),
        (ServiceLimit, Service),
        (Estimates, EstimatesOptions),
        (Overrides, OverridesOptions),
    ],
    ids=lambda cls: cls.__name__,
)
def test_every_engine_field_is_declared_once_and_derived(declaration, derived):
    """The launchpad and YAML show the engine's own default and description, so a change is one edit."""
    for field in dataclasses.fields(declaration):
        shown = derived.model_fields[field.name]
        assert shown.description == field.metadata["description"], field.name
        assert shown.is_required() if field.name == "name" else shown.default == field.default, field.name


def test_the_yaml_executor_options_are_the_resource_fields():
    for name, field in ExecutorResource.model_fields.items():
        option = ExecutorOptions.model_fields[name]
        assert (option.default, option.description) == (field.default, field.description), name


def test_the_assets_that_run_chunks_are_labelled_with_the_yaml_runtime_executor(tmp_path, monkeypatch):
    package = f"burla_{tmp_path.name.replace('-', '_')}"
    dg_project(tmp_path, package, README_YAML.replace("kind: local", "kind: burla"))
    monkeypatch.syspath_prepend(str(tmp_path))
    defs = load_from_defs_folder(path_within_project=tmp_path)
    keys = BackfillKeys.of("users")
    graph = defs.resolve_asset_graph()
    assert "burla" in graph.get(keys.manifests).kinds and "python" not in graph.get(keys.manifests).kinds
    assert "burla" not in graph.get(keys.plan).kinds, "planning runs in the step, not on the executor"
