# Two commands matter: `make demo` and `make test`. Everything else is a building block or a benchmark.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MPY_LIB := build/mpy-lib
UMQTT := $(MPY_LIB)/umqtt/simple.py
WEB_ASSETS := cloud/web/static/vendor/.fetched
PORT ?= /dev/ttyUSB0
PYTEST_ARGS ?=

.PHONY: demo test venv deps firmware-deps web-assets kafka up flash console soak \
        bench chaos bench-bridge bench-writer bench-alarms bench-web clean help

help:
	@echo "make demo   - run the whole platform locally (embedded profile), dashboard on http://127.0.0.1:8000"
	@echo "make test   - install what the tests need (root: apt packages, Kafka jars) and run the test suite"
	@echo "other: up flash console soak bench chaos bench-bridge bench-writer bench-alarms bench-web clean"

# --- set-up --------------------------------------------------------------------------------------------------
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11+ is required (found: $$($(PYTHON) --version))"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "could not create a venv: on Debian run 'apt-get install -y python3-venv'"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(STAMP)

$(UMQTT): tools/fetch_umqtt.py | $(STAMP)
	$(PY) tools/fetch_umqtt.py $(MPY_LIB)

firmware-deps: $(UMQTT)

$(WEB_ASSETS): package.json package-lock.json tools/fetch-web-assets.sh
	tools/fetch-web-assets.sh

web-assets: $(WEB_ASSETS)

kafka:
	tools/fetch-kafka.sh

deps:
	tools/install-deps.sh

# --- the two commands ----------------------------------------------------------------------------------------
demo: venv firmware-deps
	@$(MAKE) --no-print-directory web-assets || \
	  echo "warning: chart library not installed (is npm missing?); the dashboard shows live values without charts"
	$(PY) -m cloud demo

test: deps kafka venv firmware-deps web-assets
	$(PY) -m pytest $(PYTEST_ARGS)

# --- production topology natively on loopback (Mosquitto, Kafka, PostgreSQL, Redis from packages) -----------
up: deps kafka venv firmware-deps web-assets
	$(PY) -m cloud.nativestack up --dir var/stack

# --- a physical ESP32 ------------------------------------------------------------------------------------------
flash: venv
	$(PY) tools/flash.py --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

console: venv
	$(VENV)/bin/mpremote connect $(PORT) repl

# --- long runs and benchmarks (never part of `make test`) -----------------------------------------------------
soak: venv firmware-deps
	$(PY) firmware/tools/soak.py

bench: deps kafka venv firmware-deps
	$(PY) bench/bench_e2e.py $(BENCH_ARGS)

chaos: deps kafka venv firmware-deps
	$(PY) bench/chaos.py $(CHAOS_ARGS)

bench-bridge: deps kafka venv
	$(PY) bench/bench_bridge.py

# two writer processes in one consumer group (one process is one core of Python at most); --writers 1: one, in-process;
# a backlog of 3,000,000 readings keeps them busy for about 50 s: a sustained rate, not a burst of a few seconds
BENCH_WRITER_ARGS ?= --writers 2 --backlog 3000000
bench-writer: deps kafka venv
	$(PY) bench/bench_writer.py $(BENCH_WRITER_ARGS)

bench-alarms: deps kafka venv
	$(PY) bench/bench_alarms.py

bench-web: deps venv web-assets
	$(PY) bench/bench_web.py

clean:
	rm -rf build var test-artifacts .pytest_cache
