"""Benchmarks that put numbers on Paceline's promises.

Plain scripts, run by hand (``python -m benchmarks.run [--quick] [--only NAME]``,
or one of them alone, e.g. ``python -m benchmarks.overhead``). Each prints
medians of several runs and ratios against a baseline measured in the same
process, plus whether its goal was met. Results are recorded in BENCHMARKS.md.

CI runs every benchmark in ``--quick`` mode (tests/test_benchmarks_smoke.py)
with generous bounds only: absolute times are never gated.
"""
