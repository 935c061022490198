"""Providers' "slow down" dialects: a run declared above the real quota, judged by the server (DESIGN.md "Refusals").

Every cell is a real Paceline backfill (LocalExecutor, built-in workloads)
whose declared limit is higher than what the service really allows, as when
the user does not know the real quota: ``requests_per_second=50`` at safety
0.9 against a quota of 60 requests per 2 s (30 req/s). Each service refuses in
its provider's own words (``pipeline.localservices.http_api --dialect``,
``llm --credit-tokens``):

===================  ===============================================================================
cell                 what the service says once the quota is spent
===================  ===============================================================================
plain_429            baseline: sliding 60 per 2 s, ``429`` + ``Retry-After`` (this server's own dialect)
github_403           fixed 60 per 2 s window, ``403`` + ``X-RateLimit-Remaining: 0`` + an epoch
                     ``X-RateLimit-Reset``, no Retry-After
discord_429          fixed 60 per 2 s bucket, ``429`` + ``Retry-After`` + ``X-RateLimit-Reset-After``
shopify_bucket       leaky bucket of 40 leaking 30/s, ``429`` + ``Retry-After: 2.0``
llm_out_of_credit    prepaid credit for about half the prompts, then ``429 insufficient_quota`` for ever
===================  ===============================================================================

Judged from the server's arrival log (never the client's count) and the ledger:

* goodput: 200s per second, from the first arrival to the last 200 (plus one
  period), over the real quota (>= 0.9). A fixed window lets a whole quota in
  at once, so a short run can score a little above 1; a run that stopped early
  is judged by its not-ok and misclassified lines, not by this one;
* refused: the limiter's refusals, whatever their status, over all calls (<= 1 %);
* lost: items without exactly one latest row in the ledger (0);
* misclassified: rows that read the quota as something else: ``auth_aborted``
  (a quota answer taken for a bad credential) or failed for good (0).

Out of credit instead: the run stops with an error naming the quota or the
credit, each worker makes at most 3 calls after the first refusal, and after
``POST /_topup`` a rerun (resume, then one retry round) finishes every item.

Each engine run is a child process cut at ``CELL_TIMEOUT_S``, so a run that
reads an epoch reset as a delay of decades is reported, not waited for. Cells
that miss are printed first; missing is reported, never an exit code.

    python -m benchmarks.conventions [--quick]
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import PYTHON, Outcome, child_env, main
from pipeline.backfill import Backfill, plan_backfill, plan_retry, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import JsonlPrompts, Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices import start_http_api, start_llm
from pipeline.manifests import ManifestStore
from pipeline.workloads.http_api import HttpWork
from pipeline.workloads.llm import LlmWork

NAME = "conventions"
DECLARED_RPS = 50.0
SAFETY = 0.9  # aim at 45 req/s: above every real quota here, as a user who guessed high would
QUOTA, QUOTA_WINDOW_S = 60, 2  # the real limit of the HTTP cells: 30 req/s
REAL_RPS = QUOTA / QUOTA_WINDOW_S
LATENCY_MS = 20.0
SECONDS = {False: 25.0, True: 5.0}  # items = real rate x this; quick still spends each quota (2.5 windows)
CELL_TIMEOUT_S = {False: 60.0, True: 30.0}
HTTP_CELLS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain_429": ("sliding 60 per 2 s, 429 + Retry-After", {"rps": REAL_RPS, "window_s": QUOTA_WINDOW_S}),
    "github_403": (
        "fixed 60 per 2 s, 403 + X-RateLimit-Reset (epoch), no Retry-After",
        {"dialect": "github", "quota": QUOTA, "quota_window_s": QUOTA_WINDOW_S},
    ),
    "discord_429": (
        "fixed 60 per 2 s bucket, 429 + Retry-After + X-RateLimit-Reset-After",
        {"dialect": "discord", "quota": QUOTA, "quota_window_s": QUOTA_WINDOW_S},
    ),
    "shopify_bucket": (
        "leaky bucket of 40 (Shopify's) leaking 30/s, 429 + Retry-After: 2.0",
        {"dialect": "shopify", "bucket": 40, "leak_rate": REAL_RPS},
    ),
}

LLM_ITEMS = {False: 300, True: 60}
LLM_PROMPT = "word " * 40  # 200 characters: 54 prompt tokens by the server's rule
LLM_MAX_TOKENS = 16
LLM_TOKENS = math.ceil(len(LLM_PROMPT) / 4) + 4 + LLM_MAX_TOKENS  # 70 per prompt, charged against the credit
LLM_TOKENS_PER_MINUTE = 600_000  # declared; the server enforces no rate, only the credit

GOAL_GOODPUT = 0.9
GOAL_REFUSED = 0.01
GOAL_CALLS_AFTER_REFUSAL = 3  # per worker
CREDIT_WORDS = re.compile(r"quota|credit", re.IGNORECASE)


# --------------------------------------------------------------------------
# The engine run, in a child process
# --------------------------------------------------------------------------


def backfill_for(spec: dict[str, Any]) -> Backfill:
    """The backfill a cell runs, rebuilt the same way by the parent (to read the ledger) and by the child."""
    if spec["kind"] == "llm":
        limit = ServiceLimit("llm", tokens_per_minute=LLM_TOKENS_PER_MINUTE, safety=SAFETY)
        work = LlmWork(base_url=f"{spec['url']}/v1", model="local", max_tokens=LLM_MAX_TOKENS)
        return Backfill(spec["name"], JsonlPrompts(spec["prompts"]), work, limit, Estimates(tokens_per_item=LLM_TOKENS))
    limit = ServiceLimit("api", requests_per_second=DECLARED_RPS, safety=SAFETY)
    work = HttpWork(url_template="{base}/items/{id}", base=spec["url"])
    return Backfill(spec["name"], Values.of(item_ids(spec["items"])), work, limit, Estimates())


def item_ids(count: int) -> list[str]:
    return [f"item-{n}" for n in range(count)]


def workers_for(spec: dict[str, Any]) -> int:
    """The workers the engine's plan gives this cell (what "per worker" divides by)."""
    return backfill_for(spec).execution_plan(spec["items"]).max_parallelism


def engine(spec: dict[str, Any]) -> str | None:
    """Run one step of a cell; how the run ended (its exception, as text) is the result, not a crash.

    ``first`` plans and runs attempt 0; ``rerun`` resumes attempt 0 (chunks a
    stopped run never wrote) and then runs one retry round over what is left failed.
    """
    backfill = backfill_for(spec)
    store = ManifestStore(spec["store"])
    try:
        if spec["step"] == "first":
            plan_backfill(backfill, store)
        result = run_attempt(backfill, store, LocalExecutor())
        if spec["step"] == "rerun" and result.counts["failed"]:
            plan_retry(backfill, store, 1)
            run_attempt(backfill, store, LocalExecutor(), attempt=1)
    except Exception as error:  # noqa: BLE001 - how the run ended is what the cell reports
        return f"{type(error).__name__}: {error}"
    return None


@dataclass(frozen=True)
class Ended:
    """How an engine run ended: its error (``None`` if it finished), and whether we had to cut it."""

    error: str | None
    cut: bool = False


def run_engine(spec: dict[str, Any], timeout_s: float) -> Ended:
    """``engine(spec)`` in a fresh interpreter, cut after ``timeout_s``: a hung run is a result, not a hang.

    Unlike ``common.run_child``, a timeout or a crash is reported as the cell's
    outcome rather than raised, so every other cell still runs and prints.
    """
    argv = [PYTHON, "-m", "benchmarks.conventions", "--engine", json.dumps(spec)]
    try:
        child = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=child_env())
    except subprocess.TimeoutExpired:
        return Ended(f"cut after {timeout_s:g} s: the run had not ended", cut=True)
    if child.returncode != 0:
        return Ended(f"engine child crashed ({child.returncode}): {child.stderr.strip().splitlines()[-1:]}", cut=True)
    return Ended(json.loads(child.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------
# Judging a cell: the server's log and the ledger
# --------------------------------------------------------------------------


@dataclass
class Ledgered:
    """What the ledger holds for a cell's items once its runs are over."""

    lost: int  # items with no latest row, or more than one
    not_ok: int
    misclassified: dict[str, int]  # status -> rows that read the quota as a bad credential or a permanent failure


def ledgered(spec: dict[str, Any]) -> Ledgered:
    backfill = backfill_for(spec)
    name = backfill.name
    with Ledger(ManifestStore(spec["store"]), backfill.max_attempts, name) as ledger:
        latest, distinct, ok = ledger.con.execute(
            "SELECT count(*), count(DISTINCT item_id), count(*) FILTER (WHERE ok) FROM latest WHERE backfill = ?",
            [name],
        ).fetchall()[0]
        wrong = ledger.con.execute(
            "SELECT status, count(*) FROM results WHERE backfill = ? AND NOT ok "
            "AND (status = 'auth_aborted' OR NOT retryable) GROUP BY status ORDER BY status",
            [name],
        ).fetchall()
    items = spec["items"]
    return Ledgered(items - distinct + (latest - distinct), items - int(ok), {s: int(n) for s, n in wrong})


@dataclass
class Served:
    """What the server saw of a run: calls, 200s, its own refusals, goodput over the real rate."""

    calls: int
    ok: int
    refused: int
    seconds: float
    goodput: float | None  # 200s per second over the real rate; None where the service has no rate

    @property
    def refused_share(self) -> float:
        return self.refused / self.calls if self.calls else 0.0


def served(arrivals: list[dict[str, Any]], real_rps: float | None) -> Served:
    """Goodput counts each 200 as one period of the real rate, so a run paced exactly at it scores 1."""
    times = sorted(a["t"] for a in arrivals)
    ok = sorted(a["t"] for a in arrivals if a["status"] == 200)
    seconds = times[-1] - times[0] if times else 0.0
    goodput = None
    if real_rps:
        goodput = len(ok) / (ok[-1] - times[0] + 1 / real_rps) / real_rps if ok else 0.0
    refused = sum(1 for a in arrivals if a["refused"])
    return Served(len(arrivals), len(ok), refused, seconds, goodput)


@dataclass
class Cell:
    """One dialect: how the engine's run ended, what the server saw, what the ledger holds."""

    key: str
    server: str
    items: int
    ended: Ended
    workers: int
    served: Served
    ledger: Ledgered
    credit: Credit | None = None
    goals: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def missed(self) -> bool:
        return not all(met for _, met, _ in self.goals)


@dataclass
class Credit:
    """The out-of-credit cell's own facts: the stop, the calls after the first refusal, the rerun."""

    calls_after_refusal: int
    rerun: Ended
    after_rerun: Ledgered
    topup: int


def http_cell(key: str, root: str, quick: bool) -> Cell:
    """One HTTP dialect: Paceline declared at 50 req/s against a real 30 req/s, judged by the server."""
    words, options = HTTP_CELLS[key]
    items = round(REAL_RPS * SECONDS[quick])
    with start_http_api(latency_ms=LATENCY_MS, **options) as api:
        spec = {"kind": "http", "url": api.url, "items": items, "name": key, "store": os.path.join(root, key)}
        ended = run_engine({**spec, "step": "first"}, CELL_TIMEOUT_S[quick])
        seen = served([a for a in api.arrivals() if a["item"]], REAL_RPS)
    cell = Cell(key, words, items, ended, workers_for(spec), seen, ledgered(spec))
    _rate_goals(cell)
    return cell


def llm_cell(root: str, quick: bool) -> Cell:
    """Credit for about half the prompts: the run must stop and say so, and a rerun after a top-up finish."""
    key, items = "llm_out_of_credit", LLM_ITEMS[quick]
    prompts = os.path.join(root, f"{key}.jsonl")
    with open(prompts, "w") as out:
        out.writelines(json.dumps({"id": n, "prompt": LLM_PROMPT}) + "\n" for n in range(items))
    credit = LLM_TOKENS * items // 2 + LLM_TOKENS // 2
    words = f"credit {credit:,} tokens (~{credit / LLM_TOKENS:.1f} of {items} prompts), then 429 insufficient_quota"
    with start_llm(credit_tokens=credit, completion_tokens=LLM_MAX_TOKENS, latency_ms=LATENCY_MS) as llm:
        spec = {"kind": "llm", "url": llm.url, "items": items, "name": key, "store": os.path.join(root, key)}
        spec["prompts"] = prompts
        ended = run_engine({**spec, "step": "first"}, CELL_TIMEOUT_S[quick])
        first = llm.arrivals()
        first_ledger = ledgered(spec)
        topup = LLM_TOKENS * items
        llm.post_admin("/_topup", {"tokens": topup})
        rerun = run_engine({**spec, "step": "rerun"}, CELL_TIMEOUT_S[quick])
    credit_facts = Credit(_calls_after_first_refusal(first), rerun, ledgered(spec), topup)
    cell = Cell(key, words, items, ended, workers_for(spec), served(first, None), first_ledger, credit_facts)
    _credit_goals(cell, credit_facts)
    return cell


def _calls_after_first_refusal(arrivals: list[dict[str, Any]]) -> int:
    """Calls the server saw after its first out-of-credit answer (it enforces no rate here: every refusal is credit)."""
    refusals = [a["t"] for a in arrivals if a["refused"]]
    return sum(1 for a in arrivals if a["t"] > min(refusals)) if refusals else 0


def _common_goals(cell: Cell, ledger: Ledgered) -> None:
    """Nothing misread and nothing lost: the goals every cell shares.

    A run that stopped with ``AuthenticationFailed`` misread a quota answer as
    a bad credential even when it recorded no row for the refused items.
    """
    wrong = sum(ledger.misclassified.values())
    detail = ", ".join(f"{status}: {n}" for status, n in ledger.misclassified.items()) or "no rows"
    aborted = (cell.ended.error or "").startswith("AuthenticationFailed")
    if aborted:
        detail += "; the run stopped as if the credentials were bad"
    cell.goals.append(("0 misclassified", wrong == 0 and not aborted, f"{wrong} rows ({detail})"))
    cell.goals.append(("0 items lost", ledger.lost == 0, f"{ledger.lost} lost, {ledger.not_ok} not ok"))


def _rate_goals(cell: Cell) -> None:
    s = cell.served
    goodput = s.goodput or 0.0
    cell.goals.append((f"goodput >= {GOAL_GOODPUT} of the real quota", goodput >= GOAL_GOODPUT, f"{goodput:.3f}"))
    cell.goals.append(
        (
            f"<= {GOAL_REFUSED:.0%} of calls refused",
            s.refused_share <= GOAL_REFUSED,
            f"{s.refused_share:.1%} ({s.refused} of {s.calls})",
        )
    )
    _common_goals(cell, cell.ledger)


def _credit_goals(cell: Cell, credit: Credit) -> None:
    per_worker = credit.calls_after_refusal / cell.workers
    error = cell.ended.error
    cell.goals.append(
        (
            "the run stops with an error naming quota or credit",
            bool(error and not cell.ended.cut and CREDIT_WORDS.search(error)),
            error or "the run ended without an error",
        )
    )
    cell.goals.append(
        (
            f"<= {GOAL_CALLS_AFTER_REFUSAL} calls per worker after the first refusal",
            per_worker <= GOAL_CALLS_AFTER_REFUSAL,
            f"{credit.calls_after_refusal} calls / {cell.workers} workers = {per_worker:.1f}",
        )
    )
    _common_goals(cell, cell.ledger)
    after = credit.after_rerun
    cell.goals.append(
        (
            "after /_topup a rerun finishes every item",
            credit.rerun.error is None and after.lost == 0 and after.not_ok == 0,
            f"{cell.items - after.not_ok} of {cell.items} ok, {after.lost} lost; "
            f"{credit.rerun.error or 'the rerun ended without an error'}",
        )
    )


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def run(quick: bool) -> Outcome:
    """Every dialect cell, whatever the engine does with it: goodput, refusals, losses, misreadings."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paceline-bench-conventions-") as root:
        cells = [http_cell(key, root, quick) for key in HTTP_CELLS]
        cells.append(llm_cell(root, quick))
    return _outcome(cells, quick, time.perf_counter() - started)


def _outcome(cells: list[Cell], quick: bool, seconds: float) -> Outcome:
    met = [c for c in cells if not c.missed]
    outcome = Outcome(
        NAME,
        f"{len(met)}/{len(cells)} cells met; missed: {', '.join(c.key for c in cells if c.missed) or 'none'}",
    )
    outcome.row(
        "declared",
        f"requests_per_second={DECLARED_RPS:g} at safety {SAFETY} (aims at {DECLARED_RPS * SAFETY:g} req/s) against "
        f"a real {REAL_RPS:g} req/s; server latency {LATENCY_MS:g} ms; {SECONDS[quick]:g} s of items at the real "
        f"quota per cell; each run cut at {CELL_TIMEOUT_S[quick]:g} s; whole benchmark {seconds:.0f} s",
    )
    for cell in sorted(cells, key=lambda c: not c.missed):
        _cell_rows(outcome, cell)
    return outcome


def _cell_rows(outcome: Outcome, cell: Cell) -> None:
    s = cell.served
    outcome.row(f"{cell.key} [{'MISSED' if cell.missed else 'met'}]", f"{cell.server}; {cell.items} items")
    if s.goodput is not None:
        outcome.row("  goodput / real quota (server)", f"{s.goodput:.3f} ({s.ok} 200s over {s.seconds:.1f} s)")
    outcome.row("  refused by the service", f"{s.refused_share:.1%} ({s.refused} of {s.calls} calls)")
    outcome.row("  run ended", cell.ended.error or "without an error")
    outcome.row("  workers", str(cell.workers))
    outcome.row("  items lost / not ok (ledger)", f"{cell.ledger.lost} / {cell.ledger.not_ok}")
    if cell.credit is not None:
        outcome.row("  calls after the first refusal", str(cell.credit.calls_after_refusal))
        outcome.row(
            "  rerun after /_topup",
            f"{cell.credit.topup:,} tokens; {cell.credit.rerun.error or 'ended without an error'}",
        )
    for text, met, detail in cell.goals:
        outcome.goal(f"{cell.key}: {text}", met, detail)
    key = cell.key
    outcome.metrics[f"{key}_goodput"] = s.goodput
    outcome.metrics[f"{key}_refused_share"] = s.refused_share
    outcome.metrics[f"{key}_lost"] = cell.ledger.lost
    outcome.metrics[f"{key}_misclassified"] = sum(cell.ledger.misclassified.values())
    outcome.metrics[f"{key}_error"] = cell.ended.error


if __name__ == "__main__":
    if sys.argv[1:2] == ["--engine"]:
        print(json.dumps(engine(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit(main(NAME, run))
