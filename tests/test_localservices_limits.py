"""The limit options of the bundled services, against the real servers.

Benchmarks compare pacers across conditions (the window a limit is counted
over, noisy latency, rate-limit headers, a fixed quota, Retry-After as a date),
so each option must do exactly what it says, and the headers must be honest:
read back with ``pipeline.pacing.headers`` they must tell a client when budget
really returns.
"""

from __future__ import annotations

import re
import time

import pytest

from pipeline.localservices import ServiceHandle, start_http_api, start_llm
from pipeline.localservices._common import go_duration, option_flags
from pipeline.pacing.headers import read_signal, retry_after_s
from tests.test_localservices import burst, chat, client

IMF_FIXDATE = re.compile(r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} GMT")


def test_option_flags_turn_true_into_a_bare_switch() -> None:
    flags = option_flags({"rps": 5, "ratelimit_headers": True, "retry_after_date": False, "token": None})
    assert flags == ["--rps", "5", "--ratelimit-headers"]


@pytest.mark.parametrize(
    ("seconds", "text"), [(360, "6m0s"), (0.02, "20ms"), (3723.5, "1h2m3.5s"), (1, "1s"), (0, "0s")]
)
def test_go_duration_reads_back(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert read_signal({"x-ratelimit-reset-requests": text}).requests.reset_s == pytest.approx(seconds)


def test_go_duration_never_states_a_reset_early() -> None:
    """A client that sleeps exactly the stated reset must find the budget back: round up, not to nearest."""
    assert (go_duration(0.0201), go_duration(0.9994), go_duration(1.0001)) == ("21ms", "1s", "1.001s")


def test_window_counts_rps_times_w_and_allows_a_burst_within_it() -> None:
    with start_http_api(rps=5, window_s=4) as api, client(api) as http:
        statuses = [r.status_code for r in burst(http, 30, "GET", "/items/a")]
        refused = http.get("/items/a")
        stats = api.stats()
    assert statuses.count(200) == 20, "5 rps over a 4 s window: 20 at once, where a 1 s window allows 5"
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) in (3, 4)
    assert (stats["window_s"], stats["limit_per_window"], stats["busiest_window"]) == (4, 20, 20)
    assert stats["busiest_1s"] == 20 and stats["count"] == 31 and stats["by_status"]["429"] == 11


def test_latency_jitter_varies_each_sleep_within_bounds() -> None:
    with start_http_api(latency_ms=20, latency_jitter_ms=15) as api, client(api) as http:
        slept = [float(http.get(f"/items/{n}").headers["Server-Timing"].partition("dur=")[2]) for n in range(30)]
        batch = http.post("/batch", json=[1])
    assert all(5 <= ms <= 35 for ms in slept)
    # Each sleep is its own draw. Not "all 30 differ": two draws written to 0.001 ms coincide about one run in
    # seventy (the birthday bound), and a test must not fail by chance. Twenty distinct values cannot happen
    # by chance if every request slept the same fixed time.
    assert max(slept) - min(slept) > 10 and len(set(slept)) >= 20
    assert 5 <= float(batch.headers["Server-Timing"].partition("dur=")[2]) <= 35, "batches take the same latency"


def test_no_jitter_no_server_timing(http_api: ServiceHandle) -> None:
    with client(http_api) as http:
        assert "Server-Timing" not in http.get("/items/a").headers


def test_ratelimit_headers_count_down_the_sliding_window_honestly() -> None:
    with start_http_api(rps=3, window_s=2, ratelimit_headers=True) as api, client(api) as http:
        admitted = [http.get(f"/items/{n}") for n in range(6)]
        refused = http.get("/items/x")
        signal = read_signal(refused.headers)
        time.sleep(signal.requests.reset_s + 0.05)  # the server said when budget comes back: take it at its word
        after = http.get("/items/y")
        stats = api.stats()
    assert [r.headers["x-ratelimit-remaining-requests"] for r in admitted] == ["5", "4", "3", "2", "1", "0"]
    assert [r.headers["RateLimit-Remaining"] for r in admitted] == ["5", "4", "3", "2", "1", "0"]
    first = read_signal(admitted[0].headers).requests
    assert (first.limit, first.remaining) == (6, 5) and 1.9 < first.reset_s <= 2.0
    ietf = read_signal({k: v for k, v in admitted[0].headers.items() if k.startswith("ratelimit")}).requests
    assert (ietf.limit, ietf.remaining, ietf.reset_s) == (6, 5, 2)
    assert refused.status_code == 429 and signal.exhausted
    assert 0 < signal.requests.reset_s <= 2.0 and signal.retry_after_s == 2.0
    assert after.status_code == 200
    assert stats["by_status"] == {"200": 7, "429": 1} and stats["busiest_window"] == 6


def test_no_ratelimit_headers_unless_asked() -> None:
    with start_http_api(rps=3) as api, client(api) as http:
        headers = http.get("/items/a").headers
    assert "x-ratelimit-remaining-requests" not in headers and "RateLimit-Remaining" not in headers


def test_quota_refuses_only_once_spent_then_until_the_window_ends() -> None:
    with start_http_api(quota=5, quota_window_s=3) as api, client(api) as http:
        statuses = [r.status_code for r in burst(http, 5, "GET", "/items/a")]
        refused = http.get("/items/a")
        signal = read_signal(refused.headers)
        time.sleep(signal.requests.reset_s + 0.05)
        fresh = http.get("/items/b")
        stats = api.stats()
    assert statuses == [200] * 5
    assert refused.status_code == 429 and signal.exhausted
    assert signal.requests.limit == 5 and 0 < signal.requests.reset_s <= 3
    assert int(refused.headers["Retry-After"]) == pytest.approx(signal.requests.reset_s, abs=1)
    assert fresh.status_code == 200 and fresh.headers["x-ratelimit-remaining-requests"] == "4", "a new window"
    assert stats["by_status"] == {"200": 6, "429": 1} and stats["limit_per_window"] == 5


def test_a_client_that_reads_the_quota_headers_is_never_refused() -> None:
    with start_http_api(quota=4, quota_window_s=1) as api, client(api) as http:
        for n in range(12):
            signal = read_signal(http.get(f"/items/{n}").headers)
            if signal.exhausted:
                time.sleep(signal.requests.reset_s)
        stats = api.stats()
    assert stats["by_status"] == {"200": 12}


def test_limit_options_that_cannot_be_honoured_fail_fast() -> None:
    with pytest.raises(RuntimeError, match="choose one"):
        start_http_api(quota=5, rps=3)
    with pytest.raises(RuntimeError, match="at least one request"):
        start_http_api(rps=0.5, window_s=1)
    with pytest.raises(RuntimeError, match="--quota must be"):
        start_http_api(quota=0)


def test_retry_after_as_http_date() -> None:
    with start_http_api(rps=1, retry_after_date=True) as api, client(api) as http:
        assert http.get("/items/a").status_code == 200
        limited = http.get("/items/b")
        api.reset()
        fault = http.get("/items/throttle-c")
        now = time.time()
    for response in (limited, fault):
        assert response.status_code == 429
        assert IMF_FIXDATE.fullmatch(response.headers["Retry-After"])
        assert 0 <= retry_after_s(response.headers, now) <= 2


def test_llm_sends_openai_limit_headers_for_each_budget() -> None:
    """A per-minute budget enforced per second: ``tpm`` and ``rpm`` are per ``window_s``."""
    with start_llm(tpm=60, rpm=3, window_s=1, latency_ms=0) as llm, client(llm) as http:
        first = chat(http, "x" * 40)  # 30 tokens
        second = chat(http, "x" * 40)
        refused = chat(http, "x" * 40)
    signal = read_signal(first.headers)
    assert (signal.tokens.limit, signal.tokens.remaining) == (60, 30) and 0.9 < signal.tokens.reset_s <= 1
    assert (signal.requests.limit, signal.requests.remaining) == (3, 2)
    assert read_signal(second.headers).tokens.exhausted
    assert refused.status_code == 429 and read_signal(refused.headers).wait_s == 1.0
