# Set up the virtualenv from requirements.txt, then drive the pipeline with DVC.
# Stage commands and DVC's queue workers run `python` and `dvc` from PATH, so every
# target puts the virtualenv's bin first.

VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
PYTHON ?= python3

.PHONY: setup repro test steps bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

repro: setup
	dvc repro

test: setup
	python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
