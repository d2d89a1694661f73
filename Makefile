# reconciler: `make help` lists the targets. `make demo` and `make test` set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_DIR := api/proto
PROTOS := $(shell find $(PROTO_DIR) -name '*.proto' 2>/dev/null | sort)

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast lint fmt typecheck layers gen check-gen bench robustness fuzz fuzz-merge clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv and install the project with its development tools

demo: $(STAMP) ## Run a Manager and a daemon for this host with the example agents (Ctrl-C stops)
	$(BIN)/reconciler dev -f examples/quickstart.yaml

test: $(STAMP) lint typecheck layers check-gen ## Run every check: lint, types, layers, proto drift, all tests
	tools/test-services
	$(BIN)/pytest -p no:cacheprovider --durations=15 tests

test-fast: $(STAMP) ## Unit tests only
	$(BIN)/pytest -p no:cacheprovider tests/unit

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP) ## Format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP) ## mypy --strict on reconciler and agentlet
	$(BIN)/mypy

layers: $(STAMP) ## Check the import layer contracts
	$(BIN)/lint-imports

gen: $(STAMP) ## Regenerate reconciler/api from api/proto
	tools/gen-proto $(BIN)/python

check-gen: $(STAMP) ## Fail when the committed generated code is stale
	tools/gen-proto $(BIN)/python --check

bench: $(STAMP) ## Run the benchmarks and rewrite docs/benchmarks.md
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -m bench

robustness: $(STAMP) ## Run the long robustness profile
	RECONCILER_ROBUSTNESS=long $(BIN)/pytest -p no:cacheprovider tests/robustness

FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= heartbeat frame command config agentset
FUZZ_WORK ?= /tmp/reconciler-fuzz

fuzz: $(STAMP) ## Fuzz each target with atheris for FUZZ_SECONDS (default 600); findings in FUZZ_WORK
	$(BIN)/python -m pip install --quiet -e '.[dev,fuzz]'
	set -e; for target in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_WORK)/$$target; \
	  $(BIN)/python -m fuzz $$target -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$(FUZZ_WORK)/$$target- $(FUZZ_WORK)/$$target fuzz/corpus/$$target; \
	done

fuzz-merge: $(STAMP) ## Minimise what make fuzz found into the committed corpus under fuzz/corpus
	set -e; for target in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_WORK)/$$target $(FUZZ_WORK)/merged-$$target; \
	  $(BIN)/python -m fuzz $$target -merge=1 $(FUZZ_WORK)/merged-$$target fuzz/corpus/$$target $(FUZZ_WORK)/$$target; \
	  rm -f fuzz/corpus/$$target/*; mv $(FUZZ_WORK)/merged-$$target/* fuzz/corpus/$$target/; \
	  rmdir $(FUZZ_WORK)/merged-$$target; \
	done

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
