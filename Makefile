# Two commands on a fresh machine with Python 3.11+:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: install demo test lint ui bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Paceline needs Python 3.11 or newer: run make with PYTHON=python3.11 (or newer).")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: install  ## run the demo backfill on the embedded default (local executor, local manifests, bundled service)
	$(BIN)/paceline demo
	@echo
	@echo "Now the same backfill as Dagster materializations, kept in dagster_home/ for 'make ui' (about 30 s)..."
	@$(BIN)/dagster job execute -m paceline.definitions -j demo_ids_backfill > dagster_home/demo-run.log 2>&1 \
		&& echo "Done. Open the UI with 'make ui' (http://127.0.0.1:3000): assets demo_ids/*; its sensor retries the failed items." \
		|| (tail -n 30 dagster_home/demo-run.log; echo "The Dagster run failed; full log: dagster_home/demo-run.log"; exit 1)

# Processes for the suite: most tests wait on their servers, so two halve the time on 2 cores.
TEST_WORKERS ?= 2

test: install  ## the whole test suite; every server it needs is started by its fixtures
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

lint: install  ## ruff: lint rules and formatting, as configured in pyproject.toml
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: install  ## the Dagster UI on http://127.0.0.1:3000 (with the daemon, so sensors run)
	$(BIN)/dagster dev -w workspace.yaml

bench: install  ## the benchmarks (minutes); prints medians and ratios
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) data .pytest_cache
