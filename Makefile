# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a building block.
SHELL := /bin/bash
PY_BOOTSTRAP ?= python3
UV_VERSION := 0.13.8
VENV := .venv
UV := $(PY_BOOTSTRAP) -m uv
UER := $(VENV)/bin/uer
WORLD ?= default

.PHONY: setup demo test lint bench bench-simulate bench-setup bench-features features feature-server clean services help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The venv is rebuilt only when the lock or the project file changes: repeated runs are no-ops.
$(VENV)/.synced: uv.lock pyproject.toml
	@$(UV) --version 2>/dev/null | grep -q "$(UV_VERSION)" || $(PY_BOOTSTRAP) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen
	@touch $@

setup: $(VENV)/.synced  ## create .venv from uv.lock (no-op when up to date)

demo: setup  ## install, simulate the default world, build its features, and show them
	$(UER) simulate --world $(WORLD)
	$(VENV)/bin/python -m retrieval_core.world_report
	$(UER) features build
	$(UER) features lookup --user-id 1 --user-id 2

features: setup  ## build the latest landed day's features (dbt → GX gate → Feast)
	$(UER) features build

feature-server: setup  ## Feast feature server for other teams on http://127.0.0.1:6566 (Ctrl-C stops it)
	$(UER) features serve --port 6566

test: setup services  ## install what the tests need, then run them all
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

services:  ## make sure the local Postgres and Redis servers (127.0.0.1) are up
	@bash infra/services.sh ensure

bench: bench-simulate bench-features  ## every benchmark; results land in benchmarks/results/

bench-setup: setup  ## time `make setup` in a fresh clone with an empty uv cache
	$(VENV)/bin/python benchmarks/setup_fresh.py

bench-features: setup services  ## feature pipeline seconds per day and online lookup latency
	$(VENV)/bin/python benchmarks/features.py

bench-simulate: setup  ## the large world: time and peak memory of `uer simulate --world large`
	$(VENV)/bin/python benchmarks/simulate_large.py

clean:  ## remove generated data and artefacts (keeps .venv)
	rm -rf data artifacts dbt_project/target dbt_project/logs .pytest_cache .ruff_cache
