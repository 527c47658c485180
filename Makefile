# Epicycle — everything a fresh machine needs, installed by these targets.
#   make demo   the FLARE aluminium melt on-the-fly (embedded services, EMT oracle); prints the report path
#   make test   create the virtual environment (first time) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_PORT ?= 50151

.PHONY: help venv test demo demo-oracle protos bench clean

help:
	@echo "make demo    - on-the-fly training of the aluminium melt (examples/al_melt.yaml); writes runs/al-melt-*/report.md"
	@echo "make demo-oracle - start an EMT oracle on 127.0.0.1:$(DEMO_PORT) and label examples/cu_rattled.xyz"
	@echo "make test    - run the test suite (creates $(VENV) on first use)"
	@echo "make protos  - regenerate the Python gRPC code from protos/epicycle/v1/*.proto"
	@echo "make bench   - run the benchmarks in benchmarks/"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (found %s); set PYTHON=..." % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest

protos: venv
	$(BIN)/python -m protos.generate

demo: venv
	$(BIN)/epicycle run examples/al_melt.yaml

demo-oracle: venv
	@mkdir -p out
	@set -e; \
	$(BIN)/epicycle serve oracle --backend emt --port $(DEMO_PORT) & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null' EXIT; \
	$(BIN)/epicycle label examples/cu_rattled.xyz --oracle 127.0.0.1:$(DEMO_PORT) --wait 60 --out out/cu_labelled.xyz; \
	echo "labelled structures written to out/cu_labelled.xyz"

bench: venv
	$(BIN)/python benchmarks/bench_wire.py

clean:
	rm -rf $(VENV) out .pytest_cache
