# Set up the virtualenv from requirements.lock (compiled from requirements.txt), then
# drive the pipeline with DVC.
# Stage commands and DVC's queue workers run `python` and `dvc` from PATH, so every
# target puts the virtualenv's bin first.

VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
PYTHON ?= python3
# requirements.txt is the list people edit; requirements.lock, compiled from it with
# hashes (`make lock`), is what setup installs. The install stamp is keyed on the lock's
# content, not its timestamp.
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell sha256sum $(LOCK) | cut -c1-16)
PIP_TOOLS := pip-tools==7.6.2
JOBS ?= 1
SEEDS ?= 1-10
# The default DVC remote of a clone that has none: a folder that every clone on this
# machine shares (docs/sharing.md). Point a clone elsewhere with
# `dvc remote add --local -d -f shared URL`; setup then leaves it alone.
DVC_REMOTE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mnist-cnn-dvc/remote
# `dvc plots show` and `dvc plots diff` offline: a page template with Vega inline
# (docs/use.md). Setup writes it and points this clone's DVC at it, unless the clone
# already names a template of its own.
PLOTS_TEMPLATE := .dvc/plots_offline.html

.PHONY: setup repro test steps seeds docs push pull exp-push exp-pull bench gpu-check serve lock report

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r $(LOCK)
	rm -f $(VENV)/.installed-*
	touch $@

# requirements.lock from requirements.txt: every package and version setup installs,
# with their hashes, for Python 3.11 on Linux; run after editing requirements.txt
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet $(PIP_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" .lock-venv/bin/pip-compile --quiet --generate-hashes \
		--strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--output-file $(LOCK) requirements.txt
	rm -rf .lock-venv

$(PLOTS_TEMPLATE): $(STAMP) tools/plots_template.py
	python -m tools.plots_template $@

setup: $(STAMP) $(PLOTS_TEMPLATE)
	@mkdir -p "$(DVC_REMOTE)"
	@dvc remote default >/dev/null 2>&1 || { dvc remote add --local -d -f shared "$(DVC_REMOTE)" && \
		dvc remote modify --local shared verify true; }
	@dvc config --local plots.html_template >/dev/null 2>&1 || \
		dvc config --local plots.html_template $(notdir $(PLOTS_TEMPLATE))

repro: setup
	dvc repro

# the browser and SSH suites' programs first (Chromium, sshd: tools/test_programs.sh)
test: setup
	./tools/test_programs.sh
	python -m pytest -q -n 2 --dist loadfile

steps: setup
	python -m experiments.steps commit --jobs $(JOBS)

seeds: setup
	python -m experiments.seeds run --seeds $(SEEDS) --jobs $(JOBS)

# the generated tables, and the example report of step 5 against step 4
docs: setup
	python -m tools.docs
	python -m tools.report --base 'HEAD^{/^step-4:}' --head 'HEAD^{/^step-5:}' --out docs/report.md

# Push and pull through the default DVC remote, checked first (docs/sharing.md); over
# SSH, the server's host key must be in $KNOWN_HOSTS (default ~/.ssh/known_hosts).
# DVC_ARGS go on to DVC: targets, --allow-missing, -r NAME (then NAME is the remote checked).
# These targets' recipes read what they are given as shell variables ("$$NAME", set
# through `export`), not pasted into the command line, so that a name with a quote or a
# `;` in it (a branch, a workflow's input) stays a value and never becomes shell code.
DVC_ARGS ?=
push pull: export SHARE_DVC_ARGS = $(DVC_ARGS)
push: setup
	python -m tools.share push -- $$SHARE_DVC_ARGS

pull: setup
	python -m tools.share pull -- $$SHARE_DVC_ARGS

# A sweep split over machines: each pushes its experiments (EXP: names; default all of
# this commit's) to the git remote and the DVC remote, and anyone pulls them all.
GIT_REMOTE ?= origin
EXP ?=
exp-push exp-pull: export SHARE_GIT_REMOTE = $(GIT_REMOTE)
exp-push exp-pull: export SHARE_EXP = $(EXP)
exp-push: setup
	python -m tools.share exp-push "$$SHARE_GIT_REMOTE" $$SHARE_EXP

exp-pull: setup
	python -m tools.share exp-pull "$$SHARE_GIT_REMOTE" $$SHARE_EXP

bench: setup
	python -m benchmarks.train_speed

# What HEAD's committed run did against BASE's, in REPORT and its figures beside it
# (REPORT's name without .md): params and metrics diffs, the curves, the confusion change,
# the digits that changed, `dvc status`. Only the venv: no data, no DVC remote
# (docs/report.md is an example; .github/workflows/report.yml posts it on pull requests).
BASE ?= main
HEAD ?= HEAD
REPORT ?= report.md
report: export REPORT_BASE = $(BASE)
report: export REPORT_HEAD = $(HEAD)
report: export REPORT_OUT = $(REPORT)
report: $(STAMP)
	python -m tools.report --base "$$REPORT_BASE" --head "$$REPORT_HEAD" --out "$$REPORT_OUT"

# The page to draw a digit on (docs/use.md), after `make repro` or `dvc pull`.
# HOST=0.0.0.0 lets other machines reach it: read docs/use.md first.
HOST ?= 127.0.0.1
PORT ?= 8000
serve: setup
	python -m stages.serve --host $(HOST) --port $(PORT)

# The GPU check (docs/gpu.md). No setup: a lent GPU machine has torch but no network
# for requirements.txt, so this runs the first python3 on PATH (the venv's, if any).
GPU_JSON ?= benchmarks/results-gpu.json
GPU_ARGS ?=
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out $(GPU_JSON) $(GPU_ARGS)
