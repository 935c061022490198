"""What every benchmark shares: the outcome it returns, medians, the machine line, the CLI.

A benchmark is a module with ``NAME`` and ``run(quick: bool) -> Outcome``.
``Outcome.metrics`` holds the raw numbers (the smoke test asserts on them);
``rows`` and ``goals`` are what a person reads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

PYTHON = sys.executable


@dataclass(frozen=True)
class Goal:
    """One promise checked by a benchmark: what it says, whether it held, the numbers behind it."""

    text: str
    met: bool
    detail: str


@dataclass
class Outcome:
    """What one benchmark measured."""

    name: str
    headline: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, float | int | str | bool | None] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, label: str, value: str) -> None:
        self.rows.append((label, value))

    def goal(self, text: str, met: bool, detail: str) -> None:
        self.goals.append(Goal(text, bool(met), detail))

    def render(self) -> str:
        width = max((len(label) for label, _ in self.rows), default=0)
        lines = [f"== {self.name}: {self.headline}"]
        lines += [f"  {label:<{width}}  {value}" for label, value in self.rows]
        lines += [f"  [{'met' if g.met else 'MISSED'}] {g.text}: {g.detail}" for g in self.goals]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> str:
    """``min..max`` of the runs, so a reader sees how noisy a median is."""
    return f"{min(values):.3g}..{max(values):.3g}"


@contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...``; ``elapsed()`` is frozen once the block ends."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def write_ids(path: str, count: int, block: int = 1_000_000) -> None:
    """``count`` distinct ids, one per line, written in blocks to keep memory flat."""
    with open(path, "w") as out:
        for start in range(0, count, block):
            out.write("".join(f"user-{i:09d}\n" for i in range(start, min(count, start + block))))


def machine_line() -> str:
    """Machine, Python and date, for the header of every run and of BENCHMARKS.md."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, load average {load}"
    )


def child_env() -> dict[str, str]:
    """The environment for benchmark subprocesses: the project importable from any cwd."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def run_child(args: list[str], timeout: float) -> dict:
    """Run ``python args...`` in a fresh interpreter; return its last stdout line, parsed as JSON."""
    try:
        completed = subprocess.run([PYTHON, *args], capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"benchmark child {args} took longer than {timeout:.0f} s") from None
    if completed.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (exec), in bytes.

    Linux's VmHWM belongs to the process's own address space, so it is exact
    and starts from zero at exec. ``ru_maxrss`` is not used on Linux: a
    child's ru_maxrss starts at its parent's RSS at fork time, so a child of a
    big parent (pytest, the full benchmark run) would report the parent's size.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(name: str, run: Callable[[bool], Outcome], argv: list[str] | None = None) -> int:
    """The command line of one benchmark: ``python -m benchmarks.<name> [--quick] [--json FILE]``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=run.__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI and development")
    parser.add_argument("--json", metavar="FILE", help="also write the outcome as JSON")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    outcome = run(args.quick)
    print(outcome.render(), flush=True)
    if args.json:
        write_json(args.json, [outcome])
    return 0


def write_json(path: str, outcomes: list[Outcome]) -> None:
    with open(path, "w") as out:
        json.dump({"machine": machine_line(), "outcomes": [asdict(o) for o in outcomes]}, out, indent=2)
