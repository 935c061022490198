"""The refusal table at work: real backfills against the bundled services speaking providers' dialects.

Each test is judged by the server's own arrival log: what it admitted, what it
refused and when, not by the client's bookkeeping.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from pipeline.backfill import Backfill, OutOfCredit, plan_backfill, plan_retry, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import JsonlPrompts, Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices import start_http_api, start_llm
from pipeline.manifests import ManifestError, ManifestStore
from pipeline.report import busiest_window
from pipeline.workloads.http_api import HttpWork
from pipeline.workloads.llm import LlmWork

PROMPT = "Say hello to item number {n}, politely and briefly."


def _latest(store: ManifestStore, name: str) -> dict[str, dict]:
    with Ledger(store, 3, name) as ledger:
        return {r["item_id"]: r for r in ledger.query("SELECT * FROM latest").to_pylist()}


def test_a_spent_github_quota_is_waited_out_not_taken_for_bad_credentials(tmp_path):
    """GitHub answers a spent quota with 403 and an epoch reset: the run waits for the window, never aborts.

    Another client of the same token has just spent the window's quota, so the backfill's very first calls are
    all refused with 403, the case the credential check used to take for a bad token.
    """
    quota, window = 20, 2
    items = [str(n) for n in range(60)]
    with start_http_api(dialect="github", quota=quota, quota_window_s=window) as api:
        with httpx.Client(base_url=api.url) as other_client:
            spent = [other_client.get(f"/items/other-{n}").status_code for n in range(quota + 1)]
        backfill = Backfill(
            "github",
            Values.of(items),
            HttpWork(url_template="{base}/items/{id}", base=api.url),
            ServiceLimit("github", requests_per_second=50, safety=0.9),  # the user does not know the quota
            overrides=Overrides(max_retry_after_s=5.0),
        )
        store = ManifestStore(str(tmp_path / "m"))
        plan_backfill(backfill, store)
        run_attempt(backfill, store, LocalExecutor())
        ours = [a for a in api.arrivals() if not str(a["item"]).startswith("other-")]
    assert spent[-1] == 403, "the quota was spent before the backfill began"
    refused = [a for a in ours if a["status"] == 403]
    assert refused, "the backfill's first calls met the spent quota"
    rows = _latest(store, "github")
    assert len(rows) == len(items) and all(r["ok"] for r in rows.values()), "the reset was waited out; all went through"
    # Seen: 2 per worker (the first, and one a hair before the reset). Not waiting would be ~30 per worker.
    assert len(refused) <= 5 * backfill.execution_plan(len(items)).max_parallelism, "each worker waited after a 403"
    admitted = np.array(sorted(a["t"] for a in ours if a["status"] == 200))
    assert busiest_window(admitted, window) <= 2 * quota, "a sliding window holds at most two fixed windows' quotas"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"id": {n}, "prompt": "{PROMPT.format(n=n)}"}}\n' for n in range(80)))
    return JsonlPrompts(str(path))


def test_out_of_credit_stops_the_run_then_a_topped_up_rerun_finishes(tmp_path, prompts):
    """OpenAI's insufficient_quota: stop within a few calls per worker, say so, lose and kill nothing."""
    with start_llm(credit_tokens=1500, latency_ms=5) as llm:
        limit = ServiceLimit("openai", requests_per_second=40, safety=0.5)
        work = LlmWork(base_url=f"{llm.url}/v1", model="local", max_tokens=16)
        backfill = Backfill("dry", prompts, work, limit, Estimates(seconds_per_call=0.01))
        store = ManifestStore(str(tmp_path / "m"))
        plan_backfill(backfill, store)
        execution = backfill.execution_plan(80)
        with pytest.raises(OutOfCredit) as stopped:
            run_attempt(backfill, store, LocalExecutor())
        arrivals = llm.arrivals()
        first_refusal = min(a["t"] for a in arrivals if a["status"] == 429)
        after = [a for a in arrivals if a["t"] > first_refusal]
        stopped_rows = _latest(store, "dry")
        assert store.exists(store.credit_path("dry", 0)), "the stopped chunks are listed for the rerun"
        with pytest.raises(ManifestError, match="ran out of credit"):
            plan_retry(backfill, store, 1)  # a retry round would call them twice: the attempt continues instead
        llm.post_admin("/_topup", {"tokens": 100_000})
        run_attempt(backfill, store, LocalExecutor())
        rerun_calls = len(llm.arrivals()) - len(arrivals)
        assert not store.exists(store.credit_path("dry", 0)), "and the list is gone once they are done"

    message = str(stopped.value)
    assert "out of credit or quota" in message and "exceeded your current quota" in message and "openai" in message
    assert len(after) <= 3 * execution.max_parallelism, "at most three calls per worker after the first refusal"
    done = [r for r in stopped_rows.values() if r["ok"]]
    waiting = [r for r in stopped_rows.values() if r["status"] == "out_of_credit"]
    # A row for each item of the chunks that ran: done, or waiting for credit; the chunks never started have none.
    assert len(done) + len(waiting) == len(stopped_rows) and waiting
    assert all(r["retryable"] for r in waiting), "nothing failed for good for want of credit"
    rows = _latest(store, "dry")
    assert len(rows) == 80 and all(r["ok"] for r in rows.values()), "the rerun after the top-up did the rest"
    assert rerun_calls == 80 - len(done), "the rerun called exactly the items not done: no answer paid for twice"
