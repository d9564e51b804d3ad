# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= ./airlock-data
PORT   ?= 9000

.PHONY: run test venv build bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel Cython

$(STAMP): $(VENV)/bin/python pyproject.toml setup.py $(wildcard ext/*.pyx ext/*.pxd)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

run: $(STAMP)
	$(VENV)/bin/airlock up --data $(DATA) --port $(PORT)

# One pytest process per core (at most 4), each taking whole files, so a
# file's module-scoped deployment is started once.  `TESTFLAGS=-n0` runs
# everything in one process.
TESTFLAGS ?= -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(TESTFLAGS) tests

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# The comparison of docs/performance.md: airlock, SeaweedFS and moto server
# (installed here); wrk drives the cells if on PATH (`apt-get install wrk`).
bench: $(BENCH_STAMP)
	$(PY) benchmarks/run.py $(BENCHFLAGS)

clean:
	rm -rf build $(VENV) src/airlock/*/_*.c src/airlock/*/*.so ext/*.c
