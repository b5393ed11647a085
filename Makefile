# Set up the virtualenv from requirements.txt, then drive the pipeline with DVC.
# Stage commands and DVC's queue workers run `python` and `dvc` from PATH, so every
# target puts the virtualenv's bin first.

VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
PYTHON ?= python3
# The install stamp is keyed on requirements.txt's content, not its timestamp.
STAMP := $(VENV)/.installed-$(shell sha256sum requirements.txt | cut -c1-16)
JOBS ?= 1

.PHONY: setup repro test steps bench

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

repro: setup
	dvc repro

test: setup
	python -m pytest -q

steps: setup
	python -m experiments.steps run --jobs $(JOBS)

bench: setup
	python -m benchmarks.train_speed
