# Two entry points for a fresh clone: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export KEDRO_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1

AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed-stamp
AIRFLOW_VERSION := 3.3.2

.PHONY: run test test-fast test-threads test-shuffled test-kernels bench repro venv airflow airflow-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# Airflow in its own environment: its pins (SQLAlchemy, pydantic, ...) are not the project's concern.
airflow-venv: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP):
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet "apache-airflow==$(AIRFLOW_VERSION)"
	touch $(AIRFLOW_STAMP)

# The DAG for an Airflow deployment (README, "Airflow"): one task per budget namespace.
airflow: $(STAMP)
	$(BIN)/kedro airflow create --group-by memory --jinja-file conf/airflow/budcache_dag.j2 --target-dir airflow/dags

run: $(STAMP)
	$(BIN)/kedro run

test: $(STAMP) $(AIRFLOW_STAMP)
	$(BIN)/python -m pytest -q

# Everything but the end-to-end tests (marked slow): the edit-and-check loop, under 2 minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The determinism promise (README, "Determinism"): the suite at 1 and 2 torch threads, in a
# shuffled order (SHUFFLE_SEED=... for another one), and the search tests on MKL kernels
# whose rows depend on the batch shape (MKL_CBWR=COMPATIBLE; x86 builds of torch).
SHUFFLE_SEED ?= 1

test-threads: $(STAMP)
	BUDCACHE_TEST_THREADS=1 $(BIN)/python -m pytest -q
	BUDCACHE_TEST_THREADS=2 $(BIN)/python -m pytest -q

test-shuffled: $(STAMP)
	BUDCACHE_TEST_SHUFFLE_SEED=$(SHUFFLE_SEED) $(BIN)/python -m pytest -q

test-kernels: $(STAMP)
	MKL_CBWR=COMPATIBLE $(BIN)/python -m pytest -q tests/search

bench: $(STAMP)
	$(BIN)/budcache bench runtime --json data/08_reporting/bench_runtime.json

repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
