"""Every benchmark still runs, in --quick mode, and its promise-shaped checks hold.

Absolute times are never asserted tightly (CI machines differ and are shared);
what is asserted are the promises that do not depend on the machine: nothing
lost, a crash repeats only what was in flight, the server never saw the limit
exceeded, plus generous floors that catch a benchmark or an engine path that
broke (a ratio collapsing, a budget left mostly unused).
"""

import json
import subprocess
import sys

from benchmarks import (
    closed_loop,
    compaction,
    conventions,
    crash_cost,
    failed_query,
    overhead,
    planning,
    real_limit,
    shared_budget,
    utilisation,
)
from benchmarks.common import child_env

# The engine is about 0.25x the raw thread pool today on no-op work (see BENCHMARKS.md);
# raise this floor towards 0.3+ once the per-item overhead recommended there is removed.
MIN_OVERHEAD_RATIO = 0.15
MIN_UTILISATION = 0.8
MIN_CLOSED_LOOP_UTILISATION = 0.7  # 4 s cells: start-up and chunk drains weigh more than in 20 s runs


def test_overhead_quick_runs_and_paceline_is_not_pathologically_slower():
    outcome = overhead.run(quick=True)
    assert outcome.metrics["items"] == overhead.SIZES[True]
    assert outcome.metrics["ratio"] > MIN_OVERHEAD_RATIO, outcome.render()


def test_planning_quick_stays_within_the_goals():
    outcome = planning.run(quick=True)
    assert outcome.metrics["seconds"] < planning.GOAL_SECONDS, outcome.render()
    assert outcome.metrics["peak_rss_bytes"] < planning.GOAL_BYTES, outcome.render()
    assert outcome.metrics["peak_rss_bytes"] > outcome.metrics["import_rss_bytes"] > 0


def test_failed_query_quick_finds_exactly_the_failed_items():
    outcome = failed_query.run(quick=True)  # raises if the ledger's count differs from what was generated
    assert outcome.metrics["failed"] > 0
    assert outcome.metrics["total_s"] < 10 * failed_query.GOAL_SECONDS, outcome.render()


def test_compaction_quick_answers_faster_after_and_survives_kills():
    outcome = compaction.run(quick=True)  # raises if any answer differs from what was generated
    largest = max(compaction.FILES[True])
    assert outcome.metrics[f"after_s_{largest}"] < outcome.metrics[f"before_s_{largest}"], outcome.render()
    assert outcome.metrics["s3_after_s"] < outcome.metrics["s3_before_s"], outcome.render()
    assert outcome.metrics["held"] == outcome.metrics["trials"] == compaction.TRIALS[True], outcome.render()


def test_crash_cost_quick_repeats_only_what_was_in_flight():
    outcome = crash_cost.run(quick=True)
    metrics = outcome.metrics
    assert metrics["held"] == metrics["trials"] == crash_cost.TRIALS[True], outcome.render()
    assert metrics["repeated_outside_in_flight"] == 0
    assert metrics["lost"] == 0 and metrics["unreadable"] == 0
    assert metrics["mid_run_trials"] >= 1, "no kill landed mid-run, so nothing was tested"


def test_utilisation_quick_never_exceeds_a_limit_and_uses_most_of_the_budget():
    outcome = utilisation.run(quick=True)
    for case in utilisation.CASES:
        assert outcome.metrics[f"{case}_busiest_over_limit"] <= 1.0, outcome.render()
        assert outcome.metrics[f"{case}_utilisation"] >= MIN_UTILISATION, outcome.render()


def test_real_limit_quick_loses_nothing_never_exceeds_the_declared_limit_and_heeds_headers():
    outcome = real_limit.run(quick=True)
    metrics = outcome.metrics
    for cell in ("real100", "real70", "real40"):
        assert metrics[f"{cell}_lost"] == 0, outcome.render()  # every item has exactly one latest row
        assert metrics[f"{cell}_busiest_1s"] <= real_limit.DECLARED_RPS, outcome.render()
    assert metrics["headers_lost"] == 0, outcome.render()
    assert metrics["headers_busiest_1s"] <= real_limit.DECLARED_RPS, outcome.render()
    assert metrics["headers_429"] == 0, "a client that reads x-ratelimit-remaining never meets the quota's 429"


def test_closed_loop_quick_holds_the_limit_loses_nothing_and_survives_a_failover():
    outcome = closed_loop.run(quick=True)
    metrics = outcome.metrics
    cells = [(latency, estimate) for latency, estimate in closed_loop.API_CELLS[True]]
    keys = [f"api_{latency}ms_{estimate}" for latency, estimate in cells] + ["llm_tokens_2x", "llm_burst_1s_window"]
    for key in keys:
        assert metrics[f"{key}_busiest_over_limit"] <= 1.0, outcome.render()
        if key != "llm_burst_1s_window":
            # The burst cell's plan can offer 3,360 tokens in a 1 s window of 3,000 (12 workers x 4 calls,
            # see BENCHMARKS.md "Closed-loop pacing"): its rare limit 429s are a known engine finding.
            assert metrics[f"{key}_limit_429s"] == 0, outcome.render()
        assert metrics[f"{key}_lost"] == metrics[f"{key}_not_ok"] == 0, outcome.render()
        assert metrics[f"{key}_utilisation"] >= MIN_CLOSED_LOOP_UTILISATION, outcome.render()
    assert metrics["failover_failed"] <= metrics["failover_terminated"], outcome.render()
    assert metrics["failover_rows_right"], outcome.render()


def test_run_entry_point_prints_a_summary_and_writes_json(tmp_path):
    report = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "planning", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert completed.returncode == 0, completed.stderr
    assert "planning" in completed.stdout and "goals" in completed.stdout
    outcomes = json.loads(report.read_text())["outcomes"]
    assert [o["name"] for o in outcomes] == ["planning"]


def test_conventions_quick_prints_every_cell_and_loses_nothing():
    """Cells may miss while the engine learns the dialects; every one must still run, be judged and lose nothing."""
    outcome = conventions.run(quick=True)
    keys = [*conventions.HTTP_CELLS, "llm_out_of_credit"]
    for key in keys:
        assert outcome.metrics[f"{key}_lost"] == 0, outcome.render()
        assert any(label.startswith(key) for label, _ in outcome.rows), outcome.render()


def test_shared_budget_quick_holds_the_limit_across_processes_and_loses_nothing():
    """Every cell runs and is judged; the server never saw the limit exceeded, nothing is lost, the killed
    backfill's rerun finishes it. Shares and goodput are the benchmark's report, with generous floors here."""
    outcome = shared_budget.run(quick=True)
    metrics = outcome.metrics
    for cell in shared_budget.cells(quick=True):
        key = cell.key
        assert any(label.startswith(key) for label, _ in outcome.rows), outcome.render()
        assert metrics[f"{key}_busiest_1s"] <= cell.limit, outcome.render()
        assert metrics[f"{key}_lost"] == 0 and metrics[f"{key}_finished"], outcome.render()
        assert (metrics[f"{key}_lowest_goodput"] or 0.0) >= 0.6, outcome.render()
