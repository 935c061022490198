# Two commands on a fresh machine with Python 3.11+:  make demo  |  make test
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: install demo test ui bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Paceline needs Python 3.11 or newer: run make with PYTHON=python3.11 (or newer).")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: install  ## run the demo backfill on the embedded default (local executor, local manifests, bundled service)
	$(BIN)/paceline demo

test: install  ## the whole test suite; every server it needs is started by its fixtures
	$(BIN)/python -m pytest

ui: install  ## the Dagster UI on http://127.0.0.1:3000 (with the daemon, so sensors run)
	$(BIN)/dagster dev -w workspace.yaml

bench: install  ## the benchmarks (minutes); prints medians and ratios
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) data .pytest_cache
