"""The paceline command: output a user reads, and one-line errors."""

import argparse
import subprocess
import sys
import time

import pytest

from pipeline import cli
from pipeline.backfill import Backfill, plan_backfill, plan_retry, run_attempt
from pipeline.cli import main
from pipeline.executors import LocalExecutor
from pipeline.items import Values
from pipeline.leases import LeaseHolder, lease_store, new_lease
from pipeline.limits import ServiceLimit
from pipeline.localservices import start_http_api
from pipeline.manifests import ManifestStore
from pipeline.outcomes import Retryable
from pipeline.shares import LeaseTiming
from pipeline.work import FunctionWork


def test_plan_prints_the_derivation(capsys):
    assert main(["plan", "--rps", "1000", "--seconds-per-call", "1", "--items", "1000000"]) == 0
    out = capsys.readouterr().out
    assert "1,000 req/s x safety 0.5 = 500 req/s target" in out
    assert "max_parallelism = 500" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--rps", "1000", "--max-parallelism", "800", "--worker-rps", "2"], "Lower max_parallelism to 500"),
        (["plan", "--rps", "-3"], "requests_per_second must be a positive number"),
        (["plan"], "no limit declared"),
        (["plan", "--connections", "10", "--safety", "2"], "safety must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_query_and_status_on_an_empty_store(tmp_path, capsys):
    assert main(["status", "--root", str(tmp_path)]) == 0
    assert "No manifests" in capsys.readouterr().out
    assert main(["query", "--root", str(tmp_path), "SELECT count(*) AS n FROM latest"]) == 0
    assert "0" in capsys.readouterr().out
    assert main(["query", "--root", str(tmp_path), "SELECT nope FROM latest"]) == 2
    assert 'column "nope" not found' in capsys.readouterr().err.lower().replace("referenced ", "")


def test_installed_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "status" in out.stdout


def test_demo_runs_end_to_end_and_reports_what_the_service_saw(tmp_path, capsys, monkeypatch):
    listings = []  # each ledger lists the store once
    list_files = ManifestStore.manifest_files
    monkeypatch.setattr(ManifestStore, "manifest_files", lambda store, *a: listings.append(a) or list_files(store, *a))
    assert main(["demo", "--items", "300", "--limit-rps", "400", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Plan: 300 items" in out
    assert "busiest second seen by the service" in out
    assert "Retry round 1" in out  # the demo service fails a few ids once; the retry heals them
    assert len(listings) == 1 + 2 * out.count("Retry round"), "attempt 0's rows; each round's before and after"
    final = [line for line in out.splitlines() if line.strip().startswith("items:")][-1]
    assert "0 failed" in final
    assert main(["status", "--root", str(tmp_path)]) == 0
    status = capsys.readouterr().out
    assert "demo_api" in status and "in_flight_per_worker" in status, "status says what the service did"
    assert main(["advise", "--root", str(tmp_path), "--backfill", "demo_api"]) == 0
    advice = capsys.readouterr().out
    assert "demo_api, attempt 0 of 3:" in advice and "seconds_per_call=0.0" in advice, "the measured ~40 ms latency"
    assert main(["advise", "--root", str(tmp_path), "--backfill", "other"]) == 0
    assert "No manifests" in capsys.readouterr().out


def test_plan_names_the_flag_not_the_python_field(capsys):
    assert main(["plan", "--tpm", "60000"]) == 2
    err = capsys.readouterr().err
    assert "--tpm alone cannot size the workers" in err
    assert "Add --tokens-per-item (for example 600), or declare --rpm or --max-workers as well." in err
    assert "Estimates(" not in err and "tokens_per_item" not in err
    assert main(["plan", "--tpm", "60000", "--tokens-per-item", "600"]) == 0


def test_help_is_plain_text_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out, "the help is read in a terminal, not rendered as reST"
    commands = {action.dest for action in _subcommands()}
    assert commands == {"demo", "run", "plan", "query", "advise", "status", "compact"}
    for name in commands:
        assert f"\n    {name} " in out, f"--help lists {name}"


def test_a_bug_keeps_its_traceback_while_a_user_error_is_one_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(cli, "derive_plan", broken)
    with pytest.raises(ZeroDivisionError):
        main(["plan", "--rps", "100"])


def test_a_bad_query_is_one_line_that_names_the_views(tmp_path, capsys):
    assert main(["query", "--root", str(tmp_path), "SELEC 1"]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("paceline: error: ")]
    assert 'syntax error at or near "SELEC"' in error
    assert "the views are results, latest, failed, dead, summary" in error


def _subcommands():
    parser = cli._parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands._choices_actions


def test_status_advise_and_query_read_max_attempts_stored_with_the_plan(tmp_path, capsys):
    """Declared with 5 attempts, an item still failing after attempt 2 is retryable, not dead, for every reader."""

    def call(client, item):
        if item.id == "3":
            raise Retryable("service unavailable", "http_503")
        return {"id": item.id}

    backfill = Backfill(
        "five",
        Values.of(range(6)),
        FunctionWork(lambda: None, call),
        ServiceLimit("svc", requests_per_second=5000),
        max_attempts=5,
    )
    store = ManifestStore(str(tmp_path))
    plan_backfill(backfill, store)
    for attempt in range(3):
        if attempt:
            plan_retry(backfill, store, attempt)
        run_attempt(backfill, store, LocalExecutor(), attempt)
    root = ["--root", str(tmp_path)]

    assert main(["status", *root]) == 0
    assert _rows(capsys.readouterr().out)[:2] == [
        ["backfill", "items", "ok", "failed", "dead", "last_attempt", "max_attempts"],
        ["five", "6", "5", "1", "0", "2", "5"],
    ]
    assert main(["advise", *root]) == 0
    assert "five, attempt 2 of 5:" in capsys.readouterr().out
    assert main(["query", *root, "SELECT failed, dead, max_attempts FROM summary"]) == 0
    assert _rows(capsys.readouterr().out)[1] == ["1", "0", "5"]
    assert main(["query", *root, "--max-attempts", "3", "SELECT failed, dead, max_attempts FROM summary"]) == 0
    assert _rows(capsys.readouterr().out)[1] == ["0", "1", "3"], "a --max-attempts given wins"


def _rows(table: str) -> list[list[str]]:
    """The cells of a table printed by ``format_table`` (no cell holds a space here), row by row, rule left out."""
    return [line.split() for line in table.splitlines() if line.strip() and set(line) != {"-", " "}]


def _holder(root, backfill: str, weight: float, min_share: float = 0.0, clock=time.time) -> LeaseHolder:
    """A real lease on partner_api's budget (200 req/s after safety) in ``root``, as a running attempt holds one."""
    lease = new_lease("partner_api", backfill, 0, f"run-{backfill}", weight, min_share, {"requests_per_second": 200}, 4)
    holder = LeaseHolder(lease_store(str(root)), lease, LeaseTiming(), clock)
    holder.acquire()
    return holder


def test_status_lists_each_services_leases_and_their_shares_now(tmp_path, capsys):
    assert main(["status", "--root", str(tmp_path)]) == 0
    assert "no backfill holds a lease under" in capsys.readouterr().out

    nightly, adhoc = _holder(tmp_path, "nightly", 3, 0.2), _holder(tmp_path, "adhoc", 1)
    _holder(tmp_path, "crashed", 5, clock=lambda: time.time() - 60)  # renewed last a minute ago: expired
    assert main(["status", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "No manifests under" in out, "the leases show before any chunk has finished"
    assert "partner_api: 2 live lease(s)" in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["nightly"], ["adhoc"], ["crashed"])
    }
    assert rows["nightly"][:5] == ["nightly", "0", "3", "0.2", "0.750"], (
        "3:1 by weight; the expired lease counts for nothing"
    )
    assert rows["adhoc"][:5] == ["adhoc", "0", "1", "0", "0.250"]
    assert rows["nightly"][5] == "in" and 8 < float(rows["nightly"][6]) <= 10, (
        "a lease lives ttl_s (10 s) from its last renewal"
    )
    assert rows["nightly"][-2:] == [f"{nightly.lease.host}/{nightly.lease.pid}", "-"], "no connections claimed"
    assert rows["crashed"][:6] == ["crashed", "0", "5", "0", "expired", "50"], "expired 50 s ago (60 - ttl 10)"
    assert "it counts for nothing" in out

    nightly.release()
    adhoc.release()
    assert main(["status", "--root", str(tmp_path), "--backfill", "crashed"]) == 0
    out = capsys.readouterr().out
    assert "partner_api: no live lease: no backfill of it is running now" in out
    assert "nightly" not in out


def test_run_takes_the_share_it_declares_of_a_budget_another_backfill_holds(tmp_path, capsys):
    """Weights 3 and 9 would give 0.25; min_share 0.5 keeps half: the flags reached the engine's lease."""
    items = tmp_path / "ids.txt"
    items.write_text("\n".join(str(n) for n in range(1, 201)) + "\n")
    nightly = _holder(tmp_path / "data", "nightly", 9)
    nightly.start()
    try:
        with start_http_api(rps=400) as api:
            argv = ["run", "adhoc", "--service", "partner_api", "--items", str(items), "--rps", "400"]
            argv += ["--url-template", api.url + "/items/{id}", "--root", str(tmp_path / "data")]
            assert main([*argv, "--share", "3", "--min-share", "0.5"]) == 0
            stats = api.stats()
    finally:
        nightly.release()
    out = capsys.readouterr().out
    assert "share of partner_api's budget: 0.5 throughout, among 2 lease(s)" in out
    assert "adhoc: 200 ok, 0 failed, 0 dead" in out
    assert stats["by_status"] == {"200": 200} and stats["busiest_1s"] <= 200 * 0.5 * 1.1
    assert main(["run", *argv[1:], "--share", "0"]) == 2
    assert "share must be a positive number, got 0.0" in capsys.readouterr().err


def test_status_lists_the_leases_of_an_s3_store(s3, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)  # as a user of an S3-compatible store sets it for the CLI
    s3.client().create_bucket(Bucket="leases-status")
    root = "s3://leases-status/paceline"
    _holder(root, "nightly", 2).release()  # written and removed: its folder may stay, with nothing live in it
    holder = _holder(root, "adhoc", 1)
    try:
        assert main(["status", "--root", root]) == 0
    finally:
        holder.release()
    out = capsys.readouterr().out
    assert "partner_api: 1 live lease(s)" in out
    assert [line.split()[:5] for line in out.splitlines() if line.startswith("adhoc")] == [
        ["adhoc", "0", "1", "0", "1.000"]
    ]
