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

import dataclasses
from dataclasses import dataclass

from pipeline.limits import Estimates, ServiceLimit
from pipeline.report import AttemptReport

LATENCY_OFF = 2.0
"""Advise a new ``seconds_per_call`` when the median latency is this many times off (either way).

The in-flight loop absorbs any latency; the estimate only sizes workers and
chunks, so small errors do not matter and are not worth a line.
"""

THROTTLED_SHARE = 0.002
"""Advise a lower declared rate when more than 0.2% of calls were throttled and then went through.

Only throttles that the same item got past on a retry count (a hot key is throttled at any pace), so
even a few are evidence. The throttle loop itself keeps them near 1% at a real limit well below the
declared one: a higher threshold would hide exactly the runs that need the advice."""

RETRY_SAFETY = 0.9
"""Safety to pair with a measured limit: it was measured, so aim just under it, not at half."""

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


def advise(
    report: AttemptReport, limit: ServiceLimit | None = None, estimates: Estimates | None = None
) -> list[Advice]:
    """Advice from one attempt's run (empty when the declaration and estimates held up).

    Without the declaration (``paceline advise`` reads only manifests), every
    measured value is given, since there is nothing to compare it with.
    """
    found = (
        *_rate(report, limit),
        _latency(report, estimates),
        _tokens(report, estimates, limit is None or limit.tokens_per_minute is not None),
    )
    return [a for a in found if a is not None]


def advised_limit(advice: list[Advice], limit: ServiceLimit) -> ServiceLimit:
    """The limit a retry round should pace to: the measured one where the service throttled, else as declared.

    Only ever lower: a retry round must not repeat the storm that produced its failures, and
    advice is evidence about the service, never a licence to exceed the declaration.
    """
    advised = {a.field: a.value for a in advice}
    rate = advised.get("requests_per_second")
    if rate is None:
        return limit
    target = rate * RETRY_SAFETY
    declared_target = (limit.global_rate() or float("inf")) * limit.safety
    if target >= declared_target:
        return limit
    return dataclasses.replace(limit, requests_per_second=rate, requests_per_minute=None, safety=RETRY_SAFETY)


def _rate(report: AttemptReport, limit: ServiceLimit | None) -> tuple[Advice | None, ...]:
    calls = report.rows + report.throttled_calls
    if not calls or report.throttled_calls / calls <= THROTTLED_SHARE or not report.sustainable_rate:
        return ()
    declared = limit.global_rate() if limit else None
    said = f"; {_number(declared)} req/s was declared" if declared else ""
    return (
        Advice(
            "requests_per_second",
            max(1, round(report.sustainable_rate, 1)),
            f"{report.throttled_calls:,} of {calls:,} calls were throttled; in the seconds it throttled, the "
            f"service let {report.sustainable_rate:,.1f} calls/s through (median){said}",
        ),
        Advice("safety", RETRY_SAFETY, "the limit above was measured, so aim just under it"),
    )


def _latency(report: AttemptReport, estimates: Estimates | None) -> Advice | None:
    if report.latency_p50_ms is None or report.rows == 0:
        return None
    measured = report.latency_p50_ms / 1000
    if estimates is not None and 1 / LATENCY_OFF <= measured / estimates.seconds_per_call <= LATENCY_OFF:
        return None
    in_flight = f"{report.in_flight_per_worker:.1f} calls in flight per worker"
    compared = (
        f"the plan assumed {estimates.seconds_per_call * 1000:,.0f} ms ({in_flight} made up for it)"
        if estimates
        else in_flight
    )
    return Advice(
        "seconds_per_call",
        round(measured, 3),
        f"measured p50 {report.latency_p50_ms:,.0f} ms, p95 {report.latency_p95_ms or 0:,.0f} ms over "
        f"{report.rows:,} calls; {compared}",
    )


def _tokens(report: AttemptReport, estimates: Estimates | None, tokens_limited: bool) -> Advice | None:
    measured = report.tokens_per_item
    declared = estimates.tokens_per_item if estimates else None
    if measured is None or not (tokens_limited or declared):
        return None
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
