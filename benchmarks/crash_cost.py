"""Crash cost: kill -9 a backfill at a random moment, resume it, count what was done twice.

Each trial starts a backfill in a subprocess against the local HTTP API (a
moderate rate, several workers, a 300 ms latency, so each worker keeps calls
in flight and takes its next chunk while its last calls are out: chunks
overlap), waits until it has planned and started executing, sleeps a random
time, kills it with SIGKILL and resumes it in a new subprocess. The server's
arrival log is the judge:

* in flight at the kill: items the server saw before the kill whose chunk had
  no manifest yet (those chunks must be redone);
* repeated: items the server saw more than once by the end;
* chunks in flight: chunks with items in flight; more than the workers means
  the kill caught workers holding two chunks at once.

Goal, every trial: repeated <= in flight (in fact repeated is a subset of in
flight: no finished chunk is called again), nothing lost (every item has
exactly one ``latest`` row, ok), and no unreadable manifest.

    python -m benchmarks.crash_cost [--quick]
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx

from benchmarks.common import PYTHON, Outcome, child_env, main, median
from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, Overrides, ServiceLimit
from pipeline.localservices import ServiceHandle, start_http_api
from pipeline.manifests import ManifestStore
from pipeline.work import FunctionWork, Item

NAME = "crash_cost"
TRIALS = {False: 12, True: 2}
ITEMS = {False: 600, True: 300}
CHUNK = 20
SERVER_RPS = 200
LATENCY_MS = 300
LIMIT = ServiceLimit("api", requests_per_second=SERVER_RPS, safety=0.5)  # 100 req/s over 5 workers
ESTIMATES = Estimates(seconds_per_call=0.05)
RUNNING = "RUNNING"
SEED = 20_260_101


def _get(client: httpx.Client, item: Item) -> dict:
    response = client.get(f"/items/{item.id}")
    response.raise_for_status()
    return response.json()


def make_backfill(url: str, items: int) -> Backfill:
    """The same declaration in the killed run and in the resumed one, so the resume finds its chunks."""
    return Backfill(
        NAME,
        Values.of(range(items)),
        FunctionWork(lambda: httpx.Client(base_url=url, timeout=5), _get),
        LIMIT,
        ESTIMATES,
        Overrides(chunk_size=CHUNK),
    )


def child(url: str, root: str, items: int) -> None:
    """In the subprocess: plan if there is no plan yet, say so, run (or resume) attempt 0."""
    backfill, store = make_backfill(url, items), ManifestStore(root)
    if not store.exists(store.plan_path(NAME, 0)):
        plan_backfill(backfill, store)
    print(RUNNING, flush=True)
    run_attempt(backfill, store, LocalExecutor())


@dataclass(frozen=True)
class Trial:
    """What one kill and resume cost, counted from the server's arrival log and the store."""

    kill_after_s: float
    hit_before_kill: int
    chunks_done_at_kill: int
    chunks_in_flight: int
    in_flight: int
    repeated: int
    repeated_outside_in_flight: int
    lost: int
    unreadable: int

    @property
    def held(self) -> bool:
        """The promise: only items of chunks in flight at the kill were done twice."""
        return self.repeated <= self.in_flight and not self.repeated_outside_in_flight


def _spawn(url: str, root: str, items: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-m", "benchmarks.crash_cost", "--child", url, root, str(items)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def trial(api: ServiceHandle, root: str, items: int, rng: random.Random) -> Trial:
    """One kill and resume; counts from the server's arrival log and the store."""
    api.reset()
    first = _spawn(api.url, root, items)
    if first.stdout.readline().strip() != RUNNING:  # type: ignore[union-attr]
        raise RuntimeError(f"the backfill child exited before running (code {first.wait()})")
    kill_after = rng.uniform(0.05, 0.95) * items / (SERVER_RPS * LIMIT.safety)  # somewhere inside the run
    time.sleep(kill_after)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    before = collections.Counter(a["item"] for a in api.settled_arrivals())  # with requests still on the wire
    store = ManifestStore(root)
    finished = store.scan_chunks(NAME, 0).finished
    chunk_of = dict(
        zip(*store.read_table(store.plan_path(NAME, 0)).select(["item_id", "chunk_id"]).to_pydict().values())
    )
    second = _spawn(api.url, root, items)
    second.communicate(timeout=120)
    if second.returncode != 0:
        raise RuntimeError(f"the resumed backfill failed (code {second.returncode})")
    hits = collections.Counter(a["item"] for a in api.arrivals())
    in_flight = {item for item in before if chunk_of[item] not in finished}
    repeated = {item for item, n in hits.items() if n > 1}
    return Trial(
        kill_after_s=kill_after,
        hit_before_kill=len(before),
        chunks_done_at_kill=len(finished),
        chunks_in_flight=len({chunk_of[item] for item in in_flight}),
        in_flight=len(in_flight),
        repeated=len(repeated),
        repeated_outside_in_flight=len(repeated - in_flight),
        lost=items - _latest_ok(store),
        unreadable=len(store.scan_chunks(NAME, 0).unreadable),
    )


def _latest_ok(store: ManifestStore) -> int:
    """Items with exactly one latest row, and that row ok."""
    with Ledger(store) as ledger:
        row = ledger.query("SELECT count(DISTINCT item_id) AS d, count(*) FILTER (WHERE ok) AS ok FROM latest")
    distinct, ok = row["d"][0].as_py(), row["ok"][0].as_py()
    return min(distinct, ok)


def run(quick: bool) -> Outcome:
    """Random kill -9 then resume: repeated items vs items in flight at the kill."""
    trials_n, items = TRIALS[quick], ITEMS[quick]
    rng = random.Random(SEED)
    with (
        tempfile.TemporaryDirectory(prefix="paceline-bench-crash-") as tmp,
        start_http_api(rps=SERVER_RPS, latency_ms=LATENCY_MS) as api,
    ):
        trials = [trial(api, os.path.join(tmp, f"trial-{n}"), items, rng) for n in range(trials_n)]
    held = sum(t.held for t in trials)
    workers = make_backfill("", items).execution_plan(items).max_parallelism
    overlapping = sum(1 for t in trials if t.chunks_in_flight > workers)
    outcome = Outcome(NAME, f"{held}/{len(trials)} trials repeated no more than was in flight")
    outcome.row("trials, items per run, chunk size, workers", f"{len(trials)}, {items}, {CHUNK}, {workers}")
    outcome.row(
        "limit",
        f"{SERVER_RPS} req/s x safety {LIMIT.safety:g}, latency {LATENCY_MS} ms "
        f"(estimate {ESTIMATES.seconds_per_call} s)",
    )
    outcome.row("trials killed while some worker held two chunks", f"{overlapping} of {len(trials)}")
    outcome.row("trial: killed after / items hit / chunks done / chunks in flight", "items in flight / repeated / lost")
    for n, t in enumerate(trials):
        outcome.row(
            f"  {n}: {t.kill_after_s:.2f} s / {t.hit_before_kill} / {t.chunks_done_at_kill} / {t.chunks_in_flight}",
            f"{t.in_flight} / {t.repeated} / {t.lost}",
        )
    ratios = [t.repeated / t.in_flight for t in trials if t.in_flight]
    if ratios:
        outcome.row("median repeated / in flight (trials with something in flight)", f"{median(ratios):.2f}")
    outcome.metrics.update(
        trials=len(trials),
        held=held,
        max_repeated_minus_in_flight=max(t.repeated - t.in_flight for t in trials),
        repeated_outside_in_flight=sum(t.repeated_outside_in_flight for t in trials),
        lost=sum(t.lost for t in trials),
        unreadable=sum(t.unreadable for t in trials),
        in_flight_total=sum(t.in_flight for t in trials),
        repeated_total=sum(t.repeated for t in trials),
        mid_run_trials=sum(1 for t in trials if t.in_flight),
        overlapping_trials=overlapping,
    )
    outcome.goal(
        "repeated <= in flight, every trial",
        held == len(trials),
        f"{held}/{len(trials)}; repeated total {outcome.metrics['repeated_total']}, "
        f"in flight total {outcome.metrics['in_flight_total']}",
    )
    outcome.goal(
        "nothing lost, no unreadable manifest",
        not outcome.metrics["lost"] and not outcome.metrics["unreadable"],
        f"lost {outcome.metrics['lost']}, unreadable {outcome.metrics['unreadable']}",
    )
    return outcome


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(main(NAME, run))
