"""The README's "Without Dagster" snippet, run as printed against the real local API."""

from pathlib import Path

from pipeline.localservices import start_http_api

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = README.read_text().split("### Without Dagster", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_engine_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with start_http_api(rps=200, demo_faults=0.05) as api:
        monkeypatch.setenv("USERS_API_URL", api.url)
        namespace: dict = {}
        exec(compile(SNIPPET, "README engine snippet", "exec"), namespace)
        stats = api.stats()
    counts = namespace["result"].counts
    assert counts["items"] == 500 and counts["failed"] == 0  # the ids that failed once healed in the retry
    assert counts["ok"] + counts["dead"] == 500 and counts["dead"] > 0  # a few ids are missing for good
    assert stats["busiest_1s"] <= 200
    assert (tmp_path / "data" / "engine-example" / "manifests").is_dir()
