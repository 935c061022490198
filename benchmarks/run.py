"""Run every benchmark (or some) and print a summary table.

    python -m benchmarks.run [--quick] [--only NAME[,NAME...]] [--json FILE]

Full sizes take several minutes; ``--quick`` runs small versions in about a
minute. Missed goals are reported, never turned into a failing exit code:
absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import time

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
from benchmarks.common import Outcome, machine_line, write_json

BENCHMARKS = {
    module.NAME: module.run
    for module in (
        overhead,
        planning,
        failed_query,
        compaction,
        crash_cost,
        utilisation,
        closed_loop,
        real_limit,
        conventions,
        shared_budget,
    )
}


def summary(outcomes: list[Outcome], seconds: dict[str, float]) -> str:
    """One line per benchmark: its headline, how many goals held, how long it took."""
    width = max(len(o.name) for o in outcomes)
    lines = [f"{'benchmark':<{width}}  goals  time    result", "-" * (width + 80)]
    for o in outcomes:
        met = sum(g.met for g in o.goals)
        lines.append(f"{o.name:<{width}}  {met}/{len(o.goals)}    {seconds[o.name]:5.0f} s  {o.headline}")
    missed = [f"{o.name}: {g.text} ({g.detail})" for o in outcomes for g in o.goals if not g.met]
    if missed:
        lines += ["", "goals missed:", *(f"  {m}" for m in missed)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI and development")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", metavar="FILE", help="also write every outcome as JSON")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    print(machine_line(), flush=True)
    outcomes: list[Outcome] = []
    seconds: dict[str, float] = {}
    for name in names:
        started = time.perf_counter()
        outcome = BENCHMARKS[name](args.quick)
        seconds[name] = time.perf_counter() - started
        outcomes.append(outcome)
        print(outcome.render(), "", sep="\n", flush=True)
    print(summary(outcomes, seconds), flush=True)
    if args.json:
        write_json(args.json, outcomes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
