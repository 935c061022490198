"""The bundled local services, tested over real sockets with a real HTTP client.

These servers are the referee for every other test ("did the job stay under
the limit?"), so they must themselves be right: limits really enforced,
faults exactly as documented, statistics computed on the server's own log.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from pipeline.localservices import ServiceHandle, start_http_api, start_llm
from pipeline.localservices._common import busiest_window
from pipeline.localservices.http_api import JS_SHELL, ROBOTS_TXT, item_value

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"


def client(handle: ServiceHandle, **kwargs: Any) -> httpx.Client:
    """A client that ignores proxy settings from the environment."""
    return httpx.Client(base_url=handle.url, trust_env=False, timeout=5, **kwargs)


def burst(http: httpx.Client, n: int, method: str, path: str, **kwargs: Any) -> list[httpx.Response]:
    """Send ``n`` requests at once from ``n`` threads."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: http.request(method, path, **kwargs), range(n)))


def chat(http: httpx.Client, content: str, **extra: Any) -> httpx.Response:
    return http.post(CHAT, json={"model": "m", "messages": [{"role": "user", "content": content}], **extra})


@pytest.fixture
def api(http_api: ServiceHandle) -> ServiceHandle:
    """The session's unlimited API from conftest (already reset for this test)."""
    return http_api


@pytest.fixture
def http(api: ServiceHandle) -> Iterator[httpx.Client]:
    with client(api) as c:
        yield c


# --------------------------------------------------------------------------
# Pure arithmetic
# --------------------------------------------------------------------------


def test_busiest_window_is_half_open() -> None:
    assert busiest_window([], 1.0) == 0
    assert busiest_window([0.0, 1.0, 2.0], 1.0) == 1  # 1.0 is outside [0, 1)
    assert busiest_window([0.0, 0.2, 0.4, 1.0, 1.1], 1.0) == 4  # [0.2, 1.2)
    assert busiest_window([1.2, 0.0, 0.5], 1.0, [5, 10, 20]) == 30


# --------------------------------------------------------------------------
# http_api
# --------------------------------------------------------------------------


def test_rps_limit_enforced_and_measured_server_side() -> None:
    with start_http_api(rps=20) as api, client(api) as http:
        responses = burst(http, 60, "GET", "/items/a")
        throttled = [r for r in responses if r.status_code == 429]
        assert throttled and all(r.headers["Retry-After"] == "1" for r in throttled)
        assert throttled[0].json() == {"error": "rate limited"}
        stats = api.stats()
        assert stats["count"] == 60
        assert stats["by_status"]["429"] == len(throttled)
        assert stats["busiest_1s"] == 20
        assert stats["busiest_1s_all"] > 20
        assert {a["status"] for a in api.arrivals()} == {200, 429}
        assert all(a["item"] == "a" for a in api.arrivals())

        time.sleep(1.0)  # the window slides: budget is back
        assert http.get("/items/a").status_code == 200


def test_item_is_deterministic_json(http: httpx.Client) -> None:
    first, second = http.get("/items/abc"), http.get("/items/abc")
    assert first.status_code == 200
    assert first.json() == second.json() == {"id": "abc", "value": item_value("abc")}
    assert first.headers["Content-Length"] == str(len(first.content))


@pytest.mark.parametrize(
    ("item", "status", "retry_after"),
    [
        ("e500-x", 500, None),
        ("e503-x", 503, "1"),
        ("e404-x", 404, None),
        ("e400-x", 400, None),
        ("throttle-x", 429, "1"),
        ("throttlenoretry-x", 429, None),
    ],
)
def test_status_faults_repeat_every_time(http: httpx.Client, item: str, status: int, retry_after: str | None) -> None:
    for _ in range(3):
        response = http.get(f"/items/{item}")
        assert response.status_code == status
        assert response.headers.get("Retry-After") == retry_after
        assert "error" in response.json()


def test_settled_arrivals_waits_until_the_log_stops_growing(api: ServiceHandle, monkeypatch) -> None:
    """A request logged while the caller waits (one still on the wire at a kill) is in the answer."""
    logs = iter([["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c"]])
    monkeypatch.setattr(api, "arrivals", lambda: next(logs))
    assert api.settled_arrivals(quiet_s=0.01) == ["a", "b", "c"]
    growing = itertools.count(1)
    monkeypatch.setattr(api, "arrivals", lambda: ["x"] * next(growing))  # a log that never settles
    with pytest.raises(TimeoutError, match="still logged new requests"):
        api.settled_arrivals(quiet_s=0.01, timeout_s=0.05)


def test_badjson_fault(http: httpx.Client) -> None:
    response = http.get("/items/badjson-1")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.text == "{not json"
    with pytest.raises(ValueError):
        response.json()


def test_slow_fault_times_out_a_client(http: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        http.get("/items/slow-1", timeout=0.3)


def test_reset_fault_drops_connection_mid_body(api: ServiceHandle, http: httpx.Client) -> None:
    with pytest.raises(httpx.ReadError):
        http.get("/items/reset-1")
    assert http.get("/items/ok").status_code == 200  # the client recovers on a new connection
    assert api.stats()["by_status"] == {"200": 2}


def test_heal_counter_is_per_id_and_cleared_by_reset(api: ServiceHandle, http: httpx.Client) -> None:
    statuses = [http.get("/items/heal2-abc").status_code for _ in range(4)]
    assert statuses == [500, 500, 200, 200]
    assert http.get("/items/heal2-abc").json()["value"] == item_value("heal2-abc")
    first_hit = http.get("/items/heal1-other")
    assert first_hit.status_code == 500 and "Retry-After" not in first_hit.headers
    api.reset()
    assert http.get("/items/heal2-abc").status_code == 500


def test_demo_faults_are_stable_and_heal_on_retry() -> None:
    ids = [f"item{i}" for i in range(200)]
    with start_http_api(demo_faults=0.3) as api, client(api) as http:
        first = [http.get(f"/items/{i}").status_code for i in ids]
        retry = [http.get(f"/items/{i}").status_code for i in ids]
        api.reset()
        again = [http.get(f"/items/{i}").status_code for i in ids]
    assert 30 <= first.count(500) <= 90  # ~ 0.3 * 200
    assert 3 <= first.count(404) <= 25  # ~ 0.06 * 200
    assert set(first) == {200, 404, 500}
    assert retry == [404 if s == 404 else 200 for s in first]
    assert again == first


def test_token_required_except_on_admin_endpoints() -> None:
    with start_http_api(token="s3cret") as api, client(api) as http:
        assert http.get("/items/a").status_code == 401
        wrong = http.get("/items/a", headers={"Authorization": "Bearer nope"})
        assert (wrong.status_code, wrong.json()) == (401, {"error": "bad token"})
        assert http.get("/robots.txt").status_code == 401
        good = http.get("/items/a", headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert api.stats()["by_status"] == {"401": 3, "200": 1}


def test_batch_concurrency_limit() -> None:
    with start_http_api(max_concurrent_batches=2, latency_ms=300) as api, client(api) as http:
        responses = burst(http, 6, "POST", "/batch", json=[{"id": 1}, {"id": 2}, {"id": 3}])
        ok = [r for r in responses if r.status_code == 200]
        rejected = [r for r in responses if r.status_code == 429]
        assert len(ok) + len(rejected) == 6 and rejected
        assert all(r.json() == {"upserted": 3} for r in ok)
        assert all(r.headers["Retry-After"] == "1" for r in rejected)
        assert api.stats()["peak_concurrent_batches"] == 2
        assert http.post("/batch", json=[]).json() == {"upserted": 0}  # slots were released
        assert http.post("/batch", json={"not": "a list"}).status_code == 400


def test_website_pages(http: httpx.Client) -> None:
    robots = http.get("/robots.txt")
    assert robots.text == ROBOTS_TXT == "User-agent: *\nDisallow: /private/\n"
    assert robots.headers["Content-Type"].startswith("text/plain")
    page = http.get("/site/3")
    assert page.headers["Content-Type"].startswith("text/html")
    for fragment in ("<title>Page 3</title>", "<h1>", '<a class="link" href="/site/4">', '<p class="price">'):
        assert fragment in page.text
    assert page.text.count('class="link"') >= 3
    assert http.get("/private/3").status_code == 200
    assert http.get("/js-shell").text == JS_SHELL
    assert http.get("/site/abc").status_code == 404


def test_site_pages_behind_fault_prefixes(http: httpx.Client) -> None:
    assert http.get("/site/e500-3").status_code == 500
    throttled = http.get("/site/throttle-3")
    assert (throttled.status_code, throttled.headers["Retry-After"]) == (429, "1")
    assert [http.get("/site/heal1-3").status_code for _ in range(2)] == [500, 200]
    assert "<title>Page 3</title>" in http.get("/site/heal1-3").text
    assert http.get("/items/heal1-3").status_code == 500, "pages and items keep their own heal counters"
    assert http.get("/site/nofault-3").status_code == 404
    assert http.get("/site/e500-x").status_code == 404


def test_unknown_routes_are_404(http: httpx.Client) -> None:
    assert http.get("/nope").status_code == 404
    assert http.post("/items/a", json={}).status_code == 404
    assert http.get("/_nope").status_code == 404


def test_keep_alive_arrivals_and_per_peer_stats(api: ServiceHandle) -> None:
    with client(api, limits=httpx.Limits(max_connections=1)) as http:
        for i in range(5):
            assert http.get(f"/items/k{i}").status_code == 200
        http.post("/batch", json=[1])  # a POST body on the same connection must not desync it
        assert http.get("/items/after-post").status_code == 200
    arrivals = api.arrivals()
    assert [a["item"] for a in arrivals] == ["k0", "k1", "k2", "k3", "k4", None, "after-post"]
    assert set(arrivals[0]) == {"t", "path", "item", "status", "peer", "tokens", "refused"}
    assert arrivals[0]["path"] == "/items/k0" and arrivals[0]["tokens"] == 0
    stats = api.stats()
    assert stats["peers"] == 1
    assert stats["max_peer_rps_1s"] == 7


def test_reset_clears_everything(api: ServiceHandle, http: httpx.Client) -> None:
    http.get("/items/a")
    http.get("/items/e500-a")
    assert api.stats()["count"] == 2
    api.reset()
    stats = api.stats()
    assert (stats["count"], stats["by_status"], stats["busiest_1s"]) == (0, {}, 0)
    assert api.arrivals() == []


# --------------------------------------------------------------------------
# llm
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm() -> Iterator[ServiceHandle]:
    with start_llm(latency_ms=0, completion_tokens=16) as handle:
        yield handle


def test_llm_usage_follows_documented_rule(llm: ServiceHandle) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},  # 14 chars -> 4 + 4
        {"role": "user", "content": "hello world!!"},  # 13 chars -> 4 + 4
    ]
    with client(llm) as http:
        default = http.post(CHAT, json={"model": "m", "messages": messages})
        short = http.post(CHAT, json={"model": "m", "messages": messages, "max_tokens": 5})
        capped = http.post(CHAT, json={"model": "m", "messages": messages, "max_tokens": 100})
    body = default.json()
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 16, "completion_tokens": 16, "total_tokens": 32}
    assert short.json()["usage"]["completion_tokens"] == 5
    assert capped.json()["usage"]["completion_tokens"] == 16
    assert default.json()["choices"] == capped.json()["choices"]  # deterministic text


def test_llm_rpm_429_with_retry_after() -> None:
    with start_llm(rpm=3, window_s=1, latency_ms=0) as llm, client(llm) as http:
        accepted = [chat(http, "hi") for _ in range(3)]
        assert [r.headers["x-ratelimit-remaining-requests"] for r in accepted] == ["2", "1", "0"]
        limited = chat(http, "hi")
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "1"
        assert limited.json()["error"]["type"] == "rate_limit_exceeded"
        time.sleep(float(limited.headers["Retry-After"]))
        assert chat(http, "hi").status_code == 200
        stats = llm.stats()
    assert stats["busiest_window_requests"] == 3
    assert stats["by_status"] == {"200": 4, "429": 1}
    assert stats["accepted_requests"] == 4


def test_llm_tpm_budget_enforced_under_burst() -> None:
    content = "x" * 40  # 10 + 4 prompt tokens, + 16 completion = 30 total
    with start_llm(tpm=60, window_s=1, latency_ms=0) as llm, client(llm) as http:
        first = chat(http, content)
        assert first.json()["usage"]["total_tokens"] == 30
        assert first.headers["x-ratelimit-remaining-tokens"] == "30"
        assert chat(http, content).status_code == 200
        limited = chat(http, content)
        assert (limited.status_code, limited.headers["Retry-After"]) == (429, "1")
        assert limited.headers["x-ratelimit-remaining-tokens"] == "0"
        arrivals = llm.arrivals()
        assert [a["tokens"] for a in arrivals] == [30, 30, 0]

        llm.reset()  # budget back at once
        statuses = [r.status_code for r in burst(http, 10, "POST", CHAT, json={"messages": [{"content": content}]})]
        assert statuses.count(200) == 2
        stats = llm.stats()
    assert stats["busiest_window_tokens"] == 60 == stats["accepted_tokens"]
    assert (stats["tpm"], stats["window_s"]) == (60, 1)
    assert stats["first_t"] <= stats["last_t"]


def test_llm_request_larger_than_budget_is_400_not_429() -> None:
    with start_llm(tpm=50, window_s=1, latency_ms=0) as llm, client(llm) as http:
        response = chat(http, "x" * 400)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "request_too_large"


def test_llm_key_and_bad_requests() -> None:
    with start_llm(key="k", latency_ms=0) as llm, client(llm) as http:
        denied = chat(http, "hi")
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer k"}
        assert http.post(CHAT, json={"messages": [{"content": "hi"}]}, headers=auth).status_code == 200
        assert http.post(CHAT, content=b"{oops", headers=auth).status_code == 400
        assert http.post(CHAT, json={"messages": "hi"}, headers=auth).status_code == 400
        assert http.post(CHAT, json={"messages": [], "max_tokens": "5"}, headers=auth).status_code == 400
        assert http.get("/v1/models", headers=auth).status_code == 404
        assert llm.stats()["by_status"] == {"401": 1, "200": 1, "400": 3, "404": 1}


@pytest.mark.parametrize(
    ("prompt", "status", "retry_after", "kind"),
    [
        ("e500-x", 500, None, "server_error"),
        ("e503-x", 503, "1", "server_error"),
        ("e404-x", 404, None, "invalid_request_error"),
        ("e400-x", 400, None, "invalid_request_error"),
        ("throttle-x", 429, "1", "rate_limit_exceeded"),
        ("throttlenoretry-x", 429, None, "rate_limit_exceeded"),
    ],
)
def test_llm_status_faults_are_openai_shaped_and_charge_nothing(
    llm: ServiceHandle, prompt: str, status: int, retry_after: str | None, kind: str
) -> None:
    llm.reset()
    with client(llm) as http:
        for _ in range(2):
            response = chat(http, prompt)
            assert (response.status_code, response.headers.get("Retry-After")) == (status, retry_after)
            assert response.json()["error"]["type"] == kind
    assert [a["tokens"] for a in llm.arrivals()] == [0, 0]
    assert llm.stats()["accepted_tokens"] == 0


def test_llm_payload_and_transport_faults(llm: ServiceHandle) -> None:
    llm.reset()
    with client(llm) as http:
        bad = chat(http, "badjson-x")
        assert (bad.status_code, bad.text) == (200, "{not json")
        with pytest.raises(httpx.ReadError):
            chat(http, "reset-x")
        with pytest.raises(httpx.ReadTimeout):
            http.post(CHAT, json={"messages": [{"content": "slow-x"}]}, timeout=0.3)
        system_first = [{"role": "system", "content": "e500-not-the-prompt"}, {"role": "user", "content": "hi"}]
        assert http.post(CHAT, json={"messages": system_first}).status_code == 200, "only the last message counts"


def test_llm_heal_counts_per_prompt_and_reset_clears(llm: ServiceHandle) -> None:
    llm.reset()
    with client(llm) as http:
        assert [chat(http, "heal2-a").status_code for _ in range(4)] == [500, 500, 200, 200]
        assert chat(http, "heal1-b").status_code == 500
        healed = chat(http, "heal1-b")
        assert healed.json()["choices"][0]["message"]["content"] == "[local-llm] heal1-b"
        assert healed.json()["usage"]["total_tokens"] > 0, "a healed prompt is charged like any other"
        llm.reset()
        assert chat(http, "heal2-a").status_code == 500


def test_heal_counts_survive_a_restart_with_a_state_file(tmp_path: Path) -> None:
    state = tmp_path / "heal.json"
    for expected in ([500, 200], [200, 200]):
        with start_llm(latency_ms=0, state_file=state) as llm, client(llm) as http:
            assert [chat(http, "heal1-a").status_code for _ in range(2)] == expected


# --------------------------------------------------------------------------
# Handles and process lifetime
# --------------------------------------------------------------------------


def test_bad_option_fails_fast_with_stderr() -> None:
    with pytest.raises(RuntimeError, match="unrecognized arguments: --bogus"):
        start_http_api(bogus=1)


def test_stop_ends_the_server() -> None:
    api = start_http_api()
    api.stop()
    assert api.process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(api.url + "/_stats", trust_env=False)
    api.stop()  # idempotent


def test_server_dies_with_its_parent() -> None:
    script = (
        "import time\n"
        "from pipeline.localservices import start_http_api\n"
        "print(start_http_api().url, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=PROJECT_ROOT, env=env)
    try:
        url = parent.stdout.readline().decode().strip()
        assert httpx.get(url + "/_stats", trust_env=False).status_code == 200
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/_stats", trust_env=False, timeout=1)
        except httpx.ConnectError:
            return
        time.sleep(0.05)
    pytest.fail("the service outlived its parent")
