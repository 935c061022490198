"""The aiolimiter baseline measures what it claims, against the real bundled API.

The server is the judge: every request the baseline counts must be one the
server logged, and the busiest admitted second can never exceed the real limit.
"""

from __future__ import annotations

from benchmarks.baseline_aiolimiter import run_baseline
from pipeline.localservices import start_http_api


def test_declared_above_the_real_limit_meets_429s_and_the_server_holds() -> None:
    with start_http_api(rps=20) as api:
        result = run_baseline(api.url, [f"i{n}" for n in range(60)], declared_rps=40, concurrency=8)
    assert result["ok"] + result["failed"] == 60
    assert result["requests"] == result["server_requests"], "every request the client sent, 429s included"
    assert result["throttled"] > 0 and 0 < result["throttled_share"] < 1
    assert result["server_limit_per_s"] == 20 and result["server_busiest_1s"] <= 20
    assert result["server_busiest_1s_all"] > 20, "the baseline really sent more than the limit"
    assert result["goodput_ok_per_s"] == result["ok"] / result["seconds"]


def test_declared_well_below_the_real_limit_sees_no_429() -> None:
    with start_http_api(rps=20) as api:
        result = run_baseline(api.url, [f"i{n}" for n in range(24)], declared_rps=8, concurrency=4)
    assert (result["ok"], result["throttled"], result["requests"]) == (24, 0, 24)
    assert result["server_busiest_1s_all"] <= 16, "a leaky bucket of 8/s: at most its burst of 8 plus 8 in a second"
