# kappa-etl: every target bootstraps its own virtual environment (.venv) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.browser-installed
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help
.PHONY: help run test test-unit test-integration test-pg15 test-slow test-browser screenshots lint format typecheck check clean reset bench-cache chaos bench bench-freshness bench-capture

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

venv: $(STAMP) ## Create or refresh the virtual environment

# Debian's Chromium (Playwright launches it; it never downloads a browser of its own).
$(CHROMIUM):
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium chromium-driver

$(BROWSER_STAMP): $(STAMP) pyproject.toml
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pip install --quiet -e '.[dev,browser]'
	touch $(BROWSER_STAMP)

run: $(STAMP) ## Bring up the local stack (PostgreSQL, broker, the catalogue's producers, Dagster UI and daemon)
	$(BIN)/python -m kappa.cli up $(ARGS)

reset: $(STAMP) ## Bring up the local stack from empty local state
	$(BIN)/python -m kappa.cli up --reset $(ARGS)

test: $(STAMP) ## Run the test suite (unit + integration against a real broker, PostgreSQL and Dagster)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit: $(STAMP) ## Run only the fast unit tests
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-pg15: $(STAMP) ## Run the integration tests against the PostgreSQL server at 127.0.0.1:5432
	KAPPA_TEST_PG_URL=$${KAPPA_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres} \
		$(BIN)/python -m pytest tests/integration -m "not e2e" $(PYTEST_ARGS)

test-slow: $(STAMP) ## The long fault-injection tests: Celery workers killed mid-run, on PostgreSQL and on Redis (127.0.0.1:6379)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-browser: $(BROWSER_STAMP) $(CHROMIUM) ## Browser tests of the Dagster UI against a running local stack (screenshots in tests/artifacts/browser/)
	$(BIN)/python -m pytest tests/browser $(PYTEST_ARGS)

screenshots: $(BROWSER_STAMP) $(CHROMIUM) ## Regenerate docs/asset-graph.png (the README's screenshot) from the browser test
	KAPPA_UPDATE_DOCS=1 $(BIN)/python -m pytest tests/browser -k asset_graph $(PYTEST_ARGS)

chaos: $(STAMP) ## Fault and bad-input suite at full scale (kills, restarts, bad events); prints the table
	$(BIN)/python -m tests.chaos $(ARGS)

bench-cache: $(STAMP) ## Benchmark the state cache against per-message EDW queries (figures in bench/results/)
	$(BIN)/python -m bench.cache_vs_queries $(ARGS)

bench: $(BENCH_STAMP) ## Pipeline vs row by row, Quix Streams and the ceiling, then change capture (BENCH_SCALE=quick|full; bench/results/latest.json)
	BENCH_SCALE=$${BENCH_SCALE:-quick} $(BIN)/python -m bench.suite $(ARGS)
	$(BIN)/python -m bench.capture --changes $$([ "$${BENCH_SCALE:-quick}" = full ] && echo 200000 || echo 20000)

bench-capture: $(BENCH_STAMP) ## Change capture throughput: MariaDB binlog vs PostgreSQL triggers, same writes, same batch bound (bench/results/capture.json)
	$(BIN)/python -m bench.capture $(ARGS)

bench-freshness: $(BENCH_STAMP) ## Produce-to-EDW latency on the running stack, 5 s sensor interval, 5 min (merged into latest.json)
	$(BIN)/python -m bench.freshness $(ARGS)

lint: $(STAMP) ## Lint and check formatting
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Format the code
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: $(STAMP) ## Type-check the package and the code location
	$(BIN)/mypy

check: lint typecheck test ## Everything CI runs

clean: ## Remove the virtual environment and local state
	rm -rf $(VENV) .kappa .pytest_cache .mypy_cache .ruff_cache
