# Set-up and everyday commands. Every target creates .venv in the repo root when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out/demo
DATA ?= ../shared/data/instruction-data-with-preference.json

.PHONY: venv test test-fast lint demo clean

venv: $(VENV)/.installed

# torch first, with its exact pin: on a CPU-only machine the pinned wheel is the CPU build,
# while an unpinned torch pulled in by another package would fetch GBs of CUDA libraries.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,demo]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Stage one on the real SmolLM2-135M-Instruct over the ../shared/data pairs, then inspect.
demo: venv
	$(BIN)/refdpo fetch-demo-model
	$(BIN)/refdpo precompute --config jobs/instruction-data.yaml --dataset $(DATA) \
		--model $$($(BIN)/refdpo fetch-demo-model --no-verify 2>/dev/null | tail -n 1) \
		--output $(OUT)/shards
	$(BIN)/refdpo inspect $(OUT)/shards
	$(BIN)/refdpo inspect $(OUT)/shards-eval

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
