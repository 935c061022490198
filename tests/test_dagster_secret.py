"""A secret set through ``dagster.EnvVar`` reaches the service and nothing else.

The work below is deliberately careless: it echoes the Authorization header
into its payload and into an error message. The run must still leave the
token in no manifest, plan or failed-items file, no event (logs, metadata,
run config), no compute log and nothing printed.
"""

from pathlib import Path

import pyarrow.parquet as pq
from dagster import EnvVar, instance_for_test, serialize_value

from assets import paceline_definitions
from pipeline.items import Values
from pipeline.limits import Estimates, Overrides
from pipeline.localservices import start_http_api
from pipeline.outcomes import Permanent
from pipeline.shares import Lease
from pipeline.spec import BackfillSpec, Service
from pipeline.work import FunctionWork, Item
from resources import ManifestStoreResource, ServiceResource

TOKEN = "tok-3f9a77c1d2e84b6a"
VARIABLE = "PACELINE_TEST_API_TOKEN"


def careless_work(service: Service) -> FunctionWork:
    def connect():
        import httpx

        headers = {"Authorization": f"Bearer {service.secret}"}
        return httpx.Client(base_url=service.url, headers=headers, trust_env=False)

    def call(client, item: Item) -> dict:
        if item.id.startswith("refuse-"):
            raise Permanent(f"refused while sending {client.headers['Authorization']}")
        response = client.get(f"/items/{item.id}")
        response.raise_for_status()
        return {"value": response.json()["value"], "sent": client.headers["Authorization"]}

    return FunctionWork(connect, call, secret_values=(service.secret,))


def test_envvar_secret_appears_in_no_manifest_log_or_metadata(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(VARIABLE, TOKEN)
    items = [str(n) for n in range(1, 21)] + ["refuse-1", "e500-1"]
    backfill = BackfillSpec(
        name="secure",
        service="secure_api",
        items=Values.of(items),
        work=careless_work,
        estimates=Estimates(seconds_per_call=0.005),
        overrides=Overrides(chunk_size=8),
    )
    with start_http_api(rps=100, token=TOKEN) as api, instance_for_test() as instance:
        service = ServiceResource(name="secure_api", url=api.url, requests_per_second=100, secret=EnvVar(VARIABLE))
        defs = paceline_definitions([backfill], [service], ManifestStoreResource(root=str(tmp_path / "data")))
        result = defs.resolve_job_def("secure_backfill").execute_in_process(instance=instance)
        events = [serialize_value(entry) for entry in instance.all_logs(result.run_id)]
        run = instance.get_run_by_id(result.run_id)
        run_record = serialize_value(run) + serialize_value(instance.get_job_snapshot(run.job_snapshot_id))
        stored = _files_text(Path(instance.root_directory))
        ok = api.stats()["by_status"].get("200", 0)

    assert result.success and ok == 20  # the service accepted the token on every plain id
    assert any("failed_count" in event for event in events)  # metadata is among the events scanned
    assert any("share_at_start" in event for event in events)  # the share the run had too
    assert "***" in _parquet_text(tmp_path / "data")  # the echoes were there, and redacted
    printed = capfd.readouterr()
    for where, text in {
        "parquet": _parquet_text(tmp_path / "data"),
        "events": "\n".join(events),
        "run and job snapshot": run_record,
        "instance files": stored,
        "stdout": printed.out,
        "stderr": printed.err,
    }.items():
        assert TOKEN not in text, f"the secret leaked into {where}"
    assert VARIABLE in run_record  # what Dagster keeps is the variable's name


def _parquet_text(root: Path) -> str:
    files = sorted(root.rglob("*.parquet"))
    assert files, f"no Parquet under {root}"
    return "\n".join(str(pq.read_table(f).to_pylist()) for f in files)


def _files_text(root: Path) -> str:
    return "\n".join(f.read_bytes().decode("utf-8", "replace") for f in root.rglob("*") if f.is_file())


def test_a_lease_holds_names_and_numbers_only():
    """A lease is read by every backfill of its service and by ``paceline status``: it must carry no config
    value that could be a secret. A new field fails here until someone has looked at what it carries."""
    assert {name: field.type for name, field in Lease.__dataclass_fields__.items()} == {
        "lease_id": "str",
        "service": "str",
        "backfill": "str",
        "attempt": "int",
        "run_id": "str",
        "weight": "float",
        "min_share": "float",
        "budget": "dict[str, float]",
        "written_at": "float",
        "expires_at": "float",
        "active_from": "float",
        "host": "str",
        "pid": "int",
        "workers": "int",
        "connections": "int",
        "connection_cap": "int",
    }
