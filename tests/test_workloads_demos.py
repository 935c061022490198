"""Every demo backfill runs end to end against the bundled local services, with no account anywhere."""

from __future__ import annotations

import json

import psycopg
import pytest

from pipeline.localservices.s3 import CREDENTIALS
from pipeline.workloads.demos import (
    DEMO_ACCOUNTS,
    DEMO_FILES,
    DEMO_IDS,
    DEMO_LIMITS,
    DEMO_PROMPTS,
    DEMO_ROWS_PER_FILE,
    DEMO_SPECS,
    S3_URL_ENV,
    start_demo_services,
)

EXPECTED_OK = {
    "demo_http_batches": 40,
    "demo_scrape": 40,
    "demo_s3_to_postgres": DEMO_FILES,
    "demo_key_ranges": DEMO_ACCOUNTS // 500,
    "demo_llm": DEMO_PROMPTS,
}


def test_every_demo_runs_against_the_local_services_within_their_limits(
    runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(S3_URL_ENV, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    assert {spec.service for spec in DEMO_SPECS} == set(DEMO_LIMITS)
    with start_demo_services() as demo:
        backfills = {spec.name: spec.build(demo.services[spec.service]) for spec in DEMO_SPECS}
        counts = {name: runner.run(backfill).counts for name, backfill in backfills.items()}
        api, site, batches, llm = (
            demo.handles[n].stats() for n in ("local_api", "local_site", "local_batches", "local_llm")
        )
        with psycopg.connect(demo.services["local_postgres"].url) as connection:
            loaded = connection.execute("SELECT count(DISTINCT id) FROM demo_events").fetchone()[0]

    for name, ok in EXPECTED_OK.items():
        assert counts[name]["ok"] == ok, (name, counts[name])
    assert counts["demo_http_api"]["items"] == DEMO_IDS and counts["demo_http_api"]["ok"] >= 0.9 * DEMO_IDS
    assert counts["demo_scrape"]["dead"] == 2, "the robots.txt-forbidden page and the JavaScript shell"
    assert loaded == DEMO_FILES * DEMO_ROWS_PER_FILE
    assert "429" not in api["by_status"] and api["busiest_1s"] <= 100
    assert "429" not in site["by_status"] and site["busiest_1s"] <= 20
    assert batches["peak_concurrent_batches"] <= 4 and "429" not in batches["by_status"]
    assert llm["by_status"] == {"200": DEMO_PROMPTS}
    payload = json.loads(runner.latest(backfills["demo_llm"])["p000"]["payload"])
    assert payload["usage"]["total_tokens"] > 0
