# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a building block.
SHELL := /bin/bash
PY_BOOTSTRAP ?= python3
UV_VERSION := 0.13.8
VENV := .venv
UV := $(PY_BOOTSTRAP) -m uv
UER := $(VENV)/bin/uer
WORLD ?= default

.PHONY: setup demo test lint bench bench-simulate bench-setup bench-features bench-serve features feature-server \
	api-start api-stop airflow-ui clean services help bench-demo bench-training milvus-start milvus-stop milvus-status bench-serve-1m \
	bench-index-types bench-hnsw-scale bench-api-costs bench-encoding-cache

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# The venv is rebuilt only when the lock, the project file or this recipe changes: repeated runs are no-ops.
# Bytecode is compiled at install (~35 s): where PYTHONDONTWRITEBYTECODE is set (these machines set it), no
# process could keep what it compiled, and every one of them (each Airflow, dbt, KFP-component and API process)
# compiled its libraries from source again: `import feast` took 10-15 s instead of 6 s.
$(VENV)/.synced: uv.lock pyproject.toml Makefile
	@$(UV) --version 2>/dev/null | grep -q "$(UV_VERSION)" || $(PY_BOOTSTRAP) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen --compile-bytecode
	@touch $@

setup: $(VENV)/.synced  ## create .venv from uv.lock (no-op when up to date)

# A smaller training run than the nightly default, so the demo stays within minutes on 2 cores.
DEMO_RUN ?= {"run_config": {"train": {"steps": 300}, "adapt_pairs_max": 4000}}
API_URL := http://127.0.0.1:3000

demo: setup  ## install, simulate, run the daily DAG, start the API and query it (see README)
	$(UER) simulate --world $(WORLD)
	$(VENV)/bin/python -m retrieval_core.world_report
	$(UER) airflow test --conf '$(DEMO_RUN)'
	$(MAKE) --no-print-directory api-start
	$(VENV)/bin/python -m serving.demo $(API_URL)
	@echo "The API keeps running on $(API_URL): stop it with 'make api-stop'; browse the DAGs with 'make airflow-ui'."

api-start: setup  ## start the retrieval API in the background on 127.0.0.1:3000 and wait until it is ready
	@mkdir -p data
	@if [ -f data/api.pid ] && kill -0 $$(cat data/api.pid) 2>/dev/null; then echo "API already running"; else \
		setsid $(UER) serve > data/api.log 2>&1 & echo $$! > data/api.pid; fi
	@for i in $$(seq 1 120); do curl -sf $(API_URL)/readyz >/dev/null && echo "API ready on $(API_URL)" && exit 0; \
		sleep 1; done; echo "API not ready after 120 s: see data/api.log"; tail -20 data/api.log; exit 1

api-stop:  ## stop the retrieval API and this checkout's embedded Milvus Lite server
	@if [ -f data/api.pid ]; then kill -- -$$(cat data/api.pid) 2>/dev/null || true; rm -f data/api.pid; fi
	@pkill -f "[m]ilvus-lite server --host 127.0.0.1 --port [0-9]* --data-dir $(CURDIR)/data/milvus$$" 2>/dev/null || true
	@echo "stopped"

airflow-ui: setup  ## Airflow UI on http://127.0.0.1:8080 (airflow standalone; Ctrl-C stops it)
	$(UER) airflow ui

features: setup  ## build the latest landed day's features (dbt → GX gate → Feast)
	$(UER) features build

feature-server: setup  ## Feast feature server for other teams on http://127.0.0.1:6566 (Ctrl-C stops it)
	$(UER) features serve --port 6566

test: setup services  ## install what the tests need, then run them all
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=15

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

services:  ## make sure the local Postgres and Redis servers (127.0.0.1) are up
	@bash infra/services.sh ensure

bench: bench-simulate bench-features  ## every benchmark; results land in benchmarks/results/

bench-demo: setup  ## time `make setup` + `make demo` in a fresh clone with an empty uv cache (nothing else running)
	$(VENV)/bin/python benchmarks/demo_fresh.py

bench-setup: setup  ## time `make setup` in a fresh clone with an empty uv cache
	$(VENV)/bin/python benchmarks/setup_fresh.py

bench-features: setup services  ## feature pipeline seconds per day and online lookup latency
	$(VENV)/bin/python benchmarks/features.py

bench-training: setup  ## training examples/s and seconds, default world and a 1M-product catalogue (after make demo)
	$(VENV)/bin/python benchmarks/train_throughput.py

bench-encoding-cache: setup  ## the text-encoding cache at 20k/200k/1M products: open, look up, one changed title, peak memory
	$(VENV)/bin/python benchmarks/encoding_cache.py

bench-api-costs: setup  ## the API's own steps in process: query projection on 1 vs 2 BLAS threads, query tower, user-state miss (after make demo)
	$(VENV)/bin/python benchmarks/api_costs.py

bench-serve: setup  ## HTTP latency at fixed rates, refresh time, failed requests during a swap (after make demo)
	$(VENV)/bin/python benchmarks/serving.py

# A real standalone Milvus 2.3 server (PyPI `milvus`, no Docker) for the 1M-product benchmark only. It listens on
# nine ports on all interfaces, so it runs in its own network namespace (root: `unshare --net`) and a forwarder
# exposes its gRPC port on 127.0.0.1 only. Data: data/milvus_standalone/; logs: data/logs/milvus_*.log.
MILVUS_PORT ?= 19530
BENCH_PRODUCTS ?= 1000000

milvus-start: setup  ## standalone Milvus server (benchmarks) on 127.0.0.1:19530, in its own network namespace
	$(UV) sync --frozen --compile-bytecode --group bench-milvus
	$(VENV)/bin/python infra/milvus_standalone.py start --port $(MILVUS_PORT)

milvus-stop:  ## stop the standalone Milvus server (WIPE=1 also deletes data/milvus_standalone)
	@$(VENV)/bin/python infra/milvus_standalone.py stop $(if $(WIPE),--wipe)

milvus-status:  ## is the standalone Milvus server up, and where does it listen
	@$(VENV)/bin/python infra/milvus_standalone.py status --port $(MILVUS_PORT)

# The options of the committed benchmarks/results/serving.json; BENCH_1M_OPTIONS= (empty) also rebuilds the
# 1M collection under load and sweeps IVF_FLAT (~25 min more).
BENCH_1M_OPTIONS ?= --swap refresh --no-other-index --ef 100,200,400 --repeats 3

bench-serve-1m: milvus-start  ## serving benchmark on 1M products (real + synthetic) on the standalone server (after make demo)
	$(VENV)/bin/python benchmarks/serving.py --products $(BENCH_PRODUCTS) --milvus-uri http://127.0.0.1:$(MILVUS_PORT) \
		$(BENCH_1M_OPTIONS)

bench-index-types: milvus-start  ## one 165k-row segment as HNSW and SCANN: recall@100 and Milvus CPU per query (after make demo)
	$(VENV)/bin/python benchmarks/index_types.py --milvus-uri http://127.0.0.1:$(MILVUS_PORT)

bench-hnsw-scale: setup  ## HNSW recall@100 vs graph size (165k/333k/1M rows, M 16/32) in faiss: why segments stay small (after make demo)
	$(VENV)/bin/python benchmarks/hnsw_scale.py --m 16,32

bench-simulate: setup  ## the large world: time and peak memory of `uer simulate --world large`
	$(VENV)/bin/python benchmarks/simulate_large.py

clean:  ## remove generated data and artefacts (keeps .venv)
	rm -rf data artifacts dbt_project/target dbt_project/logs .pytest_cache .ruff_cache
