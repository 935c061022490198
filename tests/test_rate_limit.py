"""The declared limit holds, measured by the server, and the run uses its budget."""

import httpx
import pytest

from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import Values
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices import start_http_api
from pipeline.manifests import ManifestStore
from pipeline.work import FunctionWork


def _get_item(base_url: str) -> FunctionWork:
    def call(client, item):
        response = client.get(f"/items/{item.id}")
        response.raise_for_status()
        return response.json()

    return FunctionWork(lambda: httpx.Client(base_url=base_url, timeout=5.0), call)


def _run(limit: ServiceLimit, items: int, server_rps: float | None, tmp_path):
    with start_http_api(rps=server_rps) as api:
        backfill = Backfill(
            "paced",
            Values.of(range(items)),
            _get_item(api.url),
            limit,
            Estimates(seconds_per_call=0.005, target_chunk_seconds=2),
        )
        store = ManifestStore(str(tmp_path))
        plan_backfill(backfill, store)
        result = run_attempt(backfill, store, LocalExecutor())
        return result, api.stats()


def test_global_rate_holds_on_the_server_and_budget_is_used(tmp_path):
    limit = ServiceLimit("api", requests_per_second=60, safety=0.8)  # target 48/s
    result, server = _run(limit, items=300, server_rps=60, tmp_path=tmp_path)
    assert server["by_status"].get("429", 0) == 0, "the service never had to push back"
    assert server["busiest_1s"] <= 60, f"busiest second on the server: {server['busiest_1s']}"
    assert server["count"] == 300
    assert result.report.achieved_rate >= 0.85 * 48, result.report.achieved_rate
    assert result.counts["ok"] == 300


def test_per_worker_politeness_holds_per_connection(tmp_path):
    limit = ServiceLimit("site", per_worker_requests_per_second=4, max_workers=3)
    result, server = _run(limit, items=72, server_rps=None, tmp_path=tmp_path)
    assert server["max_peer_rps_1s"] <= 4, server
    assert server["busiest_1s"] <= 3 * 4, server
    assert result.report.achieved_rate >= 0.7 * 12  # a floor for a loaded CI machine; the ceiling is the promise


@pytest.mark.parametrize("safety", [0.5, 1.0])
def test_safety_scales_the_rate(tmp_path, safety):
    limit = ServiceLimit("api", requests_per_second=40, safety=safety)
    result, server = _run(limit, items=int(80 * safety), server_rps=40, tmp_path=tmp_path)
    assert server["busiest_1s"] <= 40
    # A 2 s run: one 0.3 s stall of a loaded machine costs 15 %, so the floor is 0.7. It still tells the
    # two apart (0.7 x 40 = 28 > 20 x 1.1), and the ceiling is the promise that safety scales the pace.
    assert 0.7 * 40 * safety <= result.report.achieved_rate <= 40 * safety * 1.1
