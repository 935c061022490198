"""The README's "what a user writes" snippet, run exactly as printed against a real local API."""

from pathlib import Path

from dagster import Definitions, instance_for_test

from assets import BackfillKeys
from pipeline.localservices import start_http_api

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = README.read_text().split("### Adding a backfill", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_ids.txt").write_text("\n".join(f"user-{n}" for n in range(60)) + "\n\nuser-1\n")
    with start_http_api(rps=200, token="snippet-token") as api, instance_for_test() as instance:
        monkeypatch.setenv("USERS_API_URL", api.url)
        monkeypatch.setenv("USERS_API_TOKEN", "snippet-token")
        namespace: dict = {}
        exec(compile(SNIPPET, "README snippet", "exec"), namespace)
        defs: Definitions = namespace["defs"]
        Definitions.validate_loadable(defs)

        result = defs.resolve_job_def("users_backfill").execute_in_process(instance=instance)
        stats = api.stats()
        keys = BackfillKeys.of("users")
        plan = instance.get_latest_materialization_event(keys.plan).asset_materialization.metadata
        failed = instance.get_latest_materialization_event(keys.failed).asset_materialization.metadata

    assert result.success
    assert (plan["item_count"].value, plan["duplicates_dropped"].value, plan["blanks_dropped"].value) == (60, 1, 1)
    assert (failed["ok_count"].value, failed["failed_count"].value) == (60, 0)
    assert stats["by_status"] == {"200": 60} and stats["busiest_1s"] <= 200
    assert (tmp_path / "data" / "manifests" / "backfill=users").is_dir()
