# Two commands for a fresh machine: `make run` and `make test`. Both install what is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lens-installed
# Offline and private: no telemetry, no hub downloads (the same as lens_model/defaults.py).
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export HF_HUB_OFFLINE ?= 1
export GX_ANALYTICS_ENABLED ?= false
export DS_ACCELERATOR ?= cpu

.PHONY: install run test test-all bench lint ui

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned to the CPU wheel: letting pip resolve plain `torch` pulls a CUDA build.
# --no-compile: pip would byte-compile all ~28,000 installed modules, where a run imports a
# fraction (Python compiles those on first import).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --no-compile torch==2.13.0
	$(PY) -m pip install --no-compile -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/lens run tiny

test: install
	$(VENV)/bin/pytest -q

test-all: install
	$(VENV)/bin/pytest -q -m "slow or not slow"

bench: install
	$(PY) -m bench.data_bench

ui: install
	$(VENV)/bin/lens ui

lint: install
	$(VENV)/bin/ruff check .
