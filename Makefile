# The few commands a user needs. Everything installs itself into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CPIA_DATA_DIR ?= $(CURDIR)/data
DEMO_HOME := $(CPIA_DATA_DIR)/dagster_home
STAMP := $(VENV)/.installed
# uv installs exactly the versions in uv.lock (`make lock` updates it after pyproject.toml changes).
# make first puts uv into .venv with $(PYTHON)'s pip (or the venv's own), at the version uv.lock
# pins in the dev extra, so that `uv sync` keeps it. Without uv.lock, pip installs as before.
UV_VERSION := $(shell sed -n '/^name = "uv"$$/{n;s/^version = "\(.*\)"$$/\1/p;}' uv.lock 2>/dev/null)
UV_REQ := uv$(if $(UV_VERSION),==$(UV_VERSION))
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: install lock demo test ui lint format bench clean pg-server

# --without-pip: seeding pip costs seconds; uv sync installs the pip that uv.lock pins.
$(BIN)/python:
	$(PYTHON) -m venv --without-pip $(VENV)

$(BIN)/uv: | $(BIN)/python
	$(PYTHON) -m pip --python $(BIN)/python install $(PIP_QUIET) "$(UV_REQ)" || \
	  { $(BIN)/python -m ensurepip && $(BIN)/python -m pip install $(PIP_QUIET) "$(UV_REQ)"; }

ifneq ($(wildcard uv.lock),)
# --compile-bytecode: .pyc files written at install on every core, not by each first import.
$(STAMP): pyproject.toml uv.lock | $(BIN)/uv
	$(BIN)/uv sync --locked --all-extras --compile-bytecode --python $(BIN)/python
	touch $(STAMP)
else
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip
	$(BIN)/python -m pip install $(PIP_QUIET) -e ".[dev,postgres]"
	touch $(STAMP)
endif

install: $(STAMP)

lock: | $(BIN)/uv
	$(BIN)/uv lock

# The Postgres tests start their own server from Debian's postgresql package (initdb, pg_ctl);
# as root on Debian this installs it where it is missing, elsewhere those tests are skipped
# (CI sets CPIA_REQUIRE_POSTGRES=1: there they fail instead).
pg-server:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's postgresql for the Postgres tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends postgresql >/dev/null; \
	  else echo "PostgreSQL server programs not found: the Postgres tests will be skipped"; fi

demo: $(STAMP)
	CPIA_CATALOG=demo DAGSTER_HOME=$(DEMO_HOME) $(BIN)/python -m cpia_assets.demo_run

test: $(STAMP) pg-server
	$(if $(wildcard uv.lock),$(BIN)/uv lock --check)
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
