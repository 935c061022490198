"""The ``paceline`` command line: plan a limit, run a backfill or the demo, and read what the manifests say.

Every ``PacelineError`` (a declaration that cannot hold, a store that cannot
be read, a query that does not parse) is the user's to fix, so it is one line
that says what is wrong and what to do; ``--debug`` shows its traceback.
Anything else is a bug, and keeps its traceback so it can be reported.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.advice import advise
from pipeline.backfill import Backfill, RunResult, open_ledger, plan_backfill, plan_retry, run_attempt
from pipeline.chart import rate_chart
from pipeline.compaction import compact, explain_files
from pipeline.console import ProgressBar, format_table
from pipeline.defaults import DEFAULT_MAX_ATTEMPTS, DEFAULT_SAFETY, DEFAULT_SHARE
from pipeline.errors import ConfigError, PacelineError
from pipeline.executors import LocalExecutor
from pipeline.items import TextLines, Values
from pipeline.lease_status import LeaseState, lease_states
from pipeline.leases import ShareChange
from pipeline.ledger import VIEWS, Ledger
from pipeline.limits import Estimates, LimitError, Overrides, ServiceLimit, derive_plan
from pipeline.localservices import start_http_api
from pipeline.manifests import ManifestStore
from pipeline.pacing.schedule import DEFAULT_SECONDS_PER_CALL
from pipeline.retries import NextRound, next_round
from pipeline.spec import described
from pipeline.workloads.http_api import HttpWork

DEFAULT_ROOT = "data"
DESCRIPTION = "Run and inspect backfills that keep to a service's limits."
# LimitError speaks the Python API (it is raised for code too); ``plan`` names the flag that sets
# each field instead. Only names that mean one flag are listed, so no message gets the wrong flag.
_PLAN_FLAGS = {
    "Estimates(tokens_per_item=...)": "--tokens-per-item",
    "tokens_per_minute": "--tpm",
    "requests_per_minute": "--rpm",
    "max_workers": "--max-workers",
}
_MAX_ATTEMPTS_HELP = (
    f"attempts before a failed item is dead (default: each backfill's own, stored with its plan, else "
    f"{DEFAULT_MAX_ATTEMPTS})"
)
_PLAN_NAMES = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, _PLAN_FLAGS)) + r")(?!\w)")


class QueryError(PacelineError):
    """SQL the ledger could not run: DuckDB's own message, and the views there are to query."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except PacelineError as error:
        if args.debug:
            raise
        print(f"paceline: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\npaceline: interrupted. Finished chunks are saved; run the same command again to resume.", file=sys.stderr
        )
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paceline", description=DESCRIPTION)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a user error too (a bug always shows one)"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = _command(commands, "demo", cmd_demo, "run a backfill against the bundled rate-limited service")
    demo.add_argument("--items", type=int, default=3000, help="how many items (default 3000)")
    demo.add_argument("--limit-rps", type=float, default=200, help="the demo service's limit (default 200/s)")
    _safety_argument(demo)
    demo.add_argument("--root", default=str(Path(DEFAULT_ROOT) / "demo"), help="where manifests go")
    demo.add_argument(
        "--real-limit",
        type=float,
        help="make the service enforce less than --limit-rps declares, "
        "to watch the workers back off and the advice find the real limit",
    )
    _share_arguments(demo)

    run = _command(
        commands,
        "run",
        cmd_run,
        "run a backfill of an HTTP API (one GET per item) under its limit, sharing the service's budget with "
        "every other backfill of it that uses the same --root; run it again to resume",
    )
    run.add_argument("name", help="the backfill's name: its manifests' folder under --root")
    run.add_argument(
        "--service",
        required=True,
        help="the service's name: backfills that name the same service under one --root split its budget",
    )
    run.add_argument("--items", required=True, help="a text file, one item id per line")
    run.add_argument(
        "--url-template", required=True, help="the URL to call per item, {id} for the item id: https://host/items/{id}"
    )
    run.add_argument("--rps", type=float, help="requests per second the service allows")
    run.add_argument("--rpm", type=float, help="requests per minute the service allows")
    _safety_argument(run)
    run.add_argument(
        "--seconds-per-call",
        type=float,
        default=DEFAULT_SECONDS_PER_CALL,
        help=f"typical latency of one call (default {DEFAULT_SECONDS_PER_CALL:g}; measured and advised after a run)",
    )
    run.add_argument(
        "--token-env",
        metavar="VARIABLE",
        help="the environment variable that holds the bearer token (never the token itself: a flag shows in ps)",
    )
    run.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help=f"attempt 0 plus retry rounds (default {DEFAULT_MAX_ATTEMPTS})",
    )
    _share_arguments(run)
    run.add_argument(
        "--root", default=DEFAULT_ROOT, help="where manifests and leases go: a folder or s3://bucket/prefix"
    )

    plan = _command(commands, "plan", cmd_plan, "print how a limit becomes workers, pacing and chunks")
    plan.add_argument("--rps", type=float, help="requests per second the service allows")
    plan.add_argument("--rpm", type=float, help="requests per minute the service allows")
    plan.add_argument("--tpm", type=float, help="tokens per minute the service allows")
    plan.add_argument("--connections", type=int, help="safe connections")
    plan.add_argument("--batches", type=int, help="concurrent batches in flight")
    plan.add_argument("--per-worker-rps", type=float, help="politeness: requests/s per worker")
    plan.add_argument("--max-workers", type=int, help="a global worker cap")
    _safety_argument(plan)
    plan.add_argument("--seconds-per-call", type=float, default=0.05, help="typical latency of one call")
    plan.add_argument("--tokens-per-item", type=float, help="estimated tokens per item")
    plan.add_argument("--items", type=int, help="number of items, to size chunks")
    plan.add_argument("--max-parallelism", type=int, help="pin the number of workers (checked against the limit)")
    plan.add_argument("--worker-rps", type=float, help="pin each worker's rate (checked against the limit)")

    query = _command(commands, "query", cmd_query, f"run SQL on the ledger views ({', '.join(VIEWS)})")
    query.add_argument("sql")
    query.add_argument("--root", default=DEFAULT_ROOT)
    query.add_argument("--max-attempts", type=int, help=_MAX_ATTEMPTS_HELP)

    advise_ = _command(commands, "advise", cmd_advise, "what each attempt measured, and what to declare next time")
    advise_.add_argument("--root", default=DEFAULT_ROOT)
    advise_.add_argument("--backfill", help="only this backfill")

    status = _command(commands, "status", cmd_status, "summarise the backfills in a manifest store")
    status.add_argument("--root", default=DEFAULT_ROOT)
    status.add_argument("--backfill", help="only this backfill")
    status.add_argument("--max-attempts", type=int, help=_MAX_ATTEMPTS_HELP)

    compaction = _command(
        commands, "compact", cmd_compact, "merge each attempt's chunk manifests into a few large files (safe to rerun)"
    )
    compaction.add_argument("--root", default=DEFAULT_ROOT)
    compaction.add_argument("--backfill", help="only this backfill")
    return parser


def _safety_argument(parser: argparse.ArgumentParser) -> None:
    _number_option(parser, "--safety", DEFAULT_SAFETY, "fraction of the limit to aim at")


def _share_arguments(parser: argparse.ArgumentParser) -> None:
    _number_option(parser, "--share", DEFAULT_SHARE, _plain(described("share")))
    _number_option(parser, "--min-share", 0.0, _plain(described("min_share")))


def _number_option(parser: argparse.ArgumentParser, flag: str, default: float, help_text: str) -> None:
    parser.add_argument(flag, type=float, default=default, help=f"{help_text} (default {default:g})")


def _plain(description: str) -> str:
    """A field's description as argparse prints it: '%' is its format character; the default follows it."""
    return description.rstrip(".").replace("%", "%%")


def _command(
    commands: argparse._SubParsersAction, name: str, fn: Callable[[argparse.Namespace], int], text: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=text, description=text)
    sub.set_defaults(command=fn)
    return sub


def cmd_plan(args: argparse.Namespace) -> int:
    limit = ServiceLimit(
        name="service",
        requests_per_second=args.rps,
        requests_per_minute=args.rpm,
        tokens_per_minute=args.tpm,
        safe_connections=args.connections,
        concurrent_batches=args.batches,
        per_worker_requests_per_second=args.per_worker_rps,
        max_workers=args.max_workers,
        safety=args.safety,
    )
    estimates = Estimates(seconds_per_call=args.seconds_per_call, tokens_per_item=args.tokens_per_item)
    overrides = Overrides(max_parallelism=args.max_parallelism, per_worker_requests_per_second=args.worker_rps)
    try:
        plan = derive_plan(limit, estimates, overrides, args.items)
    except LimitError as error:
        raise LimitError(_PLAN_NAMES.sub(lambda name: _PLAN_FLAGS[name.group(1)], str(error))) from error
    if args.items:
        plan = explain_files(plan, -(-args.items // plan.chunk_size))
    print(plan.describe())
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    with Ledger(ManifestStore(args.root), args.max_attempts) as ledger:
        if not ledger.files:
            print(
                f"paceline: no manifests under {args.root}: the views are empty. Check --root, or run a "
                "backfill first (for example `paceline demo`).",
                file=sys.stderr,
            )
        try:
            table = ledger.query(args.sql)
        except duckdb.Error as error:
            raise QueryError(f"{error} (the views are {', '.join(VIEWS)})") from error
        print(format_table(table))
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    results = compact(ManifestStore(args.root), args.backfill)
    if not results:
        print(
            f"No chunk plans under {args.root}{f' for {args.backfill}' if args.backfill else ''}: "
            "nothing to compact. Check --root and --backfill."
        )
    for result in results:
        print(result.describe())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with Ledger(ManifestStore(args.root), args.max_attempts, args.backfill) as ledger:
        summary = ledger.summary()
        if summary.num_rows == 0:
            print(f"No manifests under {args.root}. Run a backfill first (for example `paceline demo`).")
        else:
            print(format_table(summary))
            print("\nWhat the service did (all runs of each attempt):")
            print(format_table(ledger.measured_by_attempt()))
            errors = ledger.why_not_ok()
            if errors.num_rows:
                print("\nWhy items are not ok (latest row per item):")
                print(format_table(errors))
    print()
    _print_leases(args.root, args.backfill)
    return 0


def _print_leases(root: str, backfill: str | None) -> None:
    """Each service's leases: who shares its budget now, with what weight and share, and until when."""
    now = time.time()
    states = {
        service: [state for state in found if backfill in (None, state.lease.backfill)]
        for service, found in lease_states(root, None, now).items()
    }
    states = {service: found for service, found in states.items() if found}
    if not states:
        whose = f"{backfill} holds no lease" if backfill else "no backfill holds a lease"
        print(
            f"Leases: {whose} under {root} now. A running backfill holds one on its service: it splits a rate "
            "or token budget by weight with the others of the same service, and claims its connections."
        )
        return
    print("Leases: the backfills sharing each service's budget now (limit x safety, split by weight):")
    for service, found in states.items():
        live = sum(state.live for state in found)
        counted = f"{live} live lease(s)" if live else "no live lease: no backfill of it is running now"
        print(f"\n{service}: {counted}")
        print(format_table(_lease_table(found)))
        if live < len(found):
            print(
                "An expired lease was left by a run that stopped without removing it (killed, or its machine "
                "lost); it counts for nothing, and a rerun of that backfill resumes where it stopped."
            )


def _lease_table(states: list[LeaseState]) -> pa.Table:
    rows = [
        {
            "backfill": state.lease.backfill,
            "attempt": str(state.lease.attempt),
            "weight": f"{state.lease.weight:g}",
            "min_share": f"{state.lease.min_share:g}",
            "share_now": "expired" if not state.live else "-" if state.share is None else f"{state.share:.3f}",
            "expires": f"in {max(state.expires_in_s, 0.0):.1f} s" if state.live else f"{-state.expires_in_s:.0f} s ago",
            "host/pid": f"{state.lease.host}/{state.lease.pid}",
            "connections": f"{state.lease.connections} of {state.lease.connection_cap}"
            if state.lease.connection_cap
            else "-",
        }
        for state in states
    ]
    return pa.Table.from_pylist(rows)


def cmd_advise(args: argparse.Namespace) -> int:
    with Ledger(ManifestStore(args.root), backfill=args.backfill) as ledger:
        attempts = ledger.attempts()
        if not attempts:
            print(
                f"No manifests under {args.root}{' for ' + args.backfill if args.backfill else ''}. "
                "Run a backfill first (for example `paceline demo`)."
            )
            return 0
        for backfill, attempt in attempts:
            report = ledger.attempt_report(backfill, attempt, None)
            calls = report.rows + report.throttled_calls
            print(
                f"{backfill}, attempt {attempt} of {ledger.max_attempts(backfill)}: {report.rows:,} items called, "
                f"{report.throttled_calls:,} throttled calls ({report.throttled_calls / max(calls, 1):.1%})"
            )
            for advice in advise(report):
                print(f"  {advice.line()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.items < 1:
        raise ConfigError(f"--items must be at least 1, got {args.items}.")
    limit = ServiceLimit("demo_api", requests_per_second=args.limit_rps, safety=args.safety)
    if Path(args.root, "manifests", "backfill=demo_api").is_dir():
        shutil.rmtree(Path(args.root, "manifests", "backfill=demo_api"))
        print(f"Starting fresh: removed the previous demo's manifests under {args.root}.")
    store = ManifestStore(args.root)
    real = args.real_limit or args.limit_rps
    if not real > 0:
        raise ConfigError(f"--real-limit must be a positive rate, got {args.real_limit}.")
    told = (
        f"declared {args.limit_rps:g} req/s, but it enforces {real:g}"
        if real != args.limit_rps
        else f"limit {real:g} req/s"
    )
    print(f"Starting the bundled demo service ({told}; it answers 429 above it)...")
    with start_http_api(rps=real, demo_faults=0.03, latency_ms=40) as service:
        backfill = Backfill(
            name="demo_api",
            source=Values.of(range(1, args.items + 1)),
            work=HttpWork(url_template=service.url + "/items/{id}"),
            limit=limit,
            estimates=Estimates(seconds_per_call=0.05, target_chunk_seconds=5),
            share=args.share,
            min_share=args.min_share,
        )
        _plan(backfill, store)

        def attempt(number: int, before: Ledger | None) -> RunResult:
            result = _attempt(backfill, store, number, before)
            _print_service_stats(result, backfill.limit, service.stats())
            return result

        _rounds(backfill, store, attempt)
    _print_next_steps(store)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    token = ""
    if args.token_env:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise ConfigError(
                f"--token-env {args.token_env}: that environment variable is not set or empty. "
                f"Export it (export {args.token_env}=...) or leave --token-env out for a service without a token."
            )
    backfill = Backfill(
        name=args.name,
        source=TextLines(args.items),
        work=HttpWork(url_template=args.url_template, token=token),
        limit=ServiceLimit(
            args.service, requests_per_second=args.rps, requests_per_minute=args.rpm, safety=args.safety
        ),
        estimates=Estimates(seconds_per_call=args.seconds_per_call),
        max_attempts=args.max_attempts,
        share=args.share,
        min_share=args.min_share,
    )
    store = ManifestStore(args.root)
    _plan(backfill, store)
    result = _rounds(backfill, store, lambda number, before: _attempt(backfill, store, number, before))
    counts = result.counts
    print(
        f"\n{backfill.name}: {counts['ok']:,} ok, {counts['failed']:,} failed, {counts['dead']:,} dead. "
        f"Manifests: {store.uri(store.attempt_dir(backfill.name, 0)).rsplit('/attempt=', 1)[0]}/"
    )
    print(f"`paceline status --root {store.root}` shows them, and every lease on the service's budget.")
    return 0


def _plan(backfill: Backfill, store: ManifestStore) -> None:
    planned = plan_backfill(backfill, store)
    print(f"\nPlan: {planned.plan.num_rows:,} items in {planned.chunks} chunks ({planned.path})")
    print("  " + planned.execution.describe().replace("\n", "\n  "))


def _rounds(backfill: Backfill, store: ManifestStore, attempt: Callable[[int, Ledger | None], RunResult]) -> RunResult:
    """Attempt 0, then a retry round for as long as items fail and attempts are left; the last round's result."""
    result = attempt(0, None)
    while True:
        decision = next_round(
            result.counts["failed"],
            result.report.attempt + 1,
            backfill.max_attempts,
            retry_after_s=result.max_retry_after,
        )
        if not isinstance(decision, NextRound):
            return result
        if decision.wait_s:
            print(f"\nWaiting {decision.wait_s:g} s: the service asked for it (Retry-After).")
            time.sleep(decision.wait_s)
        with open_ledger(backfill, store) as before:
            retry = plan_retry(backfill, store, decision.attempt, before)
            print(f"\nRetry round {decision.attempt}: {retry.plan.num_rows:,} failed items")
            result = attempt(decision.attempt, before)


def _attempt(backfill: Backfill, store: ManifestStore, attempt: int, before: Ledger | None) -> RunResult:
    """Run one attempt (a retry round paced from the ledger ``before`` it) and print what happened."""
    bar = ProgressBar(f"attempt {attempt}")
    try:
        result = run_attempt(backfill, store, LocalExecutor(), attempt, on_progress=bar, ledger=before)
    finally:
        bar.close()
    report, counts = result.report, result.counts
    target = result.execution.target_rate
    print(f"  items: {counts['ok']:,} ok, {counts['failed']:,} failed (will retry), {counts['dead']:,} dead")
    if target:
        print(
            f"  achieved {report.achieved_rate:,.1f} calls/s against a target of {target:,.1f}/s "
            f"({report.achieved_rate / target:.0%} of target)"
        )
    if result.shares:
        print(f"  {_share_line(backfill.service, result.shares)}")
    if report.latency_p50_ms is not None:
        print(
            f"  measured: latency p50 {report.latency_p50_ms:.1f} ms, p95 {report.latency_p95_ms:.1f} ms; "
            f"{report.in_flight_per_worker:.1f} calls in flight per worker"
        )
    for advice in result.advice:
        print(f"  next time: {advice.line()}")
    for status, count, example in report.errors:
        print(f"  {count:>6,} x {status:<14} e.g. {example[:70]}")
    return result


def _share_line(service: str, shares: list[ShareChange]) -> str:
    """The part of the service's budget the attempt had: at its start, at its end, and how often it changed."""
    first, last = shares[0], shares[-1]
    if len(shares) == 1 and first.leases == 1:
        return f"share of {service}'s budget: all of it (no other backfill held a lease on it)"
    if len(shares) == 1:
        return f"share of {service}'s budget: {first.share:.3g} throughout, among {first.leases} lease(s)"
    return (
        f"share of {service}'s budget: {first.share:.3g} at the start (among {first.leases} lease(s)), "
        f"{last.share:.3g} at the end (among {last.leases}), {len(shares) - 1} change(s)"
    )


def _print_service_stats(result: RunResult, limit: ServiceLimit, server: dict) -> None:
    """What the demo service itself saw: the judge of whether the limit held."""
    declared = limit.requests_per_second or 0
    print(
        f"  busiest second seen by the service so far: {server['busiest_1s']} accepted calls "
        f"(declared limit {declared:g}); 429s it had to send: {server['by_status'].get('429', 0)}"
    )
    report = result.report
    if report.attempt == 0 and len(report.per_second) > 2:
        print()
        print(rate_chart(report.per_second, declared, declared * limit.safety))


def _print_next_steps(store: ManifestStore) -> None:
    paceline, python = _runnable("paceline", sys.argv[0]), _runnable("python", sys.executable)
    print(f"\nManifests: {store.uri(store.attempt_dir('demo_api', 0)).rsplit('/attempt=', 1)[0]}/")
    print("Try:")
    print(f"  {paceline} status --root {store.root}")
    print(f'  {paceline} query --root {store.root} "SELECT status, count(*) FROM latest GROUP BY status"')
    print(
        f'  {python} -c "import duckdb; print(duckdb.sql(\\"SELECT * FROM read_parquet('
        f"'{store.root}/manifests/**/*.parquet', hive_partitioning=true) LIMIT 5\\\"))\""
    )


def _runnable(name: str, path: str) -> str:
    """The command as the user can type it here: the bare name if it is on PATH, else a path to it."""
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(path):
        return name
    return os.path.relpath(path)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
