"""A run killed with SIGKILL resumes, repeating only the chunks that were in flight."""

import collections
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.ledger import Ledger
from pipeline.localservices import start_http_api
from pipeline.manifests import ManifestStore

RUNNER = textwrap.dedent(
    """
    import sys
    import httpx
    from pipeline.backfill import Backfill, plan_backfill, run_attempt
    from pipeline.executors import LocalExecutor
    from pipeline.items import Values
    from pipeline.limits import Estimates, Overrides, ServiceLimit
    from pipeline.manifests import ManifestStore
    from pipeline.work import FunctionWork

    url, root, mode = sys.argv[1:4]

    def call(client, item):
        response = client.get(f"/items/{item.id}")
        response.raise_for_status()
        return response.json()

    backfill = Backfill(
        "resumable",
        Values.of(range(600)),
        FunctionWork(lambda: httpx.Client(base_url=url, timeout=5), call),
        ServiceLimit("api", requests_per_second=400, safety=0.5),
        Estimates(seconds_per_call=0.01),
        Overrides(chunk_size=20),
    )
    store = ManifestStore(root)
    if mode == "plan":
        plan_backfill(backfill, store)
    print(run_attempt(backfill, store, LocalExecutor()).counts, flush=True)
    """
)

ITEMS, CHUNK = 600, 20


@pytest.fixture
def api():
    with start_http_api(rps=400) as service:
        yield service


def _wait_for_arrivals(api, run: subprocess.Popen, count: int, deadline_s: float = 60.0) -> None:
    """Wait for the server to have seen ``count`` calls: progress, not a guess at the child's start-up time."""
    deadline = time.monotonic() + deadline_s
    while api.stats()["count"] < count:
        assert run.poll() is None, f"the run ended (code {run.returncode}) before the server saw {count} calls"
        assert time.monotonic() < deadline, f"the run made fewer than {count} calls in {deadline_s:g} s"
        time.sleep(0.02)


def _start(script, url, root, mode):
    return subprocess.Popen([sys.executable, str(script), url, str(root), mode], stdout=subprocess.PIPE, text=True)


def test_kill_minus_nine_then_resume_repeats_only_in_flight_chunks(api, tmp_path):
    script = tmp_path / "run_backfill.py"
    script.write_text(RUNNER)
    root = tmp_path / "store"
    first = _start(script, api.url, root, "plan")
    _wait_for_arrivals(api, first, 250)  # of 600 at 200/s: the kill lands mid-run however slow the start-up was
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    store = ManifestStore(str(root))
    finished_at_kill = store.scan_chunks("resumable", 0).finished
    assert 0 < len(finished_at_kill) < ITEMS // CHUNK, "the kill should land mid-run"
    hits_before = collections.Counter(a["item"] for a in api.settled_arrivals())  # with calls still on the wire

    second = _start(script, api.url, root, "resume")
    assert second.wait(timeout=60) == 0

    hits = collections.Counter(a["item"] for a in api.arrivals())
    repeated = {item for item, n in hits.items() if n > 1}
    assert all(n <= 2 for n in hits.values())
    assert len(hits) == ITEMS
    # Only chunks without a manifest at the kill were repeated, and only items they had started.
    assert all(int(item) // CHUNK not in finished_at_kill for item in repeated)
    assert repeated <= set(hits_before)
    in_flight = {item for item in hits_before if int(item) // CHUNK not in finished_at_kill}
    assert repeated == in_flight
    with Ledger(store) as ledger:
        latest = ledger.query(
            "SELECT count(*) AS n, count(DISTINCT item_id) AS d, count(*) FILTER (WHERE ok) AS ok FROM latest"
        )
        assert latest.to_pylist() == [{"n": ITEMS, "d": ITEMS, "ok": ITEMS}]
        assert ledger.query("SELECT count(*) AS n FROM results")["n"][0].as_py() == ITEMS


def test_repeated_kills_at_random_points_lose_and_duplicate_nothing(api, tmp_path):
    script = tmp_path / "run_backfill.py"
    script.write_text(RUNNER)
    root = tmp_path / "store"
    store = ManifestStore(str(root))
    rng = random.Random(20261128)
    for trial in range(4):
        run = _start(script, api.url, root, "plan" if trial == 0 else "resume")
        # Each kill lands after 20..99 more calls (at most ~400 of 600 in all): mid-run, at a seeded point.
        _wait_for_arrivals(api, run, api.stats()["count"] + rng.randrange(20, 100))
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        assert store.scan_chunks("resumable", 0).unreadable == []
    final = _start(script, api.url, root, "resume")
    assert final.wait(timeout=60) == 0
    assert not list(root.rglob("*.tmp")), "temp files of killed writers are cleaned up on resume"
    assert not [p for p in root.rglob("chunk-*.parquet") if p.stat().st_size == 0]
    hits = collections.Counter(a["item"] for a in api.arrivals())
    assert len(hits) == ITEMS and max(hits.values()) <= 1 + 4
    with Ledger(store) as ledger:
        counts = ledger.query(
            "SELECT count(*) AS rows, count(DISTINCT item_id) AS items, count(*) FILTER (WHERE ok) AS ok FROM results"
        ).to_pylist()
        assert counts == [{"rows": ITEMS, "items": ITEMS, "ok": ITEMS}]
