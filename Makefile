# Two entry points: `make demo` (train + evaluate FF on MNIST) and `make test` (the test suite).
# Each creates .venv and installs what it needs. torch is installed first, pinned, so that pip
# does not pull a multi-GB CUDA build where a CPU wheel is at hand.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The shared offline MNIST copy when it exists; otherwise fflab's own lookup (FFLAB_DATA,
# the cache, then a verified download).
SHARED_MNIST := $(wildcard ../shared/data/mnist)
DATA_DIR ?= $(SHARED_MNIST)
DATA_ARG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

.PHONY: demo test lint format bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/fflab train --preset mnist-ff-quick $(DATA_ARG)

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	FFLAB_TEST_DATA=$(DATA_DIR) $(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks

format: $(BIN)/.installed
	$(BIN)/ruff format src tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_ff.py $(DATA_ARG)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
