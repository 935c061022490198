"""What to declare next time, from what a run measured.

The plan starts from the user's declaration and estimates; the workers then
follow what the service really does. This module closes the loop for the
*next* run: where a measured number is far from the declared one, it says
which value to write, with the evidence in one line, so the plan of the next
run (its number of workers, its chunk sizes) starts where this one ended.

    for advice in advise(result.report, backfill):
        print(advice.line())
    # seconds_per_call=0.31   measured p50 312 ms, p95 340 ms over 1,480 calls; the plan assumed 50 ms
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.limits import Estimates
from pipeline.report import AttemptReport

LATENCY_OFF = 2.0
"""Advise a new ``seconds_per_call`` when the median latency is this many times off (either way).

The in-flight loop absorbs any latency; the estimate only sizes workers and
chunks, so small errors do not matter and are not worth a line.
"""

TOKENS_OFF = 0.15
"""Advise a new ``tokens_per_item`` when the measured mean is more than 15% off (it sizes the workers)."""


@dataclass(frozen=True)
class Advice:
    """One value to declare next time, and why."""

    field: str
    value: float
    evidence: str

    def line(self) -> str:
        return f"{self.field}={_number(self.value):<10} {self.evidence}"


def advise(report: AttemptReport, estimates: Estimates, tokens_limited: bool = False) -> list[Advice]:
    """Advice on the estimates of one attempt's run (empty when they were close enough)."""
    return [a for a in (_latency(report, estimates), _tokens(report, estimates, tokens_limited)) if a is not None]


def _latency(report: AttemptReport, estimates: Estimates) -> Advice | None:
    if report.latency_p50_ms is None or report.rows == 0:
        return None
    measured = report.latency_p50_ms / 1000
    ratio = measured / estimates.seconds_per_call
    if 1 / LATENCY_OFF <= ratio <= LATENCY_OFF:
        return None
    return Advice(
        "seconds_per_call",
        round(measured, 3),
        f"measured p50 {report.latency_p50_ms:,.0f} ms, p95 {report.latency_p95_ms or 0:,.0f} ms over "
        f"{report.rows:,} calls; the plan assumed {estimates.seconds_per_call * 1000:,.0f} ms "
        f"(workers kept {report.in_flight_per_worker:.1f} calls in flight each to make up for it)",
    )


def _tokens(report: AttemptReport, estimates: Estimates, tokens_limited: bool) -> Advice | None:
    measured = report.tokens_per_item
    if measured is None or not (tokens_limited or estimates.tokens_per_item):
        return None
    declared = estimates.tokens_per_item
    if declared and abs(measured / declared - 1) <= TOKENS_OFF:
        return None
    assumed = f"the plan assumed {declared:,.0f}" if declared else "none was declared"
    return Advice(
        "tokens_per_item",
        round(measured),
        f"successful calls used {measured:,.0f} tokens each on average (reported usage); {assumed}",
    )


def _number(value: float) -> str:
    return f"{value:g}" if value < 1000 else f"{value:.0f}"
