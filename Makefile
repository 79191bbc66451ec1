# Set-up and everyday commands. Every target creates .venv in the repo root when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: venv test test-fast lint demo bench bench-quick bench-long bench-sharded bench-vision bench-gpu bench-gpu-wheels clean

venv: $(VENV)/.installed

# torch first, with its exact pin: on a CPU-only machine the pinned wheel is the CPU build,
# while an unpinned torch pulled in by another package would fetch GBs of CUDA libraries.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,demo,bench]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Both stages on SmolLM2-135M-Instruct with a before/after report in $(OUT);
# `make demo DATASET=file.jsonl` runs it on any supported preference file instead.
demo: venv
	$(BIN)/refdpo demo --output $(OUT) $(if $(DATASET),--dataset $(DATASET))

# refdpo against TRL's DPOTrainer (online reference and precompute_ref_log_probs) on
# SmolLM2-135M-Instruct, side by side; report in $(BENCH_OUT). bench-quick: tiny model.
BENCH_OUT ?= out/bench
bench: venv
	$(BIN)/python -m bench.run --output $(BENCH_OUT) $(BENCH_ARGS)

bench-quick: venv
	$(BIN)/python -m bench.run --quick --output $(BENCH_OUT)-quick $(BENCH_ARGS)

# Peak memory and time of both stages by pair length (2k-32k tokens), the pair mask before the
# block-sparse change against today's kernels, tiny model on CPU; report in $(BENCH_OUT)-long.
# Needs a quiet machine: up to --max-gb (20) resident per run. BENCH_ARGS="--lengths 2048 4096".
bench-long: venv
	$(BIN)/python -m bench.long_pairs --output $(BENCH_OUT)-long $(BENCH_ARGS)

# Stage one with a sharded reference on CPU: pairs/s and peak memory per rank of 1 worker and
# 2 ranks holding the whole reference against 1 and 2 ranks under --zero-stage 3, run one after
# another on SmolLM2-135M-Instruct and 96 pairs (~3.5 min on 2 cores), every output checked
# against the 1-worker one token by token; report in $(BENCH_OUT)-sharded. BENCH_ARGS="--pairs 32".
bench-sharded: venv
	$(BIN)/python -m bench.sharded_reference --output $(BENCH_OUT)-sharded $(BENCH_ARGS)

# Vision-language pairs on tiny random VLMs (LLaVA, Qwen2-VL, Idefics3, Gemma3), CPU: images the
# vision tower encodes per pair (refdpo's shared and two-sequence layouts, per-sequence rows as
# TRL and RLAIF-V feed the model, TRL's DPOTrainer itself) and pairs/s of stage one and of a
# stage-two step by layout (~1.5 min on 2 cores); report in $(BENCH_OUT)-vision.
bench-vision: venv
	$(BIN)/python -m bench.vision --output $(BENCH_OUT)-vision $(BENCH_ARGS)

# refdpo on one GPU against plain prefill / SFT-step ceilings and TRL: pairs/s, tokens/s, MFU,
# CUDA peak (~7.5 min on an H200); report in $(BENCH_OUT)-gpu. Needs no venv: it runs with
# .venv's python when there is one, else $(PYTHON), from a plain checkout, installing the
# wheels carried in wheels/ that the machine lacks (docs/benchmarks.md, GPU).
# bench-gpu-wheels builds that folder on a machine with a package registry.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
bench-gpu:
	$(GPU_PYTHON) -m bench.gpu --output $(BENCH_OUT)-gpu $(BENCH_ARGS)

bench-gpu-wheels: venv
	$(BIN)/python -m bench.gpu_wheels --output wheels

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache *.egg-info
