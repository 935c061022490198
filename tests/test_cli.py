"""The paceline command: output a user reads, and one-line errors."""

import subprocess
import sys

import pytest

from pipeline.cli import main


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


def test_demo_runs_end_to_end_and_reports_what_the_service_saw(tmp_path, capsys):
    assert main(["demo", "--items", "300", "--limit-rps", "400", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Plan: 300 items" in out
    assert "busiest second seen by the service" in out
    assert "Retry round 1" in out  # the demo service fails a few ids once; the retry heals them
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
