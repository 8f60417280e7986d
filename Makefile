# Stage-1 Pro: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DAGSTER_HOME is the project root: its dagster.yaml is the instance file, and it sends every piece
# of instance data into .dagster_home/ (paths relative to the root, where make runs). The webserver's
# telemetry-upload thread creates logs/ and .logs_queue/ in DAGSTER_HOME even with telemetry off in
# dagster.yaml; DAGSTER_DISABLE_TELEMETRY stops it, so nothing else is written at the root.
export DAGSTER_HOME := $(CURDIR)
export DAGSTER_DISABLE_TELEMETRY := 1
PHASE ?=

.PHONY: venv demo demo-phase2 ui test test-fast bench clean-artifacts

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## Run the main job on the embedded default (synthetic data + builtin tiny DINOv3): every phase in
## order, each its own Dagster run, stopping at the first failing gate. PHASE=phaseN runs one.
demo: $(STAMP)
	@$(PY) -m stage1_assets.demo $(if $(PHASE),--phase $(PHASE),)

## Phase 2 after phase 1 has passed its gate.
demo-phase2:
	$(MAKE) demo PHASE=phase2

## The Dagster UI on http://127.0.0.1:3000: runs made from the CLI (same DAGSTER_HOME) and their gate
## checks show up under Runs, Catalog and each asset's Checks tab.
ui: $(STAMP)
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

## Full test suite (unit + slow end-to-end tests that drive the real Dagster CLI).
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25

## Unit tests only.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-artifacts:
	rm -rf artifacts .dagster_home
