"""One budget, many backfills (issue 17): backfills in separate processes share one service's limit by lease.

Every cell starts backfills of one service as separate processes
(``python -m benchmarks.shared_budget --backfill SPEC``), seconds apart, all
with one manifest root (a folder, or moto's S3), against the bundled HTTP API
enforcing the declared limit itself (``--rps 200``). Each attempt holds a lease
in that root and paces at its backfill's weighted share of ``limit x safety``;
nothing else connects the processes. Everything is judged from the server's
arrival log, where an item id's prefix (``b-17``) says which backfill sent it,
and from the ledger each backfill's last process reads when it is done.

**Steady state** is the whole seconds (counted from the cell's first process
start) in which the set of running backfills is constant, less what a change
costs by design: after a newcomer's process starts, until its first call
reaches the server (it waits ``newcomer_wait_s`` after its lease for every
running worker to see it); after a backfill's last call, one re-read
(``reread_s``) for the others to see its lease gone; after a kill -9,
``regrow_after_crash_s`` for its lease to expire and be seen expired.

=================  ===========================================================================================
goal               what is measured
=================  ===========================================================================================
busiest second     every arrival (429s included) in the busiest sliding second <= the declared limit
sum <= target      the same <= 1.05 x the target (limit x safety): the issue's "at every instant the sum
                   over backfills <= limit x safety", with the 2 to 4 % a single paced backfill shows over a
                   sliding second (its workers' calls at the window's two edges)
goodput            the backfills' 200s per second together >= 0.9 of the target (limit x safety), in every
                   steady segment
shares             each backfill within 10 % of its weighted share of the target, in every steady segment
newcomer           at its share (90 % of its share's rate over the following second) within
                   ``newcomer_wait_s`` + 1 s of its process start
freed share        the others at their new share within ``reread_s`` + 1 s of a leaver's last call
crash              the survivors at their new share within ``regrow_after_crash_s`` of the kill -9, and the
                   killed backfill, run again in a new process, finishes
nothing lost       every item has exactly one latest row in the ledger, and it is ok
=================  ===========================================================================================

A newcomer's "+ 1 s" is its process's own start (the interpreter, the plan,
writing the lease: 0.2 to 0.8 s here); a freed share's is the leaver's last
answers, its last manifest and the release of its lease. A time "at its share"
is the start of the first second that holds 90 % of the share's rate, so a
change is placed to within about a fifth of a second (0.00 s: the others grew
within that much of the leaver's last call, never before it: see the
arrivals per 0.1 s in BENCHMARKS.md). Cells that miss are printed first, each
with a picture of every backfill's calls per second against the limit.

    python -m benchmarks.shared_budget [--quick]
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from benchmarks.common import PYTHON, Outcome, child_env, main
from pipeline.backfill import Backfill, plan_backfill, run_attempt
from pipeline.executors import LocalExecutor
from pipeline.items import Values
from pipeline.ledger import Ledger
from pipeline.limits import Estimates, ServiceLimit
from pipeline.localservices import ServiceHandle, start_http_api
from pipeline.localservices._common import busiest_window
from pipeline.localservices.s3 import start_s3
from pipeline.manifests import ManifestStore
from pipeline.shares import LeaseTiming
from pipeline.workloads.http_api import HttpWork

NAME = "shared_budget"
LIMIT_RPS = 200.0  # declared, and enforced by the server: a call over it is a 429 and shows in the busiest second
SAFETY = 0.9
LATENCY_MS = 20.0
GOAL_GOODPUT = 0.9
GOAL_SHARE = 0.10
GOAL_OVER_TARGET = 1.05  # the sum over backfills <= limit x safety, with the 5 % one paced backfill alone keeps
AT_SHARE = 0.9  # "at its share": this much of its share's rate within the next second
SLACK_S = 1.0  # a newcomer's process start, a leaver's last answers and release (module docstring)
SHORT_TIMING = LeaseTiming(reread_s=0.25, stale_s=0.75, skew_s=0.25, ttl_s=3.0, renew_s=1.0)  # quick kill: 4 s back
MARKS = "█▒░▓"  # one per backfill, in the order they start


@dataclass(frozen=True)
class Launch:
    """One backfill of a cell: its process starts ``at_s`` after the cell's first.

    ``kill_after_s``: kill -9 it that long after its start, then run it again
    in a new process ``rerun_after_s`` after the kill.
    """

    name: str
    weight: float
    items: int
    at_s: float
    kill_after_s: float | None = None
    rerun_after_s: float = 0.0


@dataclass(frozen=True)
class CellSpec:
    key: str
    text: str
    launches: tuple[Launch, ...]
    safety: float = SAFETY
    latency_ms: float = LATENCY_MS
    store: str = "local"  # or "s3": moto's S3 server
    timing: LeaseTiming = LeaseTiming()
    limit: float = LIMIT_RPS

    @property
    def target(self) -> float:
        return self.limit * self.safety


def cells(quick: bool) -> list[CellSpec]:
    """The cells; item counts give each phase (alone, shared, alone again) a few seconds at the expected rates."""
    if quick:
        pair = (Launch("a", 1, 1470, 0.0), Launch("b", 1, 360, 2.0))  # a alone ~4.5 s, both ~4 s, a alone ~2 s
        return [
            CellSpec("two_1to1", "2 backfills, weights 1:1, the second 2 s after the first", pair),
            CellSpec(
                "kill",
                "1:1, kill -9 of b 4 s after its start, b run again 1 s after its lease could have expired "
                "(short lease timing: ttl 3 s)",
                (Launch("a", 1, 2600, 0.0), Launch("b", 1, 700, 2.0, kill_after_s=4.0, rerun_after_s=5.0)),
                timing=SHORT_TIMING,
            ),
            CellSpec("two_1to1_s3", "the 1:1 cell with moto's S3 as the manifest store", pair, store="s3"),
        ]
    pair = (Launch("a", 1, 3600, 0.0), Launch("b", 1, 1800, 5.0))  # a alone ~7 s, both ~20 s, a alone ~5 s
    at_safety_1 = tuple(Launch(x.name, x.weight, round(x.items / SAFETY), x.at_s) for x in pair)
    regrow = LeaseTiming().regrow_after_crash_s
    return [
        CellSpec("two_1to1", "2 backfills, weights 1:1, the second 5 s after the first", pair),
        CellSpec(
            "two_3to1",
            "2 backfills, weights 1:3, the heavier one 5 s after the first (the first drops to a quarter)",
            (Launch("a", 1, 2700, 0.0), Launch("b", 3, 2700, 5.0)),
        ),
        CellSpec(
            "three_2to1to1",
            "3 backfills, weights 2:1:1, started 5 s apart; the last to start ends first",
            (Launch("a", 2, 4400, 0.0), Launch("b", 1, 1300, 5.0), Launch("c", 1, 675, 10.0)),
        ),
        CellSpec("two_1to1_s3", "the 1:1 cell with moto's S3 as the manifest store", pair, store="s3"),
        CellSpec("two_1to1_200ms", "the 1:1 cell against a service answering in 200 ms", pair, latency_ms=200.0),
        CellSpec(
            "two_7to1_200ms",
            "200 ms service, weights 7:1, the light one 5 s after (with the one worker the first one's 20 leave)",
            (Launch("a", 7, 5400, 0.0), Launch("b", 1, 450, 5.0)),
            latency_ms=200.0,
        ),
        CellSpec(
            "two_1to1_safety1",
            "the 1:1 cell at safety 1.0: the target is the limit itself",
            at_safety_1,
            safety=1.0,
        ),
        CellSpec(
            "kill",
            f"1:1, kill -9 of b 10 s after its start, b run again 4 s after its lease could have expired "
            f"(default lease timing: back within {regrow:g} s)",
            (Launch("a", 1, 6000, 0.0), Launch("b", 1, 1800, 5.0, kill_after_s=10.0, rerun_after_s=regrow + 4.0)),
        ),
    ]


# --------------------------------------------------------------------------
# One backfill, in its own process
# --------------------------------------------------------------------------


def item_ids(name: str, count: int) -> list[str]:
    return [f"{name}-{n}" for n in range(count)]


def backfill_for(spec: dict[str, Any]) -> Backfill:
    """The backfill a process runs, from the JSON spec the parent hands it."""
    return Backfill(
        spec["name"],
        Values.of(item_ids(spec["name"], spec["items"])),
        HttpWork(url_template="{base}/items/{id}", base=spec["url"]),
        ServiceLimit("api", requests_per_second=spec["limit"], safety=spec["safety"]),
        Estimates(seconds_per_call=spec["latency_s"]),
        share=spec["weight"],
        lease_timing=LeaseTiming(**spec["timing"]),
    )


def backfill_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Plan (first run only) and run attempt 0, then read this backfill's ledger.

    The first line printed is when the program began (after the interpreter's
    imports): a process killed later still tells that much.
    """
    print(json.dumps({"entered": time.time()}), flush=True)
    backfill = backfill_for(spec)
    store = ManifestStore(spec["root"], spec["s3"])
    if spec["step"] == "first":
        plan_backfill(backfill, store)
    result = run_attempt(backfill, store, LocalExecutor())
    with Ledger(store, backfill.max_attempts, backfill.name) as ledger:
        latest, distinct, ok = ledger.con.execute(
            "SELECT count(*), count(DISTINCT item_id), count(*) FILTER (WHERE ok) FROM latest WHERE backfill = ?",
            [backfill.name],
        ).fetchall()[0]
    return {
        "shares": [[change.at, change.share, change.leases] for change in result.shares],
        "explanation": result.execution.explanation[-1],
        "workers": result.execution.max_parallelism,
        "lost": spec["items"] - distinct + (latest - distinct),  # no latest row, or more than one
        "not_ok": spec["items"] - int(ok),
    }


@dataclass
class Proc:
    """One backfill process, as the parent started (and perhaps killed) it."""

    name: str
    weight: float
    items: int
    step: str  # "first" (plan and run) or "rerun" (run what the killed one left)
    started: float  # wall clock, just before the process was started
    popen: subprocess.Popen[str]
    stderr: Any  # a temporary file: a pipe nobody reads could fill and stall the process
    killed_at: float | None = None
    entered: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name} (rerun)" if self.step == "rerun" else self.name

    @property
    def lease_at(self) -> float | None:
        """When its lease was first written (its first share change): known once the process finished."""
        return self.result["shares"][0][0] if self.result and self.result["shares"] else None

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.killed_at = time.time()

    def finish(self, timeout_s: float) -> None:
        """Wait for the process (killing it after ``timeout_s``) and read what it printed."""
        try:
            out, _ = self.popen.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, _ = self.popen.communicate()
            self.error = f"still running after {timeout_s:.0f} s: killed"
        self.stderr.seek(0)
        err = self.stderr.read()
        self.stderr.close()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.entered = lines[0].get("entered") if lines else None
        if len(lines) > 1:
            self.result = lines[-1]
        elif self.killed_at is None and self.error is None:
            self.error = f"exit {self.popen.returncode}: {err.strip().splitlines()[-1:] or 'no output'}"


def start_backfill(spec: dict[str, Any], env: dict[str, str] | None = None) -> Proc:
    """Start one backfill process; its stdout is read once it ends (``Proc.finish``)."""
    stderr = tempfile.TemporaryFile("w+")
    started = time.time()
    popen = subprocess.Popen(
        [PYTHON, "-m", "benchmarks.shared_budget", "--backfill", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**child_env(), **(env or {})},
    )
    return Proc(spec["name"], spec["weight"], spec["items"], spec["step"], started, popen, stderr)


def spec_for(
    launch: Launch, url: str, root: str, s3: str | None, cell: CellSpec, step: str = "first"
) -> dict[str, Any]:
    return {
        "name": launch.name,
        "weight": launch.weight,
        "items": launch.items,
        "url": url,
        "root": root,
        "s3": s3,
        "limit": cell.limit,
        "safety": cell.safety,
        "latency_s": cell.latency_ms / 1000,
        "timing": asdict(cell.timing),
        "step": step,
    }


# --------------------------------------------------------------------------
# Judging a cell from the server's arrival log
# --------------------------------------------------------------------------


@dataclass
class Seen:
    """One process as the server saw it: every call it sent, and the 200s among them."""

    proc: Proc
    times: np.ndarray
    ok: np.ndarray

    @property
    def leave(self) -> float:
        """When it stopped sending: killed, or its last call."""
        if self.proc.killed_at is not None:
            return self.proc.killed_at
        return float(self.times[-1]) if len(self.times) else self.proc.started


def split_arrivals(arrivals: list[dict[str, Any]], procs: list[Proc]) -> list[Seen]:
    """Each arrival to the process that sent it: its item's prefix names the backfill, its time the process.

    A backfill run again after a kill uses the same item ids; an arrival
    belongs to the last of its processes started before it.
    """
    seen = []
    for proc in procs:
        later = [p.started for p in procs if p.name == proc.name and p.started > proc.started]
        until = min(later, default=math.inf)
        mine = [a for a in arrivals if a.get("item", "").partition("-")[0] == proc.name]
        times = np.sort(np.array([a["t"] for a in mine if proc.started <= a["t"] < until]))
        ok = np.sort(np.array([a["t"] for a in mine if proc.started <= a["t"] < until and a["status"] == 200]))
        seen.append(Seen(proc, times, ok))
    return seen


def at_share(times: np.ndarray, since: float, rate: float) -> float | None:
    """The first call at or after ``since`` that starts a second holding ``AT_SHARE x rate`` calls."""
    after = times[times >= since]
    counts = np.searchsorted(after, after + 1.0, side="left") - np.arange(len(after))
    hit = np.nonzero(counts >= AT_SHARE * rate)[0]
    return float(after[hit[0]]) if len(hit) else None


@dataclass
class Segment:
    """A stretch with one set of running backfills; judged over its whole steady seconds."""

    labels: tuple[str, ...]
    begin: float  # relative to the cell's start, seconds
    steady_from: float
    end: float
    seconds: int  # steady seconds
    rates: dict[str, float]  # 200s per steady second
    expected: dict[str, float]  # weighted share of the target

    @property
    def combined(self) -> float:
        return sum(self.rates.values())

    def worst_share(self) -> float:
        return max(abs(self.rates[x] / self.expected[x] - 1) for x in self.labels)


@dataclass
class Transition:
    """A change of the running set, and how long one backfill took to reach its new share."""

    kind: str  # newcomer, freed share, crash
    label: str
    cause: str
    took_s: float | None  # None: never reached it
    bound_s: float
    rate: float

    @property
    def met(self) -> bool:
        return self.took_s is not None and self.took_s <= self.bound_s


def segments_and_transitions(
    seen: list[Seen], start: float, target: float, timing: LeaseTiming
) -> tuple[list[Segment], list[Transition]]:
    """Cut the cell at every process start and every leave; judge the steady seconds between.

    A newcomer's segment is steady from its first call; a leaver's from one
    re-read after its last call; a kill's from the crash bound after it.
    """
    bins = {s.proc.label: np.floor(s.ok - start).astype(np.int64) for s in seen}
    events = sorted({s.proc.started for s in seen} | {s.leave for s in seen})
    segments, transitions = [], []
    for begin, end in zip(events, events[1:]):
        running = [s for s in seen if s.proc.started <= begin < s.leave]
        if not running:
            continue
        weights = sum(s.proc.weight for s in running)
        expected = {s.proc.label: target * s.proc.weight / weights for s in running}
        joined = [s for s in seen if s.proc.started == begin]
        left = [s for s in seen if s.leave == begin]
        steady_from = begin
        for s in joined:
            steady_from = max(steady_from, float(s.times[0]) if len(s.times) else end)
            if len(running) > 1:
                took = at_share(s.times, begin, expected[s.proc.label])
                transitions.append(
                    Transition(
                        "newcomer",
                        s.proc.label,
                        f"its process start (at {begin - start:.1f} s)",
                        None if took is None else took - begin,
                        timing.newcomer_wait_s + SLACK_S,
                        expected[s.proc.label],
                    )
                )
        for s in left:
            crashed = s.proc.killed_at is not None
            wait = timing.regrow_after_crash_s if crashed else timing.reread_s
            steady_from = max(steady_from, begin + wait)
            for other in running:
                took = at_share(other.times, begin, expected[other.proc.label])
                transitions.append(
                    Transition(
                        "crash" if crashed else "freed share",
                        other.proc.label,
                        f"{s.proc.label} {'killed' if crashed else 'sent its last call'} at {begin - start:.1f} s",
                        None if took is None else took - begin,
                        wait if crashed else timing.reread_s + SLACK_S,
                        expected[other.proc.label],
                    )
                )
        first, last = math.ceil(steady_from - start), math.floor(end - start)
        if last <= first:
            continue
        rates = {
            s.proc.label: float(np.count_nonzero((bins[s.proc.label] >= first) & (bins[s.proc.label] < last)))
            / (last - first)
            for s in running
        }
        labels = tuple(s.proc.label for s in running)
        segments.append(Segment(labels, begin - start, steady_from - start, end - start, last - first, rates, expected))
    return segments, transitions


def stacked_chart(
    per_second: dict[str, list[int]], limit: float, target: float, events: dict[float, str], height: int = 10
) -> list[str]:
    """Each backfill's calls per second, stacked, against the limit ('═') and the target ('─').

    ``events`` (second -> one character) are marked under the time axis.
    """
    names = list(per_second)
    width = max(len(v) for v in per_second.values())
    step = max(1, math.ceil(width / 60))
    columns = [[sum(per_second[name][i : i + step]) / step for name in names] for i in range(0, width, step)]
    top = max([limit, *(sum(c) for c in columns)])
    lines = []
    for row in range(height, 0, -1):
        low, high = top * (row - 1) / height, top * row / height
        blank = "═" if low < limit <= high else "─" if low < target <= high else " "
        cells = ""
        for column in columns:
            mark, below = blank, 0.0
            for n, value in enumerate(column):
                if below <= (low + high) / 2 < below + value:
                    mark = MARKS[n % len(MARKS)]
                below += value
            cells += mark
        lines.append(f"{high:6.0f} ┤{cells}")
    lines.append(" " * 7 + "└" + "─" * len(columns) + f" {width} s ({step} s per column)")
    marks = [" "] * len(columns)
    for second, mark in sorted(events.items()):
        marks[min(len(columns) - 1, max(0, int(second / step)))] = mark
    lines.append(" " * 8 + "".join(marks).rstrip())
    return lines


@dataclass
class Cell:
    spec: CellSpec
    procs: list[Proc]
    start: float
    busiest: int
    refused: int
    calls: int
    segments: list[Segment]
    transitions: list[Transition]
    chart: list[str]
    loads: tuple[float, float]
    seen: list[Seen]
    per_second: list[int]  # every backfill's calls together
    goals: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def missed(self) -> bool:
        return not all(met for _, met, _ in self.goals)


def judge(spec: CellSpec, procs: list[Proc], arrivals: list[dict[str, Any]], start: float) -> Cell:
    """Every goal of one cell, from the server's arrivals and what each process reported."""
    arrivals = [a for a in arrivals if a.get("item")]
    seen = split_arrivals(arrivals, procs)
    segments, transitions = segments_and_transitions(seen, start, spec.target, spec.timing)
    span = int(max((a["t"] for a in arrivals), default=start) - start) + 1
    per_second: dict[str, list[int]] = {}
    for name in dict.fromkeys(p.name for p in procs):
        times = np.array([a["t"] - start for a in arrivals if a["item"].partition("-")[0] == name])
        per_second[name] = np.bincount(times.astype(np.int64), minlength=span).tolist() if len(times) else [0] * span
    events = {p.started - start: p.name.upper() if p.step == "rerun" else p.name for p in procs}
    events.update({p.killed_at - start: "x" for p in procs if p.killed_at is not None})
    chart = stacked_chart(per_second, spec.limit, spec.target, events)
    chart[-1] += "   (a b c: process start; x: kill -9; B: rerun)"
    busiest = busiest_window([a["t"] for a in arrivals], 1.0)
    cell = Cell(
        spec,
        procs,
        start,
        int(busiest),
        sum(a["status"] == 429 for a in arrivals),
        len(arrivals),
        segments,
        transitions,
        chart,
        (0.0, 0.0),
        seen,
        np.sum(list(per_second.values()), axis=0).tolist(),
    )
    _goals(cell)
    return cell


def _goals(cell: Cell) -> None:
    spec, goals = cell.spec, cell.goals
    goals.append(
        (
            "busiest second <= the declared limit",
            cell.busiest <= spec.limit,
            f"{cell.busiest} <= {spec.limit:g} ({cell.refused} 429s of {cell.calls} calls)",
        )
    )
    goals.append(
        (
            f"busiest second <= {GOAL_OVER_TARGET:g} x the target",
            cell.busiest <= GOAL_OVER_TARGET * spec.target,
            f"{cell.busiest} <= {GOAL_OVER_TARGET * spec.target:g} (target {spec.target:g}); each backfill's own: "
            + ", ".join(f"{s.proc.label} {busiest_window(s.times, 1.0)}" for s in cell.seen),
        )
    )
    if cell.segments:
        low = min(cell.segments, key=lambda s: s.combined)
        goals.append(
            (
                f"goodput >= {GOAL_GOODPUT} of the target in every steady segment",
                low.combined >= GOAL_GOODPUT * spec.target,
                f"lowest {low.combined:.1f} / {spec.target:g} = {low.combined / spec.target:.3f} "
                f"({'+'.join(low.labels)}, {low.seconds} s)",
            )
        )
        worst = max(cell.segments, key=lambda s: s.worst_share())
        goals.append(
            (
                f"each backfill within {GOAL_SHARE:.0%} of its share in every steady segment",
                worst.worst_share() <= GOAL_SHARE,
                f"worst {worst.worst_share():.1%} off ({'+'.join(worst.labels)}: "
                + ", ".join(f"{x} {worst.rates[x]:.1f}/{worst.expected[x]:.1f}" for x in worst.labels)
                + ")",
            )
        )
    else:
        goals.append(("at least one steady segment", False, "none: the cell's phases were too short"))
    for kind in ("newcomer", "freed share", "crash"):
        mine = [t for t in cell.transitions if t.kind == kind]
        if mine:
            slowest = max(mine, key=lambda t: math.inf if t.took_s is None else t.took_s)
            goals.append(
                (
                    f"{kind}: at the new share within {slowest.bound_s:g} s",
                    all(t.met for t in mine),
                    "; ".join(
                        f"{t.label} {'never' if t.took_s is None else f'{t.took_s:.2f} s'} after {t.cause}"
                        for t in mine
                    ),
                )
            )
    broken = [f"{p.label}: {p.error}" for p in cell.procs if p.error]
    finals = {p.name: p for p in cell.procs if p.result}  # a backfill's last process to finish read its ledger
    lost = sum(p.result["lost"] for p in finals.values())
    not_ok = sum(p.result["not_ok"] for p in finals.values())
    unread = sorted({p.name for p in cell.procs} - finals.keys())
    goals.append(
        (
            "nothing lost: every backfill finished, every item one latest row, ok",
            not broken and not unread and lost == 0 and not_ok == 0,
            f"{lost} lost, {not_ok} not ok of {sum(p.items for p in finals.values())}"
            + (f"; {'; '.join(broken)}" if broken else "")
            + (f"; never finished: {', '.join(unread)}" if unread else ""),
        )
    )
    if any(p.killed_at for p in cell.procs):
        killed = [p for p in cell.procs if p.killed_at]
        sent = {s.proc.name: len(s.times) for s in cell.seen if s.proc.killed_at is not None}
        goals.append(
            (
                "the killed backfill was sending when killed, and its rerun finished it",
                not unread and all(sent[p.name] > 0 and finals[p.name].step == "rerun" for p in killed),
                ", ".join(
                    f"{p.label} killed at {p.killed_at - cell.start:.1f} s after {sent[p.name]} calls" for p in killed
                ),
            )
        )


# --------------------------------------------------------------------------
# Running a cell
# --------------------------------------------------------------------------


@contextmanager
def manifest_root(spec: CellSpec, folder: str) -> Iterator[tuple[str, str | None, dict[str, str]]]:
    """The cell's manifest root, its S3 endpoint (or None) and the environment its processes need."""
    if spec.store != "s3":
        yield os.path.join(folder, spec.key), None, {}
        return
    with start_s3() as s3:
        bucket = f"shared-{uuid.uuid4().hex[:12]}"
        s3.client().create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/paceline", s3.url, s3.env


def run_cell(spec: CellSpec, folder: str) -> Cell:
    """Start, kill and rerun the cell's processes on schedule; then judge what the server saw."""
    load_before = os.getloadavg()[0]
    with start_http_api(rps=spec.limit, latency_ms=spec.latency_ms) as api, manifest_root(spec, folder) as place:
        root, s3, env = place
        procs, start = drive(spec, api, root, s3, env)
        arrivals = api.settled_arrivals()
    cell = judge(spec, procs, arrivals, start)
    cell.loads = (load_before, os.getloadavg()[0])
    return cell


def drive(
    spec: CellSpec, api: ServiceHandle, root: str, s3: str | None, env: dict[str, str]
) -> tuple[list[Proc], float]:
    """Each launch at its time; a kill -9 and a rerun where the cell asks for them."""
    plan: list[tuple[float, str, Launch]] = []
    for launch in spec.launches:
        plan.append((launch.at_s, "start", launch))
        if launch.kill_after_s is not None:
            plan.append((launch.at_s + launch.kill_after_s, "kill", launch))
            plan.append((launch.at_s + launch.kill_after_s + launch.rerun_after_s, "rerun", launch))
    plan.sort(key=lambda step: step[0])
    procs: list[Proc] = []
    start = time.time()
    for at, action, launch in plan:
        time.sleep(max(0.0, start + at - time.time()))
        if action == "kill":
            next(p for p in procs if p.name == launch.name).kill()
        else:
            step = "rerun" if action == "rerun" else "first"
            procs.append(start_backfill(spec_for(launch, api.url, root, s3, spec, step), env))
    longest = max(launch.items for launch in spec.launches) / (spec.target / len(spec.launches))
    for proc in procs:
        proc.finish(timeout_s=max(60.0, 3 * longest + plan[-1][0] - (time.time() - start)))
    return procs, start


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


def run(quick: bool) -> Outcome:
    """Backfills of one service in separate processes, sharing its budget by lease: judged on the server."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paceline-bench-shared-") as folder:
        done = [run_cell(spec, folder) for spec in cells(quick)]
    return _outcome(done, time.perf_counter() - started)


def _outcome(done: list[Cell], seconds: float) -> Outcome:
    missed = [c.spec.key for c in done if c.missed]
    outcome = Outcome(
        NAME,
        f"{len(done) - len(missed)}/{len(done)} cells met; busiest second {max(c.busiest for c in done)} "
        f"(limit {LIMIT_RPS:g}); missed: {', '.join(missed) or 'none'}",
    )
    default = LeaseTiming()
    outcome.row(
        "declared",
        f"requests_per_second={LIMIT_RPS:g}, the server's own limit; safety {SAFETY} unless said; server latency "
        f"{LATENCY_MS:g} ms unless said; lease timing {_timing(default)} unless said; whole benchmark {seconds:.0f} s",
    )
    for cell in sorted(done, key=lambda c: not c.missed):
        _cell_rows(outcome, cell)
    goals = [(f"{c.spec.key}: {text}", met, detail) for c in done for text, met, detail in c.goals]
    for text, met, detail in sorted(goals, key=lambda goal: goal[1]):  # missed first
        outcome.goal(text, met, detail)
    return outcome


def _timing(timing: LeaseTiming) -> str:
    return (
        f"re-read {timing.reread_s:g} s, stale {timing.stale_s:g} s, skew {timing.skew_s:g} s, ttl {timing.ttl_s:g} s "
        f"(newcomer wait {timing.newcomer_wait_s:g} s, back after a crash {timing.regrow_after_crash_s:g} s)"
    )


def _cell_rows(outcome: Outcome, cell: Cell) -> None:
    spec, key = cell.spec, cell.spec.key
    outcome.row(f"{key} [{'MISSED' if cell.missed else 'met'}]", spec.text)
    outcome.row(
        "  declared",
        f"target {spec.target:g} req/s (safety {spec.safety:g}), latency {spec.latency_ms:g} ms, store {spec.store}, "
        f"lease timing {_timing(spec.timing)}",
    )
    for s in cell.seen:
        p = s.proc
        outcome.row(
            f"  {p.label}",
            f"weight {p.weight:g}, {p.items} items, started at {p.started - cell.start:.1f} s"
            + (f", its program {p.entered - p.started:.2f} s later" if p.entered else "")
            + (f", its lease {p.lease_at - p.started:.2f} s later" if p.lease_at else "")
            + (
                f", its first call {s.times[0] - p.lease_at:.2f} s after the lease"
                if p.lease_at and len(s.times)
                else ""
            )
            + (f"; {p.result['workers']} workers" if p.result else "")
            + (f"; killed at {p.killed_at - cell.start:.1f} s after {len(s.times)} calls" if p.killed_at else ""),
        )
    outcome.row(
        "  busiest second (server, all arrivals)",
        f"{cell.busiest} of {spec.limit:g}; {cell.refused} 429s of {cell.calls} calls",
    )
    for segment in cell.segments:
        outcome.row(
            f"  {'+'.join(segment.labels)} {segment.begin:.1f}-{segment.end:.1f} s",
            f"steady from {segment.steady_from:.1f} s, {segment.seconds} s: together {segment.combined:.1f} = "
            f"{segment.combined / spec.target:.3f} of the target; "
            + ", ".join(
                f"{x} {segment.rates[x]:.1f} / {segment.expected[x]:.1f} ({segment.rates[x] / segment.expected[x]:.3f})"
                for x in segment.labels
            ),
        )
    for t in cell.transitions:
        outcome.row(
            f"  {t.kind}: {t.label} at {t.rate:.0f}/s",
            f"{'never' if t.took_s is None else f'{t.took_s:.2f} s'} after {t.cause} (bound {t.bound_s:g} s)",
        )
    for proc in cell.procs:
        if proc.result:
            changes = ", ".join(f"{share:g} at {at - cell.start:.1f} s" for at, share, _ in proc.result["shares"])
            outcome.row(f"  {proc.label}: shares it recorded", changes)
    outcome.row("  load average (1 min) before / after", f"{cell.loads[0]:.2f} / {cell.loads[1]:.2f}")
    outcome.row("  calls per second (server), all backfills", " ".join(map(str, cell.per_second)))
    for line in cell.chart:
        outcome.row("", line)
    outcome.metrics[f"{key}_busiest_1s"] = cell.busiest
    outcome.metrics[f"{key}_429s"] = cell.refused
    outcome.metrics[f"{key}_lowest_goodput"] = min((s.combined / spec.target for s in cell.segments), default=None)
    outcome.metrics[f"{key}_worst_share"] = max((s.worst_share() for s in cell.segments), default=None)
    outcome.metrics[f"{key}_lost"] = sum(p.result["lost"] + p.result["not_ok"] for p in cell.procs if p.result)
    outcome.metrics[f"{key}_finished"] = {p.name for p in cell.procs} == {p.name for p in cell.procs if p.result}
    outcome.metrics[f"{key}_missed"] = cell.missed
    for t in cell.transitions:
        name = f"{key}_{t.kind.replace(' ', '_')}_{t.label.split()[0]}_s"
        outcome.metrics[name] = t.took_s


if __name__ == "__main__":
    if sys.argv[1:2] == ["--backfill"]:
        print(json.dumps(backfill_process(json.loads(sys.argv[2]))), flush=True)
    else:
        raise SystemExit(main(NAME, run))
