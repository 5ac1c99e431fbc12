# make train   creates .venv, installs the package, fetches the corpus, trains, samples.
# make test    runs the test suite (exits non-zero when a test fails).
# Variables: PYTHON (a Python >= 3.11 to build .venv with), PRESET, JOB_DIR, DATA_DIR.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PRESET ?= cpu
DATA_DIR ?= data/shakespeare
JOB_DIR ?= runs/shakespeare

.DEFAULT_GOAL := help
.PHONY: help venv data train test bench lint clean

help:
	@echo "make train  fetch the corpus, train --preset=$(PRESET) into $(JOB_DIR), print a sample"
	@echo "make test   run the tests (creates .venv first if needed)"
	@echo "make data   fetch the Shakespeare corpus into $(DATA_DIR)"
	@echo "make bench  fetch the corpus, run the benchmarks (results in bench/results/)"
	@echo "make lint   ruff check"
	@echo "make venv   create .venv and install the package with its test extras"
	@echo "make clean  remove build outputs and caches (keeps .venv, data/, runs/)"

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "error: need Python >= 3.11 to create $(VENV), but '$(PYTHON)' is $$(command -v $(PYTHON) >/dev/null && $(PYTHON) --version 2>&1 || echo "not found"); run: make PYTHON=python3.11 $(MAKECMDGOALS)" >&2; \
	  exit 1; }
	$(PYTHON) -m venv $(VENV)

# Reinstalled only when the packaging changes; the editable install picks up code edits.
$(STAMP): setup.py pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $@

venv: $(STAMP)

data: venv
	$(PY) -m trainer.corpus --out=$(DATA_DIR)

train: venv data
	$(PY) -m trainer.task --preset=$(PRESET) --train_data='$(DATA_DIR)/train/*.txt' \
	  --val_data='$(DATA_DIR)/val/*.txt' --job_dir=$(JOB_DIR)
	$(PY) -m trainer.generate --job_dir=$(JOB_DIR) --length=500

# Two pytest workers, a test file each at a time: much of the suite waits on processes it
# started (training jobs, servers, a bucket emulator), so two files overlap well even on
# two cores. TEST_WORKERS=0 runs the files one after another.
TEST_WORKERS ?= 2
test: venv
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: venv data
	$(PY) -m bench.run --corpus=$(DATA_DIR)

lint: venv
	$(PY) -m ruff check .

# Leaves .venv, data/ and runs/ (trained models) alone; delete those by hand.
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
