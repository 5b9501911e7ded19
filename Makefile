# The few commands a user needs. Everything installs itself into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CPIA_DATA_DIR ?= $(CURDIR)/data
DEMO_HOME := $(CPIA_DATA_DIR)/dagster_home
STAMP := $(VENV)/.installed

.PHONY: install demo test ui lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	CPIA_CATALOG=demo DAGSTER_HOME=$(DEMO_HOME) $(BIN)/python -m cpia_assets.demo_run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n auto --dist loadscope

ui: $(STAMP)
	DAGSTER_HOME=$(DEMO_HOME) $(BIN)/python -m cpia_assets.defs.instance
	CPIA_CATALOG=$${CPIA_CATALOG:-demo} DAGSTER_HOME=$(DEMO_HOME) $(BIN)/dagster dev -h 127.0.0.1 -p 3000 -w workspace.yaml

lint:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_tiling.py
	$(BIN)/python benchmarks/bench_manifest.py
	$(BIN)/python benchmarks/bench_ssl_loader.py

clean:
	rm -rf $(CPIA_DATA_DIR)
