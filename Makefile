# Epicycle — everything a fresh machine needs, installed by these targets.
#   make demo   the FLARE aluminium melt on-the-fly (embedded services, EMT oracle); prints the report path
#   make test   create the virtual environment (first time) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the external codes the tests exercise for real: Quantum ESPRESSO, GPAW, CP2K, tblite (oracles),
# Prometheus/promtool, kubectl+kustomize, kubernetes-validate, hadolint (deployment checks)
CODES_STAMP := $(VENV)/.codes-installed
CODES_INPUTS := oracle_service/setup/install_system_packages.sh oracle_service/setup/install_python_packages.sh \
	oracle_service/setup/gpaw_siteconfig.py tests/deploy/setup_tools.sh
DEMO_PORT ?= 50151

.PHONY: help venv codes test demo demo-oracle production-md protos bench clean

help:
	@echo "make demo    - on-the-fly training of the aluminium melt (examples/al_melt.yaml); writes runs/al-melt-*/report.md"
	@echo "make demo-oracle - start an EMT oracle on 127.0.0.1:$(DEMO_PORT) and label examples/cu_rattled.xyz"
	@echo "make production-md - map the newest demo model (runs/al-melt-*) and run 10 ps of 1,372-atom Al in LAMMPS"
	@echo "make test    - run the test suite (creates $(VENV) on first use)"
	@echo "make codes   - install QE, GPAW, CP2K, tblite, Prometheus, kubectl/kustomize (root or sudo; make test does it)"
	@echo "make protos  - regenerate the Python gRPC code from protos/epicycle/v1/*.proto"
	@echo "make bench   - run the benchmarks in benchmarks/"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (found %s); set PYTHON=..." % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# needs root for apt-get (CI runs as root; elsewhere the scripts use sudo)
$(CODES_STAMP): $(STAMP) $(CODES_INPUTS)
	bash oracle_service/setup/install_system_packages.sh
	bash oracle_service/setup/install_python_packages.sh $(BIN)/python
	bash tests/deploy/setup_tools.sh $(BIN)/python
	$(BIN)/python -m oracle_service.pseudo generate
	touch $@

codes: $(CODES_STAMP)

test: venv codes
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

# the model of the newest `make demo` run -> splines (epicycle map) -> 10 ps NVE of 1,372 Al atoms in LAMMPS
production-md: venv
	@set -e; run=$$(ls -td runs/al-melt-* 2>/dev/null | head -1); \
	if [ -z "$$run" ]; then echo "no runs/al-melt-*: run 'make demo' first"; exit 1; fi; \
	echo "model: $$run/learner"; \
	$(BIN)/epicycle map $$run/learner --out $$run/map; \
	$(BIN)/epicycle md --potential $$run/map --repeat 7 --ps 10 --out $$run/md

bench: venv
	$(BIN)/python benchmarks/bench_wire.py

clean:
	rm -rf $(VENV) out .pytest_cache
