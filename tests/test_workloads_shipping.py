"""Every built-in workload can be shipped to Burla workers: Burla's own pre-flight accepts it.

Burla refuses a function if any loaded local module imports a project module
at call time, and pickles the project by value; this runs that real check
(burla==1.8.4 internals, as in test_burla_executor) on each workload's chunk function.
"""

from __future__ import annotations

import burla._env_scan as env_scan
import burla._remote_parallel_map as rpm
import pytest

import pipeline.workloads.demos  # noqa: F401 - load every workload module, so the scan covers them all
from pipeline.runner import make_chunk_function
from pipeline.work import Work
from pipeline.workloads import HttpBatchWork, HttpWork, KeyRangeWork, LlmWork, S3ToPostgresWork, ScrapeWork

DSN = "postgresql://loader@db.internal:5432/warehouse"
WORKS: list[Work] = [
    HttpWork(url_template="{base}/items/{id}", base="https://api.example.com", token="t"),
    HttpBatchWork(url="https://vectors.example.com/upsert"),
    ScrapeWork(selectors={"price": "p.price"}),
    S3ToPostgresWork(dsn=DSN, bucket="events", table="public.events", columns=("id", "payload")),
    KeyRangeWork(dsn=DSN, query="UPDATE t SET x = 1 WHERE id >= %(lo)s AND id < %(hi)s"),
    LlmWork(base_url="https://api.openai.com/v1", model="gpt-4o-mini", token="sk-x"),
]


@pytest.mark.parametrize("work", WORKS, ids=lambda work: type(work).__name__)
def test_burla_preflight_accepts_the_workload(work: Work) -> None:
    scan = env_scan.scan_environment()
    names = env_scan.modules_to_pickle_by_value(scan)
    assert any(n.startswith("pipeline") for n in names), "the project travels by value"
    function = make_chunk_function(work)
    env_scan.raise_on_call_time_local_imports(function, scan, names)
    assert rpm._pickle_function(function, names)
